"""Weak localization: Grad-CAM on tiny CNNs built here, anatomy gating, box and peak reading, the ``medvlm
heatmap`` command and ``medvlm eval weakloc`` on real images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from agents.anatomy import anatomy_from_masks
from agents.heatmap import GatePlan, plan_gate, read_heatmap
from medvlm.errors import InputError
from medvlm.types import Box
from segmentation.heatmap import (
    GateConfig,
    colorize_heatmap,
    gate_heatmap,
    gate_weights,
    gradcam,
    heatmap_box,
    letterbox_to_original,
    peak,
)
from tests.conftest import data_dir

# ------------------------------------------------------------------------------------------------ Grad-CAM

QUADRANTS = {0: (slice(0, 16), slice(0, 16)), 1: (slice(0, 16), slice(16, 32)),
             2: (slice(16, 32), slice(0, 16)), 3: (slice(16, 32), slice(16, 32))}  # (rows, cols) of a 32 x 32 input


class QuadrantChannels(nn.Module):
    """Channel k is kept only in quadrant k (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) of a 16 x 16
    grid: channels that each see one place, as class-specific detector channels do in a trained CNN."""

    def __init__(self) -> None:
        super().__init__()
        keep = torch.zeros(4, 16, 16)
        for k, (rows, cols) in QUADRANTS.items():
            keep[k, rows.start // 2: rows.stop // 2, cols.start // 2: cols.stop // 2] = 1
        self.register_buffer("keep", keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep


class QuadrantClassifier(nn.Module):
    """Random conv (stride 2) -> ReLU -> quadrant channels ("features") -> logit k = mean of channel k."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), QuadrantChannels())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


