"""Fit the kind-of-image classifier of a Med-VLM checkpoint (:mod:`segmentation.textseg.kind_gate`).

    python -m finetune.kind_classifier --checkpoint segmentation/textseg/weights/multi --per-folder 20 \
        --val-per-folder 8

For every training source of the checkpoint that has a kind (:data:`medvlm.datasets.kinds.DATASET_KIND`), up to
``--per-folder`` images NOT in the checkpoint's val split are encoded by the checkpoint's own image encoder, pooled
(mean and standard deviation per channel) and fitted with a class-balanced multinomial logistic regression; up to
``--val-per-folder`` val images per folder measure it. The two files go into the checkpoint folder (``--out`` to
write elsewhere) with the fit's provenance (folders, counts, val accuracy per kind, this command). Logs progress;
the summary JSON is written to stdout by ``main``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from finetune.recipes import checkpoint_recipe_parser, pick_ids
from medvlm.errors import input_error
from segmentation.textseg.kind_gate import KindClassifier, pool_features

log = logging.getLogger(__name__)

__all__ = ["fit_kind_classifier", "fit_linear_softmax", "main"]


def fit_linear_softmax(x: npt.NDArray[np.float32], y: npt.NDArray[np.int64], n_classes: int, *,
                       weight_decay: float = 1e-3, steps: int = 300, seed: int = 0,
                       ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32],
                                  npt.NDArray[np.float32]]:
    """Class-balanced multinomial logistic regression on standardised ``x (N, D)`` with labels ``y (N,)`` in
    ``[0, n_classes)``: full-batch L-BFGS, L2 ``weight_decay``. Returns ``(weight (K, D), bias (K,), mean (D,),
    std (D,))``, the standardisation included (as :class:`KindClassifier` applies it)."""
    import torch

    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise input_error("kind classifier data", expected="x (N, D) and y (N,) with N > 0",
                          received=f"x {x.shape}, y {y.shape}", fix="encode at least one image per kind")
    torch.manual_seed(seed)
    mean = x.mean(axis=0).astype(np.float32)
    std = np.maximum(x.std(axis=0), 1e-6).astype(np.float32)
    xt = torch.from_numpy((x - mean) / std)
    yt = torch.from_numpy(y.astype(np.int64))
    counts = np.bincount(y, minlength=n_classes).astype(np.float32)
    # a kind with few images weighs as much as a kind with many: the gate must not learn "chest X-ray" as default
    class_weight = torch.from_numpy(np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_classes, 0.0)
                                    .astype(np.float32))
    linear = torch.nn.Linear(x.shape[1], n_classes)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(linear.parameters(), lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Any:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(xt), yt, weight=class_weight)
        loss = loss + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (linear.weight.detach().numpy().astype(np.float32), linear.bias.detach().numpy().astype(np.float32),
            mean, std)


def fit_kind_classifier(checkpoint: str, *, folders: Sequence[str] | None = None, per_folder: int = 20,
                        val_per_folder: int = 8, out: str | None = None, seed: int = 0, split_from: str | None = None,
                        command: str = "") -> dict[str, Any]:
    """Encode, fit, measure and save (module docstring). ``folders``: dataset names or paths (default: the
    training sources, with a kind, of ``split_from`` or else the checkpoint). ``split_from``: another checkpoint
    whose val ids are the held-out images (a chest X-ray checkpoint has none on CT; the multi-modality one does).
    Returns the summary written into ``kind_classifier.json``."""
    from medvlm.datasets import default_data_root, open_dataset
    from medvlm.datasets.kinds import kind_of
    from segmentation.textseg.predictor import MedVLMSegmenter

    segmenter = MedVLMSegmenter(checkpoint, kind_gate=False, route=False)
    meta = segmenter.meta
    if split_from is not None:
        from segmentation.textseg.checkpoint import read_checkpoint_config
        from segmentation.textseg.predictor import resolve_checkpoint

        meta = read_checkpoint_config(resolve_checkpoint(split_from))[1]
    if folders is None:
        folders = [d["name"] for d in meta.get("train_config", {}).get("data", []) if kind_of(d["name"])]
    if not folders:
        raise input_error("kind classifier folders", expected="dataset folders whose kind is known",
                          received="none", fix="pass --folders cxr_jsrt_scr ct_curvas_abdomen ...")
    val_ids = set(meta.get("val_ids", []))
    kinds: list[str] = []
    rows: dict[str, list[tuple[str, npt.NDArray[np.float32]]]] = {"train": [], "val": []}
    counts: dict[str, dict[str, int]] = {}
    started = time.perf_counter()
    for name in folders:
        path = Path(name) if Path(name).is_dir() else default_data_root() / name
        kind = kind_of(str(path))
        if kind is None or not path.is_dir():
            log.warning("skipping %s (%s)", name, "no kind" if kind is None else "not found")
            continue
        if kind not in kinds:
            kinds.append(kind)
        dataset = open_dataset(path)
        ids = list(dataset.ids())
        picks = {"train": pick_ids([i for i in ids if i not in val_ids], per_folder, seed),
                 "val": pick_ids([i for i in ids if i in val_ids], val_per_folder, seed)}
        counts[dataset.name] = {split: len(p) for split, p in picks.items()}
        for split, chosen in picks.items():
            for sample_id in chosen:
                embedding = segmenter.encode(dataset.load(sample_id).image)
                rows[split].append((kind, pool_features(embedding.features)))
        log.info("%s (%s): %s, %.0f s so far", dataset.name, kind, counts[dataset.name],
                 time.perf_counter() - started)
    if len(kinds) < 2:
        raise input_error("kind classifier folders", expected="images of at least two kinds",
                          received=str(kinds), fix="pass folders of several kinds of image")
    kinds.sort()
    x = np.stack([f for _, f in rows["train"]])
    y = np.asarray([kinds.index(k) for k, _ in rows["train"]], dtype=np.int64)
    weight, bias, mean, std = fit_linear_softmax(x, y, len(kinds), seed=seed)
    classifier = KindClassifier(kinds, weight, bias, mean, std)

    def accuracy(split: str) -> dict[str, Any]:
        per: dict[str, list[bool]] = {}
        for kind, feats in rows[split]:
            per.setdefault(kind, []).append(kinds[int(classifier.logits(feats).argmax())] == kind)
        flat = [v for vs in per.values() for v in vs]
        return {"all": round(float(np.mean(flat)), 4) if flat else None, "n": len(flat),
                "per_kind": {k: round(float(np.mean(v)), 4) for k, v in sorted(per.items())}}

    summary = {"checkpoint": str(segmenter.checkpoint), "split_from": split_from, "folders": counts,
               "train_accuracy": accuracy("train"),
               "val_accuracy": accuracy("val"), "encoder_precision": segmenter.precision, "seed": seed,
               "seconds": round(time.perf_counter() - started, 1), "command": command}
    classifier.info = summary
    classifier.save(out or segmenter.checkpoint)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    ap = checkpoint_recipe_parser(__doc__, per_folder=20, per_folder_help="training images encoded per folder")
    ap.add_argument("--val-per-folder", type=int, default=8, help="val images per folder for the accuracy")
    ap.add_argument("--split-from", default=None, help="checkpoint whose val ids are held out (default: this one)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = "python -m finetune.kind_classifier " + " ".join(sys.argv[1:] if argv is None else argv)
    summary = fit_kind_classifier(args.checkpoint, folders=args.folders, per_folder=args.per_folder,
                                  val_per_folder=args.val_per_folder, out=args.out, seed=args.seed,
                                  split_from=args.split_from, command=command)
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
