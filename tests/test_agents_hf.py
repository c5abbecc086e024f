"""TransformersGrounder with a tiny RANDOM Qwen2-VL built offline (no download) by
:func:`finetune.tiny_mllm.build_tiny_qwen2vl`.

The model folder is complete: a byte-level BPE tokenizer with Qwen2-VL's special tokens, a Qwen2VLImageProcessor
(small max_pixels so the vision tower sees few patches), a Qwen2-VL-style chat template and random weights, all
saved with ``save_pretrained`` and loaded back by the grounder through ``AutoProcessor`` /
``AutoModelForImageTextToText``. Its replies are garbage, so geometry is checked with generation replaced by known
token ids; everything else (chat template, processor, generate, decoding, frame of the model input) is real.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agents.grounders.base import GroundingResult, build_grounder
from agents.grounders.hf import TransformersGrounder
from medvlm.errors import InputError, MissingDependencyError
from medvlm.io import MedicalImage


@pytest.fixture(scope="module")
def tiny_qwen2vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from finetune.tiny_mllm import build_tiny_qwen2vl

    # the defaults (min_pixels 28*28*4, max_pixels 28*28*16) give the H=56 x W=140 model input asserted below
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny_qwen2vl"))


@pytest.fixture
def image() -> MedicalImage:
    # H=300 x W=600, sent with max_side=200 as H=100 x W=200, which the processor resizes to H=56 x W=140
    return MedicalImage(pixels=np.random.default_rng(0).random((300, 600), dtype=np.float32))


def fake_generate(grounder: TransformersGrounder, reply: str, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Make the loaded model 'generate' ``reply`` (+ end marker) after the prompt; returns the calls' kwargs."""
    import torch

    processor, model = grounder._load()
    new = processor.tokenizer.encode(reply + "<|im_end|>", add_special_tokens=False)
    calls: list[Any] = []

    def generate(**inputs: Any) -> Any:
        calls.append(inputs)
        return torch.cat([inputs["input_ids"], torch.tensor([new])], dim=1)

    monkeypatch.setattr(model, "generate", generate)
    return calls


def test_random_model_runs_end_to_end_and_reply_is_not_parseable(tiny_qwen2vl: Path, image: MedicalImage) -> None:
    grounder = TransformersGrounder(str(tiny_qwen2vl), max_new_tokens=12, max_side=200)
    results = grounder.ground_many(image, ["heart", "left lung"])
    assert [type(r) for r in results] == [GroundingResult, GroundingResult]
    assert [r.phrase for r in results] == ["heart", "left lung"]
    for result in results:
        assert result.regions == []
        assert result.meta["format"] == "unparsed" and result.note.startswith("reply not parseable:")
        assert result.meta["grounder"] == "transformers" and result.meta["model"] == str(tiny_qwen2vl)
        assert result.meta["sent_size"] == [100, 200] and result.meta["model_input_size"] == [56, 140]
        assert "<|im_end|>" not in result.meta["raw"]


