"""End-to-end CLI tests: real LiteMedSAM weights on the bundled image and on real JSRT data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvlm.app.cli import main
from medvlm.assets import asset_path
from tests.conftest import data_dir


def test_help_lists_every_command_without_loading_torch() -> None:
    code = ("import sys; from medvlm.app.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'medvlm --help imported torch'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for command in ("segment", "demo", "eval", "bench", "models", "ask", "link-report", "batch"):
        assert command in out


def test_segment_writes_masks_overlay_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = asset_path("nih_cxr14_00009745_000.png")
    spec = json.loads(asset_path("demo.json").read_text())
    heart, rlung = spec["regions"][0]["box"], spec["regions"][1]["box"]
    argv = ["segment", str(image), "--box", *map(str, heart), "--box", *map(str, rlung),
            "--label", "heart", "--label", "right lung", "--out", str(tmp_path)]
    assert main(argv) == 0
    stem = "nih_cxr14_00009745_000"
    payload = json.loads((tmp_path / f"{stem}.json").read_text())
    assert payload["size"] == [1024, 1024]
    assert [r["label"] for r in payload["regions"]] == ["heart", "right lung"]
    for k, region in enumerate(payload["regions"], start=1):
        assert region["model"] == "litemedsam"
        assert region["prompt"]["box"] == [float(v) for v in (heart if k == 1 else rlung)]
        mask = np.array(Image.open(tmp_path / region["mask"]))
        assert mask.shape == (1024, 1024) and set(np.unique(mask)) <= {0, 255}
        assert region["area_px"] == int((mask > 0).sum()) > 10_000
        x0, y0, x1, y1 = region["box"]
        px0, py0, px1, py1 = region["prompt"]["box"]
        # the mask's tight box stays (nearly) inside its prompt box
        assert x0 >= px0 - 20 and y0 >= py0 - 20 and x1 <= px1 + 20 and y1 <= py1 + 20
        assert 0.0 <= region["score"] <= 1.0
    overlay = np.array(Image.open(tmp_path / f"{stem}.overlay.png"))
    assert overlay.shape == (1024, 1024, 3)
    # an overlay with colour: gray input pixels have R == G == B, drawn pixels do not
    assert (np.ptp(overlay.astype(int), axis=2) > 30).mean() > 0.01
    assert "heart" in capsys.readouterr().out


def test_segment_bad_inputs_exit_2_with_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    assert main(["segment", str(bad), "--box", "0", "0", "5", "5", "--out", str(tmp_path)]) == 2
    assert "broken.png" in capsys.readouterr().err
    image = str(asset_path("nih_cxr14_00009745_000.png"))
    assert main(["segment", image, "--out", str(tmp_path)]) == 2
    assert "at least one --box" in capsys.readouterr().err
    assert main(["segment", image, "--box", "10", "10", "5", "50", "--out", str(tmp_path)]) == 2
    assert "x0 <= x1" in capsys.readouterr().err
    assert main(["segment", image, "--box", "0", "0", "5000", "50", "--out", str(tmp_path)]) == 2
    assert "1024" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_asks_links_a_report_and_finds_the_liver(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`medvlm demo` runs the main job on the embedded default: two chat questions on the chest X-ray (text-guided
    masks, anatomy-checked), a two-sentence report linked to it, and the liver on the CT slice."""
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Q: where is the heart?" in out and "Q: where is the liver?" in out
    assert "where the phrase places the pneumothorax" in out  # a zone, never a detected pneumothorax
    payload = json.loads((tmp_path / "ask" / "nih_cxr14_00009745_000.json").read_text())
    heart, apex = payload["regions"]
    assert heart["label"] == "heart" and heart["mask"]
    # the right apical zone is on the image left (patient's right) and in the upper third of the image
    x0, _y0, x1, y1 = apex["box"]
    assert (x0 + x1) / 2 < 512 and y1 < 1024 / 3
    report = json.loads((tmp_path / "report" / "nih_cxr14_00009745_000.json").read_text())
    assert [s["status"] for s in report["sentences"]] == ["grounded", "negated"]
    ct = json.loads((tmp_path / "ct" / "ct_amos_0006_90.json").read_text())
    (liver,) = ct["regions"]
    assert (liver["box"][0] + liver["box"][2]) / 2 < 256  # the patient's right: the image left
    for sub in ("ask", "report", "ct"):
        assert list((tmp_path / sub).glob("*.overlay.png"))


