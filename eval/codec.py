"""``medvlm eval mask-codec``: round-trip Dice of the anatomy-token mask codec (:mod:`medvlm.tokens`) on every
mask of a dataset folder, per structure, with the token counts, for one or more point budgets."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["codec_suite", "format_codec_table", "format_model_codec_table", "model_codec_suite"]


def codec_suite(data: str | Path, budgets: Sequence[int] = (16, 32, 64), limit: int | None = None) -> dict[str, Any]:
    """Encode and decode every mask of ``data`` at each budget of ``budgets`` (max polygon vertices per mask);
    returns ``{"suite", "data", "n_images", "rows": [{"max_points", "per_structure": {name: {"dice", "n"}},
    "mean_dice", "min_dice", "tokens_mean", "tokens_max"}]}``."""
    from eval.metrics import dice
    from eval.splits import select_ids
    from medvlm.datasets import open_dataset
    from medvlm.tokens import decode_mask, encode_mask

    dataset = open_dataset(data)
    ids = select_ids(dataset.ids(), None, limit)
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


def model_codec_suite(data: str | Path, segmenter: Any, *, split: str = "auto", limit: int | None = None,
                      ids_file: str | None = None, max_points: int = 32) -> dict[str, Any]:
    """The anatomy-token path of a model (``segmenter.segment(image, phrase) -> (mask, reply)``, or
    ``segment_many(image, phrases)``, e.g.
    :class:`agents.mini.MiniGrounder`): "Segment the X." -> generated ``<poly>`` tokens -> mask, Dice against every
    ground-truth mask of the held-out split (as ``eval grounding``), per structure, beside the codec's own
    round-trip Dice at ``max_points`` (the ceiling). A reply that decodes to nothing scores Dice 0 and is counted
    in ``empty``. Returns ``{"suite": "mask-codec (model)", "n_images", "split", "per_structure": {name: {"dice",
    "ceiling", "n", "empty"}}, "mean_dice", "seconds"}``."""
    from eval.grounding import heldout_ids
    from eval.metrics import dice
    from medvlm.datasets import open_dataset
    from medvlm.tokens import decode_mask, encode_mask
    from prompts.anatomy import all_phrases, load_vocabulary

    dataset = open_dataset(data)
    ids, used, _ = heldout_ids(dataset, data, split, limit=limit, ids_file=ids_file)
    vocabulary = load_vocabulary()
    per: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"dice": [], "ceiling": [], "empty": []})
    t0 = time.perf_counter()
    for sid in ids:
        sample = dataset.load(sid)
        names = sorted(sample.masks)
        phrases = [all_phrases(n)[0] if n in vocabulary else n.replace("_", " ") for n in names]
        answers = (segmenter.segment_many(sample.image, phrases) if hasattr(segmenter, "segment_many")
                   else [segmenter.segment(sample.image, p) for p in phrases])
        for name, (predicted, _reply) in zip(names, answers):
            truth = sample.masks[name]
            per[name]["dice"].append(dice(predicted, truth))
            per[name]["empty"].append(float(not predicted.any()))
            per[name]["ceiling"].append(dice(decode_mask(encode_mask(truth, max_points=max_points), *truth.shape),
                                             truth))
    rows = {k: {"dice": float(np.mean(v["dice"])), "ceiling": float(np.mean(v["ceiling"])), "n": len(v["dice"]),
                "empty": int(sum(v["empty"]))} for k, v in sorted(per.items())}
    every = [d for v in per.values() for d in v["dice"]]
    return {"suite": "mask-codec (model)", "model": getattr(segmenter, "name", type(segmenter).__name__),
            "data": str(data), "n_images": len(ids), "split": used, "per_structure": rows,
            "mean_dice": float(np.mean(every)) if every else None, "seconds": round(time.perf_counter() - t0, 1)}


def format_model_codec_table(payload: dict[str, Any]) -> str:
    head = f"{'structure':<22} {'n':>4} {'Dice':>7} {'empty':>6} {'codec ceiling':>13}"
    lines = [f"mask-codec | model {payload['model']} | {payload['n_images']} images | split {payload['split']} | "
             f"{payload['seconds']} s", head, "-" * len(head)]
    for name, r in payload["per_structure"].items():
        lines.append(f"{name:<22} {r['n']:>4} {r['dice']:>7.3f} {r['empty']:>6} {r['ceiling']:>13.3f}")
    if payload["mean_dice"] is not None:
        lines.append(f"{'mean':<22} {'':>4} {payload['mean_dice']:>7.3f}")
    return "\n".join(lines)
