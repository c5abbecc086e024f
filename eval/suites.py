"""Benchmark suites run by ``medvlm eval``.

Every segmentation suite writes the same JSON shape::

    {"suite": str, "method": str, "data": str, "n_images": int,
     "per_structure": {name: {"dice", "hd95_mm", "asd_mm", "n", ...}}, "mean": {...}, "per_case": [...]}

so that tables and plots can compare suites (oracle box, text-guided, reference-guided) side by side.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medvlm.errors import input_error

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


def _select_ids(ids: Sequence[str], ids_file: str | None, limit: int | None) -> list[str]:
    chosen = list(ids)
    if ids_file:
        wanted = [line.strip() for line in Path(ids_file).read_text().splitlines() if line.strip()]
        unknown = sorted(set(wanted) - set(chosen))
        if unknown:
            raise input_error("--ids", expected="ids present in the dataset", received=f"unknown ids {unknown[:5]}",
                              fix="list ids as printed by the dataset reader (file stems)")
        chosen = wanted
    if limit is not None:
        if limit <= 0:
            raise input_error("--limit", expected="a positive number", received=str(limit), fix="pass e.g. --limit 10")
        chosen = chosen[:limit]
    return chosen


def oracle_box(data: str | Path, *, segmenter_name: str = "litemedsam", checkpoint: str | None = None,
               limit: int | None = None, ids_file: str | None = None, keep_worst: int = 3,
               structures: Sequence[str] | None = None) -> tuple[dict[str, Any], list[WorstCase]]:
    """Prompt the segmenter with the tight box (pixel xyxy) of every ground-truth mask; Dice, HD95 and ASD in mm.

    Each image is encoded once and all its structures are decoded from that one embedding. Returns the
    suite JSON (shape in the module docstring) and the ``keep_worst`` lowest-Dice cases per structure.
    """
    from medvlm.datasets import open_dataset
    from segmentation.registry import build_segmenter

    from eval.metrics import SegmentationAccumulator, dice
    from medvlm.types import Mask
    from segmentation.base import Prompt

    dataset = open_dataset(data)
    ids = _select_ids(dataset.ids(), ids_file, limit)
    kwargs = {"checkpoint": checkpoint} if checkpoint else {}
    segmenter = build_segmenter(segmenter_name, **kwargs)
    acc = SegmentationAccumulator()
    worst: dict[str, list[WorstCase]] = {}
    per_case: list[dict[str, Any]] = []
    started = time.perf_counter()
    for i, sample_id in enumerate(ids, start=1):
        sample = dataset.load(sample_id)
        names = [n for n in sample.masks if (structures is None or n in structures) and sample.masks[n].any()]
        if not names:
            continue
        boxes = [Mask(sample.masks[n]).to_box() for n in names]
        results = segmenter.segment(sample.image, [Prompt(box=b) for b in boxes])
        spacing = sample.image.spacing_mm or (1.0, 1.0)
        for name, box, result in zip(names, boxes, results):
            gt = sample.masks[name]
            pred = result.mask.data
            acc.update(name, pred, gt, spacing_mm=spacing)
            d = float(dice(pred, gt))
            per_case.append({"id": sample_id, "structure": name, "dice": round(d, 4)})
            kept = worst.setdefault(name, [])
            kept.append(WorstCase(d, sample_id, name, pred, gt, box.to_list() if box else []))
            if len(kept) > keep_worst:  # only the lowest Dice stay in memory (masks are large)
                kept.remove(max(kept, key=lambda c: c.dice))
        log.info("oracle-box %d/%d %s", i, len(ids), sample_id)
    result_json = acc.compute()
    payload: dict[str, Any] = {
        "suite": "oracle-box",
        "method": segmenter.name,
        "data": str(data),
        "n_images": len(ids),
        "seconds": round(time.perf_counter() - started, 1),
        **result_json,
        "per_case": per_case,
    }
    worst_cases = [c for kept in worst.values() for c in sorted(kept, key=lambda c: c.dice)]
    return payload, worst_cases


def format_table(payload: dict[str, Any]) -> str:
    """Per-structure table: Dice, HD95 mm, ASD mm, n, and the mean row."""
    head = f"{'structure':<16} {'Dice':>7} {'HD95 mm':>9} {'ASD mm':>8} {'n':>5}"
    lines = [f"{payload['suite']} | method {payload['method']} | {payload['n_images']} images | {payload['data']}",
             head, "-" * len(head)]

    def row(name: str, m: dict[str, Any]) -> str:
        return f"{name:<16} {m['dice']:>7.3f} {m['hd95_mm']:>9.2f} {m['asd_mm']:>8.2f} {m['n']:>5}"

    for name, m in sorted(payload["per_structure"].items()):
        lines.append(row(name, m))
    lines.append("-" * len(head))
    lines.append(row("mean", payload["mean"]))
    return "\n".join(lines)


def run_eval(args: argparse.Namespace) -> int:
    from medvlm.outputs import write_json_atomic

    if args.suite == "oracle-box":
        payload, worst = oracle_box(args.data, segmenter_name=args.segmenter, checkpoint=args.checkpoint,
                                    limit=args.limit, ids_file=args.ids)
        print(format_table(payload))
        if args.json_out:
            write_json_atomic(payload, Path(args.json_out))
            print(f"wrote {args.json_out}")
        if args.report:
            from eval.report import write_segmentation_report

            path = write_segmentation_report(payload, worst, args.report, data=args.data)
            print(f"wrote {path}")
        return 0
    raise input_error("medvlm eval", expected="a known suite (oracle-box)", received=repr(args.suite),
                      fix="run `medvlm eval --help`")
