"""Text-guided segmentation on every kind of image: "not in this image" (existence) and 3D volumes.

- :func:`existence_suite`: on each image of a folder's val split, every ground-truth structure (matched phrase)
  and every structure that cannot be in that kind of image (:func:`medvlm.datasets.kinds.mismatched_structures`:
  "liver" on a brain MR, "polyp" on a chest X-ray) are asked, with one image encoding. Reports the share of
  matched phrases found (a non-empty mask) and the share of mismatched phrases that still got a mask (false
  positives), with the mean existence probability of each.
- :func:`volume_suite`: 3D Dice / HD95 / ASD (mm, the volume's voxel spacing) per volume of a folder whose reader
  has ``volume_ids()`` / ``volume()`` (mr_hippocampus_msd): every axial slice of each val volume is segmented
  (empty slices included, so false positives count), the slices are stacked, the largest 3D connected component
  is kept, and the stack is scored against the labels; the whole ("hippocampus" = both parts) and each part.
- :func:`text_seg_all`: both plus :func:`eval.suites.text_seg` over a list of folders, grouped by kind of image.

Empty-mask behaviour follows :mod:`eval.metrics` (both empty: Dice 1, HD95/ASD 0; one empty: Dice 0, HD95/ASD
inf, counted in ``n_inf``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from eval.splits import checkpoint_split_ids, segmenter_meta, select_ids

log = logging.getLogger(__name__)

__all__ = ["CROSS_SOURCE_BOXES", "DEFAULT_FOLDERS", "existence_suite", "finding_box_suite", "format_all_tables",
           "format_existence_table", "largest_component_3d", "text_seg_all", "volume_suite"]

DEFAULT_FOLDERS: tuple[str, ...] = (
    "cxr_jsrt_scr", "cxr_covid_v7_lungs", "ct_curvas_abdomen", "ct_msd_spleen", "mr_hippocampus_msd",
    "mr_brats2015_slices", "mr_acdc_cardiac", "us_hc18_fetal_head", "derm_ham10000", "endo_kvasir_polyp",
)
"""Folders of ``medvlm eval text-seg --all`` (each scored on the checkpoint's val split where it has one)."""


#: chest X-rays from another hospital than the training masks: (folder, structure asked, box label it should
#: cover). NIH ChestX-ray14 cardiomegaly boxes enclose the enlarged heart, so the heart mask's box is scored on them.
CROSS_SOURCE_BOXES: tuple[tuple[str, str, str], ...] = (("cxr_nih_bbox", "heart", "cardiomegaly"),)


def finding_box_suite(data: str | Path, segmenter: Any, structure: str, label: str) -> dict[str, Any]:
    """Every box labelled ``label`` in the folder ``data`` against the box of ``segmenter``'s mask for
    ``structure`` on the same image (pixels of the original grid; an empty mask scores IoU 0). Every image is used
    (such folders are never trained on). Returns ``{"suite": "finding-box", "data", "structure", "label", "n",
    "miou", "per_case": [{"id", "iou"}]}``; ``miou`` None when the folder has no such box."""
    from medvlm.datasets import open_dataset
    from medvlm.types import Mask
    from segmentation.base import Prompt

    dataset = open_dataset(data)
    cases: list[dict[str, Any]] = []
    for sample_id in dataset.ids():
        sample = dataset.load(sample_id)
        boxes = [b.box for b in sample.boxes if b.label == label]
        if not boxes:
            continue
        result = segmenter.predict_many(segmenter.encode(sample.image), [Prompt(text=structure)])[0]
        got = Mask(result.mask.data).to_box() if _found(result) else None
        cases += [{"id": sample_id, "iou": 0.0 if got is None else float(got.iou(box))} for box in boxes]
    ious = [float(c["iou"]) for c in cases]
    return {"suite": "finding-box", "data": str(data), "structure": structure, "label": label, "n": len(cases),
            "miou": float(np.mean(ious)) if ious else None, "per_case": cases}


def _found(result: Any) -> bool:
    return bool(result.meta.get("found", bool(result.mask.data.any())))


def existence_suite(data: str | Path, segmenter: Any, *, split: str = "auto", limit: int | None = None,
                    ) -> dict[str, Any]:
    """Matched vs mismatched phrases on the folder ``data`` with the Med-VLM ``segmenter`` (see module docstring).

    Returns ``{"suite": "existence", "data", "kind", "n_images", "split", "matched": {"n", "found_rate",
    "mean_existence"}, "mismatched": {"n", "mask_rate", "mean_existence", "per_structure": {name: mask_rate}}}``;
    ``mean_existence`` is None for a checkpoint without an existence head.
    """
    from medvlm.datasets import open_dataset
    from medvlm.datasets.kinds import kind_of, mismatched_structures
    from segmentation.base import Prompt

    dataset = open_dataset(data)
    chosen, used = checkpoint_split_ids(segmenter_meta(segmenter, dataset.name), dataset.ids(), split, data)
    ids = select_ids(chosen, None, limit)
    foreign = mismatched_structures(dataset.name)
    matched: list[tuple[bool, float | None]] = []
    mismatched: dict[str, list[tuple[bool, float | None]]] = {name: [] for name in foreign}
    for sample_id in ids:
        sample = dataset.load(sample_id)
        names = [n for n, m in sample.masks.items() if m.any()]
        asked = names + list(foreign)
        if not asked:
            continue
        embedding = segmenter.encode(sample.image)
        # only "found" and the existence are read, which postprocessing never changes: skip its second encoder
        embedding.extra["postprocess"] = "off"
        results = segmenter.predict_many(embedding, [Prompt(text=n) for n in asked])
        for name, result in zip(asked, results):
            record = (_found(result), result.meta.get("existence"))
            (matched.append(record) if name in names else mismatched[name].append(record))

    def summary(records: Sequence[tuple[bool, float | None]]) -> tuple[int, float | None, float | None]:
        if not records:
            return 0, None, None
        ex = [e for _, e in records if e is not None]
        return len(records), float(np.mean([f for f, _ in records])), (float(np.mean(ex)) if ex else None)

    n_m, found_rate, ex_m = summary(matched)
    flat = [r for rs in mismatched.values() for r in rs]
    n_x, mask_rate, ex_x = summary(flat)
    return {"suite": "existence", "data": str(data), "kind": kind_of(dataset.name), "n_images": len(ids),
            "split": used, "matched": {"n": n_m, "found_rate": found_rate, "mean_existence": ex_m},
            "mismatched": {"n": n_x, "mask_rate": mask_rate, "mean_existence": ex_x,
                           "per_structure": {k: summary(v)[1] for k, v in sorted(mismatched.items())}}}


def largest_component_3d(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """The largest 26-connected component of a bool ``(Z, H, W)`` mask (an empty mask stays empty)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())[1:]
    return np.asarray(labels == int(np.argmax(sizes)) + 1)


def volume_suite(data: str | Path, segmenter: Any, *, split: str = "auto", limit: int | None = None,
                 keep_largest: bool = True) -> dict[str, Any]:
    """3D scores per val volume of a volume folder (see module docstring). Texts: every labelled structure and
    the wholes of the vocabulary whose parts are labelled ("hippocampus").

    Returns ``{"suite": "text-seg-3d", "data", "n_volumes", "split", "per_structure": {...}, "mean": {...},
    "per_volume": [{"id", "structure", "dice"}], "seconds_per_slice"}`` (shapes of
    :class:`eval.metrics.SegmentationAccumulator`).
    """
    from eval.metrics import SegmentationAccumulator, dice
    from medvlm.datasets import open_dataset
    from medvlm.volume import with_neighbours
    from prompts.anatomy import parts_of, wholes_of
    from segmentation.base import Prompt
    from segmentation.volume import volume_context

    dataset = open_dataset(data)
    if not hasattr(dataset, "volume_ids"):
        from medvlm.errors import input_error

        raise input_error("text-seg 3D", expected="a folder of 3D volumes (e.g. mr_hippocampus_msd)",
                          received=str(data), fix="use the 2D suite (medvlm eval text-seg --data FOLDER)")
    every_slice: Any = type(dataset)(dataset.root, all_slices=True)  # type: ignore[call-arg]
    context = volume_context(segmenter)
    meta = segmenter_meta(segmenter, dataset.name)
    chosen, used = checkpoint_split_ids(meta, dataset.ids(), split, data)
    volumes = sorted({dataset.group(i) for i in chosen})
    trained_on = sum(1 for v in volumes if v not in {dataset.group(i) for i in meta.get("val_ids", [])})
    volumes = select_ids(volumes, None, limit)
    acc = SegmentationAccumulator()
    per_volume: list[dict[str, Any]] = []
    n_slices, started = 0, time.perf_counter()
    for vid in volumes:
        vol = every_slice.volume(vid)
        labels = dict(vol.labels)
        for whole in sorted({w for name in labels for w in wholes_of(name)}):
            labels.setdefault(whole, np.logical_or.reduce([labels[p] for p in parts_of(whole) if p in labels]))
        names = sorted(labels)
        pred = {n: np.zeros_like(labels[n]) for n in names}
        for k in range(vol.image.shape[0]):
            # every slice, labelled or not, exactly as the reader shows it (window, orientation)
            image = every_slice.load(f"{vid}_z{k:03d}").image
            if context:  # the slices around it, for a checkpoint (or specialist) trained with them
                image = with_neighbours(image, vol.image, k, context)
            embedding = segmenter.encode(image)
            embedding.extra["postprocess"] = "off"  # as segment_volume: a volume is postprocessed in 3D
            for name, result in zip(names, segmenter.predict_many(embedding, [Prompt(text=n) for n in names])):
                pred[name][k] = result.mask.data
            n_slices += 1
        for name in names:
            p = largest_component_3d(pred[name]) if keep_largest else pred[name]
            acc.update(name, p, labels[name], spacing_mm=vol.spacing_mm)
            per_volume.append({"id": vid, "structure": name, "dice": round(float(dice(p, labels[name])), 4)})
        log.info("text-seg 3D %s: %s", vid, {r["structure"]: r["dice"] for r in per_volume[-len(names):]})
    seconds = time.perf_counter() - started
    return {"suite": "text-seg-3d", "method": "medvlm (slices stacked, largest 3D component)", "data": str(data),
            "n_volumes": len(volumes), "n_images": len(volumes), "split": used, "n_trained_on": trained_on,
            "checkpoint": segmenter.checkpoint, **acc.compute(), "per_volume": per_volume,
            "seconds_per_slice": round(seconds / max(1, n_slices), 3)}


def format_existence_table(rows: Sequence[dict[str, Any]]) -> str:
    """One row per folder: matched found rate and existence, mismatched mask rate and existence."""
    def f(v: Any, fmt: str = ".3f") -> str:
        return "-" if v is None else format(v, fmt)

    head = (f"{'folder':<24} {'kind':<11} {'imgs':>5} {'matched n':>9} {'found':>6} {'exist':>6} "
            f"{'mismatched n':>12} {'masked':>7} {'exist':>6}")
    lines = ["not in this image: matched phrases found vs mismatched phrases (another kind's structures) masked",
             head, "-" * len(head)]
    for r in rows:
        m, x = r["matched"], r["mismatched"]
        lines.append(f"{Path(r['data']).name:<24} {r['kind'] or '-':<11} {r['n_images']:>5} {m['n']:>9} "
                     f"{f(m['found_rate']):>6} {f(m['mean_existence']):>6} {x['n']:>12} {f(x['mask_rate']):>7} "
                     f"{f(x['mean_existence']):>6}")
    tot_m = sum(r["matched"]["n"] for r in rows)
    tot_x = sum(r["mismatched"]["n"] for r in rows)
    found = sum((r["matched"]["found_rate"] or 0) * r["matched"]["n"] for r in rows) / max(1, tot_m)
    masked = sum((r["mismatched"]["mask_rate"] or 0) * r["mismatched"]["n"] for r in rows) / max(1, tot_x)
    lines += ["-" * len(head), f"{'all':<24} {'':<11} {'':>5} {tot_m:>9} {found:>6.3f} {'':>6} {tot_x:>12} "
              f"{masked:>7.3f}"]
    return "\n".join(lines)


def text_seg_all(folders: Sequence[str] = DEFAULT_FOLDERS, *, checkpoint: str | None = None, split: str = "auto",
                 limit: int | None = None, kind_gate: bool = True, postprocess: str = "full",
                 specialists: bool = True) -> dict[str, Any]:
    """Every folder of ``folders`` present on disk: the 2D text-seg suite (3D for volume folders) and the
    existence suite, with one segmenter (``kind_gate=False``: without its kind-of-image gate, to see what the
    existence head does alone; ``postprocess``: the segmenter's option, ``off`` to score the decoder's masks as
    drawn; ``specialists=False``: no specialist checkpoint answers its kind). Returns ``{"suite": "text-seg-all",
    "checkpoint", "kind_gate", "postprocess", "specialists", "folders":
    {name: {"kind", "segmentation": <suite JSON>, "existence": <existence JSON>}}, "skipped": {name: reason}}``."""
    from eval.suites import text_seg
    from medvlm.datasets import default_data_root
    from medvlm.datasets.kinds import kind_of
    from medvlm.errors import InputError
    from segmentation.textseg.predictor import MedVLMSegmenter

    segmenter = MedVLMSegmenter(checkpoint, kind_gate=kind_gate, postprocess=postprocess, specialists=specialists)
    out: dict[str, Any] = {"suite": "text-seg-all", "checkpoint": segmenter.checkpoint, "kind_gate": kind_gate,
                           "postprocess": postprocess, "specialists": specialists, "folders": {},
                           "skipped": {}}
    for name in folders:
        path = Path(name) if Path(name).is_dir() else default_data_root() / name
        if not path.is_dir():
            out["skipped"][name] = f"{path} not found"
            continue
        try:
            from medvlm.datasets import open_dataset

            if hasattr(open_dataset(path), "volume_ids"):
                seg = volume_suite(path, segmenter, split=split, limit=limit)
            else:
                seg, _ = text_seg(path, segmenter=segmenter, split=split, limit=limit)
            ex = existence_suite(path, segmenter, split=split, limit=limit)
        except InputError as exc:
            out["skipped"][name] = str(exc)
            continue
        out["folders"][name] = {"kind": kind_of(name), "segmentation": seg, "existence": ex}
    out["cross_source"] = []
    for name, structure, label in CROSS_SOURCE_BOXES:
        path = default_data_root() / name
        if path.is_dir():
            out["cross_source"].append(finding_box_suite(path, segmenter, structure, label))
        else:
            out["skipped"][name] = f"{path} not found"
    return out


def format_all_tables(result: dict[str, Any]) -> str:
    """One segmentation table per kind of image, then the existence table."""
    from eval.suites import format_table

    blocks: list[str] = []
    by_kind: dict[str, list[str]] = {}
    for name, entry in result["folders"].items():
        by_kind.setdefault(entry["kind"] or "other", []).append(name)
    for kind, names in by_kind.items():
        blocks.append(f"== {kind}")
        blocks += [format_table(result["folders"][n]["segmentation"]) for n in names]
    blocks.append(format_existence_table([e["existence"] for e in result["folders"].values()]))
    for r in result.get("cross_source", []):
        miou = "-" if r["miou"] is None else f"{r['miou']:.3f}"
        blocks.append(f"another hospital: {Path(r['data']).name}, box of the '{r['structure']}' mask against the "
                      f"{r['n']} '{r['label']}' boxes: mIoU {miou} ("
                      + ", ".join(f"{c['iou']:.3f}" for c in r["per_case"]) + ")")
    if result["skipped"]:
        blocks.append("skipped: " + "; ".join(f"{k} ({v})" for k, v in result["skipped"].items()))
    return "\n\n".join(blocks)
