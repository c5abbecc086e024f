"""Overlay labels never cover each other, and a region that only places a finding is labelled as the anatomy it
outlines (its score as that anatomy's), never as the finding."""

from __future__ import annotations

import numpy as np
import pytest

from medvlm.types import Box, Mask, Region
from medvlm.viz import draw_overlay, place_label


def test_place_label_avoids_every_placed_box() -> None:
    placed: list[tuple[float, float, float, float]] = []
    for _ in range(12):  # twelve labels anchored at the same point
        x, y = place_label((120, 14), (50, 40), placed, 400, 400, margin=2)
        placed.append((x, y, x + 120, y + 14))
    for i, a in enumerate(placed):
        assert a[1] >= 0 and a[3] <= 400
        for b in placed[i + 1:]:
            assert a[3] <= b[1] or b[3] <= a[1] or a[2] <= b[0] or b[2] <= a[0], (a, b)
    # no room left: the anchor is returned rather than an off-image spot
    full = [(0.0, 0.0, 400.0, 400.0)]
    assert place_label((50, 10), (10, 20), full, 400, 400) == (10, 20)


def test_overlay_with_many_regions_keeps_labels_apart() -> None:
    image = np.full((300, 300, 3), 255, np.uint8)
    mask = np.zeros((300, 300), bool)
    mask[100:200, 100:200] = True
    regions = [Region(box=Box(100, 100, 200, 200), label=f"region {k}", mask=Mask(mask), score=0.5)
               for k in range(12)]
    out = draw_overlay(image, regions, fill_alpha=0.0)
    # every label sits on its own black background: 12 separate black blocks
    from scipy import ndimage

    black = (out == 0).all(axis=2)
    labels, _ = ndimage.label(black)
    sizes = np.bincount(labels.ravel())[1:]
    assert int((sizes > 300).sum()) == 12  # (thin black contour and box dashes are far smaller)


def test_zone_score_is_labelled_as_the_zone_s() -> None:
    mask = np.zeros((50, 50), bool)
    mask[10:20, 10:20] = True
    region = Region(box=Box(10, 10, 20, 20), label="right apical zone, where the phrase places the pneumothorax",
                    mask=Mask(mask), score=0.98, provenance={"score_of": "zone"})
    from agents.grounders.base import GroundingResult
    from agents.pipeline import compose_answer

    text = compose_answer("right apical pneumothorax", GroundingResult(phrase="right apical pneumothorax",
                                                                       meta={"finding": "pneumothorax"}), [region])
    assert "zone confidence 0.98" in text


@pytest.mark.slow
def test_embedded_grounder_names_the_zone_not_the_finding() -> None:
    from agents.pipeline import GroundingAgent
    from medvlm.assets import DEMO_IMAGE, asset_path
    from medvlm.io import load_image

    answer = GroundingAgent("medvlm").ask(load_image(asset_path(DEMO_IMAGE)),
                                          "where is the right apical pneumothorax?")
    assert answer.regions
    for r in answer.regions:
        assert r.label.endswith("where the phrase places the pneumothorax"), r.label
        assert "apical" in r.label and r.provenance["score_of"] == "zone"
    assert "zone confidence" in answer.text
