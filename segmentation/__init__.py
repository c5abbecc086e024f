"""Promptable segmentation (box / points -> pixel mask): encode an image once, decode many prompts.

Importing this package does not import torch; backends load when built::

    from segmentation import Prompt, build_segmenter
    seg = build_segmenter("litemedsam")
    emb = seg.encode(image)                      # MedicalImage or (H, W[, 3]) uint8 array
    res = seg.predict(emb, Prompt(box=Box(x0, y0, x1, y1)))
    res.mask.data                                # (H, W) bool at the original resolution
"""

from segmentation.base import ImageEmbedding, Prompt, PromptableSegmenter, SegmentationResult
from segmentation.registry import SEGMENTERS, build_segmenter

__all__ = [
    "SEGMENTERS",
    "ImageEmbedding",
    "Prompt",
    "PromptableSegmenter",
    "SegmentationResult",
    "build_segmenter",
]