def test_eval_oracle_box_json_shape_and_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = data_dir("cxr_jsrt_scr")
    out_json = tmp_path / "oracle.json"
    report = tmp_path / "report"
    assert main(["eval", "oracle-box", "--data", str(data), "--limit", "2", "--json", str(out_json),
                 "--report", str(report)]) == 0
    payload = json.loads(out_json.read_text())
    assert payload["suite"] == "oracle-box" and payload["method"] == "litemedsam" and payload["n_images"] == 2
    assert set(payload["per_structure"]) == {"heart", "right lung", "left lung", "right clavicle", "left clavicle"}
    for _name, m in payload["per_structure"].items():
        assert set(m) >= {"dice", "hd95_mm", "asd_mm", "n"} and m["n"] == 2
        assert 0.0 <= m["dice"] <= 1.0
    # real pretrained weights given the perfect box: lungs are easy
    assert payload["per_structure"]["right lung"]["dice"] > 0.85
    assert payload["per_structure"]["left lung"]["dice"] > 0.85
    assert payload["per_structure"]["heart"]["hd95_mm"] > 0.0
    table = capsys.readouterr().out
    assert "HD95 mm" in table and "right clavicle" in table
    assert (report / "report.md").is_file() and (report / "per_structure.png").is_file()
    assert len(list(report.glob("worst_*.png"))) >= 5


