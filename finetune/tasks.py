"""Chat SFT examples for the multimodal LLM, built from the dataset readers' samples.

Every example is TRL's conversational prompt-completion format, so the loss falls on the answer only::

    {"prompt": [{"role": "user", "content": [{"type": "image"}, ..., {"type": "text", "text": ...}]}],
     "completion": [{"role": "assistant", "content": [{"type": "text", "text": ...}]}],
     "images": [path, ...], "task": str, "meta": {...}}

Boxes and masks in answers are location tokens (:mod:`medvlm.tokens`): a box is ``<box>`` + 4 ``<locNNNN>``
(x0 y0 x1 y1, 1024 bins of the image it belongs to), a mask is ``<poly>`` groups. Builders:

- :func:`anatomy_grounding`: every chest region the sample's masks define and every annotated structure, each
  asked with one name drawn from its key and >= 4 synonyms (the AGPT synonym augmentation);
- :func:`finding_grounding`: box annotations (JSRT nodules, NIH findings) -> phrase -> box;
- :func:`anatomy_segmentation`: "segment X" -> mask tokens;
- :func:`reference_pair`: a reference image with its structure's box + a target image -> the target's box.
"""

from __future__ import annotations

import random
from typing import Any

from medvlm.tokens import encode_box, encode_mask

__all__ = ["anatomy_grounding", "anatomy_segmentation", "finding_grounding", "reference_pair"]


def _example(task: str, images: list[str], question: str, answer: str, **meta: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
    content.append({"type": "text", "text": question})
    return {"prompt": [{"role": "user", "content": content}],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "images": images, "task": task, "meta": meta}


def _targets(sample: Any) -> dict[str, Any]:
    """name -> Box of every structure mask and every chest region its masks define (pixels of the sample)."""
    from agents.anatomy import anatomy_from_masks
    from prompts.regions import REGION_KEYS

    out = {name: sample.mask(name).to_box() for name in sample.masks}
    anatomy = anatomy_from_masks(sample.masks, sample.image.shape, "ground truth")
    if anatomy.is_chest:
        for key in REGION_KEYS:
            box = anatomy.region_box(key)
            # the cardiac silhouette is the heart mask: asked once, under "heart" with its synonyms
            if box is not None and key not in out and not (key == "cardiac silhouette" and "heart" in out):
                out[key] = box
    return out


def _phrases(name: str) -> list[str]:
    from prompts.anatomy import all_phrases, load_vocabulary
    from prompts.regions import load_regions

    regions = load_regions().regions
    if name in regions:
        return list(regions[name].phrases)
    return all_phrases(name) if name in load_vocabulary() else [name]


def anatomy_grounding(sample: Any, rng: random.Random) -> list[dict[str, Any]]:
    """One example per structure / region of ``sample``, asked by a randomly drawn name or synonym."""
    h, w = sample.image.shape
    out = []
    for name, box in sorted(_targets(sample).items()):
        phrase = rng.choice(_phrases(name))
        out.append(_example("anatomy_grounding", [sample.source], f"Locate the {phrase} in this image.",
                            f"{phrase}: {encode_box(box, h, w)}", target=name, sample_id=sample.id))
    return out


def finding_grounding(sample: Any) -> list[dict[str, Any]]:
    """One example per box annotation: its phrase -> its box."""
    h, w = sample.image.shape
    return [_example("finding_grounding", [sample.source], f"Where is the {ann.phrase}?",
                     f"{ann.phrase}: {encode_box(ann.box, h, w)}", target=ann.label, sample_id=sample.id)
            for ann in sample.boxes]


def anatomy_segmentation(sample: Any, rng: random.Random, max_points: int = 32) -> list[dict[str, Any]]:
    """One example per structure mask: "Segment the X." -> mask tokens."""
    out = []
    for name in sorted(sample.masks):
        phrase = rng.choice(_phrases(name))
        out.append(_example("anatomy_segmentation", [sample.source], f"Segment the {phrase}.",
                            encode_mask(sample.masks[name], max_points=max_points), target=name,
                            sample_id=sample.id))
    return out


def reference_pair(reference: Any, target: Any, name: str) -> dict[str, Any]:
    """Reference image with ``name`` marked by its box + target image -> the box of ``name`` in the target."""
    ref_box, tgt_box = _targets(reference)[name], _targets(target)[name]
    rh, rw = reference.image.shape
    th, tw = target.image.shape
    question = (f"The first image is a reference in which the {name} is at {encode_box(ref_box, rh, rw)}. "
                f"Find the same structure in the second image.")
    return _example("reference_pair", [reference.source, target.source], question,
                    f"{name}: {encode_box(tgt_box, th, tw)}", target=name, reference_id=reference.id,
                    sample_id=target.id)
