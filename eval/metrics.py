"""Evaluation metrics for grounding and segmentation: overlap, surface distance, boxes, pointing game.

Every metric is a pure function plus an accumulator class (``update(...)`` per case, ``compute() -> dict``).

Conventions shared by the mask metrics
--------------------------------------
- Masks are boolean arrays of any dimensionality (``(H, W)`` images, ``(D, H, W)`` volumes); a
  :class:`medvlm.types.Mask` or a numeric array holding only 0/1 is accepted too. Probabilities are
  refused rather than silently thresholded.
- ``spacing_mm`` gives the physical size of one voxel along each array axis, in array-axis order
  (``(row_mm, col_mm)`` in 2D, ``(slice_mm, row_mm, col_mm)`` in 3D); ``None`` means 1.0 per axis, so the
  distances come out in pixels.
- A mask's **surface** is ``mask XOR binary_erosion(mask)`` with the full-connectivity structuring element
  (8-neighbourhood in 2D, 26 in 3D) and everything outside the array counted as background, so an object
  touching the array border has a surface there. This is the voxel-based surface of MONAI's
  ``get_mask_edges``/``get_surface_distance``; DeepMind's ``surface-distance`` weights surfels by their
  area instead, which gives slightly different numbers on coarse anisotropic grids.
- Directed surface distances are Euclidean, in mm, from each surface voxel of one mask to the nearest
  surface voxel of the other (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing_mm``).

Empty masks (the choice made for every metric here)
---------------------------------------------------
==========  ====================  ======================
metric      both empty            exactly one empty
==========  ====================  ======================
Dice, IoU   1.0 (agreement)       0.0
HD95, ASD   0.0 mm                ``inf``
NSD         1.0                   0.0
==========  ====================  ======================

"Both empty -> 1.0" is MONAI's ``ignore_empty=False`` reading: predicting nothing where there is nothing is
a perfect answer, not a missing one. Accumulators exclude ``inf`` and NaN from means and standard
deviations and report how many there were (``n_inf``, ``n_nan``) so a reader can tell a good mean from one
that hides missed structures.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from medvlm.errors import input_error
from medvlm.types import Box, Mask

__all__ = [
    "ASDAccumulator",
    "BoxAccumulator",
    "DiceAccumulator",
    "HD95Accumulator",
    "IoUAccumulator",
    "MaskLike",
    "NSDAccumulator",
    "PointingGameAccumulator",
    "SegmentationAccumulator",
    "asd",
    "box_iou",
    "dice",
    "hausdorff",
    "hd95",
    "iou",
    "nsd",
    "pointing_game",
    "summarize",
    "surface_distances",
]

MaskLike = npt.ArrayLike | Mask
"""A bool array of any shape, a 0/1 numeric array, or a :class:`Mask`."""

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]


# --------------------------------------------------------------------------------------------------------------------
# input handling


def _as_mask(value: MaskLike, what: str, name: str) -> BoolArray:
    arr = value.data if isinstance(value, Mask) else np.asarray(value)
    if arr.ndim == 0:
        raise input_error(what, expected=f"{name} as an array with at least one axis", received="a scalar",
                          fix="pass the mask as a (H, W) or (D, H, W) array")
    if arr.dtype == np.bool_:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise input_error(what, expected=f"{name} as a bool or 0/1 numeric array", received=f"dtype {arr.dtype}",
                          fix="convert the mask to a bool array")
    if arr.size and not np.all((arr == 0) | (arr == 1)):
        raise input_error(what, expected=f"{name} as a binary mask (bool, or only 0 and 1)",
                          received=f"dtype {arr.dtype} with values in [{np.nanmin(arr)}, {np.nanmax(arr)}]",
                          fix="threshold probabilities or select one label first, e.g. `prob > 0.5` or `labels == k`")
    return arr.astype(bool)


def _pair(pred: MaskLike, gt: MaskLike, what: str) -> tuple[BoolArray, BoolArray]:
    p = _as_mask(pred, what, "pred")
    g = _as_mask(gt, what, "gt")
    if p.shape != g.shape:
        raise input_error(what, expected="pred and gt of the same shape",
                          received=f"pred shape {p.shape} and gt shape {g.shape}",
                          fix="resample the prediction onto the ground-truth grid before scoring")
    return p, g


def _spacing(spacing_mm: Sequence[float] | npt.ArrayLike | None, ndim: int, what: str) -> tuple[float, ...]:
    if spacing_mm is None:
        return (1.0,) * ndim
    try:
        arr: FloatArray | None = np.asarray(spacing_mm, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is not None and arr.ndim != 1:
        arr = None
    if arr is None or arr.size != ndim:
        raise input_error(what, expected=f"spacing_mm with one value per mask axis ({ndim})",
                          received=f"spacing_mm={spacing_mm!r}",
                          fix="pass (row_mm, col_mm) for 2D or (slice_mm, row_mm, col_mm) for 3D masks")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise input_error(what, expected="positive finite spacing_mm values", received=f"spacing_mm={spacing_mm!r}",
                          fix="use the voxel size in mm from the image header; use None for 1 mm per axis")
    return tuple(float(v) for v in arr)


def _tolerance(value: float, what: str, name: str) -> float:
    t = float(value)
    if not math.isfinite(t) or t < 0:
        raise input_error(what, expected=f"{name} >= 0 and finite", received=f"{name}={value!r}",
                          fix=f"pass a non-negative {name}")
    return t


# --------------------------------------------------------------------------------------------------------------------
# overlap metrics


def dice(pred: MaskLike, gt: MaskLike) -> float:
    """Dice coefficient ``2|P∩G| / (|P| + |G|)`` of two same-shape binary masks (any dimensionality).

    Returns a value in [0, 1]. Empty masks: both empty -> 1.0; exactly one empty -> 0.0.
    """
    p, g = _pair(pred, gt, "dice")
    total = int(p.sum()) + int(g.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, g).sum()) / total


def iou(pred: MaskLike, gt: MaskLike) -> float:
    """Intersection over union (Jaccard) ``|P∩G| / |P∪G|`` of two same-shape binary masks (any dimensionality).

    Returns a value in [0, 1]. Empty masks: both empty -> 1.0; exactly one empty -> 0.0.
    """
    p, g = _pair(pred, gt, "iou")
    union = int(np.logical_or(p, g).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(p, g).sum()) / union


# --------------------------------------------------------------------------------------------------------------------
# surface distances


def _surface(mask: BoolArray) -> BoolArray:
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return np.logical_xor(mask, eroded)


def _axis_extent(mask: BoolArray, axis: int) -> slice:
    other = tuple(a for a in range(mask.ndim) if a != axis)
    idx = np.flatnonzero(mask.any(axis=other)) if other else np.flatnonzero(mask)
    return slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0)


def _directed_pair(p: BoolArray, g: BoolArray, spacing: tuple[float, ...]) -> tuple[FloatArray, FloatArray]:
    # Crop to the bounding box of the union: outside it both masks are background, so erosion with
    # border_value=0 finds the same surfaces, and Euclidean distances between voxels inside the box do not
    # depend on the grid around it. This keeps small structures in large volumes cheap.
    union = np.logical_or(p, g)
    slices = tuple(_axis_extent(union, axis) for axis in range(union.ndim))
    ps, gs = _surface(p[slices]), _surface(g[slices])
    dist_to_g = ndimage.distance_transform_edt(~gs, sampling=spacing)
    dist_to_p = ndimage.distance_transform_edt(~ps, sampling=spacing)
    return np.asarray(dist_to_g[ps], dtype=np.float64), np.asarray(dist_to_p[gs], dtype=np.float64)


def surface_distances(pred: MaskLike, gt: MaskLike,
                      spacing_mm: Sequence[float] | None = None) -> tuple[FloatArray, FloatArray]:
    """Directed surface distances in mm: ``(pred surface -> gt surface, gt surface -> pred surface)``.

    Each is a 1-D float64 array with one entry per surface voxel of the source mask, in row-major voxel order.
    Empty masks: if either mask is empty both arrays are empty (there is nothing to measure to); the scalar
    metrics below turn that into their documented empty values.
    """
    p, g = _pair(pred, gt, "surface_distances")
    spacing = _spacing(spacing_mm, p.ndim, "surface_distances")
    if not p.any() or not g.any():
        return np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.float64)
    return _directed_pair(p, g, spacing)


def _empty_case(p: BoolArray, g: BoolArray) -> bool | None:
    """None when both masks are non-empty; True when both are empty; False when exactly one is."""
    has_p, has_g = bool(p.any()), bool(g.any())
    if has_p and has_g:
        return None
    return not has_p and not has_g


def hausdorff(pred: MaskLike, gt: MaskLike, spacing_mm: Sequence[float] | None = None,
              percentile: float = 100.0) -> float:
    """Symmetric (percentile) Hausdorff distance in mm.

    ``max(q(d(P->G)), q(d(G->P)))`` where ``q`` is the ``percentile``-th percentile (numpy's default linear
    interpolation) of each directed surface-distance set; 100 gives the classic Hausdorff distance.
    Empty masks: both empty -> 0.0; exactly one empty -> ``inf``.
    """
    if not 0.0 <= float(percentile) <= 100.0:
        raise input_error("hausdorff", expected="percentile in [0, 100]", received=f"percentile={percentile!r}",
                          fix="use 95 for HD95 or 100 for the maximum")
    p, g = _pair(pred, gt, "hausdorff")
    spacing = _spacing(spacing_mm, p.ndim, "hausdorff")
    empty = _empty_case(p, g)
    if empty is not None:
        return 0.0 if empty else math.inf
    d_pg, d_gp = _directed_pair(p, g, spacing)
    return float(max(np.percentile(d_pg, percentile), np.percentile(d_gp, percentile)))


def hd95(pred: MaskLike, gt: MaskLike, spacing_mm: Sequence[float] | None = None) -> float:
    """95th-percentile Hausdorff distance in mm (MONAI's definition).

    The maximum of the 95th percentiles of the two directed surface-distance sets (not the 95th percentile of
    their union). Masks of any dimensionality; ``spacing_mm`` one value per axis.
    Empty masks: both empty -> 0.0; exactly one empty -> ``inf``.
    """
    return hausdorff(pred, gt, spacing_mm, percentile=95.0)


def asd(pred: MaskLike, gt: MaskLike, spacing_mm: Sequence[float] | None = None) -> float:
    """Average symmetric surface distance in mm.

    The mean over the union of both directed surface-distance sets, i.e. each surface voxel of either mask
    weighs the same (MONAI's ``symmetric=True``). Empty masks: both empty -> 0.0; exactly one empty -> ``inf``.
    """
    p, g = _pair(pred, gt, "asd")
    spacing = _spacing(spacing_mm, p.ndim, "asd")
    empty = _empty_case(p, g)
    if empty is not None:
        return 0.0 if empty else math.inf
    d_pg, d_gp = _directed_pair(p, g, spacing)
    return float(np.concatenate([d_pg, d_gp]).mean())


def nsd(pred: MaskLike, gt: MaskLike, tolerance_mm: float, spacing_mm: Sequence[float] | None = None) -> float:
    """Normalized surface Dice at ``tolerance_mm``, in [0, 1].

    ``(#{P surface voxels within tol of G's surface} + #{G surface voxels within tol of P's surface})
    / (#P surface voxels + #G surface voxels)``, with "within" meaning ``distance <= tolerance_mm`` (as MONAI's
    ``compute_surface_dice``; voxels are counted, not weighted by surfel area).
    Empty masks: both empty -> 1.0; exactly one empty -> 0.0.
    """
    tol = _tolerance(tolerance_mm, "nsd", "tolerance_mm")
    p, g = _pair(pred, gt, "nsd")
    spacing = _spacing(spacing_mm, p.ndim, "nsd")
    empty = _empty_case(p, g)
    if empty is not None:
        return 1.0 if empty else 0.0
    d_pg, d_gp = _directed_pair(p, g, spacing)
    # A distance equal to the tolerance counts as within it even when the distance transform's rounding puts
    # it one ulp above (e.g. 0.2 mm computed as 0.20000000000000004).
    tol = tol * (1.0 + 1e-9) + 1e-12
    return float((np.count_nonzero(d_pg <= tol) + np.count_nonzero(d_gp <= tol)) / (d_pg.size + d_gp.size))


# --------------------------------------------------------------------------------------------------------------------
# statistics shared by the accumulators


def summarize(values: Iterable[float]) -> dict[str, Any]:
    """Mean and population std (ddof=0) of the finite values, plus counts.

    Returns ``{"mean", "std", "n", "n_nan", "n_inf"}``: ``n`` counts every value given, ``n_nan`` and ``n_inf``
    those left out of ``mean``/``std``. ``mean`` and ``std`` are None (JSON null) when no value is finite, so
    the dict stays valid strict JSON.
    """
    arr = np.asarray(list(values), dtype=np.float64)
    nan = np.isnan(arr)
    inf = np.isinf(arr)
    finite = arr[~nan & ~inf]
    mean = float(finite.mean()) if finite.size else None
    std = float(finite.std()) if finite.size else None
    return {"mean": mean, "std": std, "n": int(arr.size), "n_nan": int(nan.sum()), "n_inf": int(inf.sum())}


class _ScalarAccumulator:
    """Collects one float per case; ``compute`` summarizes them with :func:`summarize`."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def add(self, value: float) -> None:
        """Record an already computed value (NaN and inf are kept and counted, not averaged)."""
        self.values.append(float(value))

    def __len__(self) -> int:
        return len(self.values)

    def compute(self) -> dict[str, Any]:
        return summarize(self.values)


class DiceAccumulator(_ScalarAccumulator):
    """Dice over cases. ``compute() -> {"mean", "std", "n", "n_nan"}``; both-empty cases count as 1.0."""

    def update(self, pred: MaskLike, gt: MaskLike) -> float:
        value = dice(pred, gt)
        self.add(value)
        return value

    def compute(self) -> dict[str, Any]:
        out = summarize(self.values)
        del out["n_inf"]
        return out


class IoUAccumulator(_ScalarAccumulator):
    """Mask IoU over cases. ``compute() -> {"mean", "std", "n", "n_nan"}``; both-empty cases count as 1.0."""

    def update(self, pred: MaskLike, gt: MaskLike) -> float:
        value = iou(pred, gt)
        self.add(value)
        return value

    def compute(self) -> dict[str, Any]:
        out = summarize(self.values)
        del out["n_inf"]
        return out


class HD95Accumulator(_ScalarAccumulator):
    """HD95 (mm) over cases. ``compute() -> {"mean", "std", "n", "n_nan", "n_inf"}``.

    Cases with exactly one empty mask give ``inf``: counted in ``n_inf``, left out of mean and std.
    """

    def update(self, pred: MaskLike, gt: MaskLike, spacing_mm: Sequence[float] | None = None) -> float:
        value = hd95(pred, gt, spacing_mm)
        self.add(value)
        return value


class ASDAccumulator(_ScalarAccumulator):
    """ASD (mm) over cases. ``compute() -> {"mean", "std", "n", "n_nan", "n_inf"}``.

    Cases with exactly one empty mask give ``inf``: counted in ``n_inf``, left out of mean and std.
    """

    def update(self, pred: MaskLike, gt: MaskLike, spacing_mm: Sequence[float] | None = None) -> float:
        value = asd(pred, gt, spacing_mm)
        self.add(value)
        return value


class NSDAccumulator(_ScalarAccumulator):
    """NSD at a fixed ``tolerance_mm`` over cases. ``compute() -> {"mean", "std", "n", "n_nan", "tolerance_mm"}``."""

    def __init__(self, tolerance_mm: float) -> None:
        super().__init__()
        self.tolerance_mm = _tolerance(tolerance_mm, "NSDAccumulator", "tolerance_mm")

    def update(self, pred: MaskLike, gt: MaskLike, spacing_mm: Sequence[float] | None = None) -> float:
        value = nsd(pred, gt, self.tolerance_mm, spacing_mm)
        self.add(value)
        return value

    def compute(self) -> dict[str, Any]:
        out = summarize(self.values)
        del out["n_inf"]
        out["tolerance_mm"] = self.tolerance_mm
        return out


# --------------------------------------------------------------------------------------------------------------------
# per-structure segmentation summary


class SegmentationAccumulator:
    """Dice, HD95 and ASD per named structure, for the benchmark suites.

    ``update(name, pred, gt, spacing_mm)`` scores one case (masks of any dimensionality, spacing in mm per
    axis) and returns ``{"dice", "hd95_mm", "asd_mm"}`` for it. ``compute()`` returns::

        {"per_structure": {name: {"dice", "hd95_mm", "asd_mm", "n", "n_inf"}},
         "mean": {"dice", "hd95_mm", "asd_mm", "n", "n_inf", "n_structures"}}

    Per structure, each value is the mean over its cases; ``n`` is its number of cases and ``n_inf`` the
    number whose distances are ``inf`` (exactly one mask empty), which are left out of the distance means
    (they still count in Dice, as 0.0). A mean with no finite value is None. ``"mean"`` is the unweighted mean
    of the per-structure means (each structure weighs the same whatever its number of cases), skipping None;
    its ``n`` and ``n_inf`` are totals over all cases. Structures appear in first-seen order.
    """

    def __init__(self) -> None:
        self._cases: dict[str, dict[str, list[float]]] = {}

    def update(self, name: str, pred: MaskLike, gt: MaskLike,
               spacing_mm: Sequence[float] | None = None) -> dict[str, float]:
        if not isinstance(name, str) or not name:
            raise input_error("SegmentationAccumulator.update", expected="a non-empty structure name",
                              received=repr(name), fix="pass the structure's label, e.g. 'liver'")
        p, g = _pair(pred, gt, "SegmentationAccumulator.update")
        spacing = _spacing(spacing_mm, p.ndim, "SegmentationAccumulator.update")
        d = dice(p, g)
        empty = _empty_case(p, g)
        if empty is None:
            # Both distance metrics from one pair of distance transforms.
            d_pg, d_gp = _directed_pair(p, g, spacing)
            h = float(max(np.percentile(d_pg, 95.0), np.percentile(d_gp, 95.0)))
            a = float(np.concatenate([d_pg, d_gp]).mean())
        else:
            h = a = 0.0 if empty else math.inf
        record = self._cases.setdefault(name, {"dice": [], "hd95_mm": [], "asd_mm": []})
        record["dice"].append(d)
        record["hd95_mm"].append(h)
        record["asd_mm"].append(a)
        return {"dice": d, "hd95_mm": h, "asd_mm": a}

    def compute(self) -> dict[str, Any]:
        per: dict[str, dict[str, Any]] = {}
        for name, rec in self._cases.items():
            dist_inf = int(np.isinf(np.asarray(rec["hd95_mm"])).sum())
            per[name] = {
                "dice": summarize(rec["dice"])["mean"],
                "hd95_mm": summarize(rec["hd95_mm"])["mean"],
                "asd_mm": summarize(rec["asd_mm"])["mean"],
                "n": len(rec["dice"]),
                "n_inf": dist_inf,
            }
        mean: dict[str, Any] = {}
        for key in ("dice", "hd95_mm", "asd_mm"):
            mean[key] = summarize(v[key] for v in per.values() if v[key] is not None)["mean"]
        mean["n"] = sum(v["n"] for v in per.values())
        mean["n_inf"] = sum(v["n_inf"] for v in per.values())
        mean["n_structures"] = len(per)
        return {"per_structure": per, "mean": mean}


# --------------------------------------------------------------------------------------------------------------------
# boxes


def box_iou(a: Box, b: Box) -> float:
    """IoU of two boxes in pixel xyxy, in [0, 1]; 0.0 when both have zero area (nothing overlaps)."""
    if not isinstance(a, Box) or not isinstance(b, Box):
        raise input_error("box_iou", expected="two Box objects", received=f"{type(a).__name__}, {type(b).__name__}",
                          fix="wrap coordinates with Box.from_list([x0, y0, x1, y1])")
    return a.iou(b)


class BoxAccumulator:
    """Box grounding over cases: mIoU and Acc@t.

    ``update(pred, gt)`` takes the predicted :class:`Box` (or None when the model gave no box, scored as IoU 0)
    and the ground-truth box, and returns the case's IoU. A case is correct at threshold ``t`` when
    ``IoU >= t``. ``compute()`` returns ``{"miou", "mean" (same as miou), "std", "n", "n_missing",
    "acc@<t>" for each threshold}`` with ``t`` formatted by ``:g`` (``"acc@0.5"``); means are None when n == 0.
    """

    def __init__(self, thresholds: Sequence[float] = (0.5,)) -> None:
        ts = [float(t) for t in thresholds]
        if any(not 0.0 < t <= 1.0 for t in ts):
            raise input_error("BoxAccumulator", expected="IoU thresholds in (0, 1]", received=repr(list(thresholds)),
                              fix="use e.g. thresholds=[0.3, 0.5, 0.7]")
        self.thresholds = ts
        self.ious: list[float] = []
        self.n_missing = 0

    def update(self, pred: Box | None, gt: Box) -> float:
        if pred is None:
            self.n_missing += 1
            value = 0.0
        else:
            value = box_iou(pred, gt)
        self.ious.append(value)
        return value

    def compute(self) -> dict[str, Any]:
        stats = summarize(self.ious)
        arr = np.asarray(self.ious, dtype=np.float64)
        out: dict[str, Any] = {"miou": stats["mean"], "mean": stats["mean"], "std": stats["std"],
                               "n": stats["n"], "n_missing": self.n_missing}
        for t in self.thresholds:
            out[f"acc@{t:g}"] = float(np.mean(arr >= t)) if arr.size else None
        return out


# --------------------------------------------------------------------------------------------------------------------
# pointing game


def _heatmap_peak(heatmap: npt.NDArray[Any]) -> tuple[int, int]:
    if heatmap.size == 0:
        raise input_error("pointing_game", expected="a non-empty (H, W) heatmap", received=f"shape {heatmap.shape}",
                          fix="pass the model's saliency/attention map on the image grid")
    if np.isnan(heatmap).any():
        raise input_error("pointing_game", expected="a heatmap without NaN", received="NaN values",
                          fix="replace NaN with -inf (or 0) before scoring")
    # np.argmax returns the first maximum in row-major order, so ties are broken deterministically.
    r, c = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return int(r), int(c)


def pointing_game(pred: npt.ArrayLike | Sequence[float], target: MaskLike | Box, tolerance_px: float = 0) -> bool:
    """True when the predicted point lands on the target (the pointing game of Zhang et al.).

    ``pred`` is either a point ``(x, y)`` in pixel xy of the original image, or a heatmap of shape ``(H, W)``
    whose maximum (first one in row-major order on ties) is taken as the point, at that pixel's centre
    ``(c + 0.5, r + 0.5)``. ``target`` is a ``(H, W)`` mask or a :class:`Box`.

    - Mask target: the point's pixel ``(floor(y), floor(x))`` is a hit when its centre lies within
      ``tolerance_px`` (Euclidean, pixel units) of a target pixel's centre, i.e. it is in the target dilated by
      a disc of that radius; a point outside the image can still hit through the tolerance.
    - Box target: a hit when the Euclidean distance from the point to the closed box is ``<= tolerance_px``.

    Empty mask target: always False (nothing to hit); :class:`PointingGameAccumulator` skips such cases.
    """
    tol = _tolerance(tolerance_px, "pointing_game", "tolerance_px")
    arr = np.asarray(pred, dtype=np.float64)
    if arr.ndim == 2:
        r, c = _heatmap_peak(arr)
        x, y = c + 0.5, r + 0.5
    elif arr.shape == (2,) and np.all(np.isfinite(arr)):
        x, y = float(arr[0]), float(arr[1])
    else:
        raise input_error("pointing_game", expected="a point (x, y) or a (H, W) heatmap",
                          received=f"shape {arr.shape}" + ("" if arr.ndim != 1 else f" values {arr.tolist()!r}"),
                          fix="pass two finite pixel coordinates, or a 2D heatmap")

    if isinstance(target, Box):
        dx = max(target.x0 - x, 0.0, x - target.x1)
        dy = max(target.y0 - y, 0.0, y - target.y1)
        return math.hypot(dx, dy) <= tol

    mask = _as_mask(target, "pointing_game", "target")
    if mask.ndim != 2:
        raise input_error("pointing_game", expected="a (H, W) target mask", received=f"shape {mask.shape}",
                          fix="select one slice before scoring")
    if arr.ndim == 2 and arr.shape != mask.shape:
        raise input_error("pointing_game", expected="heatmap and target mask of the same shape",
                          received=f"heatmap shape {arr.shape} and target shape {mask.shape}",
                          fix="resize the heatmap to the original image grid first")
    row, col = math.floor(y), math.floor(x)
    if 0 <= row < mask.shape[0] and 0 <= col < mask.shape[1] and mask[row, col]:
        return True
    if tol == 0 or not mask.any():
        return False
    # Only pixels within the tolerance window can be hits; a brute-force check there is exact and cheap.
    reach = math.floor(tol)
    r0, r1 = max(row - reach, 0), min(row + reach + 1, mask.shape[0])
    c0, c1 = max(col - reach, 0), min(col + reach + 1, mask.shape[1])
    if r0 >= r1 or c0 >= c1:
        return False
    rr, cc = np.nonzero(mask[r0:r1, c0:c1])
    if rr.size == 0:
        return False
    d2 = (rr + r0 - row) ** 2 + (cc + c0 - col) ** 2
    return bool(d2.min() <= tol * tol)


class PointingGameAccumulator:
    """Pointing-game hit rate over cases.

    ``update(pred, target, tolerance_px=None)`` scores a case with :func:`pointing_game` (``tolerance_px`` None
    uses the accumulator's default) and returns the hit, or None when the case is skipped. ``pred=None`` (no
    point given) is a miss counted in ``n_missing``. A case whose target mask is empty is skipped (the game is
    undefined without a target) and counted in ``n_skipped``. ``compute()`` returns ``{"hit_rate", "mean"
    (same as hit_rate), "std", "n", "n_hits", "n_missing", "n_skipped"}`` where ``n`` counts scored cases only;
    rates are None when n == 0.
    """

    def __init__(self, tolerance_px: float = 0) -> None:
        self.tolerance_px = _tolerance(tolerance_px, "PointingGameAccumulator", "tolerance_px")
        self.hits: list[bool] = []
        self.n_missing = 0
        self.n_skipped = 0

    def update(self, pred: npt.ArrayLike | Sequence[float] | None, target: MaskLike | Box,
               tolerance_px: float | None = None) -> bool | None:
        if not isinstance(target, Box) and not _as_mask(target, "PointingGameAccumulator", "target").any():
            self.n_skipped += 1
            return None
        if pred is None:
            self.n_missing += 1
            hit = False
        else:
            tol = self.tolerance_px if tolerance_px is None else tolerance_px
            hit = pointing_game(pred, target, tol)
        self.hits.append(hit)
        return hit

    def compute(self) -> dict[str, Any]:
        stats = summarize(float(h) for h in self.hits)
        return {"hit_rate": stats["mean"], "mean": stats["mean"], "std": stats["std"], "n": stats["n"],
                "n_hits": int(sum(self.hits)), "n_missing": self.n_missing, "n_skipped": self.n_skipped}
