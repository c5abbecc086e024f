"""``medvlm eval mask-codec``: round-trip Dice of the anatomy-token mask codec (:mod:`medvlm.tokens`) on every
mask of a dataset folder, per structure, with the token counts, for one or more point budgets."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["codec_suite", "format_codec_table"]


def codec_suite(data: str | Path, budgets: Sequence[int] = (16, 32, 64), limit: int | None = None) -> dict[str, Any]:
    """Encode and decode every mask of ``data`` at each budget of ``budgets`` (max polygon vertices per mask);
    returns ``{"suite", "data", "n_images", "rows": [{"max_points", "per_structure": {name: {"dice", "n"}},
    "mean_dice", "min_dice", "tokens_mean", "tokens_max"}]}``."""
    from eval.metrics import dice
    from eval.suites import _select_ids
    from medvlm.datasets import open_dataset
    from medvlm.tokens import decode_mask, encode_mask

    dataset = open_dataset(data)
    ids = _select_ids(dataset.ids(), None, limit)
    masks = [(name, m) for sid in ids for name, m in dataset.load(sid).masks.items()]
    rows = []
    for budget in budgets:
        t0 = time.perf_counter()
        per: dict[str, list[float]] = defaultdict(list)
        tokens = []
        for name, m in masks:
            text = encode_mask(m, max_points=budget)
            tokens.append(text.count("<"))
            per[name].append(dice(decode_mask(text, *m.shape), m))
        every = [d for ds in per.values() for d in ds]
        rows.append({"max_points": budget, "mean_dice": float(np.mean(every)), "min_dice": float(np.min(every)),
                     "per_structure": {k: {"dice": float(np.mean(v)), "n": len(v)} for k, v in sorted(per.items())},
                     "tokens_mean": float(np.mean(tokens)), "tokens_max": int(np.max(tokens)),
                     "seconds": round(time.perf_counter() - t0, 1)})
    return {"suite": "mask-codec", "data": str(data), "n_images": len(ids), "n_masks": len(masks), "rows": rows}


def format_codec_table(payload: dict[str, Any]) -> str:
    names = sorted(payload["rows"][0]["per_structure"]) if payload["rows"] else []
    head = f"{'max points':>10} {'tokens mean':>11} {'max':>5} {'mean Dice':>9} {'min Dice':>8} " + " ".join(
        f"{n[:14]:>14}" for n in names)
    lines = [f"mask-codec | {payload['n_images']} images, {payload['n_masks']} masks | {payload['data']}", head,
             "-" * len(head)]
    for r in payload["rows"]:
        lines.append(f"{r['max_points']:>10} {r['tokens_mean']:>11.1f} {r['tokens_max']:>5} {r['mean_dice']:>9.4f} "
                     f"{r['min_dice']:>8.4f} " + " ".join(f"{r['per_structure'][n]['dice']:>14.4f}" for n in names))
    return "\n".join(lines)
