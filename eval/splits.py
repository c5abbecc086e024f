"""Which ids an evaluation suite scores: an id list or file, a limit, and the Med-VLM checkpoint's val split.

Shared by every suite of :mod:`eval` (one home, so the suites never import each other for it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medvlm.errors import input_error


def segmenter_meta(segmenter: Any, dataset: str) -> dict[str, Any]:
    """The training meta (val ids, sources) of the Med-VLM model that answers images of ``dataset`` (folder name
    or path): ``segmenter.meta_for(dataset)`` for a routed checkpoint, else ``segmenter.meta``."""
    meta_for = getattr(segmenter, "meta_for", None)
    return dict(meta_for(dataset)) if callable(meta_for) else dict(getattr(segmenter, "meta", {}))


def select_ids(ids: Sequence[str], ids_file: str | None, limit: int | None) -> list[str]:
    """The ids a suite scores: ``ids`` in order, or those listed in ``ids_file`` (one per line, each must be in
    ``ids``), then the first ``limit``. Unknown ids and a non-positive limit are input errors."""
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