class OneQuadrantHead(nn.Module):
    """A tiny random CNN whose only logit reads the features of one quadrant of the image through random weights
    (so channel weights alone cannot localize: the map has to follow the gradient's place)."""

    def __init__(self, quadrant: int, tokens: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                                      nn.ReLU())
        self.tokens = nn.Identity()  # (1, N, C) tokens, row-major, as a ViT block would give
        self.as_tokens = tokens
        rows, cols = QUADRANTS[quadrant]
        self.rows, self.cols = slice(rows.start // 2, rows.stop // 2), slice(cols.start // 2, cols.stop // 2)
        self.head = nn.Parameter(torch.randn(8, 8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)  # (1, 8, 16, 16)
        if self.as_tokens:
            t = self.tokens(f.flatten(2).transpose(1, 2))  # (1, 256, 8)
            f = t.transpose(1, 2).reshape(1, 8, 16, 16)
        return (f[:, :, self.rows, self.cols] * self.head).sum(dim=(1, 2, 3))[:, None]


def _mass_in(cam: np.ndarray, quadrant: int) -> float:
    """Share of the map's mass in ``quadrant`` (a 32 x 32 map, or a 16 x 16 one on the layer's own grid)."""
    rows, cols = QUADRANTS[quadrant]
    f = 32 // cam.shape[0]
    return float(cam[rows.start // f: rows.stop // f, cols.start // f: cols.stop // f].sum() / cam.sum())


@pytest.mark.parametrize("quadrant", [0, 1, 2, 3])
def test_gradcam_mass_lies_in_the_quadrant_the_target_reads(quadrant: int) -> None:
    torch.manual_seed(1)
    model = QuadrantClassifier()
    x = torch.rand(1, 1, 32, 32)
    cam = gradcam(model, "features", x, quadrant)
    assert cam.shape == (32, 32) and cam.dtype == np.float32
    assert cam.min() >= 0 and cam.max() == pytest.approx(1.0)
    # on the layer's own 16 x 16 grid all of it; upsampled, bilinear interpolation bleeds ~1 px over the border
    assert _mass_in(gradcam(model, "features", x, quadrant, size=(16, 16)), quadrant) == pytest.approx(1.0)
    assert _mass_in(cam, quadrant) > 0.9
    assert max(_mass_in(cam, k) for k in range(4) if k != quadrant) < 0.05
    # the model is untouched: no parameter received a gradient
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("quadrant", [0, 3])
@pytest.mark.parametrize("tokens", [False, True])
def test_hirescam_follows_where_the_target_depends_on_the_image(quadrant: int, tokens: bool) -> None:
    model = OneQuadrantHead(quadrant, tokens=tokens)
    x = torch.rand(1, 1, 32, 32)
    layer = "tokens" if tokens else "features"
    cam = gradcam(model, layer, x, 0, method="hirescam")
    assert cam.shape == (32, 32)
    assert _mass_in(gradcam(model, layer, x, 0, size=(16, 16), method="hirescam"), quadrant) == pytest.approx(1.0)
    assert _mass_in(cam, quadrant) > 0.9
    # a scalar function of the output is the same target as its index
    same = gradcam(model, layer, x, lambda out: out[0, 0], method="hirescam")
    np.testing.assert_allclose(cam, same, atol=1e-6)


def test_gradcam_size_frozen_models_and_errors() -> None:
    torch.manual_seed(1)
    model = QuadrantClassifier()
    for p in model.parameters():
        p.requires_grad_(False)  # a frozen network: the layer's output is outside the graph until Grad-CAM hooks it
    x = torch.rand(1, 1, 32, 32)
    cam = gradcam(model, "features", x, 2, size=(64, 48))
    assert cam.shape == (64, 48)
    assert cam[32:, :24].sum() / cam.sum() > 0.9  # quadrant 2, bottom-left, at the new size
    with pytest.raises(InputError, match="sub-module name"):
        gradcam(model, "no.such.layer", x, 0)
    with pytest.raises(InputError, match="batch size 1"):
        gradcam(model, "features", torch.rand(2, 1, 32, 32), 0)
    with pytest.raises(InputError, match="index"):
        gradcam(model, "features", x, 7)
    with pytest.raises(InputError, match="gradcam method"):
        gradcam(model, "features", x, 0, method="cam++")  # type: ignore[arg-type]


def test_letterbox_to_original_crops_padding_and_keeps_orientation() -> None:
    frame = np.zeros((8, 8), dtype=np.float32)
    frame[:4, :] = np.arange(8, dtype=np.float32)[None, :]  # content: top half, rising to the right
    frame[4:, :] = 100.0  # padding: must not leak into the image
    out = letterbox_to_original(frame, (4, 8), (20, 40))
    assert out.shape == (20, 40)
    assert out.max() <= 7.0 + 1e-5
    assert out[10, 39] > out[10, 20] > out[10, 0]


# ------------------------------------------------------------------------------------------------ gating


def _rect(shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[rows, cols] = True
    return m


def test_hard_gate_zeroes_outside_and_keeps_inside() -> None:
    rng = np.random.default_rng(0)
    heat = rng.random((100, 120)).astype(np.float32)
    region = _rect(heat.shape, slice(20, 60), slice(30, 90))
    gated = gate_heatmap(heat, region, GateConfig(grow=0.0, soft=0.0))
    np.testing.assert_array_equal(gated[region], heat[region])
    assert float(gated[~region].sum()) == 0.0


def test_soft_gate_keeps_the_grown_region_and_damps_with_distance() -> None:
    shape = (200, 200)
    region = _rect(shape, slice(80, 120), slice(80, 120))
    cfg = GateConfig(grow=0.02, soft=0.03)  # grow 4 px, sigma 6 px on a 200 px image
    w = gate_weights(region, cfg)
    assert w[region].min() == 1.0 and w[100, 123] == 1.0  # 4 px outside: inside the grown region
    row = w[100, 120:200]
    assert np.all(np.diff(row) <= 0)  # falls with the distance
    assert w[100, 150] < 1e-3 and w[10, 10] < 1e-12  # 30 px and farther out: gone
    heat = np.ones(shape, dtype=np.float32)
    gated = gate_heatmap(heat, region, cfg)
    far = gate_weights(region, GateConfig(grow=0.02 + 4 * 0.03, soft=0.0)) == 0  # beyond grow + 4 sigma
    assert gated[far].sum() / heat[far].sum() < 1e-3
    np.testing.assert_array_equal(gated[region], heat[region])
    with pytest.raises(InputError, match="shape"):
        gate_heatmap(heat, region[:50])


# ------------------------------------------------------------------------------------------------ reading


def _gaussian(shape: tuple[int, int], cx: float, cy: float, sx: float, sy: float, amp: float = 1.0) -> np.ndarray:
    yy, xx = np.mgrid[0: shape[0], 0: shape[1]] + 0.5  # pixel centres
    return (amp * np.exp(-0.5 * (((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2))).astype(np.float32)


def test_heatmap_box_is_the_half_maximum_box_of_the_largest_blob_and_peak_the_hottest_pixel() -> None:
    shape = (300, 400)
    big = _gaussian(shape, cx=250.0, cy=120.0, sx=40.0, sy=20.0)  # wide, off-centre: x and y must not swap
    small = _gaussian(shape, cx=60.5, cy=240.5, sx=6.0, sy=6.0, amp=1.05)  # hotter but small, on a pixel centre
    heat = np.maximum(big, small)
    half = np.sqrt(2 * np.log(1 / (0.5 * 1.05)))  # in sigmas: where the big blob crosses half the global maximum
    expected = Box(250 - half * 40, 120 - half * 20, 250 + half * 40, 120 + half * 20)
    box = heatmap_box(heat, 0.5)
    assert box is not None and box.iou(expected) > 0.9
    assert peak(heat) == (60.5, 240.5)  # the peak is the small blob's, the box the big one's (CAM rule)
    assert heatmap_box(np.zeros(shape, dtype=np.float32)) is None
    with pytest.raises(InputError, match="fraction"):
        heatmap_box(heat, 0.0)


def test_peak_pixel_centre_and_ties() -> None:
    heat = np.zeros((20, 50), dtype=np.float32)
    heat[12, 37] = 3.0
    assert peak(heat) == (37.5, 12.5)
    heat[3, 40] = 3.0  # a tie earlier in row-major order wins
    assert peak(heat) == (40.5, 3.5)
    with pytest.raises(InputError, match="finite"):
        peak(np.full((4, 4), np.nan))


def test_colorize_leaves_cold_pixels_as_they_were() -> None:
    rgb = np.full((10, 12, 3), 90, dtype=np.uint8)
    heat = np.zeros((10, 12), dtype=np.float32)
    heat[2, 3] = 1.0
    out = colorize_heatmap(rgb, heat)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[5:], rgb[5:])
    assert not np.array_equal(out[2, 3], rgb[2, 3])


# ------------------------------------------------------------------------------------------------ gate plans


def _chest(shape: tuple[int, int] = (200, 200), lung_width: int = 50) -> dict[str, np.ndarray]:
    """Synthetic frontal chest masks: right lung on the image left, left lung on the image right, heart between."""
    return {"right lung": _rect(shape, slice(30, 170), slice(20, 20 + lung_width)),
            "left lung": _rect(shape, slice(30, 170), slice(180 - lung_width, 180)),
            "heart": _rect(shape, slice(110, 160), slice(80, 130))}


def test_plan_gate_maps_findings_to_their_regions() -> None:
    assert plan_gate("cardiomegaly") == GatePlan("cardiomegaly", "cardiomegaly", ("cardiac silhouette",), None)
    eff = plan_gate("left pleural effusion")
    assert eff.finding == "pleural effusion" and set(eff.regions) == {"left costophrenic angle", "left lower lung zone"}
    assert set(plan_gate("nodule").regions) == {"right lung", "left lung"}
    assert "right apical zone" in plan_gate("pneumothorax").regions
    unknown = plan_gate("xyz blob")
    assert unknown.finding is None and unknown.regions == () and "names no finding" in str(unknown.reason)
    with pytest.raises(InputError, match="non-empty finding"):
        plan_gate("   ")


def test_read_heatmap_gates_known_findings_on_chest_films_only() -> None:
    shape = (200, 200)
    heat = np.full(shape, 0.2, dtype=np.float32)
    heat[40:60, 30:50] = 0.9  # a hot spot in the right upper lung, far from the heart
    heat[130:140, 100:110] = 0.5  # a weaker one on the heart
    chest = anatomy_from_masks(_chest(shape), shape, "test")
    assert chest.is_chest

    gated = read_heatmap(heat, plan_gate("cardiomegaly"), chest, gate="anatomy")
    assert gated.gate_used == "anatomy" and gated.gate_reason is None and gated.regions == ("cardiac silhouette",)
    assert gated.box is not None and gated.box.contains_point(*gated.peak)
    assert 80 <= gated.peak[0] <= 130 and 110 <= gated.peak[1] <= 160  # the heart spot now wins
    assert float(gated.final[50, 40]) < 1e-3 * 0.9  # the lung spot is gated away

    ungated = read_heatmap(heat, plan_gate("cardiomegaly"), chest, gate="none")
    assert ungated.gate_used == "none" and ungated.peak == (30.5, 40.5) and "gating off" in str(ungated.gate_reason)
    np.testing.assert_array_equal(ungated.final, heat)

    unknown = read_heatmap(heat, plan_gate("xyz blob"), chest, gate="anatomy")
    assert unknown.gate_used == "none" and "names no finding" in str(unknown.gate_reason)
    np.testing.assert_array_equal(unknown.final, heat)

    small = anatomy_from_masks(_chest(shape, lung_width=8), shape, "test")  # lungs of a CT slice's size
    assert not small.is_chest
    not_chest = read_heatmap(heat, plan_gate("cardiomegaly"), small, gate="anatomy")
    assert not_chest.gate_used == "none" and "not a frontal chest radiograph" in str(not_chest.gate_reason)
    assert not_chest.peak == (30.5, 40.5)
    payload = not_chest.to_json()
    assert payload["gate"]["used"] == "none" and payload["gate"]["is_chest"] is False

    with pytest.raises(InputError, match="gate"):
        read_heatmap(heat, plan_gate("cardiomegaly"), chest, gate="lungs")


# ------------------------------------------------------------------------------------------------ real data


@pytest.mark.slow
@pytest.mark.data
def test_heatmap_command_on_a_nih_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medvlm.app.cli import main

    image = data_dir("cxr_nih_bbox") / "images" / "00009745_000.png"
    assert main(["heatmap", str(image), "cardiomegaly", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "00009745_000.heatmap.json").read_text())
    assert (tmp_path / "00009745_000.heatmap.overlay.png").is_file()
    assert (tmp_path / "00009745_000.heatmap.png").is_file()
    height, width = payload["size"]
    x0, y0, x1, y1 = payload["box"]
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert payload["gate"] == {"requested": "anatomy", "used": "anatomy", "regions": ["cardiac silhouette"],
                               "reason": None, "is_chest": True}
    px, py = payload["peak"]
    assert 0 <= px <= width and 0 <= py <= height
    # the official NIH cardiomegaly box of this image: Med-VLM's map for the word lies on the heart
    assert Box(329.4, 399.8, 785.6, 782.4).contains_point(px, py)
    assert "gate anatomy" in capsys.readouterr().out
    assert main(["heatmap", str(image), " ", "--out", str(tmp_path)]) == 2  # empty finding: an input error


@pytest.mark.slow
@pytest.mark.data
def test_eval_weakloc_runs_and_reports_rates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medvlm.app.cli import main

    data_dir("cxr_nih_bbox")
    data_dir("cxr_jsrt_scr")
    out = tmp_path / "weakloc.json"
    # the shipped checkpoint also stands in as the "learned gating" model: its columns must equal the base ones
    shipped = Path(__file__).resolve().parents[1] / "segmentation" / "textseg" / "weights" / "default"
    assert main(["eval", "weakloc", "--limit", "1", "--source", "medvlm", "--learned", str(shipped),
                 "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert [d["n_images"] for d in payload["datasets"]] == [1, 1]
    jsrt = payload["datasets"][1]
    assert jsrt["split"] == "val" and jsrt["n_trained_on"] == 0
    assert payload["methods"] == ["medvlm", "medvlm+anatomy", "L:medvlm", "L:medvlm+anatomy", "prior"]
    for case in payload["per_case"]:
        assert case["L:medvlm"] == case["medvlm"] and case["L:medvlm+anatomy"] == case["medvlm+anatomy"]
        assert 0.0 <= case["medvlm"]["inside"] <= 1.0  # both images are chest films with a gate
    for row in payload["rows"]:
        assert 0.0 <= row["random"] <= 1.0
        for m in payload["methods"]:
            assert 0.0 <= row[m]["point"] <= 1.0 and 0.0 <= row[m]["iou"] <= 1.0
    overall = payload["rows"][-1]
    assert overall["dataset"] == "all" and overall["n"] == 2
    assert 0.0 < overall["random"] < 0.5
    table = capsys.readouterr().out
    assert "mv+A pt" in table and "mvL+A pt" in table and "cxr_jsrt_scr images (val): " + jsrt["ids"][0] in table
