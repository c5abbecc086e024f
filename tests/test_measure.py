"""Measurements read off masks (medvlm.measure): ellipse fits, fetal head biometry, the eval's comparison with a
folder's reference values, and the CLI's --spacing."""

from __future__ import annotations

import math
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from eval.suites import MeasurementAccumulator, format_table
from medvlm.errors import InputError
from medvlm.io import check_spacing
from medvlm.measure import (
    EllipseFit,
    ellipse_circumference,
    ellipse_mask,
    fetal_head_biometry,
    fit_ellipse_moments,
    measure_structure,
)
from medvlm.types import Mask, Region

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "us_hc18_fetal_head"


def test_circumference_known_values() -> None:
    assert ellipse_circumference(3.0, 3.0) == pytest.approx(2 * math.pi * 3.0, rel=1e-12)
    # the perimeter of the ellipse with semi-axes 2 and 1 (complete elliptic integral): 9.688448220547675
    assert ellipse_circumference(2.0, 1.0) == pytest.approx(9.688448220547675, rel=1e-6)
    assert ellipse_circumference(1.0, 0.0) == pytest.approx(4.0, rel=1e-3)  # a segment, there and back
    with pytest.raises(ValueError):
        ellipse_circumference(-1.0, 1.0)


@pytest.mark.parametrize("angle", [0.0, 30.0, -60.0, 90.0])
def test_fit_recovers_a_drawn_rotated_ellipse(angle: float) -> None:
    truth = EllipseFit(cx=120.3, cy=90.7, a=60.0, b=35.0, angle_deg=angle)
    drawn = ellipse_mask(truth, (200, 260))
    fit = fit_ellipse_moments(drawn)
    assert fit is not None
    assert (fit.cx, fit.cy) == pytest.approx((truth.cx, truth.cy), abs=0.1)
    assert (fit.a, fit.b) == pytest.approx((truth.a, truth.b), abs=0.1)
    assert ((fit.angle_deg - angle + 90.0) % 180.0 - 90.0) == pytest.approx(0.0, abs=0.2)
    assert -90.0 < fit.angle_deg <= 90.0
    assert (ellipse_mask(fit, drawn.shape) ^ drawn).sum() < 0.01 * drawn.sum()


def test_fit_in_mm_on_anisotropic_pixels() -> None:
    """An ellipse drawn in mm on pixels 0.5 mm tall and 0.25 mm wide comes back in mm (axes of the physical
    shape, not of the pixel grid)."""
    spacing = (0.5, 0.25)
    truth = EllipseFit(cx=30.0, cy=40.0, a=20.0, b=12.0, angle_deg=45.0)
    drawn = ellipse_mask(truth, (200, 300), spacing)
    fit = fit_ellipse_moments(drawn, spacing)
    assert fit is not None
    assert (fit.a, fit.b, fit.angle_deg) == pytest.approx((20.0, 12.0, 45.0), abs=0.15)
    assert fit.circumference == pytest.approx(ellipse_circumference(20.0, 12.0), rel=0.005)
    # the same pixels read as square pixels give another (wrong in mm) shape
    assert fit_ellipse_moments(drawn).a != pytest.approx(20.0 / 0.25, rel=0.05)


def test_no_ellipse_for_specks_and_lines() -> None:
    m = np.zeros((20, 20), bool)
    m[5, 5:9] = True
    assert fit_ellipse_moments(m) is None  # 4 pixels
    m[5, 5:15] = True
    assert fit_ellipse_moments(m) is None  # one row of pixels
    with pytest.raises(ValueError):
        fit_ellipse_moments(np.zeros((2, 3, 4), bool))


def test_fetal_head_biometry_of_a_circle_with_a_speck() -> None:
    """A head of radius 100 px at 0.2 mm/px: HC 2*pi*20 mm, BPD = OFD = 40 mm; a far speck is not measured."""
    yy, xx = np.mgrid[0:300, 0:400]
    m = (xx - 180.0) ** 2 + (yy - 150.0) ** 2 <= 100.0 ** 2
    m[10:14, 380:390] = True
    got = fetal_head_biometry(m, (0.2, 0.2))
    assert got is not None
    assert got["head_circumference_mm"] == pytest.approx(2 * math.pi * 20.0, rel=0.003)
    assert got["biparietal_diameter_mm"] == pytest.approx(40.0, abs=0.1)
    assert got["occipitofrontal_diameter_mm"] == pytest.approx(40.0, abs=0.1)
    px = fetal_head_biometry(m, None)
    assert px is not None and px["head_circumference_px"] == pytest.approx(2 * math.pi * 100.0, rel=0.003)
    assert measure_structure("fetal head", np.zeros_like(m), (0.2, 0.2)) is None
    assert measure_structure("liver", m, (0.2, 0.2)) is None
    assert measure_structure(None, m, (0.2, 0.2)) is None


