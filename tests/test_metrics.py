"""Tests of eval.metrics against brute-force references, analytic shapes and hand-computed examples."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from eval.metrics import (
    ASDAccumulator,
    BoxAccumulator,
    DiceAccumulator,
    HD95Accumulator,
    IoUAccumulator,
    NSDAccumulator,
    PointingGameAccumulator,
    SegmentationAccumulator,
    asd,
    box_iou,
    dice,
    hausdorff,
    hd95,
    iou,
    nsd,
    pointing_game,
    surface_distances,
)
from medvlm.errors import InputError
from medvlm.types import Box, Mask

# ----------------------------------------------------------------------------------------------------------------------
# independent brute-force reference (explicit neighbour check, all pairwise distances)


def ref_surface(mask: np.ndarray) -> np.ndarray:
    """A voxel is on the surface when it is set and one of its 3^ndim - 1 neighbours (outside = unset) is not."""
    padded = np.pad(mask, 1, constant_values=False)
    out = np.zeros_like(mask, dtype=bool)
    for idx in np.argwhere(mask):
        for offset in itertools.product((-1, 0, 1), repeat=mask.ndim):
            if not padded[tuple(int(i) + 1 + o for i, o in zip(idx, offset))]:
                out[tuple(idx)] = True
                break
    return out


def ref_directed(src: np.ndarray, dst: np.ndarray, spacing) -> np.ndarray:
    a = np.argwhere(ref_surface(src)) * np.asarray(spacing, dtype=float)
    b = np.argwhere(ref_surface(dst)) * np.asarray(spacing, dtype=float)
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).min(axis=1)


def ref_metrics(pred: np.ndarray, gt: np.ndarray, spacing, tol: float) -> dict[str, float]:
    inter, sp, sg = int((pred & gt).sum()), int(pred.sum()), int(gt.sum())
    out = {"dice": 2 * inter / (sp + sg) if sp + sg else 1.0,
           "iou": inter / int((pred | gt).sum()) if sp + sg else 1.0}
    if sp and sg:
        d1, d2 = ref_directed(pred, gt, spacing), ref_directed(gt, pred, spacing)
        out["hd95"] = max(np.percentile(d1, 95), np.percentile(d2, 95))
        out["hd100"] = max(d1.max(), d2.max())
        out["asd"] = np.concatenate([d1, d2]).mean()
        out["nsd"] = ((d1 <= tol).sum() + (d2 <= tol).sum()) / (d1.size + d2.size)
    elif sp or sg:
        out.update(hd95=math.inf, hd100=math.inf, asd=math.inf, nsd=0.0)
    else:
        out.update(hd95=0.0, hd100=0.0, asd=0.0, nsd=1.0)
    return out


def check_against_reference(pred: np.ndarray, gt: np.ndarray, spacing, tol: float) -> None:
    ref = ref_metrics(pred, gt, spacing, tol)
    assert dice(pred, gt) == pytest.approx(ref["dice"])
    assert iou(pred, gt) == pytest.approx(ref["iou"])
    assert hd95(pred, gt, spacing) == pytest.approx(ref["hd95"])
    assert hausdorff(pred, gt, spacing, percentile=100) == pytest.approx(ref["hd100"])
    assert asd(pred, gt, spacing) == pytest.approx(ref["asd"])
    assert nsd(pred, gt, tol, spacing) == pytest.approx(ref["nsd"])


mask_seeds = st.integers(0, 2**32 - 1)
spacings = st.floats(0.2, 3.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(seed=mask_seeds, h=st.integers(1, 12), w=st.integers(1, 12), density=st.floats(0.0, 1.0),
       row_mm=spacings, col_mm=spacings, tol=st.floats(0.0, 4.0))
def test_random_2d_masks_match_brute_force(seed, h, w, density, row_mm, col_mm, tol):
    rng = np.random.default_rng(seed)
    pred = rng.random((h, w)) < density
    gt = rng.random((h, w)) < density
    if pred.any() and gt.any():
        # a tolerance within rounding of an actual distance makes "<=" ambiguous in any two implementations
        dists = np.concatenate([ref_directed(pred, gt, (row_mm, col_mm)), ref_directed(gt, pred, (row_mm, col_mm))])
        assume(np.abs(dists - tol).min() > 1e-6)
    check_against_reference(pred, gt, (row_mm, col_mm), tol)


def test_random_3d_masks_match_brute_force():
    rng = np.random.default_rng(7)
    for _ in range(5):
        shape = tuple(int(s) for s in rng.integers(2, 8, size=3))
        pred = rng.random(shape) < 0.4
        gt = rng.random(shape) < 0.4
        check_against_reference(pred, gt, (2.5, 0.7, 0.9), 1.0)


def test_surface_distances_are_directed_and_in_voxel_order():
    rng = np.random.default_rng(3)
    pred, gt = rng.random((9, 11)) < 0.3, rng.random((9, 11)) < 0.3
    d_pg, d_gp = surface_distances(pred, gt, (1.5, 0.5))
    np.testing.assert_allclose(d_pg, ref_directed(pred, gt, (1.5, 0.5)))
    np.testing.assert_allclose(d_gp, ref_directed(gt, pred, (1.5, 0.5)))


def test_object_far_from_array_origin_is_handled_by_the_crop():
    # Both objects touch the array border here: their border pixels must count as surface.
    pred = np.zeros((30, 40), dtype=bool)
    gt = np.zeros((30, 40), dtype=bool)
    pred[20:30, 30:40] = True
    gt[18:30, 33:40] = True
    check_against_reference(pred, gt, (0.8, 1.3), 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# analytic shapes


def disc(radius: float, centre_rc=(50, 50), size: int = 101) -> np.ndarray:
    rr, cc = np.mgrid[:size, :size]
    return (rr - centre_rc[0]) ** 2 + (cc - centre_rc[1]) ** 2 <= radius**2


def test_concentric_discs_distance_is_radius_difference():
    inner, outer = disc(10), disc(20)
    assert hd95(inner, outer) == pytest.approx(10.0, abs=1.0)
    assert asd(inner, outer) == pytest.approx(10.0, abs=1.0)
    assert hd95(outer, inner) == hd95(inner, outer)
    assert nsd(inner, outer, tolerance_mm=5.0) == 0.0
    assert nsd(inner, outer, tolerance_mm=12.0) == 1.0


def test_shifted_disc_distances_scale_with_spacing():
    a, b = disc(15), disc(15, centre_rc=(50, 56))
    hd_px, asd_px = hd95(a, b), asd(a, b)
    assert hausdorff(a, b) == pytest.approx(6.0, abs=1.0)
    assert hd95(a, b, (0.5, 0.5)) == pytest.approx(0.5 * hd_px)
    assert asd(a, b, (0.5, 0.5)) == pytest.approx(0.5 * asd_px)
    # A shift along x with 0.5 mm columns is 3 mm: the symmetric Hausdorff follows the column spacing.
    assert hausdorff(a, b, (1.0, 0.5)) == pytest.approx(3.0, abs=0.5)
    assert hausdorff(a, b, (1.0, 0.5)) < hausdorff(a, b, (1.0, 1.0))


def test_identical_masks():
    m = disc(12)
    assert dice(m, m) == 1.0
    assert iou(m, m) == 1.0
    assert hd95(m, m, (0.7, 1.3)) == 0.0
    assert asd(m, m) == 0.0
    assert nsd(m, m, 0.0) == 1.0


def test_dice_iou_known_values():
    a = np.zeros((4, 4), dtype=bool)
    b = np.zeros((4, 4), dtype=bool)
    a[0, :2] = True
    b[0, 1:3] = True
    assert dice(a, b) == pytest.approx(0.5)
    assert iou(a, b) == pytest.approx(1 / 3)
    assert dice(Mask(a), b.astype(np.uint8)) == pytest.approx(0.5)  # Mask and 0/1 arrays are accepted


def test_3d_volumes():
    vol = np.zeros((6, 20, 20), dtype=bool)
    vol[1:5, 5:15, 5:15] = True
    shifted = np.roll(vol, 2, axis=2)
    assert dice(vol, vol) == 1.0
    assert dice(vol, shifted) == pytest.approx(2 * 4 * 10 * 8 / (2 * 400))
    assert iou(vol, shifted) == pytest.approx(320 / 480)
    assert hausdorff(vol, shifted, (3.0, 1.0, 0.5)) == pytest.approx(1.0)
    assert hd95(vol, vol, (3.0, 1.0, 0.5)) == 0.0
    assert asd(vol, shifted, (3.0, 1.0, 0.5)) > 0
    assert nsd(vol, shifted, 1.0, (3.0, 1.0, 0.5)) == 1.0


# ----------------------------------------------------------------------------------------------------------------------
# empty masks


@pytest.mark.parametrize("shape", [(5, 6), (3, 4, 5)])
def test_both_empty(shape):
    e = np.zeros(shape, dtype=bool)
    assert dice(e, e) == 1.0
    assert iou(e, e) == 1.0
    assert hd95(e, e) == 0.0
    assert asd(e, e) == 0.0
    assert nsd(e, e, 1.0) == 1.0
    d1, d2 = surface_distances(e, e)
    assert d1.size == 0 and d2.size == 0


@pytest.mark.parametrize("swap", [False, True])
def test_exactly_one_empty(swap):
    e = np.zeros((8, 8), dtype=bool)
    m = e.copy()
    m[2:5, 2:5] = True
    pred, gt = (m, e) if swap else (e, m)
    assert dice(pred, gt) == 0.0
    assert iou(pred, gt) == 0.0
    assert hd95(pred, gt) == math.inf
    assert asd(pred, gt) == math.inf
    assert nsd(pred, gt, 100.0) == 0.0


def test_distance_accumulators_exclude_inf_and_nan():
    e = np.zeros((8, 8), dtype=bool)
    m = e.copy()
    m[2:5, 2:5] = True
    shifted = np.roll(m, 1, axis=1)
    for acc_cls in (HD95Accumulator, ASDAccumulator):
        acc = acc_cls()
        acc.update(m, m)
        acc.update(m, shifted, (1.0, 2.0))
        acc.update(e, m)
        acc.add(float("nan"))
        out = acc.compute()
        assert out["n"] == 4 and out["n_inf"] == 1 and out["n_nan"] == 1
        assert acc.values[1] > 0
        assert out["mean"] == pytest.approx(acc.values[1] / 2)
        assert out["std"] == pytest.approx(acc.values[1] / 2)
    hd = HD95Accumulator()
    hd.update(e, m)
    assert hd.compute() == {"mean": None, "std": None, "n": 1, "n_nan": 0, "n_inf": 1}


def test_overlap_accumulators():
    a = np.zeros((4, 4), dtype=bool)
    b = a.copy()
    a[0, :2] = True
    b[0, 1:3] = True
    d = DiceAccumulator()
    assert d.update(a, b) == pytest.approx(0.5)
    d.update(a, a)
    d.add(float("nan"))
    assert d.compute() == pytest.approx({"mean": 0.75, "std": 0.25, "n": 3, "n_nan": 1})
    j = IoUAccumulator()
    j.update(a, b)
    j.update(np.zeros_like(a), np.zeros_like(a))
    assert j.compute() == pytest.approx({"mean": (1 / 3 + 1) / 2, "std": 1 / 3, "n": 2, "n_nan": 0})
    n = NSDAccumulator(tolerance_mm=0.5)
    n.update(a, b)
    n.update(a, np.zeros_like(a))
    out = n.compute()
    assert out["n"] == 2 and out["tolerance_mm"] == 0.5
    assert out["mean"] == pytest.approx((nsd(a, b, 0.5) + 0.0) / 2)


# ----------------------------------------------------------------------------------------------------------------------
# per-structure summary


def test_segmentation_accumulator_shape_and_values():
    sq = np.zeros((4, 4), dtype=bool)
    sq[1:3, 1:3] = True
    acc = SegmentationAccumulator()
    assert acc.update("a", sq, sq) == {"dice": 1.0, "hd95_mm": 0.0, "asd_mm": 0.0}
    acc.update("a", np.zeros_like(sq), sq)  # missed structure: Dice 0, distances inf
    acc.update("a", sq, sq, (2.0, 2.0))
    # b: two 2x2 squares one column apart; every pixel is surface. With 2 mm columns, the directed distances
    # are [2, 0, 2, 0] both ways: HD95 = 2, ASD = 1, Dice = 2*2/8.
    p = np.zeros((4, 4), dtype=bool)
    g = p.copy()
    p[0:2, 0:2] = True
    g[0:2, 1:3] = True
    assert acc.update("b", p, g, (1.0, 2.0)) == pytest.approx({"dice": 0.5, "hd95_mm": 2.0, "asd_mm": 1.0})
    out = acc.compute()
    assert json.loads(json.dumps(out, allow_nan=False)) == out
    assert list(out) == ["per_structure", "mean"]
    assert list(out["per_structure"]) == ["a", "b"]
    assert out["per_structure"]["a"] == pytest.approx({"dice": 2 / 3, "hd95_mm": 0.0, "asd_mm": 0.0, "n": 3,
                                                       "n_inf": 1})
    assert out["per_structure"]["b"] == pytest.approx({"dice": 0.5, "hd95_mm": 2.0, "asd_mm": 1.0, "n": 1,
                                                       "n_inf": 0})
    # Mean of per-structure means (7/12), not the pooled mean over cases (2.5/4).
    assert out["mean"] == pytest.approx({"dice": 7 / 12, "hd95_mm": 1.0, "asd_mm": 0.5, "n": 4, "n_inf": 1,
                                         "n_structures": 2})


def test_segmentation_accumulator_all_inf_structure_and_empty():
    assert SegmentationAccumulator().compute() == {
        "per_structure": {}, "mean": {"dice": None, "hd95_mm": None, "asd_mm": None, "n": 0, "n_inf": 0,
                                      "n_structures": 0}}
    sq = np.zeros((5, 5), dtype=bool)
    sq[1:3, 1:3] = True
    acc = SegmentationAccumulator()
    acc.update("gone", np.zeros_like(sq), sq)
    acc.update("ok", sq, sq)
    out = acc.compute()
    assert out["per_structure"]["gone"] == {"dice": 0.0, "hd95_mm": None, "asd_mm": None, "n": 1, "n_inf": 1}
    assert out["mean"]["hd95_mm"] == 0.0  # the structure with no finite distance is left out
    assert out["mean"]["dice"] == 0.5
    with pytest.raises(InputError):
        acc.update("", sq, sq)


# ----------------------------------------------------------------------------------------------------------------------
# boxes


def test_box_iou_known_answers():
    assert box_iou(Box(0, 0, 1, 1), Box(2, 2, 3, 3)) == 0.0
    assert box_iou(Box(1, 2, 5, 7), Box(1, 2, 5, 7)) == 1.0
    assert box_iou(Box(0, 0, 2, 1), Box(1, 0, 3, 1)) == pytest.approx(1 / 3)
    assert box_iou(Box(0, 0, 2, 2), Box(1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou(Box(0, 0, 0, 0), Box(0, 0, 0, 0)) == 0.0
    with pytest.raises(InputError):
        box_iou([0, 0, 1, 1], Box(0, 0, 1, 1))  # type: ignore[arg-type]


def test_box_accumulator_counts():
    gt = Box(0, 0, 2, 1)
    acc = BoxAccumulator(thresholds=[0.3, 0.5, 0.7])
    assert acc.update(Box(0, 0, 2, 1), gt) == 1.0
    assert acc.update(Box(1, 0, 3, 1), gt) == pytest.approx(1 / 3)
    assert acc.update(Box(0, 0, 1, 1), gt) == pytest.approx(0.5)  # exactly 0.5 counts as correct at 0.5
    assert acc.update(None, gt) == 0.0
    out = acc.compute()
    assert out["n"] == 4 and out["n_missing"] == 1
    assert out["miou"] == pytest.approx((1 + 1 / 3 + 0.5) / 4)
    assert out["mean"] == out["miou"]
    assert out["acc@0.3"] == 0.75
    assert out["acc@0.5"] == 0.5
    assert out["acc@0.7"] == 0.25
    default = BoxAccumulator()
    assert default.compute() == {"miou": None, "mean": None, "std": None, "n": 0, "n_missing": 0, "acc@0.5": None}
    with pytest.raises(InputError):
        BoxAccumulator(thresholds=[0.0])


# ----------------------------------------------------------------------------------------------------------------------
# pointing game


def target_mask() -> np.ndarray:
    m = np.zeros((10, 10), dtype=bool)
    m[2:4, 5:7] = True  # rows 2-3, columns 5-6: x in [5, 7), y in [2, 4)
    return m


def test_pointing_game_points_on_mask():
    m = target_mask()
    assert pointing_game((5.5, 2.5), m)
    assert pointing_game((6.99, 3.99), m)
    assert not pointing_game((4.9, 2.5), m)  # column 4
    assert pointing_game((4.9, 2.5), m, tolerance_px=1)
    assert not pointing_game((3.5, 2.5), m, tolerance_px=1)  # column 3 is 2 px away
    assert not pointing_game((4.5, 1.5), m, tolerance_px=1)  # diagonal neighbour: sqrt(2) > 1
    assert pointing_game((4.5, 1.5), m, tolerance_px=1.5)
    assert pointing_game((-0.5, 2.5), np.roll(m, -5, axis=1), tolerance_px=1)  # off-image point, within tolerance
    assert not pointing_game((50.0, 50.0), m, tolerance_px=3)
    assert not pointing_game((5.5, 2.5), np.zeros_like(m))


def test_pointing_game_heatmap():
    m = target_mask()
    heat = np.zeros((10, 10))
    heat[3, 6] = 1.0
    assert pointing_game(heat, m)
    heat[0, 0] = 1.0  # tie: the first maximum in row-major order, (0, 0), wins
    assert not pointing_game(heat, m)
    assert pointing_game(heat, Box(0, 0, 1, 1))  # peak pixel centre (0.5, 0.5)
    with pytest.raises(InputError, match=r"\(10, 10\).*\(5, 5\)"):
        pointing_game(heat, np.zeros((5, 5), dtype=bool))
    with pytest.raises(InputError):
        pointing_game(np.full((3, 3), np.nan), Box(0, 0, 1, 1))


def test_pointing_game_box_target():
    box = Box(2, 2, 4, 4)
    assert pointing_game((3, 3), box)
    assert pointing_game((4, 4), box)  # closed box
    assert not pointing_game((5, 3), box)
    assert pointing_game((5, 3), box, tolerance_px=1)
    assert not pointing_game((5, 5), box, tolerance_px=1)  # corner distance sqrt(2)
    with pytest.raises(InputError):
        pointing_game((1, 2, 3), box)
    with pytest.raises(InputError):
        pointing_game((1, 2), box, tolerance_px=-1)


def test_pointing_game_accumulator():
    m = target_mask()
    acc = PointingGameAccumulator(tolerance_px=1)
    assert acc.update((5.5, 2.5), m) is True
    assert acc.update((4.5, 2.5), m) is True  # default tolerance 1
    assert acc.update((4.5, 2.5), m, tolerance_px=0) is False
    assert acc.update(None, m) is False
    assert acc.update((0.0, 0.0), np.zeros_like(m)) is None
    assert acc.update((0.5, 0.5), Box(0, 0, 1, 1)) is True
    out = acc.compute()
    assert out == pytest.approx({"hit_rate": 0.6, "mean": 0.6, "std": math.sqrt(0.24), "n": 5, "n_hits": 3,
                                 "n_missing": 1, "n_skipped": 1})


# ----------------------------------------------------------------------------------------------------------------------
# validation


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(InputError, match=r"\(4, 5\).*\(4, 6\)"):
        dice(np.zeros((4, 5), bool), np.zeros((4, 6), bool))
    for fn in (iou, hd95, asd):
        with pytest.raises(InputError, match=r"\(3, 3\).*\(3, 3, 1\)"):
            fn(np.zeros((3, 3), bool), np.zeros((3, 3, 1), bool))
    with pytest.raises(InputError):
        SegmentationAccumulator().update("x", np.zeros((2, 2), bool), np.zeros((3, 3), bool))


@pytest.mark.parametrize("spacing", [(0.0, 1.0), (1.0, -2.0), (1.0, float("nan")), (1.0,), (1.0, 1.0, 1.0),
                                     ((1.0, 1.0),), "ab"])
def test_bad_spacing(spacing):
    m = target_mask()
    for call in (lambda: hd95(m, m, spacing), lambda: asd(m, m, spacing), lambda: nsd(m, m, 1.0, spacing),
                 lambda: surface_distances(m, m, spacing),
                 lambda: SegmentationAccumulator().update("x", m, m, spacing)):
        with pytest.raises(InputError):
            call()


def test_bad_masks_and_parameters():
    with pytest.raises(InputError, match="threshold"):
        dice(np.full((3, 3), 0.7), np.zeros((3, 3)))
    with pytest.raises(InputError):
        iou(np.array(True), np.array(True))
    with pytest.raises(InputError):
        nsd(target_mask(), target_mask(), -1.0)
    with pytest.raises(InputError):
        hausdorff(target_mask(), target_mask(), percentile=101)
    with pytest.raises(InputError):
        NSDAccumulator(float("inf"))


def test_checkpoint_split_ids_picks_the_val_ids_in_folder_order() -> None:
    from eval.splits import checkpoint_split_ids
    from medvlm.errors import InputError

    meta = {"val_ids": ["c", "a", "z"]}
    assert checkpoint_split_ids(meta, ["a", "b", "c"], "auto", "f") == (["a", "c"], "val")
    assert checkpoint_split_ids(meta, ["a", "b", "c"], "all", "f") == (["a", "b", "c"], "all")
    assert checkpoint_split_ids(meta, ["x", "y"], "auto", "f") == (["x", "y"], "all")
    with pytest.raises(InputError, match="none of its 3 val ids in f"):
        checkpoint_split_ids(meta, ["x", "y"], "val", "f")
