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
- :func:`reference_pair`: a reference image with its structure's box + a target image -> the target's box;
- :func:`relative_position`: "is A above or below B?", "on the image left or right?", "to the patient's right or
  left?" (chest radiographs only), "which is larger?", answered from the pair's boxes (the RAU spatial-reasoning
  recipe), both boxes quoted as tokens in the answer;
- :func:`drr_examples`: grounding and segmentation on a synthetic radiograph from CT (:mod:`finetune.drr`), with
  :func:`write_drr_sample` to project a CT and write its image.

Frames: boxes are pixel xyxy of the image the example shows; tokens are its 1024 bins per side. Structure names
are the PATIENT's sides; on a frontal radiograph (and a DRR) the patient's right is the IMAGE left.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medvlm.errors import input_error
from medvlm.tokens import encode_box, encode_mask
from medvlm.types import Box, Mask
from prompts.templates import load_templates

if TYPE_CHECKING:
    from finetune.drr import DRR

__all__ = ["RELATION_KINDS", "anatomy_grounding", "anatomy_segmentation", "drr_examples", "finding_grounding",
           "reference_pair", "relative_position", "write_drr_sample"]

RELATION_KINDS: tuple[str, ...] = ("above_below", "image_left_right", "patient_left_right", "larger")
"""The questions :func:`relative_position` asks; ``patient_left_right`` only on frontal chest radiographs."""


