"""From command-line or HTTP prompt arguments to segmentation Prompts, and from a segmenter's results to Regions.

Shared by ``medvlm segment`` and the server's ``/v1/segment`` (one home, so both build the same prompts and give
the same regions). Coordinates are pixel xyxy of the original image (left top right bottom), floats.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medvlm.errors import input_error
from medvlm.types import Box, Points, Region
from segmentation.base import Prompt


def build_prompts(boxes: Sequence[Sequence[float]], positive: Sequence[Sequence[float]],
                  negative: Sequence[Sequence[float]], labels: Sequence[str]) -> tuple[list[Any], list[str]]:
    """CLI prompt arguments -> (list of segmentation.base.Prompt, one label per prompt).

    Each box is one prompt. Points join the box when there is exactly one box, or form one prompt of their
    own when there is none; with several boxes, which box a point belongs to would be a guess, so it is an error.
    """
    points = Points.from_lists(positive, negative) if (positive or negative) else None
    if not boxes and points is None:
        raise input_error("segment prompts", expected="at least one --box, --point or --negative-point",
                          received="no prompt", fix="add e.g. --box 120 80 480 620 (pixels: left top right bottom)")
    if len(boxes) > 1 and points is not None:
        raise input_error("segment prompts", expected="points together with at most one --box",
                          received=f"{len(boxes)} boxes and {len(points)} points",
                          fix="run one command per box when you add points to a box")
    if labels and len(labels) != max(1, len(boxes)):
        raise input_error("--label", expected=f"one label per box ({len(boxes)})", received=f"{len(labels)} labels",
                          fix="give one --label per --box, in the same order")
    prompts = [Prompt(box=Box.from_list(b), points=points) for b in boxes] if boxes else [Prompt(points=points)]
    names = list(labels) if labels else [f"region {k}" for k in range(1, len(prompts) + 1)]
    return prompts, names


def text_prompts(texts: Sequence[str], labels: Sequence[str]) -> tuple[list[Any], list[str]]:
    """``--text`` arguments -> (text Prompts, one label per text: the --label or the text itself)."""
    if labels and len(labels) != len(texts):
        raise input_error("--label", expected=f"one label per --text ({len(texts)})", received=f"{len(labels)} labels",
                          fix="give one --label per --text, in the same order, or none")
    return [Prompt(text=t) for t in texts], list(labels) if labels else [t.strip() for t in texts]


def segment_to_regions(segmenter: Any, image: Any, prompts: Sequence[Any], labels: Sequence[str]) -> list[Region]:
    """Encode ``image`` once, decode every prompt, and wrap the masks as Regions with provenance."""
    results = segmenter.segment(image, prompts)
    regions = []
    for result, label, prompt in zip(results, labels, prompts):
        box = result.mask.to_box()
        prompt_json: dict[str, Any] = {}
        if prompt.box is not None:
            prompt_json["box"] = prompt.box.to_list()
        if prompt.points is not None:
            prompt_json["points"] = prompt.points.to_json()
        if prompt.text is not None:
            prompt_json["text"] = prompt.text
            if result.meta.get("structure"):
                prompt_json["structure"] = result.meta["structure"]
        provenance: dict[str, Any] = {"model": segmenter.name, "prompt": prompt_json}
        if "found" in result.meta:  # a checkpoint with an existence head: "not in this image" is an answer
            provenance["found"] = bool(result.meta["found"])
            if result.meta.get("existence") is not None:
                provenance["existence"] = round(float(result.meta["existence"]), 4)
            if result.meta.get("routed_to"):  # the default hands non-radiographs to the multi-modality model
                provenance["checkpoint"] = Path(result.meta["routed_to"]).name
            if result.meta.get("specialist"):  # ... and multi hands a kind it has a specialist for to that one
                provenance["checkpoint"] = Path(result.meta["specialist"]).name
            if result.meta.get("image_kind") is not None:  # a checkpoint with a kind classifier
                provenance["image_kind"] = result.meta["image_kind"]
                provenance["ruled_out_by_kind"] = bool(result.meta.get("ruled_out_by_kind"))
        if result.meta.get("postprocess"):  # what the checkpoint's postprocess.json did to this mask
            provenance["postprocess"] = list(result.meta["postprocess"])
            provenance["pixels_before_postprocess"] = int(result.meta.get("pixels_before_postprocess", 0))
        regions.append(Region(
            box=box if box is not None else prompt.box or Box(0, 0, 0, 0),
            label=label, mask=result.mask, points=prompt.points, score=float(result.score),
            provenance=provenance,
        ))
    return regions
