"""``medvlm eval refseg``: reference-guided segmentation (k references) against the oracle box and the text-guided
Med-VLM, on the same target images.

Targets: every image of ``data``; when ``references`` is omitted (or the same folder), ``data`` is split as the
Med-VLM recipe splits it (``split_ids(0.2, seed 0)`` by patient group): references are drawn from its train part
and the targets are its val part, the images the shipped Med-VLM never saw. For each ``k`` and each seed, ``k``
reference images are drawn (``numpy`` generator seeded with the seed); every target is segmented with them; the
metrics of all seeds are pooled (so a structure's Dice is the mean over seeds and targets). Each target is encoded
once per encoder and reused by every k, seed and method.

JSON: ``{"suite": "refseg", "data", "references", "n_images", "ks", "seeds", "methods": {name: {"per_structure",
"mean", ...}}}``; each method entry has the shape of the other segmentation suites (:mod:`eval.suites`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medvlm.errors import input_error

__all__ = ["format_refseg_table", "refseg_suite"]

log = logging.getLogger(__name__)


def _targets_and_pool(data: str | Path, references: str | Path | None,
                      limit: int | None) -> tuple[Any, list[str], Any, list[str]]:
    from medvlm.datasets import open_dataset, split_ids

    target_ds = open_dataset(data)
    if references is None or Path(references).resolve() == Path(target_ds.root).resolve():
        pool, targets = split_ids(target_ds.ids(), 0.2, 0, group=target_ds.group)
        ref_ds = target_ds
    else:
        ref_ds = open_dataset(references)
        pool, targets = ref_ds.ids(), target_ds.ids()
    targets = targets[:limit] if limit else targets
    if not targets or not pool:
        raise input_error("eval refseg", expected="target images and a reference pool",
                          received=f"{len(targets)} targets, {len(pool)} references",
                          fix="pass a folder with annotated images (and --references with more)")
    return target_ds, targets, ref_ds, pool


def refseg_suite(data: str | Path, references: str | Path | None = None, *, ks: Sequence[int] = (1, 5),
                 seeds: Sequence[int] = (0, 1, 2), limit: int | None = None,
                 structures: Sequence[str] | None = None, compare: bool = True) -> dict[str, Any]:
    """Run the suite (see the module docstring); ``compare`` adds oracle-box and text-guided rows."""
    from eval.metrics import SegmentationAccumulator
    from segmentation.base import Prompt
    from segmentation.refseg import ReferenceSegmenter, RefSegConfig
    from segmentation.registry import build_segmenter

    started = time.perf_counter()
    target_ds, target_ids, ref_ds, pool = _targets_and_pool(data, references, limit)
    if any(k < 1 or k > len(pool) for k in ks):
        raise input_error("--k", expected=f"1..{len(pool)} (the reference pool)", received=str(list(ks)),
                          fix="use e.g. --k 1 --k 5")
    sam = build_segmenter("litemedsam")
    samples, embeddings = [], []
    for tid in target_ids:
        sample = target_ds.load(tid)
        samples.append(sample)
        embeddings.append(sam.encode(sample.image))
    names_of = [[n for n in s.masks if (structures is None or n in structures) and s.masks[n].any()]
                for s in samples]
    ref_cache: dict[str, tuple[Any, Any]] = {}
    accs: dict[str, SegmentationAccumulator] = {}

    def acc(method: str) -> SegmentationAccumulator:
        return accs.setdefault(method, SegmentationAccumulator())

    for k in ks:
        for seed in seeds:
            chosen = [str(i) for i in np.random.default_rng(seed).choice(pool, size=k, replace=False)]
            per_source = {}
            for source in ("vote", "segmenter"):
                per_source[source] = ReferenceSegmenter(sam, RefSegConfig(mask_source=source))
            for rid in chosen:
                if rid not in ref_cache:
                    ref = ref_ds.load(rid)
                    ref_cache[rid] = (ref, sam.encode(ref.image))
                ref, emb = ref_cache[rid]
                for rs in per_source.values():
                    rs.add_reference(ref.image, ref.masks, embedding=emb)
            for sample, emb, names in zip(samples, embeddings, names_of):
                spacing = sample.image.spacing_mm or (1.0, 1.0)
                for source, rs in per_source.items():
                    wanted = [n for n in names if n in rs.structures]
                    for name, result in rs.segment(sample.image, wanted, embedding=emb).items():
                        pred = result.mask.data if result.mask is not None else np.zeros_like(sample.masks[name])
                        acc(f"refseg k={k} ({source})").update(name, pred, sample.masks[name], spacing_mm=spacing)
            log.info("refseg k=%d seed %d done", k, seed)
    extra: dict[str, Any] = {}
    if compare:
        from eval.splits import n_trained_on, segmenter_meta
        from segmentation.textseg.predictor import MedVLMSegmenter

        text = MedVLMSegmenter()
        for sample, emb, names in zip(samples, embeddings, names_of):
            spacing = sample.image.spacing_mm or (1.0, 1.0)
            boxes = [Prompt(box=box) for n in names if (box := _box(sample, n)) is not None]
            for name, box_result in zip(names, sam.predict_many(emb, boxes)):
                acc("oracle-box (litemedsam)").update(name, box_result.mask.data, sample.masks[name],
                                                      spacing_mm=spacing)
            for name, text_result in zip(names, text.segment(sample.image, [Prompt(text=n) for n in names])):
                acc("text-guided (medvlm)").update(name, text_result.mask.data, sample.masks[name],
                                                   spacing_mm=spacing)
        extra["text_guided_n_trained_on"] = n_trained_on(segmenter_meta(text, target_ds.name), target_ds.name,
                                                         target_ids)
    return {"suite": "refseg", "data": str(data), "references": str(references or data),
            "n_images": len(target_ids), "target_ids": list(target_ids), "ks": list(ks), "seeds": list(seeds),
            "methods": {m: a.compute() for m, a in accs.items()}, "seconds": round(time.perf_counter() - started, 1),
            **extra}


def _box(sample: Any, name: str) -> Any:
    return sample.mask(name).to_box()


def format_refseg_table(payload: dict[str, Any]) -> str:
    """Dice per structure (rows) and method (columns), then mean Dice / HD95 / ASD rows."""
    methods = list(payload["methods"])
    structures = sorted({s for m in payload["methods"].values() for s in m["per_structure"]})
    width = max(12, *(len(m) for m in methods))
    title = (f"refseg | {payload['n_images']} target images of {payload['data']} | references from "
             f"{payload['references']} | k in {payload['ks']}, seeds {payload['seeds']} (pooled)")
    if "text_guided_n_trained_on" in payload:
        title += f" | text-guided trained on {payload['text_guided_n_trained_on']} of the targets"
    head = f"{'Dice':<16}" + "".join(f" {m:>{width}}" for m in methods)
    lines = [title, head, "-" * len(head)]

    def cell(value: Any, fmt: str) -> str:
        return f" {'-' if value is None else format(value, fmt):>{width}}"

    for s in structures:
        lines.append(f"{s:<16}" + "".join(cell(payload["methods"][m]["per_structure"].get(s, {}).get("dice"), ".3f")
                                          for m in methods))
    lines.append("-" * len(head))
    for key, label, fmt in (("dice", "mean Dice", ".3f"), ("hd95_mm", "mean HD95 mm", ".2f"),
                            ("asd_mm", "mean ASD mm", ".2f")):
        lines.append(f"{label:<16}" + "".join(cell(payload["methods"][m]["mean"].get(key), fmt) for m in methods))
    return "\n".join(lines)
