"""Is the answer in what medvlm-mini's language model sees? A linear readout of the five JSRT structure boxes
from the 64 image tokens the LLM reads (frozen vision tower -> pixel shuffle -> the adapter's projector).

The held-out probe (``medvlm eval mini-probe``) measures what the LLM answers; its ``--swap-images`` control how
much of that comes from the image. This readout bounds what the same tokens hold: a ridge regression from the
flattened tokens (64 x hidden) to the 20 relative box coordinates, fitted on the JSRT train split that
``medvlm train mllm`` trains on (the probe's split: ``val_fraction`` 0.2, ``split_seed`` 0), its ridge strength
chosen by 5-fold cross-validation there, scored on every held-out image, beside the image-blind prior (the
train mean box). A readout well above the prior with an LLM at the prior says the LLM does not use its input.

    HF_HUB_OFFLINE=1 python -m finetune.mini_readout --adapter agents/weights/mini   # ~1 min on 2 CPU cores

The ridge is the closed form in its dual (n = 129 images << d = 36,864 features): a few lines of numpy, not a
scikit-learn dependency.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from finetune.mllm_train import PROBE_STRUCTURES
from medvlm.types import Box

__all__ = ["fit_ridge", "image_token_features", "readout", "relative_boxes_miou"]

FloatArray = npt.NDArray[np.float64]


def fit_ridge(x: FloatArray, y: FloatArray, strength: float) -> tuple[FloatArray, FloatArray]:
    """Ridge regression ``y ~ x @ w + b`` in its dual form. ``x``: (n, d), ``y``: (n, k); the intercept is the
    mean of ``y`` and is not penalised. Returns (``w`` (d, k), ``b`` (k,)). ``strength`` > 0."""
    if strength <= 0:
        raise ValueError(f"ridge strength must be > 0, got {strength}")
    b = y.mean(axis=0)
    alpha = np.linalg.solve(x @ x.T + strength * np.eye(len(x)), y - b)
    return x.T @ alpha, b


def relative_boxes_miou(pred: FloatArray, truth: FloatArray) -> tuple[float, dict[str, float]]:
    """Box mIoU of (n, 4 * len(PROBE_STRUCTURES)) relative xyxy boxes (x0/W, y0/H, x1/W, y1/H per structure, in
    :data:`PROBE_STRUCTURES` order): overall and per structure. A predicted box with swapped corners is read as
    the box they span, so a regression can never fail to give one."""
    per: dict[str, list[float]] = {n: [] for n in PROBE_STRUCTURES}
    for p, t in zip(pred, truth):
        for k, name in enumerate(PROBE_STRUCTURES):
            a, b = p[4 * k:4 * k + 4], t[4 * k:4 * k + 4]
            box = Box(min(a[0], a[2]), min(a[1], a[3]), max(a[0], a[2]), max(a[1], a[3]))
            per[name].append(box.iou(Box(*(float(v) for v in b))))
    return float(np.mean([v for vs in per.values() for v in vs])), {n: float(np.mean(v)) for n, v in per.items()}


def image_token_features(processor: Any, model: Any, images: list[Any]) -> FloatArray:
    """The image tokens a medvlm-mini model (InternVL layout) feeds its LLM for each image (an
    :class:`medvlm.types.Image`), flattened: (n, tokens * hidden), fp32, no grad."""
    import torch
    from PIL import Image as PILImage

    rows = []
    for image in images:
        pixels = processor.image_processor(images=[PILImage.fromarray(image.to_rgb_uint8())],
                                           return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = model.get_image_features(pixel_values=pixels)
        tokens = getattr(out, "pooler_output", None)
        tokens = out if tokens is None else tokens
        rows.append(tokens[0].reshape(-1).float().numpy())
    return np.asarray(rows, dtype=np.float64)


def _targets(samples: list[Any]) -> FloatArray:
    rows = []
    for sample in samples:
        h, w = sample.image.shape
        boxes = [sample.mask(n).to_box() for n in PROBE_STRUCTURES]
        if any(b is None for b in boxes):
            raise ValueError(f"{sample.id}: a JSRT image without all of {PROBE_STRUCTURES}")
        rows.append(np.concatenate([b.to_array() / [w, h, w, h] for b in boxes if b is not None]))
    return np.asarray(rows, dtype=np.float64)


def readout(adapter: str, *, data_root: str | None = None, folds: int = 5,
            strengths: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)) -> dict[str, Any]:
    """Fit and score the readout for one adapter folder (see the module doc). ``strengths`` are per feature (the
    ridge strength is ``s * d`` on standardised features). Returns ``{"adapter", "n_train", "n_val",
    "strength", "cv_miou", "val_miou", "val_per_target", "prior_miou", "prior_per_target", "seconds"}``."""
    from agents.mini import load_mini
    from medvlm.datasets import open_dataset, split_ids

    t0 = time.perf_counter()
    processor, model = load_mini(adapter)
    ds = open_dataset("cxr_jsrt_scr", root=data_root)
    train_ids, val_ids = split_ids(ds.ids(), 0.2, 0, group=ds.group)  # the split medvlm train mllm makes
    train = [ds.load(i) for i in train_ids]
    val = [ds.load(i) for i in val_ids]
    xt = image_token_features(processor, model, [s.image for s in train])
    xv = image_token_features(processor, model, [s.image for s in val])
    yt, yv = _targets(train), _targets(val)
    mean, std = xt.mean(axis=0), xt.std(axis=0) + 1e-6
    xt, xv = (xt - mean) / std, (xv - mean) / std
    fold = np.arange(len(xt)) % folds
    scores = {}
    for s in strengths:
        pred = np.zeros_like(yt)
        for k in range(folds):
            w, b = fit_ridge(xt[fold != k], yt[fold != k], s * xt.shape[1])
            pred[fold == k] = xt[fold == k] @ w + b
        scores[s] = relative_boxes_miou(pred, yt)[0]
    best = max(scores, key=lambda s: scores[s])
    w, b = fit_ridge(xt, yt, best * xt.shape[1])
    val_miou, val_per = relative_boxes_miou(xv @ w + b, yv)
    prior_miou, prior_per = relative_boxes_miou(np.tile(yt.mean(axis=0), (len(yv), 1)), yv)
    return {"adapter": adapter, "n_train": len(train), "n_val": len(val), "strength": best,
            "cv_miou": scores[best], "val_miou": val_miou, "val_per_target": val_per, "prior_miou": prior_miou,
            "prior_per_target": prior_per, "seconds": round(time.perf_counter() - t0, 1)}


def format_readout_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`readout` results, one row each, the prior's row last."""
    head = "| readout from the image tokens of | val box mIoU | " + " | ".join(PROBE_STRUCTURES) + " |"
    lines = [head, "|" + "---|" * (2 + len(PROBE_STRUCTURES))]
    for r in rows:
        lines.append(f"| {r['adapter']} | {r['val_miou']:.3f} | "
                     + " | ".join(f"{r['val_per_target'][n]:.3f}" for n in PROBE_STRUCTURES) + " |")
    last = rows[-1]
    lines.append(f"| image-blind prior (train mean box) | {last['prior_miou']:.3f} | "
                 + " | ".join(f"{last['prior_per_target'][n]:.3f}" for n in PROBE_STRUCTURES) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", action="append", required=True, help="adapter or checkpoint folder (repeatable)")
    parser.add_argument("--data-root", default=None, help="the shared data folder (default: ../shared/data)")
    parser.add_argument("--json", default=None, help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    rows = [readout(a, data_root=args.data_root) for a in args.adapter]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    sys.stdout.write(format_readout_table(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