def test_region_json_carries_measurements_of_its_structure() -> None:
    yy, xx = np.mgrid[0:100, 0:120]
    mask = Mask((xx - 60.0) ** 2 / 40.0 ** 2 + (yy - 50.0) ** 2 / 30.0 ** 2 <= 1.0)
    head = Region.from_mask(mask, label="head", provenance={"prompt": {"text": "the baby's head",
                                                                       "structure": "fetal head"}})
    out = head.to_json(spacing_mm=(0.1, 0.1))
    assert head.structure == "fetal head"
    assert out["measurements"]["head_circumference_mm"] == pytest.approx(
        ellipse_circumference(4.0, 3.0), rel=0.01)
    assert out["measurements"]["occipitofrontal_diameter_mm"] == pytest.approx(8.0, abs=0.05)
    liver = Region.from_mask(mask, label="liver", provenance={"prompt": {"text": "liver", "structure": "liver"}})
    assert "measurements" not in liver.to_json(spacing_mm=(0.1, 0.1))
    assert "measurements" not in Region.from_mask(mask).to_json()


def test_measurement_accumulator_against_references() -> None:
    yy, xx = np.mgrid[0:200, 0:200]
    circle = (xx - 100.0) ** 2 + (yy - 100.0) ** 2 <= 50.0 ** 2
    measured = fetal_head_biometry(circle, (0.1, 0.1))
    assert measured is not None
    hc = measured["head_circumference_mm"]  # 2 pi 5 mm, less what the pixel grid takes off
    assert hc == pytest.approx(2 * math.pi * 5.0, rel=0.01)
    acc = MeasurementAccumulator()
    case = acc.update("fetal head", circle, (0.1, 0.1), {"head_circumference_mm": hc + 2.0, "case_id": "7"})
    assert case["head_circumference_mm_ref"] == pytest.approx(hc + 2.0)
    acc.update("fetal head", circle, (0.1, 0.1), {"head_circumference_mm": hc - 1.0, "pixel_size_mm": 0.1})
    acc.update("fetal head", np.zeros_like(circle), (0.1, 0.1), {"head_circumference_mm": hc})  # not found
    assert acc.update("fetal head", circle, None, {"head_circumference_mm": hc}) == {}  # no spacing: not in mm
    assert acc.update("liver", circle, (0.1, 0.1), {"head_circumference_mm": hc}) == {}
    assert list(acc.compute()["fetal head"]) == ["head_circumference_mm"]  # the folder's other *_mm: no reference
    got = acc.compute()["fetal head"]["head_circumference_mm"]
    assert got["n"] == 2 and got["missing"] == 1
    assert got["mean_abs_diff"] == pytest.approx(1.5, abs=1e-6)
    assert got["mean_diff"] == pytest.approx(-0.5, abs=1e-6)
    payload = {"suite": "text-seg", "method": "m", "n_images": 3, "data": "d",
               "per_structure": {"fetal head": {"dice": 0.9, "hd95_mm": 1.0, "asd_mm": 0.5, "n": 3}},
               "mean": {"dice": 0.9, "hd95_mm": 1.0, "asd_mm": 0.5, "n": 3}, "measurements": acc.compute()}
    assert "fetal head: head circumference, mean absolute difference 1.50 mm (mean -0.50)" in format_table(payload)


def test_check_spacing_and_segment_refuses_it_for_a_volume(tmp_path: Path) -> None:
    assert check_spacing(["0.2", 0.3]) == (0.2, 0.3)
    for bad in ([0.0, 0.2], [0.2], ["a", "b"], [float("nan"), 1.0], None):
        with pytest.raises(InputError, match="pixel size in mm"):
            check_spacing(bad)
    import nibabel as nib

    from medvlm.app.commands import run_segment

    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), np.eye(4)), path)
    args = Namespace(image=str(path), text=["liver"], box=[], point=[], negative_point=[], refine=None,
                     slice_index=None, spacing=[0.5, 0.5])
    with pytest.raises(InputError, match="volume keeps its voxel size"):
        run_segment(args)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} not found (the HC18 folder of ../shared/data)")
def test_hc18_reference_masks_measure_their_reference_circumference() -> None:
    """HC18's masks are its reference ellipses drawn and filled (outline pixels included): their moment ellipse
    measures the recorded head circumference to within a few pixels of outline (measured on all 240: mean
    +1.15 mm, at most 2.6 mm)."""
    from medvlm.datasets import open_dataset

    dataset = open_dataset(DATA)
    diffs = []
    for sample_id in dataset.ids()[:40]:
        sample = dataset.load(sample_id)
        got = fetal_head_biometry(sample.masks["fetal head"], sample.image.spacing_mm)
        assert got is not None
        diffs.append(got["head_circumference_mm"] - sample.meta["head_circumference_mm"])
    d = np.array(diffs)
    assert 0.0 < d.mean() < 2.0  # the filled outline is a little larger than the ellipse it was drawn from
    assert np.abs(d).max() < 3.5


def test_segment_prints_the_measurements(capsys: pytest.CaptureFixture[str]) -> None:
    from medvlm.app.commands import _print_regions

    yy, xx = np.mgrid[0:100, 0:120]
    mask = Mask((xx - 60.0) ** 2 + (yy - 50.0) ** 2 <= 30.0 ** 2)
    head = Region.from_mask(mask, label="fetal head", score=0.9,
                            provenance={"prompt": {"text": "fetal head", "structure": "fetal head"}})
    _print_regions([head], (0.5, 0.5))
    out = capsys.readouterr().out
    assert "head circumference 94.1 mm, biparietal diameter 30.0 mm, occipitofrontal diameter 30.0 mm" in out
