"""Chest regions derived from masks, and the laterality / zone consistency check, on hand-built masks."""

from __future__ import annotations

import numpy as np
import pytest

from agents.anatomy import ChestAnatomy, anatomy_from_masks, check_region, interior_point
from medvlm.types import Box, Mask, Region

H = W = 200


def _rect(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


@pytest.fixture
def chest() -> ChestAnatomy:
    # patient's right lung on the IMAGE left (columns 20-80), left lung on the image right (120-180); rows 30-150
    masks = {
        "right lung": _rect(30, 150, 20, 80),
        "left lung": _rect(30, 150, 120, 180),
        "heart": _rect(90, 160, 70, 140),
        "right clavicle": _rect(35, 45, 20, 90),
        "left clavicle": _rect(35, 45, 110, 180),
    }
    return anatomy_from_masks(masks, (H, W), "hand-made")


def test_zones_are_thirds_of_each_lung(chest: ChestAnatomy) -> None:
    upper = chest.region_box("right upper lung zone")
    mid = chest.region_box("right mid lung zone")
    lower = chest.region_box("left lower lung zone")
    assert upper == Box(20, 30, 80, 70)
    assert mid == Box(20, 70, 80, 110)
    assert lower == Box(120, 110, 180, 150)


def test_apical_zone_ends_at_the_clavicle_and_costophrenic_angle_is_lateral(chest: ChestAnatomy) -> None:
    assert chest.region_box("right apical zone") == Box(20, 30, 80, 45)  # clavicle's lowest row is 44
    # lateral = away from the midline: image left for the patient's right lung, image right for the left
    assert chest.region_box("right costophrenic angle") == Box(20, 126, 50, 150)
    assert chest.region_box("left costophrenic angle") == Box(150, 126, 180, 150)


def test_hila_midline_and_mediastinum(chest: ChestAnatomy) -> None:
    assert chest.midline_x() == pytest.approx(100.0)
    right_hilum = chest.region_box("right hilar structures")
    assert right_hilum is not None and right_hilum.x0 == pytest.approx(59) and right_hilum.x1 == pytest.approx(83)
    assert (right_hilum.y0, right_hilum.y1) == (70, 110)
    med = chest.region_box("mediastinum")
    assert med == Box(70, 30, 140, 160)  # the gap between the lungs from the apices, plus the heart
    upper = chest.region_box("upper mediastinum")
    assert upper == Box(80, 30, 120, 90)  # above the heart's top row (90)
    diaphragm = chest.region_box("left hemidiaphragm")
    assert diaphragm == Box(120, 145, 180, 154)  # +-4 % of the 120-row lung around its lowest row, 149


def test_missing_masks_give_no_region() -> None:
    only_right = anatomy_from_masks({"right lung": _rect(30, 150, 20, 80)}, (H, W), "partial")
    assert only_right.region("left upper lung zone") is None
    assert only_right.region("mediastinum") is None
    assert not only_right.is_chest
    assert only_right.region("not a region") is None


def test_interior_point_is_inside_a_concave_mask() -> None:
    ring = _rect(10, 90, 10, 90) & ~_rect(30, 70, 30, 90)  # a C shape open to the right
    x, y = interior_point(ring)  # type: ignore[misc]
    assert ring[int(y), int(x)]
    assert interior_point(np.zeros((5, 5), bool)) is None


def _region_from(mask: np.ndarray, label: str = "x") -> Region:
    return Region.from_mask(Mask(mask), label=label, score=0.9)


def test_laterality_flag_and_repair(chest: ChestAnatomy) -> None:
    wrong_side = _region_from(chest.region("left apical zone"), "right apical pneumothorax")  # type: ignore[arg-type]
    flagged = check_region(wrong_side, ["right apical zone"], chest, mode="flag")
    assert flagged.checks["laterality"] == {"expected": "right", "observed": "left", "fraction_on_side": 0.0,
                                            "midline_x": 100.0, "ok": False}
    assert flagged.checks["action"] == "flagged"
    assert flagged.box == wrong_side.box
    repaired = check_region(wrong_side, ["right apical zone"], chest, mode="repair")
    assert repaired.checks["action"] == "repaired: replaced by right apical zone"
    assert repaired.box == chest.region_box("right apical zone")
    assert repaired.points is not None and repaired.box.contains_point(*repaired.points.positive[0])


def test_zone_repair_intersects_and_correct_regions_pass(chest: ChestAnatomy) -> None:
    whole_lung = _region_from(chest.region("right lung"), "right apical pneumothorax")  # type: ignore[arg-type]
    out = check_region(whole_lung, ["right apical zone"], chest, mode="repair")
    assert out.checks["laterality"]["ok"] and not out.checks["zone"]["ok"]
    assert out.checks["action"] == "repaired: intersected with right apical zone"
    assert out.box == Box(20, 30, 80, 45)
    good = _region_from(chest.region("right apical zone"), "right apex")  # type: ignore[arg-type]
    passed = check_region(good, ["right apical zone"], chest, mode="repair")
    assert passed.checks["action"] == "none" and passed.checks["zone"]["fraction_inside"] == 1.0
    box_only = Region(box=Box(25, 32, 75, 44), label="right apex")  # LLM boxes have no mask: the box is used
    assert check_region(box_only, ["right apical zone"], chest).checks["action"] == "none"


def test_checks_are_skipped_off_the_chest() -> None:
    ct = anatomy_from_masks({"liver": _rect(50, 120, 20, 100)}, (H, W), "ct")
    region = _region_from(_rect(10, 20, 10, 20))
    out = check_region(region, ["right lung"], ct)
    assert out.checks["action"] == "none" and "not a frontal chest radiograph" in out.checks["skipped"]


def test_mirrored_region_is_caught_and_repaired(chest: ChestAnatomy) -> None:
    from eval.grounding import mirror_region

    right = _region_from(chest.region("right lower lung zone"), "right lower zone")  # type: ignore[arg-type]
    flipped = mirror_region(right, W)
    assert flipped.box == Box(W - 80, 110, W - 20, 150) and flipped.mask is not None
    assert flipped.mask.data[120, W - 21] and not flipped.mask.data[120, 20]
    repaired = check_region(flipped, ["right lower lung zone"], chest)
    assert not repaired.checks["laterality"]["ok"] and repaired.box == right.box
