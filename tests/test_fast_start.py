"""What makes a cold `medvlm ask` fast, checked against the slow reference it replaces: numpy resizing and
contours equal to torch / scipy, chest anatomy segmented on demand, and the console script's early exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agents.anatomy import BASE_STRUCTURES, segment_chest_anatomy
from medvlm.types import Mask
from segmentation.base import ImageEmbedding, SegmentationResult

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("shape,size", [((200, 256), (1024, 1300)), ((256, 256), (100, 77)), ((3, 5), (7, 11)),
                                        ((64, 40), (64, 40)), ((180, 256), (517, 733))])
def test_resize_bilinear_is_torch_interpolate(shape: tuple[int, int], size: tuple[int, int]) -> None:
    import torch
    import torch.nn.functional as F

    from segmentation.textseg.preprocess import resize_bilinear

    a = (np.random.default_rng(0).normal(size=shape) * 5).astype(np.float32)
    want = F.interpolate(torch.from_numpy(a)[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    got = resize_bilinear(a, size)
    assert got.shape == size and got.dtype == np.float32
    np.testing.assert_allclose(got, want.numpy(), atol=5e-4)
    assert np.array_equal(got > 0, want.numpy() > 0)


@pytest.mark.parametrize("thickness", [1, 2, 3, 5, 8])
def test_mask_contour_equals_scipy_morphology(thickness: int) -> None:
    from scipy import ndimage

    from medvlm.viz import mask_contour

    rng = np.random.default_rng(thickness)
    cross = np.ones((3, 3), bool)
    for k in range(12):
        m = ndimage.binary_opening(rng.random((60, 80)) > 0.4) if k % 2 else rng.random((60, 80)) > 0.5
        m[0, :] = k % 3 == 0  # masks touching the border: the outside counts as background
        want = m & ~ndimage.binary_erosion(m, structure=cross, border_value=0)
        if thickness > 1:
            want = ndimage.binary_dilation(want, structure=cross, iterations=thickness // 2)
        assert np.array_equal(mask_contour(m, thickness), want)
    assert not mask_contour(np.zeros((5, 5), bool), 3).any()


class _CountingSegmenter:
    """Each structure is a fixed rectangle; records which texts each decoder call got."""

    name = "counting"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.boxes = {"right lung": (30, 150, 20, 80), "left lung": (30, 150, 120, 180), "heart": (90, 160, 70, 140),
                      "right clavicle": (35, 45, 20, 90), "left clavicle": (35, 45, 110, 180)}

    def predict_many(self, emb: Any, prompts: list[Any]) -> list[SegmentationResult]:
        self.calls.append([str(p.text) for p in prompts])
        out = []
        for p in prompts:
            m = np.zeros((200, 200), bool)
            r0, r1, c0, c1 = self.boxes[str(p.text)]
            m[r0:r1, c0:c1] = True
            out.append(SegmentationResult(mask=Mask(m), score=0.5 + 0.01 * len(out), logits=None, prompt=p))
        return out


def test_chest_anatomy_is_segmented_on_demand() -> None:
    from medvlm.coords import letterbox_frame

    seg = _CountingSegmenter()
    emb = ImageEmbedding(backend="counting", original_size=(200, 200), features=None,
                         frame=letterbox_frame(200, 200, 256))
    anatomy = segment_chest_anatomy(seg, None, emb)
    assert seg.calls == []
    assert anatomy.is_chest  # both lungs, in one decoder call
    assert seg.calls == [["right lung", "left lung"]]
    heart = anatomy.region("cardiac silhouette")
    assert heart is not None and heart.sum() == 70 * 70
    assert seg.calls[-1] == ["heart"] and len(seg.calls) == 2
    assert "polyp" not in anatomy.masks and anatomy.scores.get("polyp") is None  # not a base structure: no call
    assert len(seg.calls) == 2
    assert sorted(anatomy.masks) == sorted(BASE_STRUCTURES)  # iterating decodes the rest, once
    assert seg.calls[-1] == ["right clavicle", "left clavicle"] and len(seg.calls) == 3
    assert anatomy.scores["left clavicle"] == pytest.approx(0.51)
    assert dict(anatomy.masks).keys() == set(BASE_STRUCTURES) and len(seg.calls) == 3


@pytest.mark.data
def test_console_script_exits_early_with_everything_written(tmp_path: Path) -> None:
    """`medvlm ask` ends with os._exit after flushing: the exit code, the printed answer and the files are all
    there (and `medvlm --help`, not a fast-exit command, exits normally)."""
    from tests.conftest import data_dir

    image = data_dir("cxr_jsrt_scr") / "images" / "JPCLN011.png"
    cmd = [sys.executable, "-c", "import sys; from medvlm.app.cli import entry; sys.argv[0] = 'medvlm'; entry()"]
    done = subprocess.run([*cmd, "ask", str(image), "where is the heart?", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.rstrip().endswith(f"wrote {tmp_path / 'JPCLN011.json'} and "
                                         f"{tmp_path / 'JPCLN011.overlay.png'}")
    payload = json.loads((tmp_path / "JPCLN011.json").read_text())
    assert payload["regions"][0]["label"] == "heart"
    bad = subprocess.run([*cmd, "ask", str(tmp_path / "missing.png"), "where is the heart?"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "missing.png" in bad.stderr


def test_interior_point_is_the_argmax_of_scipys_distance_transform() -> None:
    from scipy import ndimage

    from agents.anatomy import interior_point

    def reference(mask: np.ndarray) -> tuple[float, float]:
        dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
        return float(c) + 0.5, float(r) + 0.5

    rng = np.random.default_rng(0)
    masks = [ndimage.binary_opening(rng.random((50, 70)) > 0.3, iterations=k % 3 + 1) for k in range(25)]
    yy, xx = np.mgrid[:400, :500]
    masks.append(((yy - 200) / 150) ** 2 + ((xx - 260) / 200) ** 2 <= 1)  # large: the coarse grid is used
    masks.append((((yy - 200) / 150) ** 2 + ((xx - 260) / 200) ** 2 <= 1) & (xx % 97 > 3))  # slits
    square = np.zeros((300, 300), bool)
    square[50:250, 50:250] = True  # a plateau of ties: the first in row-major order wins
    masks += [square, np.ones((120, 90), bool), np.eye(40, dtype=bool)]
    masks = [m for m in masks if m.any()]
    assert len(masks) >= 20
    for mask in masks:
        assert interior_point(mask) == reference(mask)
    assert interior_point(np.zeros((4, 4), bool)) is None


@pytest.mark.parametrize("radius", [0.5, 1.0, 1.5, 2.0, 3.7, 5.0, 20.48])
def test_dilate_disc_is_scipys_distance_threshold(radius: float) -> None:
    from scipy import ndimage

    from agents.anatomy import dilate_disc

    rng = np.random.default_rng(int(radius * 10))
    for k in range(12):
        mask = ndimage.binary_opening(rng.random((60, 90)) > 0.55, iterations=k % 2 + 1)
        if k % 4 == 0:  # a single pixel near the border: the disc itself, cut by the image edge
            mask[:] = False
            mask[int(rng.integers(0, 5)), int(rng.integers(0, 90))] = True
        want = ndimage.distance_transform_edt(~mask) <= radius if mask.any() else np.zeros_like(mask)
        assert np.array_equal(dilate_disc(mask, radius), want)
