"""Choose the per-structure postprocessing of a Med-VLM checkpoint on its training images (``postprocess.json``).

    python -m finetune.postprocess --checkpoint segmentation/textseg/weights/multi --per-folder 16
    python -m finetune.postprocess --checkpoint segmentation/textseg/weights/default --per-folder 16
    python -m finetune.postprocess --checkpoint multi --from-evidence --min-cases 8   # choose again, no images
    python -m finetune.postprocess --checkpoint segmentation/textseg/weights/body_ct --per-folder 16 --zoom

For every training source of the checkpoint found under the data root, up to ``--per-folder`` images NOT in its
val split are segmented with every labelled structure (kind gate on, postprocessing off, no routing); each found
mask is scored (Dice against the label) as drawn and after every candidate of
:data:`segmentation.textseg.postprocess.CANDIDATES` (largest component, hole filling, LiteMedSAM on the padded
boxes of its components, with ``--zoom`` a second Med-VLM look at a window around it, ...). Per structure the best
candidate is kept when it beats the raw mask by more than ``--min-gain`` mean Dice over at least ``--min-cases``
found masks
(:func:`~segmentation.textseg.postprocess.choose_candidate`), the way nnU-Net chooses its
postprocessing on training folds. ``postprocess.json`` is written into the checkpoint folder (``--out`` to write
elsewhere) with the evidence, and the model card's section is rewritten. Logs progress; the summary JSON goes to
stdout.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.recipes import checkpoint_recipe_parser, pick_ids
from medvlm.errors import input_error
from segmentation.textseg.postprocess import (
    CANDIDATES,
    PostprocessPolicy,
    choose_candidate,
    postprocess_mask,
    refine_by_boxes,
)

log = logging.getLogger(__name__)

__all__ = ["candidate_masks", "fit_postprocess", "main", "rechoose"]


def candidate_masks(mask: np.ndarray, refined: np.ndarray | None, zoomed: np.ndarray | None = None,
                    refined_zoomed: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every :data:`CANDIDATES` mask of one found ``mask`` (bool ``(H, W)``); ``refined``: its ``refine_box``
    result, ``zoomed``: its ``zoom`` result and ``refined_zoomed`` that one's ``refine_box`` result (None or empty:
    the candidates keep the mask they start from, as the predictor does)."""
    out = {}
    for name, ops in CANDIDATES.items():
        start, ref = mask, refined
        if "zoom" in ops and zoomed is not None and zoomed.any():
            start, ref = zoomed, refined_zoomed
        out[name] = postprocess_mask(start, [op for op in ops if op != "zoom"], _returning(ref))[0]
    return out


def _returning(mask: np.ndarray | None) -> Callable[[np.ndarray], np.ndarray | None]:
    return lambda _: mask


def fit_postprocess(checkpoint: str, *, folders: Sequence[str] | None = None, per_folder: int = 16,
                    min_gain: float = 0.005, min_cases: int = 5, out: str | None = None, seed: int = 0,
                    command: str = "", zoom: bool = False) -> dict[str, Any]:
    """Measure, choose and save (module docstring). ``folders``: dataset names or paths (default: the checkpoint's
    training sources). ``zoom``: also measure the ``zoom`` candidates (one more Med-VLM encoding per found mask;
    for a checkpoint trained on zoom windows, :mod:`segmentation.textseg.zoom`). Returns the policy's JSON."""
    from eval.metrics import dice
    from medvlm.datasets import default_data_root, open_dataset
    from segmentation.base import Prompt, as_rgb_uint8
    from segmentation.textseg.predictor import MedVLMSegmenter

    candidates = [c for c, ops in CANDIDATES.items() if zoom or "zoom" not in ops]

    segmenter = MedVLMSegmenter(checkpoint, route=False, postprocess="off")
    refiner = segmenter.refiner()
    meta = segmenter.meta
    if folders is None:
        folders = [d["name"] for d in meta.get("train_config", {}).get("data", [])]
    val_ids = set(meta.get("val_ids", []))
    scores: dict[str, dict[str, list[float]]] = {}
    counts: dict[str, int] = {}
    started = time.perf_counter()
    for name in folders:
        path = Path(name) if Path(name).is_dir() else default_data_root() / name
        if not path.is_dir():
            log.warning("skipping %s (not found)", name)
            continue
        dataset = open_dataset(path)
        chosen = pick_ids([i for i in dataset.ids() if i not in val_ids], per_folder, seed)
        counts[dataset.name] = len(chosen)
        for sample_id in chosen:
            sample = dataset.load(sample_id)
            names = [n for n, m in sample.masks.items() if m.any()]
            if not names:
                continue
            embedding = segmenter.encode(sample.image)
            rgb = as_rgb_uint8(sample.image) if zoom else None
            refiner_embedding = None
            for label, result in zip(names, segmenter.predict_many(embedding, [Prompt(text=n) for n in names])):
                mask = np.asarray(result.mask.data, dtype=bool)
                if not result.meta.get("found") or not mask.any():
                    continue  # postprocessing only touches found masks
                if refiner_embedding is None:
                    refiner_embedding = refiner.encode(sample.image)
                refined = refine_by_boxes(refiner, refiner_embedding, mask)
                zoomed = refined_zoomed = None
                if zoom:
                    zoomed = segmenter.zoom_mask(embedding, Prompt(text=label), mask, rgb=rgb)
                    if zoomed is not None:
                        refined_zoomed = refine_by_boxes(refiner, refiner_embedding, zoomed)
                structure = str(result.meta.get("structure") or label)
                per = scores.setdefault(structure, {c: [] for c in candidates})
                for cand, m in candidate_masks(mask, refined, zoomed, refined_zoomed).items():
                    if cand not in per:
                        continue
                    per[cand].append(float(dice(m, sample.masks[label])))
        log.info("%s: %d images, %.0f s so far", dataset.name, len(chosen), time.perf_counter() - started)
    if not scores:
        raise input_error("postprocess data", expected="training images with found structures",
                          received=f"none in {list(folders)}", fix="pass --folders with labelled training folders")
    evidence: dict[str, Any] = {"measured_by": command or "python -m finetune.postprocess", "images": counts,
                                "seconds": round(time.perf_counter() - started, 1),
                                "structures": {structure: {"n": len(per["none"]),
                                                           "mean_dice": {c: round(float(np.mean(v)), 4)
                                                                         for c, v in per.items()}}
                                               for structure, per in sorted(scores.items())}}
    return _choose_and_save(checkpoint, evidence, min_gain=min_gain, min_cases=min_cases, out=out, command=command)


