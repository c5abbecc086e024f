"""Text-guided segmentation with a trained Med-VLM checkpoint, behind the same protocol as the promptable ones.

``MedVLMSegmenter.encode(image)`` runs the whole image encoder (frozen base + LoRA) once; every text prompt
then costs one text-encoder + mixer + decoder pass on the cached features. Masks come back at the original
resolution (pixel grid of the input image), like the promptable backends' masks.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from medvlm.coords import letterbox_frame
from medvlm.errors import input_error
from medvlm.types import Mask
from segmentation.base import ImageEmbedding, ImageInput, Prompt, SegmentationResult, SegmenterBase, as_rgb_uint8

__all__ = ["DEFAULT_CHECKPOINT_ENV", "MedVLMSegmenter", "default_checkpoint_dir", "expand_text"]

DEFAULT_CHECKPOINT_ENV = "MEDVLM_TEXTSEG_CHECKPOINT"


def default_checkpoint_dir() -> Path:
    """The checkpoint shipped in the package (``segmentation/textseg/weights/default``), or
    ``$MEDVLM_TEXTSEG_CHECKPOINT`` when set."""
    env = os.environ.get(DEFAULT_CHECKPOINT_ENV)
    if env:
        return Path(env)
    return Path(str(resources.files("segmentation.textseg").joinpath("weights", "default")))


def expand_text(text: str, level: str = "complex", modality: str | None = None) -> tuple[str, str | None]:
    """A user phrase -> the text the model reads, and the canonical structure it names (or None).

    A phrase that names a known structure or one of its synonyms ("cardiac silhouette") is replaced by that
    structure's description at ``level`` (the model was trained on those); any other text, such as a
    description the user wrote, is passed through unchanged.
    """
    from prompts.anatomy import describe, resolve_structure

    name = resolve_structure(text)
    if name is None or level == "verbatim":
        return text, name
    return describe(name, "simple" if level == "simple" else "complex", modality=modality), name


@functools.lru_cache(maxsize=2)
def _load(directory: str, device: str) -> tuple[Any, dict[str, Any]]:
    from segmentation.textseg.checkpoint import load_medvlm

    return load_medvlm(directory, device)


class MedVLMSegmenter(SegmenterBase):
    """Med-VLM text-guided segmenter. Prompts carry ``text``; boxes and points are rejected.

    ``checkpoint``: a folder written by ``save_medvlm`` (default: :func:`default_checkpoint_dir`).
    ``text_level``: how a known structure name is expanded before the model reads it (``complex`` = the
    description the default checkpoint was mostly trained with, ``simple``, or ``verbatim`` = no expansion).
    """

    name = "medvlm"
    accepts_geometry = False
    accepts_text = True
    max_batch = 8

    def __init__(self, checkpoint: str | Path | None = None, *, device: str = "cpu", text_level: str = "complex",
                 threshold: float = 0.5) -> None:
        directory = Path(checkpoint) if checkpoint is not None else default_checkpoint_dir()
        if text_level not in ("complex", "simple", "verbatim"):
            raise input_error("text_level", expected="'complex', 'simple' or 'verbatim'", received=repr(text_level),
                              fix="use 'complex' (default)")
        self.checkpoint = str(directory)
        self.device = device
        self.text_level = text_level
        self.threshold = threshold
        self.model, self.meta = _load(str(directory.resolve()), device)
        self._lock = threading.Lock()

    @property
    def weights(self) -> str:
        return self.checkpoint

    def encode(self, image: ImageInput) -> ImageEmbedding:
        import torch

        rgb = as_rgb_uint8(image)
        height, width = rgb.shape[:2]
        t0 = time.perf_counter()
        encoder = self.model.image_encoder
        chw, content = encoder.preprocess(rgb)
        with self._lock, torch.inference_mode():
            features = encoder(torch.from_numpy(chw)[None].to(self.device))
        size = encoder.config.image_size
        modality = getattr(image, "modality", None)
        return ImageEmbedding(backend=self.name, original_size=(height, width), features=features,
                              frame=letterbox_frame(height, width, size),
                              extra={"input_size": size, "content_shape": content, "modality": modality,
                                     "encode_s": time.perf_counter() - t0})

    def _decode(self, embedding: ImageEmbedding, prompts: Sequence[Prompt],
                multimask: bool) -> list[SegmentationResult]:
        import torch
        import torch.nn.functional as F

        model = self.model
        modality = embedding.extra.get("modality")
        expanded = [expand_text(str(p.text), self.text_level, modality) for p in prompts]
        texts = [t for t, _ in expanded]
        n = len(prompts)
        with self._lock, torch.inference_mode():
            ids, mask = model.text_encoder.tokenize(texts, self.device)
            feats = embedding.features.expand(n, -1, -1, -1)
            logits = model.forward_encoded(feats, ids, mask)[:, 0]  # (n, S, S)
            probs = torch.sigmoid(logits)
            ch, cw = embedding.extra["content_shape"]
            height, width = embedding.original_size
            results = []
            for i, prompt in enumerate(prompts):
                up = F.interpolate(logits[i, :ch, :cw][None, None], size=(height, width), mode="bilinear",
                                   align_corners=False)[0, 0]
                binary = (torch.sigmoid(up) > self.threshold).cpu().numpy()
                inside = probs[i, :ch, :cw]
                sel = inside > self.threshold
                # mean foreground probability of the predicted mask: a confidence in [0, 1], 0 when empty
                score = float(inside[sel].mean()) if bool(sel.any()) else 0.0
                results.append(SegmentationResult(
                    mask=Mask(np.asarray(binary, dtype=bool)), score=score,
                    logits=logits[i].float().cpu().numpy(), prompt=prompt,
                    meta={"backend": self.name, "text_read": texts[i], "structure": expanded[i][1],
                          "text_level": self.text_level, "logits_frame": embedding.frame.name},
                ))
        return results
