"""The anatomy-token mask codec: exact bins on 1024 grids, components, tolerance, and real SCR masks."""

from __future__ import annotations

import numpy as np
import pytest

from eval.metrics import dice
from medvlm.errors import InputError
from medvlm.tokens import POLY_CLOSE, POLY_OPEN, decode_mask, encode_mask, mask_tokens
from tests.conftest import data_dir


def test_rectangle_round_trips_exactly_on_a_1024_grid() -> None:
    m = np.zeros((1024, 1024), bool)
    m[100:300, 200:600] = True
    text = encode_mask(m)
    assert text == POLY_OPEN + "<loc0200><loc0100><loc0200><loc0299><loc0599><loc0299><loc0599><loc0100>" + POLY_CLOSE
    assert np.array_equal(decode_mask(text, 1024, 1024), m)


def test_two_components_largest_first_and_scaled_grid() -> None:
    m = np.zeros((512, 256), bool)
    m[300:500, 20:120] = True  # larger
    m[10:60, 150:200] = True
    text = encode_mask(m)
    assert text.count(POLY_OPEN) == 2
    first = decode_mask(text[: text.index(POLY_CLOSE) + len(POLY_CLOSE)], 512, 256)
    assert first[400, 70] and not first[30, 175]  # the larger component comes first
    assert dice(decode_mask(text, 512, 256), m) > 0.97


def test_budget_bounds_the_tokens_and_empty_mask() -> None:
    yy, xx = np.mgrid[:400, :400]
    disc = (yy - 200) ** 2 + (xx - 200) ** 2 < 150**2
    for budget in (8, 32):
        text = encode_mask(disc, max_points=budget)
        assert text.count("<loc") // 2 <= budget
    assert dice(decode_mask(encode_mask(disc, max_points=32), 400, 400), disc) > 0.99
    assert encode_mask(np.zeros((4, 4), bool)) == ""
    assert not decode_mask("", 4, 4).any()
    assert len(mask_tokens()) == 1028


def test_decode_is_tolerant_and_encode_checks_input() -> None:
    junk = "Sure! <poly><loc0100><loc0100><loc0900><loc0100><loc0500><loc0900><loc0007></poly> <poly><loc0001></poly>"
    out = decode_mask(junk, 1024, 1024)
    assert out[500, 500] and not out[950, 500]  # the triangle; the odd token and the 1-vertex group are dropped
    with pytest.raises(InputError):
        encode_mask(np.zeros((2, 2, 2), bool))
    with pytest.raises(InputError):
        encode_mask(np.ones((4, 4), bool), max_points=2)
    with pytest.raises(InputError):
        decode_mask("", 0, 5)


@pytest.mark.data
def test_round_trip_dice_on_real_scr_masks() -> None:
    from eval.codec import codec_suite

    result = codec_suite(data_dir("cxr_jsrt_scr"), budgets=(32,), limit=10)
    [row] = result["rows"]
    assert result["n_masks"] == 50 and row["tokens_max"] <= 2 * 32 + 2 * 10
    assert row["mean_dice"] > 0.99 and row["min_dice"] > 0.98


def test_box_tokens_round_trip() -> None:
    from medvlm.tokens import decode_box, encode_box
    from medvlm.types import Box

    box = Box(100, 200, 300, 260)
    text = encode_box(box, 1024, 1024)
    assert text == "<box><loc0100><loc0200><loc0299><loc0259></box>"
    assert decode_box("answer: " + text, 1024, 1024) == box
    back = decode_box(encode_box(box, 512, 2048), 512, 2048)
    assert back is not None and back.iou(box) > 0.97
    assert decode_box("<box><loc0001></box>", 10, 10) is None
