"""Core types and frame conversions: known answers plus property-based round trips on non-square images."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medvlm.coords import (
    from_loc_tokens,
    from_normalized,
    from_per_mille,
    letterbox_content_shape,
    letterbox_frame,
    resized_frame,
    to_loc_tokens,
    to_normalized,
    to_per_mille,
)
from medvlm.errors import InputError
from medvlm.types import Box, Mask, Points, Region

sizes = st.integers(min_value=1, max_value=4096)


@st.composite
def image_and_box(draw: st.DrawFn) -> tuple[int, int, Box]:
    h, w = draw(sizes), draw(sizes)
    x0 = draw(st.floats(0, w, allow_nan=False))
    x1 = draw(st.floats(x0, w, allow_nan=False))
    y0 = draw(st.floats(0, h, allow_nan=False))
    y1 = draw(st.floats(y0, h, allow_nan=False))
    return h, w, Box(x0, y0, x1, y1)


def _close(a: Box, b: Box, tol: float) -> bool:
    return bool(np.allclose(a.to_array(), b.to_array(), atol=tol, rtol=0))


@settings(max_examples=300, deadline=None)
@given(image_and_box())
def test_normalized_round_trip(case: tuple[int, int, Box]) -> None:
    h, w, box = case
    norm = to_normalized(box, h, w)
    assert np.all(norm >= -1e-12) and np.all(norm <= 1 + 1e-12)
    assert _close(from_normalized(norm, h, w), box, 1e-6 * max(h, w))


@settings(max_examples=300, deadline=None)
@given(image_and_box())
def test_per_mille_round_trip_within_half_unit(case: tuple[int, int, Box]) -> None:
    h, w, box = case
    ints = to_per_mille(box, h, w)
    assert all(isinstance(v, int) and 0 <= v <= 1000 for v in ints)
    back = from_per_mille(ints, h, w)
    # rounding to integers in [0, 1000] loses at most half a unit per axis
    tol = np.array([w, h, w, h]) / 2000 + 1e-9
    assert np.all(np.abs(back.to_array() - box.to_array()) <= tol)


@settings(max_examples=300, deadline=None)
@given(image_and_box(), sizes, sizes)
def test_resized_round_trip(case: tuple[int, int, Box], new_h: int, new_w: int) -> None:
    h, w, box = case
    frame = resized_frame(h, w, new_h, new_w)
    uv = frame.forward_box(box)
    assert uv[2] <= new_w + 1e-6 and uv[3] <= new_h + 1e-6
    assert _close(frame.inverse_box(uv), box, 1e-6 * max(h, w))


@settings(max_examples=300, deadline=None)
@given(image_and_box(), st.sampled_from([256, 1024]))
def test_letterbox_keeps_aspect_and_round_trips(case: tuple[int, int, Box], target: int) -> None:
    h, w, box = case
    frame = letterbox_frame(h, w, target)
    assert frame.sx == frame.sy  # one scale: aspect ratio kept
    uv = frame.forward_box(box)
    ch, cw = letterbox_content_shape(h, w, target)
    assert max(ch, cw) == target
    assert uv[2] <= target + 1e-6 and uv[3] <= target + 1e-6
    assert _close(frame.inverse_box(uv), box, 1e-6 * max(h, w))


@settings(max_examples=200, deadline=None)
@given(image_and_box())
def test_loc_tokens_round_trip_within_one_bin(case: tuple[int, int, Box]) -> None:
    h, w, box = case
    text = to_loc_tokens(box, h, w)
    bins = [int(text[i + 4:i + 8]) for i in range(0, len(text), 9)]
    assert len(bins) == 4
    back = from_loc_tokens(bins, h, w)
    tol = np.array([w, h, w, h]) / 1024 + 1e-9
    assert np.all(np.abs(back.to_array() - box.to_array()) <= tol)


def test_points_frames_round_trip_non_square() -> None:
    pts = Points.from_lists([(10.5, 200.0)], [(299.0, 0.0)])
    frame = resized_frame(300, 500, 1000, 1000)
    back = frame.inverse_points(frame.forward_points(pts), pts.labels)
    assert back == pts
    assert frame.forward_points(pts)[0].tolist() == pytest.approx([21.0, 666.6666667])


def test_known_values() -> None:
    box = Box(50, 25, 150, 75)  # image 100 rows x 200 cols
    assert to_normalized(box, 100, 200).tolist() == [0.25, 0.25, 0.75, 0.75]
    assert to_per_mille(box, 100, 200) == [250, 250, 750, 750]
    assert from_per_mille([250, 250, 750, 750], 100, 200) == box
    assert to_loc_tokens(box, 100, 200) == "<loc0256><loc0256><loc0768><loc0768>"
    assert letterbox_frame(100, 200, 256).forward_box(box).tolist() == [64.0, 32.0, 192.0, 96.0]


def test_box_validation_and_geometry() -> None:
    with pytest.raises(InputError, match="x0 <= x1"):
        Box(10, 0, 5, 5)
    with pytest.raises(InputError, match="finite"):
        Box(0, 0, float("nan"), 1)
    with pytest.raises(InputError, match="4 values"):
        Box.from_list([1, 2, 3])
    a, b = Box(0, 0, 2, 2), Box(1, 0, 3, 2)
    assert a.iou(b) == pytest.approx(1 / 3)
    assert a.iou(Box(5, 5, 6, 6)) == 0.0
    assert Box.from_xywh(1, 2, 3, 4) == Box(1, 2, 4, 6)


def test_mask_box_is_exclusive_pixel_edges() -> None:
    data = np.zeros((10, 20), bool)
    data[2:5, 7:12] = True  # rows 2..4, cols 7..11
    mask = Mask(data)
    assert mask.to_box() == Box(7, 2, 12, 5)
    assert mask.area_px == 15
    assert mask.area_mm2((0.5, 0.2)) == pytest.approx(1.5)
    assert Mask(np.zeros((3, 3))).to_box() is None
    with pytest.raises(InputError, match="2D array"):
        Mask(np.zeros((2, 3, 4)))


def test_points_validation() -> None:
    with pytest.raises(InputError, match="one label per point"):
        Points(np.zeros((2, 2)), np.array([1]))
    with pytest.raises(InputError, match="labels 1"):
        Points(np.zeros((1, 2)), np.array([2]))


def test_region_json() -> None:
    data = np.zeros((4, 4), bool)
    data[1:3, 1:3] = True
    region = Region.from_mask(Mask(data), label="heart", score=0.9, provenance={"model": "m"})
    js = region.to_json(mask_path="a.png", spacing_mm=(0.5, 0.5))
    assert js["box"] == [1.0, 1.0, 3.0, 3.0]
    assert js["area_px"] == 4 and js["area_mm2"] == 1.0 and js["mask"] == "a.png"
    with pytest.raises(InputError, match="non-empty mask"):
        Region.from_mask(Mask(np.zeros((2, 2), bool)))