def test_models_lists_presets_and_presence(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert by_name["litemedsam"]["present"] is True
    assert "sam2" in by_name and by_name["sam2"]["how_to_get"]
    grounders = [r["name"] for r in rows if r["kind"] == "grounder"]
    assert grounders == ["medvlm", "openai", "transformers", "mini"]
    assert "agents/weights/mini" in by_name["mini"]["source"] and by_name["mini"]["how_to_get"]


@pytest.fixture(scope="module")
def tiny_textseg_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Med-VLM saved as a checkpoint: plumbing of the text path, not its quality."""
    import torch

    from segmentation.textseg.checkpoint import save_medvlm
    from segmentation.textseg.config import tiny_test_config
    from segmentation.textseg.model import build_medvlm

    torch.manual_seed(0)
    return save_medvlm(build_medvlm(tiny_test_config()), tmp_path_factory.mktemp("tiny") / "ckpt")


def test_segment_text_prompts_share_one_encoding(tiny_textseg_checkpoint: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    image = str(asset_path("nih_cxr14_00009745_000.png"))
    texts = ["heart", "left lung", "right lung", "left clavicle", "the cardiac silhouette"]
    argv = ["segment", image, *[a for t in texts for a in ("--text", t)], "--checkpoint",
            str(tiny_textseg_checkpoint), "--out", str(tmp_path)]
    from segmentation.textseg.predictor import MedVLMSegmenter

    calls = {"n": 0}
    original = MedVLMSegmenter.encode

    def counting(self, img):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return original(self, img)

    MedVLMSegmenter.encode = counting  # type: ignore[method-assign]
    try:
        assert main(argv) == 0
    finally:
        MedVLMSegmenter.encode = original  # type: ignore[method-assign]
    assert calls["n"] == 1
    payload = json.loads((tmp_path / "nih_cxr14_00009745_000.json").read_text())
    assert [r["label"] for r in payload["regions"]] == texts
    assert [r["prompt"]["text"] for r in payload["regions"]] == texts
    assert payload["regions"][4]["prompt"]["structure"] == "heart"
    assert all(r["model"] == "medvlm" for r in payload["regions"])
    for region in payload["regions"]:
        assert np.array(Image.open(tmp_path / region["mask"])).shape == (1024, 1024)


def test_segment_text_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = str(asset_path("nih_cxr14_00009745_000.png"))
    assert main(["segment", image, "--text", "heart", "--box", "1", "1", "9", "9", "--out", str(tmp_path)]) == 2
    assert "either --text prompts or --box" in capsys.readouterr().err
    assert main(["segment", image, "--box", "1", "1", "9", "9", "--refine", "litemedsam", "--out",
                 str(tmp_path)]) == 2
    assert "--refine" in capsys.readouterr().err
    assert main(["segment", image, "--text", "  ", "--out", str(tmp_path)]) == 2
    assert "non-empty phrase" in capsys.readouterr().err
    assert main(["segment", image, "--text", "heart", "--checkpoint", str(tmp_path / "nope"), "--out",
                 str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_segment_text_refined_by_litemedsam_with_shipped_checkpoint(tmp_path: Path) -> None:
    image = str(asset_path("nih_cxr14_00009745_000.png"))
    assert main(["segment", image, "--text", "heart", "--text", "right lung", "--refine", "litemedsam",
                 "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "nih_cxr14_00009745_000.json").read_text())
    assert payload["model"] == "medvlm+litemedsam"
    for region in payload["regions"]:
        assert region["refined_by"] == "litemedsam" and len(region["refine_prompt"]["box"]) == 4
        assert region["area_px"] > 10_000
    heart, rlung = payload["regions"]
    assert (rlung["box"][0] + rlung["box"][2]) / 2 < 512  # patient's right lung on the image left
    assert 300 < (heart["box"][0] + heart["box"][2]) / 2 < 750


@pytest.mark.parametrize("answer", ["tokens", "json"])
def test_llm_answer_option_reaches_the_openai_grounder(answer: str) -> None:
    from agents.grounders.openai import OpenAIGrounder
    from agents.llm import OpenAIChatClient
    from medvlm.app.agent_commands import build_agent
    from medvlm.app.cli import build_parser

    url = "http://127.0.0.1:9/v1"  # never contacted: building the agent sends no request
    args = build_parser().parse_args(["ask", "x.png", "where is the heart?", "--grounder", "openai", "--llm-url", url,
                                      "--llm-model", "tuned", "--llm-answer", answer])
    assert args.llm_answer == answer
    agent = build_agent(args)
    assert isinstance(agent.grounder, OpenAIGrounder)
    assert agent.grounder.answer == answer and agent.grounder.model == "tuned"
    assert agent.grounder.template.name == ("grounding_tokens" if answer == "tokens" else "grounding")
    if answer == "tokens":
        assert agent.llm is None  # a token model is no chat model: phrases come from the rule-based extractor
    else:
        assert isinstance(agent.llm, OpenAIChatClient) and agent.llm.base_url == url and agent.llm.model == "tuned"


def test_llm_answer_option_reaches_the_transformers_grounder() -> None:
    from medvlm.app.agent_commands import build_agent
    from medvlm.app.cli import build_parser

    args = build_parser().parse_args(["ask", "x.png", "q", "--grounder", "transformers", "--llm-model", "/m",
                                      "--llm-answer", "tokens"])
    agent = build_agent(args)  # the model loads on first use, not here
    assert agent.grounder.answer == "tokens" and agent.grounder.template.name == "grounding_tokens"


def test_llm_answer_defaults_to_json_and_rejects_other_values(capsys: pytest.CaptureFixture[str]) -> None:
    from medvlm.app.cli import build_parser

    assert build_parser().parse_args(["ask", "x.png", "q"]).llm_answer == "json"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ask", "x.png", "q", "--llm-answer", "xml"])
    assert "--llm-answer" in capsys.readouterr().err