def sft_example(task: str, images: list[str], question: str, answer: str, **meta: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
    content.append({"type": "text", "text": question})
    return {"prompt": [{"role": "user", "content": content}],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "images": images, "task": task, "meta": meta}


def _target_masks(sample: Any) -> dict[str, Any]:
    """name -> bool ``(H, W)`` mask of every structure and every chest region its masks define (sample's grid)."""
    from agents.anatomy import anatomy_from_masks
    from prompts.regions import REGION_KEYS

    out = dict(sample.masks)
    # an augmented copy (finetune.augment) spans scale^2 of its canvas: the chest test measures against that
    scale = float(sample.meta.get("augment", {}).get("scale", 1.0))
    h, w = sample.image.shape
    anatomy = anatomy_from_masks(sample.masks, sample.image.shape, "ground truth", image_area=h * w * scale * scale)
    if anatomy.is_chest:
        for key in REGION_KEYS:
            region = anatomy.region(key)
            # the cardiac silhouette is the heart mask: asked once, under "heart" with its synonyms
            if region is not None and key not in out and not (key == "cardiac silhouette" and "heart" in out):
                out[key] = region
    return out


def grounding_question(phrase: str) -> str:
    """The question of the ``grounding_tokens`` template, which the ``openai`` grounder (``answer="tokens"``) asks
    a fine-tuned model at inference: one source, so training and serving never drift apart."""
    from prompts.templates import load_templates

    return str(load_templates("1")["grounding_tokens"].render(phrase=phrase)[-1]["content"])


def _segment_question(phrase: str) -> str:
    """The question of the ``segment_tokens`` template ("Segment the X."), asked at inference by
    :meth:`agents.mini.MiniGrounder.segment`."""
    from prompts.templates import load_templates

    return str(load_templates("1")["segment_tokens"].render(phrase=phrase)[-1]["content"])


def _targets(sample: Any) -> dict[str, Any]:
    """name -> Box of every structure mask and every chest region its masks define (pixels of the sample)."""
    return {name: box for name, mask in _target_masks(sample).items() if (box := Mask(mask).to_box()) is not None}


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
        out.append(sft_example("anatomy_grounding", [sample.source], grounding_question(phrase),
                            f"{phrase}: {encode_box(box, h, w)}", target=name, sample_id=sample.id))
    return out


def finding_grounding(sample: Any) -> list[dict[str, Any]]:
    """One example per box annotation: its phrase -> its box."""
    h, w = sample.image.shape
    return [sft_example("finding_grounding", [sample.source], f"Where is the {ann.phrase}?",
                     f"{ann.phrase}: {encode_box(ann.box, h, w)}", target=ann.label, sample_id=sample.id)
            for ann in sample.boxes]


def anatomy_segmentation(sample: Any, rng: random.Random, max_points: int = 32) -> list[dict[str, Any]]:
    """One example per structure mask: "Segment the X." -> mask tokens."""
    out = []
    for name in sorted(sample.masks):
        phrase = rng.choice(_phrases(name))
        out.append(sft_example("anatomy_segmentation", [sample.source], _segment_question(phrase),
                            encode_mask(sample.masks[name], max_points=max_points), target=name,
                            sample_id=sample.id))
    return out


def reference_pair(reference: Any, target: Any, name: str) -> dict[str, Any]:
    """Reference image with ``name`` marked by its box + target image -> the box of ``name`` in the target."""
    ref_box, tgt_box = _targets(reference)[name], _targets(target)[name]
    rh, rw = reference.image.shape
    th, tw = target.image.shape
    # the template the refseg MLLM path asks at inference, so training and serving share one wording
    question = str(load_templates("1")["reference_pair"].render(name=name, box=encode_box(ref_box, rh, rw))[-1]
                   ["content"])
    return sft_example("reference_pair", [reference.source, target.source], question,
                    f"{name}: {encode_box(tgt_box, th, tw)}", target=name, reference_id=reference.id,
                    sample_id=target.id)


# ------------------------------------------------------------------------------------------ relative position


def _axis_order(a0: float, a1: float, b0: float, b1: float, side: int, margin: float) -> int:
    """-1 when A lies before B along one axis (smaller coordinate: above, or image left), +1 after, 0 when the
    relation is not clear: centres closer than ``margin`` of the image ``side``, or the intervals overlapping by
    more than half the shorter one (nested structures such as a lung and its zone have no side of each other)."""
    ca, cb = (a0 + a1) / 2.0, (b0 + b1) / 2.0
    if abs(ca - cb) < margin * side:
        return 0
    overlap = max(0.0, min(a1, b1) - max(a0, b0))
    if overlap > 0.5 * min(a1 - a0, b1 - b0):
        return 0
    return -1 if ca < cb else 1


def _relation(kind: str, a: Box, b: Box, areas: tuple[int, int], shape: tuple[int, int], margin: float,
              min_area_ratio: float) -> str | None:
    """The answer word of question ``kind`` about A relative to B (boxes in pixel xyxy of an image ``shape``
    ``(H, W)``; ``areas`` their masks' pixel counts), or None when the geometry does not settle it."""
    h, w = shape
    if kind == "above_below":
        order = _axis_order(a.y0, a.y1, b.y0, b.y1, h, margin)
        return {-1: "above", 1: "below"}.get(order)
    if kind in ("image_left_right", "patient_left_right"):
        order = _axis_order(a.x0, a.x1, b.x0, b.x1, w, margin)
        # frontal radiograph display: the patient's right is on the image left (smaller x)
        words = {-1: "image left", 1: "image right"} if kind == "image_left_right" else \
            {-1: "patient's right", 1: "patient's left"}
        return words.get(order)
    # "larger" must hold for the structures (mask areas) AND for the boxes the answer quotes: a derived region
    # such as the mediastinum can have a wide box around a narrow mask
    winners = set()
    for x, y in ((a.area, b.area), (float(areas[0]), float(areas[1]))):
        if min(x, y) <= 0 or max(x, y) < min_area_ratio * min(x, y):
            return None
        winners.add("A" if x > y else "B")
    return winners.pop() if len(winners) == 1 else None


def _relation_example(kind: str, word: str, pa: str, pb: str, ta: str, tb: str) -> tuple[str, str]:
    """(question, answer) of one relation; ``pa``/``pb`` the phrases asked, ``ta``/``tb`` their box tokens."""
    if kind == "above_below":
        return (f"Is the {pa} above or below the {pb} in this image?",
                f"{word}: the {pa} {ta} is {word} the {pb} {tb}.")
    if kind == "image_left_right":
        side = word.split()[1]
        return (f"Is the {pa} on the image left or the image right of the {pb}?",
                f"{word}: the {pa} {ta} is to the {side} of the {pb} {tb} in the image.")
    if kind == "patient_left_right":
        image_side = "left" if word == "patient's right" else "right"
        return (f"Is the {pa} to the patient's right or to the patient's left of the {pb}?",
                f"{word}: the {pa} {ta} is to the {word} of the {pb} {tb} (the image {image_side} on this "
                f"frontal radiograph).")
    larger, smaller = (pa, pb) if word == "A" else (pb, pa)
    t_larger, t_smaller = (ta, tb) if word == "A" else (tb, ta)
    return (f"Which is larger in this image, the {pa} or the {pb}?",
            f"the {larger}: the {larger} {t_larger} is larger than the {smaller} {t_smaller}.")


def relative_position(sample: Any, rng: random.Random, n: int = 4, *, kinds: Sequence[str] = RELATION_KINDS,
                      margin: float = 0.05, min_area_ratio: float = 1.25) -> list[dict[str, Any]]:
    """Up to ``n`` relative-position questions about distinct pairs of the sample's structures and chest regions
    (the targets of :func:`anatomy_grounding`), each answered from the pair's boxes (pixel xyxy of the sample's
    image) and quoting both boxes as tokens (1024 bins per side), e.g. ``"above: the heart <box>...</box> is
    above the left costophrenic angle <box>...</box>."``.

    ``kinds`` (subset of :data:`RELATION_KINDS`):

    - ``above_below``: box centres' rows (image top = superior on a radiograph);
    - ``image_left_right``: box centres' columns, asked and answered in IMAGE terms ("image left");
    - ``patient_left_right``: the same columns in the PATIENT's terms, only when the sample is a frontal chest
      radiograph (:attr:`agents.anatomy.ChestAnatomy.is_chest`), where the patient's right is the image left;
    - ``larger``: masks' pixel counts, only when one is at least ``min_area_ratio`` times the other and the boxes'
      areas agree by the same ratio.

    A side relation is asked only when the centres differ by at least ``margin`` of the image side along that
    axis and the boxes overlap along it by at most half the shorter extent, so every answer is unambiguous.
    The kinds take turns (in a random order), each asking about the next pair of a shuffled list that it settles;
    every pair is asked at most once, with random synonyms (:func:`_phrases`) and a random order of A and B.
    Deterministic given ``rng``. ``meta``: ``target`` (A), ``other`` (B), ``relation`` (the kind), ``label``
    (the answer word; for ``larger`` the canonical name of the larger).
    """
    from agents.anatomy import anatomy_from_masks

    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise input_error("relative_position n", expected="a non-negative int", received=repr(n),
                          fix="pass how many pairs to ask about, e.g. 4")
    unknown = [k for k in kinds if k not in RELATION_KINDS]
    if unknown or not kinds:
        raise input_error("relative_position kinds", expected=f"a non-empty subset of {list(RELATION_KINDS)}",
                          received=repr(list(kinds)), fix="drop the unknown kinds")
    if not 0.0 <= margin < 1.0 or min_area_ratio < 1.0:
        raise input_error("relative_position margin / min_area_ratio",
                          expected="0 <= margin < 1 (fraction of the image side) and min_area_ratio >= 1",
                          received=f"margin={margin!r}, min_area_ratio={min_area_ratio!r}",
                          fix="use the defaults 0.05 and 1.25")
    shape = sample.image.shape
    h, w = shape
    allowed = [k for k in RELATION_KINDS if k in kinds]
    if "patient_left_right" in allowed and not anatomy_from_masks(sample.masks, shape, "ground truth").is_chest:
        # only a frontal chest radiograph is known here to show the patient's right on the image left
        allowed.remove("patient_left_right")
    masks = _target_masks(sample)
    boxes = {name: box for name, m in masks.items() if (box := Mask(m).to_box()) is not None}
    areas = {name: int(np.count_nonzero(masks[name])) for name in boxes}
    pairs = list(itertools.combinations(sorted(boxes), 2))
    rng.shuffle(pairs)
    # kinds take turns, each asked about the next pair that it settles: "larger" settles almost every pair, so
    # drawing a kind per pair would make it most of the examples
    rotation = allowed[:]
    rng.shuffle(rotation)
    out: list[dict[str, Any]] = []
    turn = 0
    while len(out) < n and rotation and pairs:
        kind = rotation[turn % len(rotation)]
        found: tuple[tuple[str, str], str, str, str] | None = None
        for pair in pairs:
            a, b = pair if rng.random() < 0.5 else pair[::-1]
            word = _relation(kind, boxes[a], boxes[b], (areas[a], areas[b]), shape, margin, min_area_ratio)
            if word is not None:
                found = pair, a, b, word
                break
        if found is None:
            rotation.remove(kind)  # no pair left that this kind settles
            continue
        pair, a, b, word = found
        pairs.remove(pair)
        turn += 1
        pa, pb = rng.choice(_phrases(a)), rng.choice(_phrases(b))
        if pa == pb:  # two targets sharing a synonym would make the question meaningless: ask by name
            pa, pb = a, b
        question, answer = _relation_example(kind, word, pa, pb, encode_box(boxes[a], h, w),
                                             encode_box(boxes[b], h, w))
        label = (a if word == "A" else b) if kind == "larger" else word
        out.append(sft_example("relative_position", [sample.source], question, answer, target=a, other=b,
                            relation=kind, label=label, sample_id=sample.id))
    return out


# ----------------------------------------------------------------------------------- synthetic radiographs


def drr_examples(drr: DRR, source_png: str, rng: random.Random, max_points: int = 32,
                 min_fraction: float = 0.001) -> list[dict[str, Any]]:
    """Anatomy grounding (``"drr_grounding"``: box tokens) and segmentation (``"drr_segmentation"``: mask
    tokens, :func:`~medvlm.tokens.encode_mask` with ``max_points``) examples on a DRR whose image is the file
    ``source_png`` (same ``(H, W)`` as ``drr.image``; boxes are pixel xyxy of it, tokens its 1024 bins).

    Mask names are canonicalized (:func:`~medvlm.datasets.base.canonical_structure`: ``"kidney_right"`` ->
    ``"right kidney"``, the patient's side) and asked by a random synonym when the name is in the anatomy
    vocabulary. Masks covering less than ``min_fraction`` of the pixels are skipped (a sliver a few pixels wide
    is no grounding target). Grounding examples first, then segmentation, each in name order. ``meta``:
    ``target`` (canonical name), ``mask`` (the DRR's name), ``sample_id`` (``source_png``).
    """
    from medvlm.datasets.base import canonical_structure

    if not Path(source_png).is_file():
        raise input_error("drr_examples source_png", expected="the path of the DRR's image file",
                          received=repr(source_png), fix="write it first, e.g. with write_drr_sample")
    h, w = drr.image.shape
    kept: list[tuple[str, str, Any]] = []
    for raw in sorted(drr.masks):
        mask = np.asarray(drr.masks[raw], dtype=bool)
        if mask.shape != (h, w):
            raise input_error(f"DRR mask {raw!r}", expected=f"the image's shape {(h, w)}",
                              received=f"shape {mask.shape}", fix="project masks and image together (drr_from_volume)")
        if not mask.any() or mask.sum() < min_fraction * h * w:
            continue
        kept.append((canonical_structure(raw), raw, mask))
    out = []
    for name, raw, mask in kept:
        phrase = rng.choice(_phrases(name))
        box = Mask(mask).to_box()
        assert box is not None  # kept masks are non-empty
        out.append(sft_example("drr_grounding", [source_png], grounding_question(phrase),
                            f"{phrase}: {encode_box(box, h, w)}", target=name, mask=raw, sample_id=source_png))
    for name, raw, mask in kept:
        phrase = rng.choice(_phrases(name))
        out.append(sft_example("drr_segmentation", [source_png], _segment_question(phrase),
                            encode_mask(mask, max_points=max_points), target=name, mask=raw, sample_id=source_png))
    return out


def write_drr_sample(ct_path: str | Path, seg_path: str | Path, out_dir: str | Path,
                     names: dict[int, str] | None = None) -> tuple[DRR, str]:
    """Project a CT NIfTI and its label volume (:func:`finetune.drr.drr_from_nifti`; ``names``: label value ->
    structure name) and write the image as ``<out_dir>/<ct stem>.drr.png`` (8 bit, bright = dense, the display
    of ``python -m finetune.drr``). Returns the DRR and the PNG path, ready for :func:`drr_examples`."""
    from finetune.drr import drr_from_nifti
    from medvlm.io import save_png

    drr = drr_from_nifti(ct_path, seg_path, names)
    stem = Path(ct_path).name.removesuffix(".gz").removesuffix(".nii")
    png = save_png((drr.image * 255).round().astype(np.uint8), Path(out_dir) / f"{stem}.drr.png")
    return drr, str(png)
