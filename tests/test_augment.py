"""Geometric augmentation of SFT samples (finetune.augment): image, masks and boxes move together, sides are
never swapped, the layout prior stops being an answer, and the SFT builder renders and answers each copy."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from finetune.augment import GeometricAugment, augment_sample, random_affine, warp_box, warp_mask
from medvlm.datasets.base import BoxAnnotation, Sample
from medvlm.io import MedicalImage
from medvlm.types import Box, Mask
from tests.conftest import data_dir


def _square_sample() -> Sample:
    pixels = np.zeros((120, 160), np.float32)
    pixels[30:70, 40:100] = 1000.0
    mask = pixels > 0
    return Sample(id="sq", image=MedicalImage(pixels, spacing_mm=(0.5, 0.5)), masks={"heart": mask},
                  boxes=[BoxAnnotation(box=Box(40, 30, 100, 70), phrase="bright square", label="square")])


def test_image_mask_and_box_move_together() -> None:
    sample = _square_sample()
    for seed in range(12):
        aug = augment_sample(sample, random.Random(seed))
        s = aug.meta["augment"]["scale"]
        assert 0.6 <= s <= 1.0 and aug.id == "sq.aug" and aug.image.shape == sample.image.shape
        bright = aug.image.pixels > 500
        mask = aug.masks["heart"]
        iou = (bright & mask).sum() / (bright | mask).sum()
        assert iou > 0.85, (seed, iou)
        assert mask.sum() == pytest.approx(40 * 60 * s * s, rel=0.08)
        [ann] = aug.boxes
        assert ann.box.iou(Mask(mask).to_box()) > 0.85 and ann.phrase == "bright square"
        assert aug.image.spacing_mm == pytest.approx((0.5 / s, 0.5 / s))
        assert aug.image.pixels.min() == 0.0  # the border takes the darkest value
    assert sample.masks["heart"].sum() == 40 * 60  # the original is untouched


def test_affine_and_box_helpers() -> None:
    matrix, s = random_affine((100, 200), random.Random(3), GeometricAugment(scale=(0.5, 0.5), max_rotation_deg=0))
    assert s == 0.5 and np.allclose(matrix[:, :2], np.eye(2) * 0.5)
    box = warp_box(Box(0, 0, 200, 100), matrix, (100, 200))
    assert box is not None and box.width == pytest.approx(100) and box.height == pytest.approx(50)
    shift = np.array([[1.0, 0, 160], [0, 1.0, 0]])
    assert warp_box(Box(0, 0, 100, 100), shift, (100, 200)) is None  # only 40 % stays on the canvas
    moved = warp_mask(np.eye(4, dtype=bool), np.array([[1.0, 0, 1], [0, 1.0, 0]]))
    assert moved[0, 1] and moved[2, 3] and not moved[0, 0]
    for bad in ({"scale": (0.0, 1.0)}, {"scale": (0.8, 0.6)}, {"scale": (0.6, 1.2)}, {"max_rotation_deg": 60}):
        with pytest.raises(Exception, match="augment"):
            GeometricAugment(**bad)  # type: ignore[arg-type]


@pytest.mark.data
def test_jsrt_copies_keep_sides_and_break_the_layout_prior() -> None:
    from finetune.tasks import anatomy_grounding
    from medvlm.datasets import open_dataset

    sample = open_dataset(data_dir("cxr_jsrt_scr")).load("JPCLN002")
    centres = []
    for seed in range(16):
        aug = augment_sample(sample, random.Random(seed))
        right, left = Mask(aug.masks["right lung"]).to_box(), Mask(aug.masks["left lung"]).to_box()
        assert right is not None and left is not None
        assert right.center[0] < left.center[0]  # patient's right stays on the image left: no flips
        heart = Mask(aug.masks["heart"]).to_box()
        assert heart is not None
        centres.append((heart.center[0] / 1024, heart.center[1] / 1024, heart.width / 1024))
        # zoomed-out copies still count as chest radiographs, so the zone tasks are built for them
        targets = {e["meta"]["target"] for e in anatomy_grounding(aug, random.Random(0))}
        assert {"right apical zone", "left costophrenic angle", "cardiac silhouette"} & targets
    spread = np.asarray(centres).std(axis=0)
    assert spread[0] > 0.03 and spread[1] > 0.03 and spread[2] > 0.02  # the heart's relative box moves


@pytest.mark.data
def test_build_examples_renders_and_answers_each_copy(tmp_path: Path) -> None:
    from finetune.mllm_data import MLLMDataSource, build_examples
    from medvlm.tokens import decode_box

    src = MLLMDataSource("cxr_jsrt_scr", tasks=["anatomy_grounding"], limit=3, augment=2)
    root = str(data_dir("cxr_jsrt_scr").parent)
    examples, _ = build_examples([src], tmp_path / "a", data_root=root, image_max_side=128, seed=5)
    by_image: dict[str, list[dict]] = {}
    for e in examples:
        by_image.setdefault(Path(e["images"][0]).name, []).append(e)
    kept = [n for n in by_image if ".aug" not in n]
    assert len(kept) >= 1 and len(by_image) == 3 * len(kept)  # the original + 2 copies of each training image
    from medvlm.datasets import open_dataset

    ds = open_dataset(data_dir("cxr_jsrt_scr"))
    ious = []
    for name, items in by_image.items():
        assert (tmp_path / "a" / "images" / "cxr_jsrt_scr" / name).is_file()
        if ".aug" not in name:
            continue
        sid, k = name.split(".aug")[0], int(name.split(".aug")[1].split(".")[0])
        # the builder's copy is reproducible from its seed string, and its answer is the copy's heart box
        copy = augment_sample(ds.load(sid), random.Random(f"5/cxr_jsrt_scr/{sid}/{k}"), src.augmentation(),
                              suffix=f"aug{k}")
        heart = next(e for e in items if e["meta"]["target"] == "heart")
        box = decode_box(heart["completion"][0]["content"][0]["text"], 1024, 1024)
        want = Mask(copy.masks["heart"]).to_box()
        assert box is not None and want is not None and box.iou(want) > 0.98
        orig = next(e for e in by_image[f"{sid}.png"] if e["meta"]["target"] == "heart")
        ious.append(box.iou(decode_box(orig["completion"][0]["content"][0]["text"], 1024, 1024)))
    assert min(ious) < 0.8  # the copies do move the answer
    again, _ = build_examples([src], tmp_path / "b", data_root=root, image_max_side=128, seed=5)
    first = (tmp_path / "a" / "data" / "train.jsonl").read_text()
    assert first.replace(str(tmp_path / "a"), "") == (tmp_path / "b" / "data" / "train.jsonl").read_text().replace(
        str(tmp_path / "b"), "")
    assert len(json.loads(first.splitlines()[0])["images"]) == 1 and len(again) == len(examples)
    with pytest.raises(Exception, match="augment"):
        MLLMDataSource("cxr_jsrt_scr", augment=-1).validate()