def rechoose(checkpoint: str, *, min_gain: float = 0.005, min_cases: int = 5, out: str | None = None,
             command: str = "") -> dict[str, Any]:
    """Choose again from the evidence of the checkpoint's ``postprocess.json`` (no image is read): other
    ``min_gain`` / ``min_cases``."""
    from segmentation.textseg.predictor import resolve_checkpoint

    policy = PostprocessPolicy.load(resolve_checkpoint(checkpoint))
    if policy is None or "structures" not in policy.evidence:
        raise input_error("--from-evidence", expected="a postprocess.json with evidence in the checkpoint",
                          received="none", fix="run python -m finetune.postprocess --checkpoint CKPT first")
    evidence = {k: v for k, v in policy.evidence.items() if k not in ("min_gain", "min_cases", "measured_by")}
    evidence["measured_by"] = policy.evidence.get("measured_by", policy.source)
    return _choose_and_save(checkpoint, evidence, min_gain=min_gain, min_cases=min_cases, out=out, command=command)


def _choose_and_save(checkpoint: str, evidence: dict[str, Any], *, min_gain: float, min_cases: int,
                     out: str | None, command: str) -> dict[str, Any]:
    from segmentation.textseg.predictor import resolve_checkpoint

    ops: dict[str, tuple[str, ...]] = {}
    for structure, info in evidence["structures"].items():
        info["chosen"] = choose_candidate(info["mean_dice"], int(info["n"]), min_gain=min_gain, min_cases=min_cases)
        if CANDIDATES[info["chosen"]]:
            ops[structure] = CANDIDATES[info["chosen"]]
    evidence = {**evidence, "min_gain": min_gain, "min_cases": min_cases}
    policy = PostprocessPolicy(ops=ops, evidence=evidence, source=command or "python -m finetune.postprocess")
    target = Path(out) if out else resolve_checkpoint(checkpoint)
    target.mkdir(parents=True, exist_ok=True)
    policy.save(target)
    from finetune.model_card import update_postprocess_section

    if (target / "README.md").is_file():
        update_postprocess_section(target)
    return policy.to_json()


def main(argv: Sequence[str] | None = None) -> None:
    ap = checkpoint_recipe_parser(__doc__, per_folder=16, per_folder_help="training images per folder")
    ap.add_argument("--min-gain", type=float, default=0.005, help="mean Dice a candidate must add over none")
    ap.add_argument("--min-cases", type=int, default=5, help="found masks a structure needs for any choice")
    ap.add_argument("--zoom", action="store_true",
                    help="also measure the zoom candidates (a checkpoint trained with zooms: in its data sources)")
    ap.add_argument("--from-evidence", action="store_true",
                    help="choose again from the evidence already in the checkpoint's postprocess.json (no images)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = "python -m finetune.postprocess " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.from_evidence:
        summary = rechoose(args.checkpoint, min_gain=args.min_gain, min_cases=args.min_cases, out=args.out,
                           command=command)
    else:
        summary = fit_postprocess(args.checkpoint, folders=args.folders, per_folder=args.per_folder,
                                  min_gain=args.min_gain, min_cases=args.min_cases, out=args.out, seed=args.seed,
                                  command=command, zoom=args.zoom)
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
