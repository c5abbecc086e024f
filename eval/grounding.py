"""``medvlm eval grounding``: phrase -> box benchmarks, per phrase type, with and without the anatomy check.

Cases of one image (pixel xyxy of the original image everywhere):

- ``structure``: every annotated structure (heart, lungs, clavicles, CT/MR organs), asked by its name and by
  each synonym of the anatomy vocabulary; ground truth = the tight box of its mask;
- ``region``: every chest region of :mod:`prompts.regions` that the image's masks define (lung zones, apical
  zones, costophrenic angles, hila, hemidiaphragms, mediastinum), asked by its key and each synonym; ground
  truth = the same geometric rule applied to the ground-truth masks (as Chest ImaGenome derives its boxes).
  A region whose rule needs a mask the ground truth lacks (apical zone: clavicle; mediastinum: heart; V7 and
  Shenzhen annotate lungs only) is not scored;
- findings: every box annotation (JSRT nodules with their phrase, NIH finding boxes), type = its label.

Scores per type: box mIoU and Acc@0.5 (best-overlapping predicted region; no region = IoU 0), the pointing game
(the first region's point inside the box) and the region hit rate (the box centre inside any predicted mask,
a zone-level localisation), and, for sided phrases, laterality errors (the region lies mostly on the other side
of the ground-truth midline) without and with the consistency check (``repair``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medvlm.types import Region

__all__ = ["format_grounding_table", "grounding_suite", "heldout_ids"]


#: regions whose rule uses more than the lungs (apical zone: the clavicle; mediastinum: the heart's extent)
_NEEDS: dict[str, tuple[str, ...]] = {
    "right apical zone": ("right clavicle",), "left apical zone": ("left clavicle",),
    "mediastinum": ("heart",), "upper mediastinum": ("heart",),
}


def _cases(sample: Any, gt_anatomy: Any) -> list[tuple[str, str, Any, str | None, str]]:
    """(type, phrase, ground-truth Box, side, what: the structure / region key / finding asked for) per case."""
    from prompts.anatomy import all_phrases, load_vocabulary, side_of
    from prompts.regions import load_regions, region_side

    vocab = load_vocabulary()
    regions = load_regions()
    cases: list[tuple[str, str, Any, str | None, str]] = []
    for name in sample.masks:
        if name not in vocab:
            continue
        box = sample.mask(name).to_box()
        for phrase in all_phrases(name):
            cases.append(("structure", phrase, box, side_of(name), name))
    if gt_anatomy.is_chest:
        for key, region in regions.regions.items():
            if key in sample.masks or (key == "cardiac silhouette" and "heart" in sample.masks):
                continue  # the same mask as a structure case
            if any(need not in sample.masks for need in _NEEDS.get(key, ())):
                continue  # without that mask the ground truth would follow a fallback rule the model does not
            box = gt_anatomy.region_box(key)
            if box is None:
                continue
            for phrase in region.phrases:
                cases.append(("region", phrase, box, region_side(key), key))
    for ann in sample.boxes:
        cases.append((ann.label, ann.phrase, ann.box, side_of(ann.phrase), ann.label))
    return cases


def side_error(region: Region, side: str | None, midline: float) -> bool | None:
    if side not in ("left", "right"):
        return None
    pixels = region.mask.data if region.mask is not None else None
    if pixels is None or not pixels.any():
        cx = region.box.center[0]
        on_patient_right = cx < midline
    else:
        cols = np.nonzero(pixels)[1]
        on_patient_right = float(np.mean(cols < midline)) >= 0.5
    return on_patient_right != (side == "right")


def mirror_region(region: Region, width: int) -> Region:
    """``region`` flipped left-right in an image ``width`` pixels wide (box, points and mask): what a grounder
    that confuses the patient's and the image's left would answer. Used by the ``mirror`` stress test."""
    from medvlm.types import Box, Mask, Points

    b = region.box
    points = None
    if region.points is not None:
        coords = region.points.coords.copy()
        coords[:, 0] = width - coords[:, 0]
        points = Points(coords, region.points.labels)
    mask = Mask(region.mask.data[:, ::-1].copy()) if region.mask is not None else None
    return Region(box=Box(width - b.x1, b.y0, width - b.x0, b.y1), label=region.label, mask=mask, points=points,
                  score=region.score, provenance={**region.provenance, "mirrored": True})


def heldout_ids(dataset: Any, data: str | Path, split: str = "auto", *, limit: int | None = None,
                ids_file: str | None = None, meta: dict[str, Any] | None = None
                ) -> tuple[list[str], str, dict[str, Any]]:
    """(ids, split used, checkpoint meta) of ``dataset``: the Med-VLM checkpoint's held-out split for ``auto``
    (the shipped checkpoint's when ``meta`` is empty: an LLM grounder has none, and the MLLM recipe never trains
    on that split either), ``ids_file`` when given, the first ``limit``."""
    from eval.splits import checkpoint_split_ids, select_ids

    if not meta:
        from segmentation.textseg.checkpoint import read_checkpoint_config
        from segmentation.textseg.predictor import default_checkpoint_dir

        meta = read_checkpoint_config(default_checkpoint_dir())[1]
    all_ids = dataset.ids()
    chosen, used = checkpoint_split_ids(meta, all_ids, split, data)
    return select_ids(all_ids if ids_file else chosen, ids_file, limit), used, meta


def grounding_suite(data: str | Path, *, agent: Any = None, split: str = "auto", limit: int | None = None,
                    ids_file: str | None = None, types: Sequence[str] | None = None,
                    mirror: bool = False) -> dict[str, Any]:
    """Run the grounding benchmark on one dataset folder with ``agent`` (default: the embedded medvlm grounder,
    refine auto). ``split``: as in text-seg (``auto`` = the Med-VLM checkpoint's val ids when present here).
    ``mirror``: stress test of the anatomy check: every region is flipped left-right before scoring, as a
    grounder that mixes up the patient's and the image's left would answer; the "checked" columns then show
    what the check recovers.
    Returns ``{"suite": "grounding", "data", "n_images", "split", "per_type": {type: {...}}, ...}``."""
    from agents.anatomy import anatomy_from_masks
    from agents.pipeline import GroundingAgent
    from eval.metrics import BoxAccumulator, PointingGameAccumulator
    from eval.splits import n_trained_on
    from medvlm.datasets import open_dataset

    dataset = open_dataset(data)
    agent = agent or GroundingAgent("medvlm", check="off")
    meta = getattr(getattr(agent.grounder, "segmenter", None), "meta", {}) or {}
    ids, used, meta = heldout_ids(dataset, data, split, limit=limit, ids_file=ids_file, meta=meta)
    box_acc: dict[str, Any] = defaultdict(lambda: BoxAccumulator((0.5,)))
    box_acc_checked: dict[str, Any] = defaultdict(lambda: BoxAccumulator((0.5,)))
    per_key: dict[str, Any] = defaultdict(lambda: BoxAccumulator((0.5,)))
    point_acc: dict[str, Any] = defaultdict(PointingGameAccumulator)
    hits: dict[str, list[bool]] = defaultdict(list)
    side_errors: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # [n sided, errors raw, errors checked]
    actions: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    layout: dict[tuple[str, str], list[tuple[Any, ...]]] = defaultdict(list)
    t0 = time.perf_counter()
    for sid in ids:
        sample = dataset.load(sid)
        gt_anatomy = anatomy_from_masks(sample.masks, sample.image.shape, "ground truth")
        cases = [c for c in _cases(sample, gt_anatomy) if types is None or c[0] in types]
        if not cases:
            continue
        old_check, agent.check = agent.check, "off"
        try:
            grounded = agent.ground_phrases(sample.image, [c[1] for c in cases])
            if mirror:
                grounded = [(res, [mirror_region(r, sample.image.width) for r in regions]) for res, regions in grounded]
        finally:
            agent.check = old_check
        midline = gt_anatomy.midline_x()
        h, w = sample.image.shape
        for kind, _phrase, gt_box, _side, what in cases:
            layout[(kind, what)].append((sid, gt_box.x0 / w, gt_box.y0 / h, gt_box.x1 / w, gt_box.y1 / h, w, h))
        for (kind, _phrase, gt_box, side, what), (result, regions) in zip(cases, grounded):
            best = max(regions, key=lambda r: r.box.iou(gt_box), default=None)
            box_acc[kind].update(best.box if best is not None else None, gt_box)
            per_key[f"{kind}: {what}"].update(best.box if best is not None else None, gt_box)
            first_pt = None
            if regions and regions[0].points is not None and len(regions[0].points):
                first_pt = tuple(regions[0].points.positive[0])
            elif regions:
                first_pt = regions[0].box.center
            point_acc[kind].update(first_pt, gt_box)
            cx, cy = gt_box.center
            hits[kind].append(any(r.mask is not None and r.mask.data[min(int(cy), r.mask.shape[0] - 1),
                                                                     min(int(cx), r.mask.shape[1] - 1)]
                                  for r in regions))
            checked = agent.check_regions(sample.image, result, regions, mode="repair")
            for r in checked:
                if r.checks:
                    actions[kind][str(r.checks.get("action", "none")).split(":")[0]] += 1
            best_c = max(checked, key=lambda r: r.box.iou(gt_box), default=None)
            box_acc_checked[kind].update(best_c.box if best_c is not None else None, gt_box)
            if regions and side in ("left", "right"):
                side_errors[kind][0] += 1
                side_errors[kind][1] += int(bool(side_error(regions[0], side, midline)))
                side_errors[kind][2] += int(bool(side_error(checked[0], side, midline)))
    per_type: dict[str, Any] = {}
    for kind in box_acc:
        raw, chk = box_acc[kind].compute(), box_acc_checked[kind].compute()
        n_sided, err_raw, err_chk = side_errors[kind]
        per_type[kind] = {
            "n": raw["n"], "miou": raw["miou"], "acc@0.5": raw["acc@0.5"], "n_missing": raw["n_missing"],
            "miou_checked": chk["miou"], "acc@0.5_checked": chk["acc@0.5"],
            "pointing_hit_rate": point_acc[kind].compute()["hit_rate"],
            "region_hit_rate": float(np.mean(hits[kind])) if hits[kind] else None,
            "n_sided": n_sided, "laterality_errors": err_raw, "laterality_errors_checked": err_chk,
            "check_actions": dict(actions[kind]),
            **_layout_prior(layout, kind),
        }
    keys = {k: {m: v for m, v in acc.compute().items() if m in ("n", "miou", "acc@0.5")}
            for k, acc in sorted(per_key.items())}
    return {"suite": "grounding", "grounder": agent.grounder.name + (" (mirrored: stress test)" if mirror else ""),
            "data": str(data), "n_images": len(ids), "n_trained_on": n_trained_on(meta, dataset.name, ids),
            "split": used, "seconds": round(time.perf_counter() - t0, 1), "per_type": per_type, "per_target": keys}


def _layout_prior(layout: dict[tuple[str, str], list[tuple[Any, ...]]], kind: str) -> dict[str, Any]:
    """The image-blind baseline for phrase type ``kind``: each case answered with the mean ground-truth box of the
    same target on the OTHER evaluated images (coordinates relative to image size, leave-one-image-out), i.e.
    the best a model that learned where a target usually lies, but ignores the image, could do here. Returns
    ``{"prior_miou", "prior_acc@0.5"}`` (None when no target appears in two images)."""
    from medvlm.types import Box

    ious = []
    for (k, _what), rows in layout.items():
        if k != kind:
            continue
        arr = np.array([r[1:5] for r in rows], dtype=np.float64)
        ids = [r[0] for r in rows]
        for i, (sid, *_rel, w, h) in enumerate(rows):
            others = [j for j in range(len(rows)) if ids[j] != sid]
            if not others:
                continue
            x0, y0, x1, y1 = arr[others].mean(axis=0)
            truth = Box(arr[i, 0] * w, arr[i, 1] * h, arr[i, 2] * w, arr[i, 3] * h)
            ious.append(Box(x0 * w, y0 * h, x1 * w, y1 * h).iou(truth))
    if not ious:
        return {"prior_miou": None, "prior_acc@0.5": None}
    return {"prior_miou": float(np.mean(ious)), "prior_acc@0.5": float(np.mean(np.array(ious) >= 0.5))}


def format_grounding_table(payload: dict[str, Any]) -> str:
    """One row per phrase type: n, mIoU, Acc@0.5 (without / with check), pointing game, region hit, laterality."""
    title = (f"grounding | grounder {payload['grounder']} | {payload['n_images']} images | split {payload['split']}"
             f" ({payload.get('n_trained_on', '?')} of them seen in training) | {payload['data']}")
    head = (f"{'phrase type':<16} {'n':>5} {'mIoU':>6} {'Acc@0.5':>8} {'mIoU chk':>9} {'Acc chk':>8} "
            f"{'point':>6} {'in-reg':>7} {'sided':>6} {'lat err':>8} {'lat chk':>8} {'prior mIoU':>10} "
            f"{'prior Acc':>9}")
    lines = [title, head, "-" * len(head)]

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    for kind, m in sorted(payload["per_type"].items()):
        lines.append(f"{kind:<16} {m['n']:>5} {f(m['miou']):>6} {f(m['acc@0.5']):>8} {f(m['miou_checked']):>9} "
                     f"{f(m['acc@0.5_checked']):>8} {f(m['pointing_hit_rate']):>6} {f(m['region_hit_rate']):>7} "
                     f"{m['n_sided']:>6} {m['laterality_errors']:>8} {m['laterality_errors_checked']:>8} "
                     f"{f(m.get('prior_miou')):>10} {f(m.get('prior_acc@0.5')):>9}")
    lines.append("")
    lines.append(f"{'target (all its phrases)':<44} {'n':>5} {'mIoU':>6} {'Acc@0.5':>8}")
    for key, m in payload.get("per_target", {}).items():
        lines.append(f"{key:<44} {m['n']:>5} {f(m['miou']):>6} {f(m['acc@0.5']):>8}")
    lines.append("point = pointing game (first region's point in the box); in-reg = box centre inside a predicted "
                 "mask; chk = after the anatomy check (repair); prior = image-blind baseline: the target's mean box "
                 "on the other evaluated images")
    return "\n".join(lines)
