"""``medvlm eval weakloc``: weak localization of findings from heatmaps, with and without anatomy gating.

Cases: every (image, finding label) with ground-truth finding boxes (pixel xyxy of the original image): the NIH
ChestX-ray14 boxes of ``cxr_nih_bbox`` (cardiomegaly, nodule, mass, pneumonia, atelectasis, infiltrate; Med-VLM
never trained on this folder) and the JSRT nodule boxes of ``cxr_jsrt_scr``. Med-VLM trained on JSRT's anatomy
masks (never on its nodule boxes); still, as every suite here, only the images of its JSRT val split are scored
when they are in the folder (``split="auto"``), so the anatomy the gate uses is never memorised.

The heatmap is asked for with the finding LABEL ("nodule", "cardiomegaly"), never with the JSRT phrase, whose
lobe ("... in the right upper lobe") would hand the location to the gate.

Methods per case (one Med-VLM image encoding serves them all): each heatmap source (``medvlm``: Med-VLM's mask
probability for the label; ``gradcam``: Seg-Grad-CAM of Med-VLM for it) ungated and gated by the finding's
expected regions (:mod:`agents.heatmap`), and two references: ``random`` = the expected pointing-game hit rate
of a uniformly random point (area of the label's boxes / image area), and ``prior`` = the expected regions alone
(peak = their most interior point, box = their largest connected part; the whole image when ungated), which
shows what the anatomy knows without any heatmap.

Learned gating: with ``learned`` (a Med-VLM checkpoint trained with the prior-mass loss, ``prior_weight`` > 0 in
its training config), every heatmap source is also run with that model (methods ``L:<source>``), ungated and
gated; the gate's anatomy always comes from the base model, so the gated columns use the same regions.

Scores: the pointing game (peak inside a ground-truth box of the label; Zhang et al. 2018) and the box IoU
(heatmap box vs the best-matching ground-truth box of the label; no box = 0); per ungated source also
``inside``, the share of the map's mass inside the soft gate of the expected regions (what learned gating
optimises; chest films only).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medvlm.errors import input_error
from medvlm.types import Box

__all__ = ["DEFAULT_DATASETS", "format_weakloc_table", "weakloc_suite"]

#: the folders with finding boxes, in table order
DEFAULT_DATASETS: tuple[str, ...] = ("cxr_nih_bbox", "cxr_jsrt_scr")


def _union_fraction(boxes: Sequence[Box], height: int, width: int) -> float:
    """Fraction of the image covered by the union of ``boxes`` (pixel xyxy): the chance that a uniformly random
    point of the image lands in one of them."""
    cover = np.zeros((height, width), dtype=bool)
    for b in boxes:
        c = b.clip(width, height)
        cover[int(np.floor(c.y0)): int(np.ceil(c.y1)), int(np.floor(c.x0)): int(np.ceil(c.x1))] = True
    return float(cover.mean())


def _score(point: tuple[float, float], box: Box | None, gt: Sequence[Box]) -> tuple[bool, float]:
    from eval.metrics import box_iou, pointing_game

    hit = any(pointing_game(point, g) for g in gt)
    iou = max((box_iou(box, g) for g in gt), default=0.0) if box is not None else 0.0
    return hit, float(iou)


def _inside_share(heat: Any, region: Any, cfg: Any) -> float:
    """Share of the (ungated) map's mass inside the soft gate of ``region``: sum(heat x gate) / sum(heat), in
    [0, 1]; 0 for an all-zero map."""
    from segmentation.heatmap import gate_weights

    total = float(np.sum(heat))
    return float(np.sum(heat * gate_weights(region, cfg.gate))) / total if total > 0 else 0.0


def _prior(plan: Any, anatomy: Any, shape: tuple[int, int]) -> tuple[tuple[float, float], Box | None, bool]:
    """Peak, box and whether gated for the anatomy prior alone (see the module docstring)."""
    from agents.anatomy import interior_point
    from segmentation.heatmap import heatmap_box

    h, w = shape
    mask = anatomy.union(plan.regions) if plan.reason is None and anatomy is not None and anatomy.is_chest else None
    if mask is None or not mask.any():
        return (w / 2.0, h / 2.0), Box(0.0, 0.0, float(w), float(h)), False
    pt = interior_point(mask)
    assert pt is not None
    return pt, heatmap_box(mask.astype(np.float32), 1.0), True


def _pick_ids(dataset: Any, meta: dict[str, Any], split: str, limit: int | None) -> tuple[list[str], str]:
    """Ids of the images with boxes, of the checkpoint's val split when it is in this folder (``auto``/``val``)
    else all; the first ``limit`` of them."""
    from eval.splits import checkpoint_split_ids

    candidates, used = checkpoint_split_ids(meta, dataset.ids(), split, dataset.root)
    chosen: list[str] = []
    for sid in candidates:
        if limit is not None and len(chosen) >= limit:
            break
        if dataset.load(sid).boxes:
            chosen.append(sid)
    return chosen, used


def weakloc_suite(datasets: Sequence[str] = DEFAULT_DATASETS, *, sources: Sequence[str] = ("medvlm", "gradcam"),
                  split: str = "auto", limit: int | None = None, checkpoint: str | None = None,
                  config: Any = None, learned: str | None = None) -> dict[str, Any]:
    """Run the benchmark (see the module docstring) on each dataset folder (name or path).

    ``limit``: at most this many images with boxes per dataset. ``config``: an
    :class:`agents.heatmap.HeatmapConfig`. Returns ``{"suite": "weakloc", "datasets": [{name, split, ids,
    n_trained_on}], "methods": [...], "rows": [{dataset, finding, n, random, <method>: {point, iou, n_gated}}],
    "per_case": [...]}``; rows per dataset and label, then per dataset ("all"), then over everything.
    """
    from agents.anatomy import segment_chest_anatomy
    from agents.heatmap import SOURCES, HeatmapConfig, finding_heatmap, plan_gate, read_heatmap
    from eval.splits import n_trained_on, segmenter_meta
    from medvlm.datasets import open_dataset
    from segmentation.textseg.predictor import MedVLMSegmenter

    if limit is not None and limit <= 0:
        raise input_error("--limit", expected="a positive number", received=str(limit), fix="pass e.g. --limit 3")
    bad = [s for s in sources if s not in SOURCES]
    if bad or not sources:
        raise input_error("--source", expected=f"one or more of {', '.join(SOURCES)}", received=repr(list(sources)),
                          fix="e.g. --source medvlm --source gradcam")
    cfg = config or HeatmapConfig()
    segmenter = MedVLMSegmenter(checkpoint)
    models: list[tuple[str, Any]] = [("", segmenter)]
    if learned is not None:
        models.append(("L:", MedVLMSegmenter(learned)))
    methods = [f"{t}{s}{g}" for t, _ in models for s in sources for g in ("", "+anatomy")] + ["prior"]
    cases: list[dict[str, Any]] = []
    used_sets: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for name in datasets:
        dataset = open_dataset(name)
        meta = segmenter_meta(segmenter, dataset.name)
        ids, used = _pick_ids(dataset, meta, split, limit)
        used_sets.append({"name": dataset.name, "split": used, "n_images": len(ids), "ids": ids,
                          "n_trained_on": n_trained_on(meta, dataset.name, ids)})
        for sid in ids:
            sample = dataset.load(sid)
            image = sample.image
            embs = {tag: model.encode(image) for tag, model in models}
            anatomy = segment_chest_anatomy(segmenter, image, embs[""])
            by_label: dict[str, list[Box]] = defaultdict(list)
            for ann in sample.boxes:
                by_label[ann.label].append(ann.box)
            for label, gt in sorted(by_label.items()):
                plan = plan_gate(label)
                case: dict[str, Any] = {"dataset": dataset.name, "id": sid, "finding": label,
                                        "gt_boxes": [[round(v, 1) for v in b.to_list()] for b in gt],
                                        "random": _union_fraction(gt, image.height, image.width),
                                        "is_chest": anatomy.is_chest, "regions": list(plan.regions)}
                for (tag, model), source in ((m, s) for m in models for s in sources):
                    heat = finding_heatmap(model, embs[tag], label, source=source, image=image, config=cfg)
                    for gate, key in (("none", f"{tag}{source}"), ("anatomy", f"{tag}{source}+anatomy")):
                        res = read_heatmap(heat, plan, anatomy, gate=gate, source=source, config=cfg)
                        hit, iou = _score(res.peak, res.box, gt)
                        case[key] = {"point": hit, "iou": round(iou, 4), "gated": res.gate_used == "anatomy",
                                     "peak": [round(v, 1) for v in res.peak],
                                     "box": None if res.box is None else [round(v, 1) for v in res.box.to_list()]}
                        if gate == "anatomy" and res.gate_reason:
                            case["not_gated"] = res.gate_reason
                        if gate == "anatomy" and res.gate_mask is not None:
                            # what learned gating optimises: the raw map's share inside the soft gate
                            case[f"{tag}{source}"]["inside"] = round(_inside_share(heat, res.gate_mask, cfg), 4)
                pt, box, gated = _prior(plan, anatomy, image.shape)
                hit, iou = _score(pt, box, gt)
                case["prior"] = {"point": hit, "iou": round(iou, 4), "gated": gated, "peak": [round(v, 1) for v in pt],
                                 "box": None if box is None else [round(v, 1) for v in box.to_list()]}
                cases.append(case)
    rows = _rows(cases, methods, [d["name"] for d in used_sets])
    return {"suite": "weakloc", "checkpoint": segmenter.checkpoint,
            "learned_checkpoint": None if learned is None else models[1][1].checkpoint,
            "box_fraction": cfg.box_fraction,
            "gate": {"grow": cfg.gate.grow, "soft": cfg.gate.soft}, "cam": {"layer": cfg.cam_layer,
                                                                             "method": cfg.cam_method},
            "datasets": used_sets, "methods": methods, "seconds": round(time.perf_counter() - t0, 1),
            "rows": rows, "per_case": cases}


def _rows(cases: Sequence[dict[str, Any]], methods: Sequence[str], names: Sequence[str]) -> list[dict[str, Any]]:
    def summary(dataset: str, finding: str, chosen: Sequence[dict[str, Any]]) -> dict[str, Any]:
        row: dict[str, Any] = {"dataset": dataset, "finding": finding, "n": len(chosen),
                               "random": float(np.mean([c["random"] for c in chosen]))}
        for m in methods:
            row[m] = {"point": float(np.mean([c[m]["point"] for c in chosen])),
                      "iou": float(np.mean([c[m]["iou"] for c in chosen])),
                      "n_gated": int(sum(c[m]["gated"] for c in chosen))}
            inside = [c[m]["inside"] for c in chosen if "inside" in c[m]]
            if inside:
                row[m]["inside"] = float(np.mean(inside))
        return row

    rows = []
    for name in names:
        mine = [c for c in cases if c["dataset"] == name]
        for finding in sorted({c["finding"] for c in mine}):
            rows.append(summary(name, finding, [c for c in mine if c["finding"] == finding]))
        if mine:
            rows.append(summary(name, "all", mine))
    if cases:
        rows.append(summary("all", "all", cases))
    return rows


_SHORT = {"medvlm": "mv", "gradcam": "gc", "medvlm+anatomy": "mv+A", "gradcam+anatomy": "gc+A", "prior": "prior",
          "L:medvlm": "mvL", "L:gradcam": "gcL", "L:medvlm+anatomy": "mvL+A", "L:gradcam+anatomy": "gcL+A"}


def format_weakloc_table(payload: dict[str, Any]) -> str:
    """One row per dataset x finding (then per dataset, then overall): n, random-point hit rate, and for each
    method its pointing-game hit rate (pt) and mean box IoU (IoU)."""
    methods = payload["methods"]
    sets = "; ".join(f"{d['name']}: {d['n_images']} images, split {d['split']} ({d['n_trained_on']} seen in training)"
                     for d in payload["datasets"])
    lines = [f"weakloc | Med-VLM {Path(payload['checkpoint']).name} | box at {payload['box_fraction']} x max | {sets}"]
    head = f"{'dataset':<13} {'finding':<13} {'n':>3} {'random':>7}"
    for m in methods:
        short = _SHORT.get(m, m)
        head += f" {short + ' pt':>9} {short + ' IoU':>9}"
    lines += [head, "-" * len(head)]
    for row in payload["rows"]:
        line = f"{row['dataset']:<13} {row['finding']:<13} {row['n']:>3} {row['random']:>7.3f}"
        for m in methods:
            line += f" {row[m]['point']:>9.3f} {row[m]['iou']:>9.3f}"
        lines.append(line)
    raw = [m for m in methods if "+" not in m and m != "prior"]
    overall = next((r for r in payload["rows"] if r["dataset"] == "all"), None)
    if overall is not None and any("inside" in overall[m] for m in raw):
        lines.append("share of the ungated map's mass inside the finding's (soft) expected regions, over "
                     "everything: " + ", ".join(f"{_SHORT.get(m, m)} {overall[m]['inside']:.3f}" for m in raw
                                                if "inside" in overall[m]))
    gated = {m: sum(r[m]["n_gated"] for r in payload["rows"] if r["dataset"] == "all") for m in methods if "+" in m}
    n_all = next((r["n"] for r in payload["rows"] if r["dataset"] == "all"), 0)
    lines.append(f"pt = pointing game (peak inside a ground-truth box of the finding); IoU = heatmap box vs best "
                 f"ground-truth box; random = expected pt of a uniformly random point; mv = Med-VLM mask "
                 f"probability, gc = Seg-Grad-CAM of Med-VLM ({payload['cam']['layer']}), +A = gated by the "
                 f"finding's expected regions; prior = those regions alone (interior point, region box)"
                 + (f"; L = Med-VLM with learned gating ({Path(payload['learned_checkpoint']).name}), the gate's "
                    "anatomy from the base model" if payload.get("learned_checkpoint") else ""))
    if gated:
        lines.append("gated cases: " + ", ".join(f"{_SHORT.get(m, m)} {k}/{n_all}" for m, k in gated.items())
                     + " (the others: not a chest film by Med-VLM's lungs, or no region; read ungated)")
    for d in payload["datasets"]:
        lines.append(f"{d['name']} images ({d['split']}): {' '.join(d['ids'])}")
    return "\n".join(lines)
