"""Reference-guided segmentation jobs: one reference (image + mask or box), many targets.

Two ways to find the structure in a target, both ending in a mask in pixels of the ORIGINAL target image:

- embedded, offline, training-free: :class:`segmentation.refseg.ReferenceSegmenter` (label transfer on
  LiteMedSAM features; one reference encoding serves every target);
- MLLM (RAU): a model fine-tuned by ``medvlm train mllm`` (task ``reference_pair``) gets the reference image, the
  reference box as location tokens and the target image in one request (the ``reference_pair`` template it was
  trained on, answer held to the token syntax by vLLM's regex), and its target box drives LiteMedSAM.

A consistency check compares sides: a structure named left/right whose target centroid falls on the other half
of the image than on the reference is flagged (``checks["laterality"] = "differs from the reference"``).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import numpy.typing as npt

from agents.llm import OpenAIChatClient, image_data_url
from agents.parsing import parse_grounding
from medvlm.errors import input_error
from medvlm.tokens import encode_box
from medvlm.types import Box, Mask, Region
from prompts.templates import load_templates

__all__ = ["add_reference", "laterality_check", "llm_reference_box", "reference_mask_from_file", "transfer_region"]

_SIDE = re.compile(r"\b(left|right)\b", re.I)


def reference_mask_from_file(path: str | bytes, shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """A mask image (PNG/JPEG/...: structure brighter than half the maximum), given as a path or the file's bytes
    (an upload), as bool ``(H, W)``; it must have the reference's ``shape``."""
    from medvlm.io import load_image

    source = "the uploaded mask" if isinstance(path, (bytes, bytearray)) else str(path)
    pixels = load_image(path).pixels
    if pixels.shape != tuple(shape):
        raise input_error("--reference-mask", expected=f"a mask of the reference's size {shape[0]}x{shape[1]} (HxW)",
                          received=f"{pixels.shape[0]}x{pixels.shape[1]} from {source}",
                          fix="pass the mask drawn on this very reference image")
    top = float(pixels.max())
    mask = pixels > top / 2 if top > 0 else np.zeros(pixels.shape, bool)
    if not mask.any():
        raise input_error("--reference-mask", expected="a mask with the structure in white", received=f"an empty "
                          f"mask ({source})", fix="check the file: structure pixels must be bright (e.g. 255)")
    return np.asarray(mask, bool)


def llm_reference_box(client: OpenAIChatClient, reference: Any, reference_box: Box, target: Any, name: str, *,
                      max_side: int = 512, max_tokens: int = 64) -> tuple[Box | None, dict[str, Any]]:
    """Ask a fine-tuned MLLM for ``name`` in ``target`` given ``reference`` with ``reference_box`` (pixel xyxy of
    the reference). Returns (box in pixels of the original target or None, provenance)."""
    from agents.grounders.openai import TOKEN_ANSWER_REGEX

    rh, rw = reference.shape
    text = load_templates("1")["reference_pair"].render(name=name, box=encode_box(reference_box, rh, rw))[-1]
    ref_url, _ = image_data_url(reference.to_rgb_uint8(), max_side=max_side)
    tgt_url, sent = image_data_url(target.to_rgb_uint8(), max_side=max_side)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ref_url}},
                                             {"type": "image_url", "image_url": {"url": tgt_url}},
                                             {"type": "text", "text": text["content"]}]}]
    reply = client.chat(messages, structured_outputs={"regex": TOKEN_ANSWER_REGEX}, max_tokens=max_tokens)
    parsed = parse_grounding(reply, image_size=target.shape, sent_size=sent, fmt="medvlm")
    box = parsed.regions[0].box if parsed.regions else None
    return box, {"method": "mllm reference pair", "model": client.model, "raw": reply[:500],
                 "warnings": parsed.warnings, "structured_output": client.last_structured}


def laterality_check(name: str, reference_mask: npt.NDArray[np.bool_], target: Region) -> dict[str, Any]:
    """Compare on which half of the image (by centroid column) the structure lies on reference and target; only for
    names with a side."""
    if not _SIDE.search(name) or target.mask is None or target.mask.is_empty():
        return {}
    ref_half = _half(reference_mask)
    tgt_half = _half(target.mask.data)
    verdict = "same side as the reference" if ref_half == tgt_half else "differs from the reference"
    return {"laterality": verdict, "reference_half": ref_half, "target_half": tgt_half}


def _half(mask: npt.NDArray[np.bool_]) -> str:
    cols = np.nonzero(mask)[1]
    return "image left" if cols.mean() < mask.shape[1] / 2 else "image right"


def as_region(name: str, mask: Mask | None, box: Box | None, score: float | None,
              provenance: dict[str, Any]) -> Region | None:
    """A Region of a found structure (None when nothing was found)."""
    if box is None:
        return None
    return Region(box=box, label=name, mask=mask, score=score, provenance=provenance)


def add_reference(rs: Any, reference: Any, name: str, *, mask: npt.NDArray[np.bool_] | None = None,
                  box: Box | None = None) -> npt.NDArray[np.bool_]:
    """Give ``rs`` (a :class:`segmentation.refseg.ReferenceSegmenter`) the structure ``name`` of ``reference``,
    as a bool mask ``(H, W)`` or a box (pixel xyxy of the reference, segmented by ``rs``'s LiteMedSAM on the same
    encoding); returns the reference mask used. Exactly one of ``mask`` / ``box``; an empty result is an InputError.
    """
    if (mask is None) == (box is None):
        raise input_error("reference", expected="a reference mask or a reference box (exactly one)",
                          received=f"mask {'given' if mask is not None else 'missing'}, box "
                          f"{'given' if box is not None else 'missing'}",
                          fix="pass --reference-mask MASK or --reference-box X0 Y0 X1 Y1")
    used = rs.add_reference(reference, {name: mask} if mask is not None else None,
                            boxes={name: box} if box is not None else None)
    return np.asarray(used[name], dtype=bool)


def transfer_region(rs: Any, target: Any, name: str, reference_mask: npt.NDArray[np.bool_]) -> Region | None:
    """The structure ``name`` found by ``rs`` in ``target`` as a Region in pixels of the original target (None
    when not found), with the laterality check against ``reference_mask``."""
    result = rs.segment(target)[name]
    region = as_region(name, result.mask, result.box, result.score, {"method": "label transfer", **result.meta})
    if region is not None:
        region.checks.update(laterality_check(name, reference_mask, region))
    return region
