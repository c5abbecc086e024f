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


def n_trained_on(meta: dict[str, Any], dataset_name: str, ids: Sequence[str]) -> int:
    """How many of ``ids`` the Med-VLM checkpoint (its ``meta``) trained on: its sources minus its val ids."""
    trained_sources = {d.get("name") for d in meta.get("train_config", {}).get("data", [])}
    val_ids = set(meta.get("val_ids", []))
    return 0 if dataset_name not in trained_sources else sum(1 for i in ids if i not in val_ids)


def checkpoint_split_ids(meta: dict[str, Any], all_ids: Sequence[str], split: str,
                         where: object) -> tuple[list[str], str]:
    """``(ids, used)``: the Med-VLM checkpoint's val ids (its ``meta``) among ``all_ids`` when ``split`` is "val",
    or "auto" and some are there, with ``used = "val"``; else every id with ``used = "all"``. "val" with none of
    them in the folder (``where``, for the message) is an input error."""
    val_ids = set(meta.get("val_ids", []))
    in_val = [i for i in all_ids if i in val_ids]
    if split == "val" and not in_val:
        raise input_error("--split val", expected="a folder holding the checkpoint's val ids",
                          received=f"none of its {len(val_ids)} val ids in {where}",
                          fix="use --split auto (the val split where it exists, else every image) or --split all "
                          "(and read n_trained_on in the result)")
    return (in_val, "val") if split == "val" or (split == "auto" and in_val) else (list(all_ids), "all")


