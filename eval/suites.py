"""Benchmark suites run by ``medvlm eval``.

Every segmentation suite writes the same JSON shape::

    {"suite": str, "method": str, "data": str, "n_images": int,
     "per_structure": {name: {"dice", "hd95_mm", "asd_mm", "n", ...}}, "mean": {...}, "per_case": [...]}

so that tables and plots can compare suites (oracle box, text-guided, reference-guided) side by side.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from eval.splits import checkpoint_split_ids, n_trained_on, segmenter_meta, select_ids
from segmentation.textseg.wholes import add_wholes

log = logging.getLogger(__name__)


@dataclass
class WorstCase:
    """A low-Dice case kept for the report's overlays (masks on the original grid)."""

    dice: float
    sample_id: str
    structure: str
    pred: npt.NDArray[np.bool_] = field(repr=False)
    gt: npt.NDArray[np.bool_] = field(repr=False)
    box: list[float]


class MeasurementAccumulator:
    """Clinical measurements of predicted masks (:func:`medvlm.measure.measure_structure`) against the reference
    values a folder records in its samples' ``meta`` under the same key (HC18: ``head_circumference_mm``).

    Empty masks and shapes no measurement fits count as ``missing`` (no value to compare); a sample without a
    spacing is skipped for the ``*_mm`` keys (its measurements come out in px)."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], list[tuple[float, float]]] = {}
        self.missing: dict[tuple[str, str], int] = {}

    def update(self, structure: str, pred: Any, spacing_mm: tuple[float, float] | None,
               meta: dict[str, Any]) -> dict[str, float]:
        """Record one predicted mask (bool ``(H, W)``) of ``structure``; returns ``{key: predicted value,
        key_ref: reference}`` for each measurement that ``meta`` has a reference for (for the per-case JSON)."""
        from medvlm.measure import MEASUREMENTS, measure_structure

        entry = MEASUREMENTS.get(structure)
        if entry is None or spacing_mm is None:
            return {}
        refs = {f"{n}_mm": float(meta[f"{n}_mm"]) for n in entry.names
                if isinstance(meta.get(f"{n}_mm"), int | float) and not isinstance(meta.get(f"{n}_mm"), bool)}
        if not refs:
            return {}
        got = measure_structure(structure, pred, spacing_mm) or {}
        out: dict[str, float] = {}
        for key, ref in refs.items():
            if key not in got:
                self.missing[(structure, key)] = self.missing.get((structure, key), 0) + 1
                self.values.setdefault((structure, key), [])
                continue
            self.values.setdefault((structure, key), []).append((got[key], ref))
            out[key], out[f"{key}_ref"] = got[key], ref
        return out

    def compute(self) -> dict[str, dict[str, dict[str, Any]]]:
        """structure -> key -> ``n`` (compared), ``missing``, ``mean_abs_diff``, ``mean_diff`` (predicted minus
        reference, in the key's unit; None when nothing was compared)."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for (structure, key), pairs in sorted(self.values.items()):
            diffs = np.array([p - r for p, r in pairs], dtype=np.float64)
            out.setdefault(structure, {})[key] = {
                "n": int(diffs.size), "missing": self.missing.get((structure, key), 0),
                "mean_abs_diff": round(float(np.abs(diffs).mean()), 3) if diffs.size else None,
                "mean_diff": round(float(diffs.mean()), 3) if diffs.size else None}
        return out


def _score(dataset: Any, ids: Sequence[str], segmenter: Any, make_prompts: Any, *, keep_worst: int,
           structures: Sequence[str] | None, label: str, wholes: bool = False,
           ) -> tuple[dict[str, Any], list[WorstCase], float]:
    """Segment every ground-truth structure of every image (one encoding per image) and accumulate metrics.

    ``make_prompts(names, masks) -> (prompts, boxes for the report)``."""
    from eval.metrics import SegmentationAccumulator, dice

    acc = SegmentationAccumulator()
    measured = MeasurementAccumulator()
    worst: dict[str, list[WorstCase]] = {}
    per_case: list[dict[str, Any]] = []
    started = time.perf_counter()
    for i, sample_id in enumerate(ids, start=1):
        sample = dataset.load(sample_id)
        masks = add_wholes(sample.masks) if wholes else sample.masks
        names = [n for n in masks if (structures is None or n in structures) and masks[n].any()]
        if not names:
            continue
        prompts, boxes = make_prompts(names, masks)
        results = segmenter.segment(sample.image, prompts)
        spacing = sample.image.spacing_mm or (1.0, 1.0)
        for name, box, result in zip(names, boxes, results):
            gt = masks[name]
            pred = result.mask.data
            acc.update(name, pred, gt, spacing_mm=spacing)
            d = float(dice(pred, gt))
            case: dict[str, Any] = {"id": sample_id, "structure": name, "dice": round(d, 4)}
            case.update(measured.update(name, pred, sample.image.spacing_mm, sample.meta))
            per_case.append(case)
            kept = worst.setdefault(name, [])
            kept.append(WorstCase(d, sample_id, name, pred, gt, box))
            if len(kept) > keep_worst:  # only the lowest Dice stay in memory (masks are large)
                kept.remove(max(kept, key=lambda c: c.dice))
        log.info("%s %d/%d %s", label, i, len(ids), sample_id)
    payload = {**acc.compute(), "per_case": per_case}
    if measured.values:
        payload["measurements"] = measured.compute()
    worst_cases = [c for kept in worst.values() for c in sorted(kept, key=lambda c: c.dice)]
    return payload, worst_cases, time.perf_counter() - started


def oracle_box(data: str | Path, *, segmenter_name: str = "litemedsam", checkpoint: str | None = None,
               limit: int | None = None, ids_file: str | None = None, keep_worst: int = 3,
               structures: Sequence[str] | None = None) -> tuple[dict[str, Any], list[WorstCase]]:
    """Prompt the segmenter with the tight box (pixel xyxy) of every ground-truth mask; Dice, HD95 and ASD in mm.

    Each image is encoded once and all its structures are decoded from that one embedding. Returns the
    suite JSON (shape in the module docstring) and the ``keep_worst`` lowest-Dice cases per structure.
    """
    from medvlm.datasets import open_dataset
    from medvlm.types import Mask
    from segmentation.base import Prompt
    from segmentation.registry import build_segmenter

    dataset = open_dataset(data)
    ids = select_ids(dataset.ids(), ids_file, limit)
    kwargs = {"checkpoint": checkpoint} if checkpoint else {}
    segmenter = build_segmenter(segmenter_name, **kwargs)

    def make_prompts(names: Sequence[str], masks: dict[str, Any]) -> tuple[list[Any], list[list[float]]]:
        boxes = [Mask(masks[n]).to_box() for n in names]
        return [Prompt(box=b) for b in boxes], [b.to_list() if b else [] for b in boxes]

    scores, worst, seconds = _score(dataset, ids, segmenter, make_prompts, keep_worst=keep_worst,
                                    structures=structures, label="oracle-box")
    payload: dict[str, Any] = {"suite": "oracle-box", "method": segmenter.name, "data": str(data),
                               "n_images": len(ids), "seconds": round(seconds, 1), **scores}
    return payload, worst


def text_seg(data: str | Path, *, checkpoint: str | None = None, split: str = "auto", level: str = "complex",
             limit: int | None = None, ids_file: str | None = None, keep_worst: int = 3,
             structures: Sequence[str] | None = None, segmenter: Any = None, postprocess: str = "full",
             specialists: bool = True) -> tuple[dict[str, Any], list[WorstCase]]:
    """Prompt Med-VLM with the text of every ground-truth structure; same JSON as :func:`oracle_box` plus
    ``split``, ``n_trained_on`` (evaluated images the checkpoint was trained on) and ``checkpoint``.

    ``split``: ``val`` = the checkpoint's recorded val ids (error if none is in this folder), ``all`` = every
    image, ``auto`` = ``val`` when possible, else ``all``. ``segmenter``: an already loaded MedVLMSegmenter
    (then ``checkpoint``, ``level``, ``postprocess`` and ``specialists`` are its own). ``postprocess``: the
    segmenter's per-structure postprocessing (``full``, ``masks``, ``off``:
    :class:`~segmentation.textseg.predictor.MedVLMSegmenter`); ``specialists=False``: the broad checkpoint answers
    every image (no ``specialists.json`` hand-over). The
    wholes of labelled parts ("lung" = both lungs, "hippocampus") are asked and scored too.
    """
    from medvlm.datasets import open_dataset
    from segmentation.base import Prompt
    from segmentation.textseg.predictor import MedVLMSegmenter

    dataset = open_dataset(data)
    segmenter = (segmenter if segmenter is not None
                 else MedVLMSegmenter(checkpoint, text_level=level, postprocess=postprocess, specialists=specialists))
    level = segmenter.text_level
    meta = segmenter_meta(segmenter, dataset.name)
    all_ids = dataset.ids()
    chosen, used = checkpoint_split_ids(meta, all_ids, split, data)
    # an --ids file picks from the whole folder; n_trained_on below still counts any training image in it
    ids = select_ids(all_ids if ids_file else chosen, ids_file, limit)
    trained_on = n_trained_on(meta, dataset.name, ids)

    def make_prompts(names: Sequence[str], masks: dict[str, Any]) -> tuple[list[Any], list[list[float]]]:
        return [Prompt(text=n) for n in names], [[] for _ in names]

    scores, worst, seconds = _score(dataset, ids, segmenter, make_prompts, keep_worst=keep_worst,
                                    structures=structures, label="text-seg", wholes=True)
    payload: dict[str, Any] = {"suite": "text-seg", "method": f"medvlm ({level} text)", "data": str(data),
                               "postprocess": segmenter.postprocess,
                               "n_images": len(ids), "split": used, "n_trained_on": trained_on,
                               "checkpoint": segmenter.checkpoint, "seconds": round(seconds, 1), **scores}
    return payload, worst


def format_table(payload: dict[str, Any]) -> str:
    """Per-structure table: Dice, HD95 mm, ASD mm, n, and the mean row."""
    head = f"{'structure':<28} {'Dice':>7} {'HD95 mm':>9} {'ASD mm':>8} {'n':>5}"
    title = f"{payload['suite']} | method {payload['method']} | {payload['n_images']} images | {payload['data']}"
    if "split" in payload:
        title += f" | split {payload['split']} ({payload['n_trained_on']} of them seen in training)"
    lines = [title, head, "-" * len(head)]

    def row(name: str, m: dict[str, Any]) -> str:
        def f(key: str, fmt: str) -> str:
            # None = no finite value (e.g. HD95 of structures the model never found on any image)
            return "-" if m.get(key) is None else format(m[key], fmt)

        return f"{name:<28} {f('dice', '.3f'):>7} {f('hd95_mm', '.2f'):>9} {f('asd_mm', '.2f'):>8} {m['n']:>5}"

    for name, m in sorted(payload["per_structure"].items()):
        lines.append(row(name, m))
    lines.append("-" * len(head))
    lines.append(row("mean", payload["mean"]))
    for structure, keys in sorted(payload.get("measurements", {}).items()):
        for key, m in keys.items():
            if m["mean_abs_diff"] is None:
                continue
            unit = key.rsplit("_", 1)[-1]
            what = key[: -len(unit) - 1].replace("_", " ")
            lines.append(f"{structure}: {what}, mean absolute difference {m['mean_abs_diff']:.2f} {unit} "
                         f"(mean {m['mean_diff']:+.2f}) against the folder's reference, n {m['n']}"
                         + (f", {m['missing']} without a mask" if m["missing"] else ""))
    return "\n".join(lines)