def test_qwen2vl_reply_maps_to_original_pixels(tiny_qwen2vl: Path, image: MedicalImage,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    grounder = TransformersGrounder(str(tiny_qwen2vl), max_side=200)
    reply = "<|object_ref_start|>heart<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|>"
    calls = fake_generate(grounder, reply, monkeypatch)
    (result,) = grounder.ground_many(image, ["heart"])
    # per mille of the original 600x300 image: x * 0.6, y * 0.3
    assert [round(v, 6) for v in result.regions[0].box.to_list()] == [60.0, 60.0, 180.0, 120.0]
    assert result.regions[0].label == "heart" and result.meta["format"] == "qwen2vl"
    assert result.meta["raw"] == reply  # box markup kept, end marker removed
    (call,) = calls
    assert call["do_sample"] is False and call["max_new_tokens"] == 256
    assert call["image_grid_thw"].tolist() == [[1, 4, 10]]
    prompt = grounder._load()[0].tokenizer.decode(call["input_ids"][0])
    assert "Locate in this image: heart" in prompt and "200x100 pixels" in prompt
    assert "<|vision_start|><|image_pad|>" in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_qwen25vl_reply_uses_the_processors_input_size(tiny_qwen2vl: Path, image: MedicalImage,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    grounder = TransformersGrounder(str(tiny_qwen2vl), max_side=200)
    fake_generate(grounder, '```json\n[{"bbox_2d": [28, 14, 70, 42], "label": "heart"}]\n```', monkeypatch)
    (result,) = grounder.ground_many(image, ["heart"])
    # model input 140x56 (image_grid_thw 4x10 patches of 14): x * 600/140, y * 300/56
    expected = [28 * 600 / 140, 14 * 300 / 56, 70 * 600 / 140, 42 * 300 / 56]
    assert result.regions[0].box.to_list() == pytest.approx(expected)
    assert result.meta["format"] == "qwen25vl" and result.meta["model_input_size"] == [56, 140]


def test_token_answer_uses_the_trained_template_and_maps_bins_to_pixels(tiny_qwen2vl: Path, image: MedicalImage,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    grounder = TransformersGrounder(str(tiny_qwen2vl), max_side=200, answer="tokens")
    calls = fake_generate(grounder, "heart: <box><loc0256><loc0512><loc0768><loc1023></box>", monkeypatch)
    (result,) = grounder.ground_many(image, ["heart"])
    # bins of 1024 over the original 600 x 300 image (bin b covers [b, b+1) / 1024 of the side)
    box = result.regions[0].box.to_list()
    assert box == pytest.approx([256 / 1024 * 600, 512 / 1024 * 300, 769 / 1024 * 600, 300.0], abs=0.6)
    assert result.meta["format"] == "medvlm" and result.meta["template"] == "grounding_tokens/v1"
    prompt = grounder._load()[0].tokenizer.decode(calls[0]["input_ids"][0])
    assert "Locate the heart in this image." in prompt and "pixels" not in prompt
    with pytest.raises(InputError, match="answer"):
        TransformersGrounder(str(tiny_qwen2vl), answer="xml")


def test_missing_model_names_the_cli_option() -> None:
    with pytest.raises(InputError, match="--llm-model"):
        TransformersGrounder(None)
    with pytest.raises(InputError, match="--llm-model"):
        TransformersGrounder("  ")


def test_unloadable_model_folder_is_an_input_error(tmp_path: Path, image: MedicalImage) -> None:
    pytest.importorskip("transformers")
    grounder = TransformersGrounder(str(tmp_path / "absent"))
    with pytest.raises(InputError, match="--llm-model"):
        grounder.ground_many(image, ["heart"])


def test_without_transformers_says_what_to_install(monkeypatch: pytest.MonkeyPatch, image: MedicalImage) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    grounder = TransformersGrounder("some/model")
    with pytest.raises(MissingDependencyError, match=r"pip install 'medvlm\[text\]'"):
        grounder.ground_many(image, ["heart"])


def test_build_grounder_preset(tiny_qwen2vl: Path) -> None:
    grounder = build_grounder("transformers", model=str(tiny_qwen2vl))
    assert isinstance(grounder, TransformersGrounder) and grounder.name == "transformers"


@pytest.mark.slow
@pytest.mark.data
def test_eval_grounding_runs_an_llm_grounder_on_the_held_out_split(tiny_qwen2vl: Path, tmp_path: Path) -> None:
    """`medvlm eval grounding --grounder transformers --llm-answer tokens`: the held-out split is the shipped
    Med-VLM one although the LLM has no Med-VLM checkpoint; a random model finds nothing, and says so per phrase."""
    import json

    from medvlm.app.cli import main
    from tests.conftest import data_dir

    out = tmp_path / "g.json"
    assert main(["eval", "grounding", "--data", str(data_dir("cxr_jsrt_scr")), "--limit", "1", "--type", "structure",
                 "--grounder", "transformers", "--llm-model", str(tiny_qwen2vl), "--llm-answer", "tokens",
                 "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["grounder"] == "transformers" and payload["split"] == "val" and payload["n_trained_on"] == 0
    structure = payload["per_type"]["structure"]
    assert structure["n"] == 30 and structure["n_missing"] == 30 and structure["miou"] == 0.0
