"""Refinement: pass regions to a promptable segmenter (LiteMedSAM, SAM2) and keep its masks.

Used by ``medvlm segment --text ... --refine`` (Med-VLM masks -> their boxes) and by the grounding agent
(LLM boxes and points -> masks). The image is encoded once for all regions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medvlm.types import Region

__all__ = ["refine_regions"]


def refine_regions(refiner: Any, image: Any, regions: Sequence[Region], *, indices: Sequence[int] | None = None,
                   with_points: bool = False) -> list[Region]:
    """Prompt ``refiner`` with the box (pixel xyxy of ``image``, clipped to it) of each region in ``indices``
    (default: all), plus the region's points when ``with_points``; return the regions with the refined masks.

    A refined region takes the refiner's mask, box and score; its provenance records ``refined_by``,
    ``refine_prompt`` and ``score_before_refinement``. A region whose refined mask comes back empty stays as it is.
    """
    from segmentation.base import Prompt

    todo = list(range(len(regions))) if indices is None else list(indices)
    out = list(regions)
    if not todo:
        return out
    prompts = [Prompt(box=regions[i].box.clip(image.width, image.height),
                      points=regions[i].points if with_points else None) for i in todo]
    for i, prompt, result in zip(todo, prompts, refiner.segment(image, prompts)):
        r = regions[i]
        box = result.mask.to_box()
        if box is None:
            continue
        out[i] = Region(box=box, label=r.label, mask=result.mask, points=r.points, score=float(result.score),
                        checks=r.checks, provenance={**r.provenance, "refined_by": refiner.name,
                                                     "refine_prompt": prompt.to_json(),
                                                     "score_before_refinement": r.score})
    return out
