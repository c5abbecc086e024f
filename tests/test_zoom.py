"""The zoomed second look (segmentation/textseg/zoom.py): windows, the postprocess order, the training windows
in the feature cache, and the predictor's zoom against a hand computation on a tiny random checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from segmentation.base import Prompt
from segmentation.textseg.postprocess import PostprocessPolicy, postprocess_mask
from segmentation.textseg.zoom import Window, random_zoom_window, square_window, zoom_windows


def test_square_window_known_values() -> None:
    # 40 px wide box: 2.5 x 40 = 100 < half of 512, so 256; centred at (120, 210), slid right to column 0
    assert square_window((100, 200, 140, 220), (512, 512)) == Window(82, 0, 256)
    # 2.5 x 160 = 400 > 256; centre (300, 300)
    assert square_window((220, 250, 380, 350), (512, 512)) == Window(100, 100, 400)
    # never more than the shorter side; slid inside the image
    assert square_window((0, 0, 300, 100), (300, 600)) == Window(0, 0, 300)
    # shift moves the centre by a fraction of the side (40 px), then the window slides back inside (left 140 -> 112)
    assert square_window((220, 250, 380, 350), (512, 512), shift=(-0.1, -0.1)) == Window(60, 60, 400)
    assert square_window((220, 250, 380, 350), (512, 512), shift=(0.1, -0.1)) == Window(60, 112, 400)


def test_window_crop_and_paste_round_trip() -> None:
    image = np.arange(100 * 120).reshape(100, 120)
    w = Window(10, 30, 50)
    assert (w.crop(image) == image[10:60, 30:80]).all()
    small = np.zeros((50, 50), bool)
    small[5, 7] = True
    full = w.paste(small, (100, 120))
    assert full.shape == (100, 120) and full.sum() == 1 and full[15, 37]
    assert w.contains((30, 10, 80, 60)) and not w.contains((29, 10, 80, 60))


def test_zoom_windows_one_per_component_skipping_those_inside() -> None:
    m = np.zeros((400, 400), bool)
    m[50:70, 50:90] = True  # 800 px
    m[300:320, 300:340] = True  # 800 px, far away: its own window
    assert set(zoom_windows(m)) == {square_window((50, 50, 90, 70), m.shape),
                                    square_window((300, 300, 340, 320), m.shape)}
    near = np.zeros((400, 400), bool)
    near[50:70, 50:90] = True
    near[100:110, 100:120] = True  # 200 px inside the first component's 200 px window: no second window
    assert len(zoom_windows(near)) == 1
    speck = np.zeros((400, 400), bool)
    speck[50:70, 50:90] = True
    speck[390, 390] = True  # < 10 % of the largest: no window at all
    assert len(zoom_windows(speck)) == 1
    assert zoom_windows(np.zeros((10, 10), bool)) == []


def test_random_zoom_windows_keep_their_structure_and_vary() -> None:
    m = np.zeros((512, 512), bool)
    m[200:240, 300:380] = True  # 80 px long side
    rng = np.random.default_rng(0)
    windows = [random_zoom_window({"kidney": m, "absent": np.zeros_like(m)}, m.shape, rng) for _ in range(50)]
    assert all(w is not None and w.contains((300, 200, 380, 240)) for w in windows)
    sides = {w.side for w in windows if w is not None}
    assert min(sides) >= 0.4 * 512 - 1 and max(sides) <= 0.6 * 512 + 1 and len(sides) > 10
    assert random_zoom_window({"absent": np.zeros_like(m)}, m.shape, rng) is None


def test_postprocess_runs_zoom_first_then_refine_then_pixel_ops() -> None:
    mask = np.zeros((20, 20), bool)
    mask[2:5, 2:5] = True
    zoomed = np.zeros((20, 20), bool)
    zoomed[10:15, 10:15] = True
    zoomed[0, 19] = True
    seen: list[np.ndarray] = []

    def refine(m: np.ndarray) -> np.ndarray:
        seen.append(m.copy())
        return m

    out, applied = postprocess_mask(mask, ("zoom", "refine_box", "largest_component"), refine, lambda m: zoomed)
    assert applied == ["zoom", "refine_box", "largest_component"]
    assert (seen[0] == zoomed).all() and out.sum() == 25 and out[10:15, 10:15].all()
    kept, applied = postprocess_mask(mask, ("zoom",), None, lambda m: None)  # nothing found: the mask stays
    assert applied == [] and (kept == mask).all()


def test_candidate_masks_with_a_zoomed_mask() -> None:
    from finetune.postprocess import candidate_masks

    mask = np.zeros((20, 20), bool)
    mask[2:5, 2:5] = True
    zoomed = np.zeros((20, 20), bool)
    zoomed[10:15, 10:15] = True
    refined_zoomed = np.zeros((20, 20), bool)
    refined_zoomed[9:16, 9:16] = True
    out = candidate_masks(mask, None, zoomed, refined_zoomed)
    assert (out["zoom"] == zoomed).all() and (out["zoom+refine_box"] == refined_zoomed).all()
    assert (out["none"] == mask).all() and (out["refine_box"] == mask).all()
    unzoomed = candidate_masks(mask, None, None, None)
    assert (unzoomed["zoom+largest_component"] == mask).all()


def test_the_cache_stores_zoom_windows_with_their_masks(tmp_path: Path) -> None:
    import torch

    from finetune.textseg_cache import FeatureCache, build_cache
    from medvlm.datasets import Sample
    from medvlm.io import MedicalImage
    from segmentation.textseg.config import tiny_test_config
    from segmentation.textseg.model import build_medvlm

    torch.manual_seed(0)
    encoder = build_medvlm(tiny_test_config()).image_encoder
    pixels = np.random.default_rng(0).uniform(0, 1, (96, 128)).astype(np.float32)
    small = np.zeros((96, 128), bool)
    small[40:50, 60:72] = True
    big = np.zeros((96, 128), bool)
    big[5:90, 5:60] = True
    sample = Sample(id="s1", image=MedicalImage(pixels), masks={"pancreas": small, "liver": big})
    items = [("ds", sample, 2, ("pancreas", "liver", "spleen"))]
    entries = build_cache(encoder, items, tmp_path, seed=3, progress=False, zooms={"ds": 3})
    assert [e.key for e in entries] == ["ds__s1__v0", "ds__s1__v1", "ds__s1__z0", "ds__s1__z1", "ds__s1__z2"]
    assert [e.window is None for e in entries] == [True, True, False, False, False]
    size = encoder.config.image_size
    for e in entries[2:]:
        assert e.window is not None
        top, left, side = e.window
        assert 0 <= top <= 96 - side and 0 <= left <= 128 - side and side <= 96
        assert "spleen" in e.absent and set(e.structures) <= {"pancreas", "liver"}
    # the unaugmented window's masks are the sample's masks cropped to it, letterboxed
    from finetune.textseg_cache import letterbox_mask

    first = entries[2]
    assert first.window is not None
    w = Window(*first.window)
    cache = FeatureCache(tmp_path, encoder)
    for name in first.structures:
        expected = letterbox_mask(np.ascontiguousarray(w.crop(sample.masks[name])), size)
        assert np.array_equal(cache.masks[first.key][name].numpy(), expected)
    assert cache.entries[2].window == first.window  # the index keeps the window
    again = build_cache(encoder, items, tmp_path, seed=3, progress=False, zooms={"ds": 3})
    assert [e.window for e in again] == [e.window for e in entries]  # same draws: a rebuild resumes


def test_the_segmenter_zooms_as_the_hand_computation_says(tmp_path: Path, tiny_folder: tuple[Path, int]) -> None:
    from segmentation.textseg.predictor import MedVLMSegmenter

    folder = Path(shutil.copytree(tiny_folder[0], tmp_path / "ckpt"))
    image = np.random.default_rng(1).integers(0, 255, (64, 96), dtype=np.uint8)
    kwargs = {"precision": "fp32", "threshold": 0.5, "existence_threshold": 0.0}
    plain = MedVLMSegmenter(folder, **kwargs)
    raw = plain.segment(image, [Prompt(text="polyp")])[0]
    assert raw.meta["found"], "the tiny model must draw something for this test"
    windows = zoom_windows(raw.mask.data)
    assert windows
    rgb = np.repeat(image[..., None], 3, axis=2)
    expected = np.zeros(image.shape, bool)
    for w in windows:
        crop = plain.segment(np.ascontiguousarray(w.crop(rgb)), [Prompt(text="polyp")])[0]
        if crop.meta["found"]:
            expected |= w.paste(crop.mask.data, image.shape)
    PostprocessPolicy(ops={"polyp": ("zoom",)}).save(folder)
    seg = MedVLMSegmenter(folder, **kwargs)
    got = seg.segment(image, [Prompt(text="polyp")])[0]
    assert expected.any() and not np.array_equal(expected, raw.mask.data)  # else this test could not fail
    assert got.meta["postprocess"] == ["zoom"] and np.array_equal(got.mask.data, expected)
    assert got.logits is not None and np.array_equal(got.logits, raw.logits)  # logits stay the first pass's
    # postprocess="masks" never encodes again: no zoom, no pixels kept
    masks_only = MedVLMSegmenter(folder, postprocess="masks", **kwargs)
    assert "rgb" not in masks_only.encode(image).extra
    r = masks_only.segment(image, [Prompt(text="polyp")])[0]
    assert "postprocess" not in r.meta and np.array_equal(r.mask.data, raw.mask.data)


@pytest.mark.parametrize("bad", [0, -1])
def test_a_data_source_needs_one_variant(bad: int) -> None:
    from finetune.textseg_train import DataSource, TrainConfig
    from medvlm.errors import InputError

    with pytest.raises(InputError, match="zooms"):
        TrainConfig(data=[DataSource("cxr_jsrt_scr", variants=1 if bad == -1 else bad, zooms=bad)]).validate()

