"""Neighbouring-slice context (issue #16: "optional neighbouring-slice context"): a Med-VLM checkpoint trained with
``slice_context`` reads a volume slice with the slices below and above it as R and B
(:class:`medvlm.volume.SliceWithNeighbours`). Checked: the pixels (order, clamping, one window), the config key,
the feature cache refusing a mismatch, the predictor (a context checkpoint reads the neighbours, any other the grey
centre), a broad checkpoint handing a slice to a context specialist (the classifier reads grey, the specialist its
neighbours, exact against the specialist alone), and segment_volume / the training split feeding them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medvlm.errors import InputError
from medvlm.io import MedicalImage
from medvlm.volume import SliceWithNeighbours, read_volume, with_neighbours
from segmentation.base import Prompt
from tests.conftest import DATA_ROOT, data_dir
from tests.test_specialists import OPTS, _classifier, _pair
from tests.test_volume import FakeTextSegmenter, _synthetic_ct, _write_nifti


def _stack() -> np.ndarray:
    """(5, 40, 56) float32: slice k holds values 100 k + a fixed random texture, so each channel names its slice."""
    texture = np.random.default_rng(7).uniform(0, 50, (40, 56)).astype(np.float32)
    return np.stack([100.0 * k + texture for k in range(5)]).astype(np.float32)


def _with_context(folder: Path, k: int = 1) -> Path:
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["slice_context"] = k
    (folder / "config.json").write_text(json.dumps(meta))
    return folder


def test_neighbours_are_r_and_b_clamped_at_the_ends_under_one_window() -> None:
    stack = _stack()
    win = (250.0, 500.0)  # 0..500 -> 0..255
    for k, (lo, hi) in {2: (1, 3), 0: (0, 1), 4: (3, 4)}.items():
        image = with_neighbours(MedicalImage(stack[k], window=win, modality="MR"), stack, k)
        rgb = image.to_rgb_uint8()
        assert isinstance(image, SliceWithNeighbours) and image.modality == "MR" and rgb.shape == (40, 56, 3)
        for channel, z in enumerate((lo, k, hi)):
            assert np.array_equal(rgb[..., channel], MedicalImage(stack[z], window=win).to_uint8())
        assert np.array_equal(image.gray_rgb_uint8(), MedicalImage(stack[k], window=win).to_rgb_uint8())
        assert np.array_equal(image.pixels, stack[k]) and image.meta["slice_context"] == 1
    # no window: one min-max over the three slices, not one per channel
    rgb = with_neighbours(MedicalImage(stack[2]), stack, 2).to_rgb_uint8()
    assert rgb[..., 0].max() < 128 < rgb[..., 2].min()
    wide = with_neighbours(MedicalImage(stack[2]), stack, 2, context=2).to_rgb_uint8()
    lo, hi = float(stack[[0, 2, 4]].min()), float(stack[[0, 2, 4]].max())
    joint = ((lo + hi) / 2.0, hi - lo)
    for channel, z in enumerate((0, 2, 4)):
        assert np.array_equal(wide[..., channel], MedicalImage(stack[z], window=joint).to_uint8())
    with pytest.raises(InputError, match="stack the image was sliced from"):
        with_neighbours(MedicalImage(stack[1]), stack, 2)
    with pytest.raises(InputError, match="context"):
        with_neighbours(MedicalImage(stack[2]), stack, 2, context=0)
    with pytest.raises(InputError, match="centre's shape"):
        SliceWithNeighbours(stack[2], below=stack[1][:10], above=stack[3])


def test_config_key_round_trips_and_bad_values_are_refused() -> None:
    from segmentation.textseg.config import MedVLMConfig, tiny_test_config

    cfg = MedVLMConfig.from_json({**tiny_test_config().to_json(), "slice_context": 1})
    assert cfg.slice_context == 1 and MedVLMConfig.from_json(cfg.to_json()).slice_context == 1
    assert MedVLMConfig.from_json({k: v for k, v in cfg.to_json().items() if k != "slice_context"}).slice_context == 0
    for bad in (-1, True, "1"):
        with pytest.raises(InputError, match="slice_context"):
            MedVLMConfig.from_json({**tiny_test_config().to_json(), "slice_context": bad})


def test_the_feature_cache_refuses_another_slice_context(tmp_path: Path) -> None:
    from finetune.textseg_cache import FeatureCache, build_cache
    from medvlm.datasets import Sample
    from segmentation.textseg.config import tiny_test_config
    from segmentation.textseg.model import build_medvlm

    encoder = build_medvlm(tiny_test_config()).image_encoder
    stack = _stack()
    mask = np.zeros((40, 56), bool)
    mask[10:20, 10:30] = True
    image = with_neighbours(MedicalImage(stack[2], window=(250.0, 500.0)), stack, 2)
    sample = Sample(id="v_z002", image=image, masks={"liver": mask})
    entries = build_cache(encoder, [("toy", sample, 1, ("liver",))], tmp_path, progress=False, slice_context=1)
    assert len(entries) == 1 and json.loads((tmp_path / "index.json").read_text())["slice_context"] == 1
    assert len(FeatureCache(tmp_path, encoder, slice_context=1).entries) == 1
    with pytest.raises(InputError, match="slice_context 1"):
        FeatureCache(tmp_path, encoder)
    with pytest.raises(InputError, match="its own cache_dir"):
        build_cache(encoder, [("toy", sample, 1, ("liver",))], tmp_path, progress=False, slice_context=0)
    # the cached prefix is the encoder's output on the three slices, not on the grey centre
    import torch

    payload = torch.load(tmp_path / "toy__v_z002__v0.pt", weights_only=True)
    chw, _ = encoder.preprocess(image.to_rgb_uint8())
    grey, _ = encoder.preprocess(image.gray_rgb_uint8())
    with torch.no_grad():
        want, other = encoder.prefix(torch.from_numpy(np.stack([chw, grey])))
    assert torch.allclose(payload["prefix"].float(), want, atol=2e-2)
    assert not torch.allclose(payload["prefix"].float(), other, atol=2e-2)


def test_a_context_checkpoint_reads_the_neighbours_and_others_the_grey_centre(
        tmp_path: Path, tiny_folder: tuple[Path, int]) -> None:
    from segmentation.textseg.predictor import MedVLMSegmenter

    base, _ = tiny_folder
    plain = Path(shutil.copytree(base, tmp_path / "plain"))
    ctx = _with_context(Path(shutil.copytree(base, tmp_path / "ctx")))
    stack = _stack()
    image = with_neighbours(MedicalImage(stack[2], window=(250.0, 500.0), modality="MR"), stack, 2)
    prompts = [Prompt(text="liver")]
    seg_ctx = MedVLMSegmenter(ctx, route=False, **OPTS)
    seg_plain = MedVLMSegmenter(plain, route=False, **OPTS)
    assert seg_ctx.slice_context == 1 == seg_ctx.volume_context() and seg_plain.volume_context() == 0
    on_ctx = seg_ctx.segment(image, prompts)[0].logits
    assert np.allclose(on_ctx, seg_ctx.segment(image.to_rgb_uint8(), prompts)[0].logits, atol=1e-5)
    assert not np.allclose(on_ctx, seg_ctx.segment(image.gray_rgb_uint8(), prompts)[0].logits, atol=1e-3)
    on_plain = seg_plain.segment(image, prompts)[0].logits
    assert np.allclose(on_plain, seg_plain.segment(image.gray_rgb_uint8(), prompts)[0].logits, atol=1e-5)
    # batched encoding reads the same pixels
    batch = seg_ctx.encode_batch([image, MedicalImage(stack[3], window=(250.0, 500.0))])
    assert np.allclose(seg_ctx.predict_many(batch[0], prompts)[0].logits, on_ctx, atol=1e-5)


def test_a_broad_checkpoint_hands_a_slice_to_its_context_specialist(tmp_path: Path,
                                                                   tiny_folder: tuple[Path, int]) -> None:
    from segmentation.textseg.predictor import MedVLMSegmenter

    broad, spec = _pair(tmp_path, tiny_folder)
    _with_context(spec)
    stack = _stack()
    image = with_neighbours(MedicalImage(stack[2], window=(250.0, 500.0)), stack, 2)
    prompts = [Prompt(text="fetal head")]
    seg = MedVLMSegmenter(broad, **OPTS)
    assert seg.slice_context == 0 and seg.volume_context() == 1
    for embedding in (seg.encode(image), seg.encode_batch([image])[0]):
        grey = MedVLMSegmenter(broad, specialists=False, **OPTS).encode(image.gray_rgb_uint8())
        assert np.allclose(np.asarray(embedding.features), np.asarray(grey.features), atol=1e-5)  # classifier: grey
        assert embedding.extra["specialist_input"]["checkpoint"] is not None
        got = seg.predict_many(embedding, prompts)[0]
        alone = MedVLMSegmenter(spec, route=False, **OPTS).segment(image, prompts)[0]
        assert got.meta["specialist"] and np.allclose(got.logits, alone.logits, atol=1e-5)
    # a plain 2D image has no neighbours: no second pass, the specialist decodes the grey features
    flat = seg.encode(image.gray_rgb_uint8())
    assert "specialist_input" not in flat.extra
    # a specialist without context gets no second pass either
    broad2, _ = _pair(tmp_path / "b2", tiny_folder)
    assert "specialist_input" not in MedVLMSegmenter(broad2, **OPTS).encode(image).extra
    assert MedVLMSegmenter(broad2, **OPTS).volume_context() == 0
    # a front checkpoint that routes other kinds to the broad one (the packaged default -> multi) asks for the
    # neighbours too, without building the routed model, and its answer reaches the context specialist
    front = Path(shutil.copytree(tiny_folder[0], tmp_path / "front" / "ckpt"))
    _classifier(front, tiny_folder[1], {"fetal_us": 10.0, "chest_xray": 0.0})
    (front / "routes.json").write_text(json.dumps({"kinds": ["chest_xray"], "otherwise": "../../broad/ckpt"}))
    front_seg = MedVLMSegmenter(front, **OPTS)
    assert front_seg.volume_context() == 1 and front_seg._routed is None
    assert MedVLMSegmenter(front, route=False, **OPTS).volume_context() == 0
    routed = front_seg.segment(image, prompts)[0]
    assert routed.meta["specialist"] and np.allclose(routed.logits, alone.logits, atol=1e-5)


def test_segment_volume_feeds_neighbours_to_a_context_segmenter(tmp_path: Path) -> None:
    from segmentation.volume import segment_volume

    data, affine = _synthetic_ct()
    vol = read_volume(_write_nifti(tmp_path / "ct.nii.gz", data, affine))

    class ContextFake(FakeTextSegmenter):
        def __init__(self, context: int) -> None:
            super().__init__(batched=True)
            self.context = context
            self.seen: list[Any] = []

        def volume_context(self) -> int:
            return self.context

        def encode(self, image: Any) -> Any:
            self.seen.append(image)
            return super().encode(image)

    for context in (0, 1):
        seg = ContextFake(context)
        result = segment_volume(seg, vol, ["bright"], window=(0.0, 2000.0))
        assert len(seg.seen) == vol.n_slices and result.results[0].mask.any()
        for k, image in enumerate(seg.seen):
            assert isinstance(image, SliceWithNeighbours) == bool(context)
            if context:
                below = max(0, k - 1)
                assert np.array_equal(image.below, vol.array[below]) and np.array_equal(image.pixels, vol.array[k])


def test_training_split_gives_volume_slices_their_neighbours() -> None:
    root = data_dir("mr_hippocampus_msd")  # skips when absent
    from finetune.textseg_train import slice_with_context
    from medvlm.datasets import open_dataset

    ds = open_dataset(root)
    sid = ds.ids()[5]
    sample = ds.load(sid)
    k = int(sample.meta["slice_index"])
    stack = ds.volume(ds.group(sid)).image
    out = slice_with_context(ds, sample, 1)
    assert isinstance(out.image, SliceWithNeighbours) and out.masks.keys() == sample.masks.keys()
    assert np.array_equal(out.image.below, stack[max(0, k - 1)]) and np.array_equal(out.image.above, stack[k + 1])
    assert np.array_equal(out.image.gray_rgb_uint8(), sample.image.to_rgb_uint8())
    assert slice_with_context(ds, sample, 0) is sample
    brats = DATA_ROOT / "mr_brats2015_slices"
    if brats.is_dir():  # 2D slices without their volumes stay grey
        flat = open_dataset(brats)
        one = flat.load(flat.ids()[0])
        assert slice_with_context(flat, one, 1) is one
