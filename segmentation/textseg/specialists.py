"""Specialists: checkpoints that answer one kind of image for a broader checkpoint, on its image features.

A broad checkpoint (``multi``) splits one small mixer and decoder between every kind of image, so a kind with many
training images but few of the batches stays under-trained (the 190 HC18 training images were ~4 % of multi's
batches). A *specialist* is a checkpoint fine-tuned from it on one kind. Trained with the image encoder frozen
(``train_modules`` without ``image_encoder.``), its image features are the broad checkpoint's bit for bit, so an
image the broad checkpoint has encoded is handed over without a second encoder pass: only the text encoder,
mixer, decoder and existence head differ. A specialist that adapted its image encoder too (finetune
``image_lora_stages``; :func:`shares_image_encoder` is False) encodes the images handed to it itself: one more
encoder pass for those images. Either way the broad checkpoint's kind classifier, on its own features, decides.

File ``specialists.json`` in the broad checkpoint's folder::

    {"kinds": {"fetal_us": "fetal_us"}, "min_confidence": 0.9, "why": "..."}

``kinds`` maps a kind of image (:data:`medvlm.datasets.kinds.KIND_STRUCTURES`) to a checkpoint: a folder
relative to the broad one's parent (so packaged checkpoints name each other, e.g. ``fetal_us`` next to
``multi``), a path, or a packaged name. The broad checkpoint's kind classifier picks the specialist when it gives
that kind at least ``min_confidence``; every other image stays with the broad checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medvlm.errors import input_error

__all__ = ["SPECIALISTS_FILE", "image_encoder_tensors", "read_specialists", "shares_image_encoder"]

SPECIALISTS_FILE = "specialists.json"


def read_specialists(directory: str | Path, resolve: Callable[[str], Path]) -> dict[str, Any] | None:
    """The validated ``specialists.json`` of checkpoint folder ``directory``: ``{"kinds": {kind: folder Path},
    "min_confidence": float}``, or None when the folder has none. ``resolve``: a packaged name or path -> folder
    (the predictor's ``resolve_checkpoint``). Raises a clear error for a malformed file, an unknown kind, a missing
    target or a target that is ``directory`` itself."""
    from medvlm.datasets.kinds import KIND_STRUCTURES

    path = Path(directory) / SPECIALISTS_FILE
    if not path.is_file():
        return None
    expected = ('{"kinds": {"<kind of image>": "<checkpoint folder or packaged name>"}, "min_confidence": 0.9} '
                f"with kinds among {sorted(KIND_STRUCTURES)}")
    try:
        spec = json.loads(path.read_text())
    except ValueError as exc:
        raise input_error("Med-VLM specialists", expected="JSON", received=f"{path}: {exc}",
                          fix="fix or delete it") from exc
    kinds = spec.get("kinds") if isinstance(spec, dict) else None
    confidence = spec.get("min_confidence", 0.9) if isinstance(spec, dict) else None
    if (not isinstance(kinds, dict) or not kinds or any(k not in KIND_STRUCTURES for k in kinds)
            or not all(isinstance(v, str) and v for v in kinds.values())
            or not isinstance(confidence, (int, float)) or not 0 <= confidence <= 1):
        raise input_error("Med-VLM specialists", expected=expected, received=f"{path}: {spec!r}"[:300],
                          fix="fix or delete it")
    resolved: dict[str, Path] = {}
    for kind, name in kinds.items():
        sibling = Path(directory).resolve().parent / name
        target = sibling if (sibling / "config.json").is_file() else resolve(name)
        if not (target / "config.json").is_file():
            raise input_error("Med-VLM specialists", expected=f"a checkpoint folder for kind {kind!r}",
                              received=f"{name!r} (looked at {sibling} and {target})",
                              fix=f"train one (finetune init_from this checkpoint) or delete {path}")
        if target.resolve() == Path(directory).resolve():
            raise input_error("Med-VLM specialists", expected="another checkpoint than the broad one",
                              received=f"{kind}: {name}", fix="name the specialist's folder")
        resolved[kind] = target
    return {"kinds": resolved, "min_confidence": float(confidence)}


def image_encoder_tensors(directory: str | Path) -> dict[str, np.ndarray]:
    """The trained image-encoder tensors (its LoRA; the frozen base is not stored) of a checkpoint folder, by name."""
    from safetensors import safe_open

    from segmentation.textseg.checkpoint import WEIGHTS_NAME

    with safe_open(str(Path(directory) / WEIGHTS_NAME), framework="np") as f:  # reads only these tensors
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith("image_encoder.")}  # noqa: SIM118 (no __iter__)


def shares_image_encoder(broad: str | Path, specialist: str | Path) -> bool:
    """Whether two checkpoints have the same image encoder: the same ``image_encoder`` config and the same stored
    tensors, bit for bit (then their image features are the same and one's embedding serves the other)."""
    from segmentation.textseg.checkpoint import read_checkpoint_config

    a_cfg, b_cfg = read_checkpoint_config(broad)[0], read_checkpoint_config(specialist)[0]
    if a_cfg.image_encoder != b_cfg.image_encoder:
        return False
    a, b = image_encoder_tensors(broad), image_encoder_tensors(specialist)
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