def _score(dataset: Any, ids: Sequence[str], segmenter: Any, make_prompts: Any, *, keep_worst: int,
           structures: Sequence[str] | None, label: str) -> tuple[dict[str, Any], list[WorstCase], float]:
    """Segment every ground-truth structure of every image (one encoding per image) and accumulate metrics.

    ``make_prompts(names, masks) -> (prompts, boxes for the report)``."""
    from eval.metrics import SegmentationAccumulator, dice

    acc = SegmentationAccumulator()
    worst: dict[str, list[WorstCase]] = {}
    per_case: list[dict[str, Any]] = []
    started = time.perf_counter()
    for i, sample_id in enumerate(ids, start=1):
        sample = dataset.load(sample_id)
        names = [n for n in sample.masks if (structures is None or n in structures) and sample.masks[n].any()]
        if not names:
            continue
        prompts, boxes = make_prompts(names, sample.masks)
        results = segmenter.segment(sample.image, prompts)
        spacing = sample.image.spacing_mm or (1.0, 1.0)
        for name, box, result in zip(names, boxes, results):
            gt = sample.masks[name]
            pred = result.mask.data
            acc.update(name, pred, gt, spacing_mm=spacing)
            d = float(dice(pred, gt))
            per_case.append({"id": sample_id, "structure": name, "dice": round(d, 4)})
            kept = worst.setdefault(name, [])
            kept.append(WorstCase(d, sample_id, name, pred, gt, box))
            if len(kept) > keep_worst:  # only the lowest Dice stay in memory (masks are large)
                kept.remove(max(kept, key=lambda c: c.dice))
        log.info("%s %d/%d %s", label, i, len(ids), sample_id)
    payload = {**acc.compute(), "per_case": per_case}
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
    ids = _select_ids(dataset.ids(), ids_file, limit)
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
             structures: Sequence[str] | None = None) -> tuple[dict[str, Any], list[WorstCase]]:
    """Prompt Med-VLM with the text of every ground-truth structure; same JSON as :func:`oracle_box` plus
    ``split``, ``n_trained_on`` (evaluated images the checkpoint was trained on) and ``checkpoint``.

    ``split``: ``val`` = the checkpoint's recorded val ids (error if none is in this folder), ``all`` = every
    image, ``auto`` = ``val`` when possible, else ``all``.
    """
    from medvlm.datasets import open_dataset
    from segmentation.base import Prompt
    from segmentation.textseg.predictor import MedVLMSegmenter

    dataset = open_dataset(data)
    segmenter = MedVLMSegmenter(checkpoint, text_level=level)
    meta = segmenter.meta
    all_ids = dataset.ids()
    chosen, used = checkpoint_split_ids(meta, all_ids, split, data)
    # an --ids file picks from the whole folder; n_trained_on below still counts any training image in it
    ids = _select_ids(all_ids if ids_file else chosen, ids_file, limit)
    trained_on = n_trained_on(meta, dataset.name, ids)

    def make_prompts(names: Sequence[str], masks: dict[str, Any]) -> tuple[list[Any], list[list[float]]]:
        return [Prompt(text=n) for n in names], [[] for _ in names]

    scores, worst, seconds = _score(dataset, ids, segmenter, make_prompts, keep_worst=keep_worst,
                                    structures=structures, label="text-seg")
    payload: dict[str, Any] = {"suite": "text-seg", "method": f"medvlm ({level} text)", "data": str(data),
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
    return "\n".join(lines)


def _emit(result: dict[str, Any], table: str, json_out: str | None) -> int:
    """Print a suite's table and write its JSON when asked."""
    from medvlm.outputs import write_json_atomic

    print(table)
    if json_out:
        write_json_atomic(result, Path(json_out))
        print(f"wrote {json_out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from medvlm.outputs import write_json_atomic

    if args.suite == "oracle-box":
        payload, worst = oracle_box(args.data, segmenter_name=args.segmenter, checkpoint=args.checkpoint,
                                    limit=args.limit, ids_file=args.ids)
    elif args.suite == "text-seg" and getattr(args, "ablation", None):
        from finetune.textseg_ablation import format_ablation, run_ablation
        from finetune.textseg_train import load_train_config

        result = run_ablation(args.ablation, load_train_config(args.config), args.ablation_steps, args.ablation_out)
        return _emit(result, format_ablation(result), args.json_out)
    elif args.suite == "grounding":
        from agents.commands import build_agent
        from eval.grounding import format_grounding_table, grounding_suite

        args.check = "off"  # the suite scores the raw regions and applies the anatomy check itself
        result = grounding_suite(args.data, agent=build_agent(args), split=args.split, limit=args.limit,
                                 ids_file=args.ids, types=args.types, mirror=args.mirror)
        return _emit(result, format_grounding_table(result), args.json_out)
    elif args.suite == "mask-codec":
        from eval.codec import codec_suite, format_codec_table, format_model_codec_table, model_codec_suite

        if getattr(args, "grounder", None) == "mini":  # the model's generated tokens, not the round trip
            from agents.mini import MiniGrounder

            result = model_codec_suite(args.data, MiniGrounder(args.llm_model), split=args.split, limit=args.limit,
                                       ids_file=args.ids)
            return _emit(result, format_model_codec_table(result), args.json_out)
        result = codec_suite(args.data, budgets=args.budgets or (16, 32, 64), limit=args.limit)
        return _emit(result, format_codec_table(result), args.json_out)
    elif args.suite == "link-report":
        from eval.link_report import format_link_report_table, link_report_suite

        result = link_report_suite(args.data, split=args.split, limit=args.limit, ids_file=args.ids, seed=args.seed)
        return _emit(result, format_link_report_table(result), args.json_out)
    elif args.suite == "refseg":
        from eval.refseg import format_refseg_table, refseg_suite

        result = refseg_suite(args.data, args.references, ks=tuple(args.ks or (1, 5)), seeds=tuple(range(args.seeds)),
                              limit=args.limit, compare=not args.no_compare)
        return _emit(result, format_refseg_table(result), args.json_out)
    elif args.suite == "weakloc":
        from agents.heatmap import HeatmapConfig
        from eval.weakloc import DEFAULT_DATASETS, format_weakloc_table, weakloc_suite

        result = weakloc_suite(args.datasets or DEFAULT_DATASETS, sources=args.sources or ("medvlm", "gradcam"),
                               split=args.split, limit=args.limit, checkpoint=args.checkpoint,
                               config=HeatmapConfig(box_fraction=args.box_fraction),
                               learned=args.learned)
        return _emit(result, format_weakloc_table(result), args.json_out)
    elif args.suite == "text-seg":
        payload, worst = text_seg(args.data, checkpoint=args.checkpoint, split=args.split, level=args.level,
                                  limit=args.limit, ids_file=args.ids)
    else:
        raise input_error("medvlm eval", expected="a known suite (oracle-box, text-seg, grounding, link-report)",
                          received=repr(args.suite), fix="run `medvlm eval --help`")
    print(format_table(payload))
    if args.json_out:
        write_json_atomic(payload, Path(args.json_out))
        print(f"wrote {args.json_out}")
    if args.report:
        from eval.report import write_segmentation_report

        path = write_segmentation_report(payload, worst, args.report, data=args.data)
        print(f"wrote {path}")
    return 0
