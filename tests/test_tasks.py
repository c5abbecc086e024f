"""SFT task builders on a real JSRT sample and on hand-built samples and DRRs: formats, synonym augmentation,
answers that agree with the geometry, tokens that decode to the truth."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from tests.conftest import data_dir

_BOX = re.compile(r"<box>.*?</box>")


@pytest.fixture(scope="module")
def samples():
    from medvlm.datasets import open_dataset

    ds = open_dataset(data_dir("cxr_jsrt_scr"))
    return ds.load("JPCLN002"), ds.load("JPCNN001")


@pytest.mark.data
def test_anatomy_grounding_covers_structures_and_regions_with_synonyms(samples):
    from finetune.tasks import anatomy_grounding
    from medvlm.tokens import decode_box

    sample = samples[0]
    ex = anatomy_grounding(sample, random.Random(0))
    targets = [e["meta"]["target"] for e in ex]
    assert {"heart", "left lung", "right apical zone", "left costophrenic angle"} <= set(targets)
    assert len(targets) == len(set(targets)) == 5 + 16  # 5 masks + the regions they define (not repeating them)
    heart = next(e for e in ex if e["meta"]["target"] == "heart")
    assert heart["prompt"][0]["content"][0] == {"type": "image"} and heart["images"] == [sample.source]
    box = decode_box(heart["completion"][0]["content"][0]["text"], 1024, 1024)
    assert box is not None and box.iou(sample.mask("heart").to_box()) > 0.99
    asked = {anatomy_grounding(sample, random.Random(s))[0]["prompt"][0]["content"][1]["text"] for s in range(20)}
    assert len(asked) >= 3  # the same target is asked with different synonyms


@pytest.mark.data
def test_findings_masks_and_reference_pairs(samples):
    from eval.metrics import dice
    from finetune.tasks import anatomy_segmentation, finding_grounding, reference_pair
    from medvlm.tokens import decode_box, decode_mask

    nodule, other = samples
    [finding] = finding_grounding(nodule)
    assert "nodule" in finding["prompt"][0]["content"][1]["text"]
    got = decode_box(finding["completion"][0]["content"][0]["text"], 1024, 1024)
    assert got is not None and got.iou(nodule.boxes[0].box) > 0.95
    assert finding_grounding(other) == []
    seg = {e["meta"]["target"]: e for e in anatomy_segmentation(other, random.Random(0))}
    mask = decode_mask(seg["left lung"]["completion"][0]["content"][0]["text"], 1024, 1024)
    assert dice(mask, other.masks["left lung"]) > 0.98
    pair = reference_pair(nodule, other, "heart")
    assert pair["images"] == [nodule.source, other.source] and len(pair["prompt"][0]["content"]) == 3
    tgt = decode_box(pair["completion"][0]["content"][0]["text"], 1024, 1024)
    assert tgt is not None and tgt.iou(other.mask("heart").to_box()) > 0.99


def _answer(example):
    return example["completion"][0]["content"][0]["text"]


def _question(example):
    return example["prompt"][0]["content"][-1]["text"]


def _answer_boxes(example, h, w):
    """Every <box> of the answer, decoded to pixels of an (h, w) image, in order."""
    from medvlm.tokens import decode_box

    return [decode_box(group, h, w) for group in _BOX.findall(_answer(example))]


def _chest_sample():
    """A hand-built frontal 'radiograph' 100 x 100: patient's right lung on the IMAGE left, left lung on the
    image right, a heart low between them (lungs cover 28 % of the image each, so it counts as a chest)."""
    from medvlm.datasets.base import Sample
    from medvlm.io import MedicalImage

    right, left, heart = (np.zeros((100, 100), bool) for _ in range(3))
    right[10:90, 10:45] = True
    left[10:90, 55:90] = True
    heart[60:85, 35:70] = True
    return Sample("chest", MedicalImage(np.zeros((100, 100), np.float32)),
                  {"right lung": right, "left lung": left, "heart": heart}, source="chest.png")


def test_relative_position_on_hand_built_samples():
    from finetune.tasks import RELATION_KINDS, relative_position
    from medvlm.datasets.base import Sample
    from medvlm.errors import InputError
    from medvlm.io import MedicalImage
    from medvlm.types import Box

    liver, spleen = np.zeros((100, 100), bool), np.zeros((100, 100), bool)
    liver[10:30, 10:40] = True  # top, image left, 600 px
    spleen[60:90, 55:95] = True  # bottom, image right, 1200 px
    sample = Sample("abdomen", MedicalImage(np.zeros((100, 100), np.float32)), {"liver": liver, "spleen": spleen},
                    source="abdomen.png")
    # the relations of the liver to the spleen; flipped when the builder asks about the spleen first
    truth = {"above_below": ("above", "below"), "image_left_right": ("image left", "image right"),
             "larger": ("spleen", "spleen")}
    for kind, (liver_first, spleen_first) in truth.items():
        for seed in range(4):
            [ex] = relative_position(sample, random.Random(seed), kinds=(kind,))
            first = ex["meta"]["target"]
            assert {first, ex["meta"]["other"]} == {"liver", "spleen"} and ex["meta"]["relation"] == kind
            assert ex["meta"]["label"] == (liver_first if first == "liver" else spleen_first)
            boxes = _answer_boxes(ex, 100, 100)
            quoted = ["spleen", "liver"] if kind == "larger" else [first, ex["meta"]["other"]]  # larger first
            expected = [{"liver": Box(10, 10, 40, 30), "spleen": Box(55, 60, 95, 90)}[n] for n in quoted]
            assert len(boxes) == 2 and all(b is not None and b.iou(t) > 0.99 for b, t in zip(boxes, expected))
            assert ex["images"] == ["abdomen.png"] and ex["task"] == "relative_position"
    # not a chest radiograph: no question in the patient's frame
    assert relative_position(sample, random.Random(0), kinds=("patient_left_right",)) == []
    assert len(relative_position(sample, random.Random(0), n=10)) == 1  # one pair, asked once

    # side by side at the same height and the same size: only left/right is settled
    beside = np.zeros((100, 100), bool)
    beside[10:30, 60:90] = True
    pair = Sample("pair", MedicalImage(np.zeros((100, 100), np.float32)), {"liver": liver, "spleen": beside})
    assert relative_position(pair, random.Random(0), kinds=("above_below", "larger")) == []
    [ex] = relative_position(pair, random.Random(0), n=10)
    assert ex["meta"]["relation"] == "image_left_right"
    # side by side but centres 4 px apart (< 5 % of 100 px): not settled, though the boxes do not overlap
    a, b = np.zeros((100, 100), bool), np.zeros((100, 100), bool)
    a[10:30, 40:44] = True
    b[10:30, 44:48] = True
    close = Sample("close", MedicalImage(np.zeros((100, 100), np.float32)), {"liver": a, "spleen": b})
    assert relative_position(close, random.Random(0), n=10) == []
    # nested (a structure inside another: its centre is 25 px higher, yet it is not "above" its container)
    outer, inner = np.zeros((100, 100), bool), np.zeros((100, 100), bool)
    outer[10:90, 10:90] = True
    inner[15:35, 30:70] = True
    nested = Sample("nested", MedicalImage(np.zeros((100, 100), np.float32)), {"liver": outer, "gallbladder": inner})
    [ex] = relative_position(nested, random.Random(0), n=10)
    assert ex["meta"]["relation"] == "larger" and ex["meta"]["label"] == "liver"

    # a chest: the patient's right lung is on the patient's right, which is the image LEFT
    chest = _chest_sample()
    ex = relative_position(chest, random.Random(0), n=1000, kinds=("patient_left_right", "image_left_right"))
    lungs = {(e["meta"]["relation"], e["meta"]["target"]): e for e in ex
             if {e["meta"]["target"], e["meta"]["other"]} == {"right lung", "left lung"}}
    assert len(lungs) == 1  # the pair is asked once
    (kind, first), e = next(iter(lungs.items()))
    words = ("patient's right", "patient's left") if kind == "patient_left_right" else ("image left", "image right")
    assert e["meta"]["label"] == words[0 if first == "right lung" else 1]
    assert _answer(e).startswith(e["meta"]["label"] + ":")
    patient = [e for seed in range(10)
               for e in relative_position(chest, random.Random(seed), n=1000, kinds=("patient_left_right",))
               if e["meta"]["target"] == "right lung" and e["meta"]["other"] == "left lung"]
    assert patient and all(e["meta"]["label"] == "patient's right" and "patient's" in _question(e)
                           and "(the image left on this frontal radiograph)" in _answer(e) for e in patient)

    for bad in ({"n": -1}, {"kinds": ("diagonal",)}, {"kinds": ()}, {"margin": 1.5}, {"min_area_ratio": 0.5}):
        with pytest.raises(InputError):
            relative_position(sample, random.Random(0), **bad)
    assert set(RELATION_KINDS) == {"above_below", "image_left_right", "patient_left_right", "larger"}


@pytest.mark.data
def test_relative_position_on_jsrt_agrees_with_ground_truth_geometry(samples):
    from agents.anatomy import anatomy_from_masks
    from finetune.tasks import RELATION_KINDS, relative_position

    sample = samples[0]
    h, w = sample.image.shape
    anatomy = anatomy_from_masks(sample.masks, (h, w), "ground truth")
    assert anatomy.is_chest

    def truth(name):
        mask = sample.masks[name] if name in sample.masks else anatomy.region(name)
        return sample.mask(name).to_box() if name in sample.masks else anatomy.region_box(name), int(mask.sum())

    ex = relative_position(sample, random.Random(0), n=1000)
    assert len(ex) > 100 and {e["meta"]["relation"] for e in ex} == set(RELATION_KINDS)
    pairs = [frozenset((e["meta"]["target"], e["meta"]["other"])) for e in ex]
    assert len(pairs) == len(set(pairs))  # every pair asked once
    for e in ex:
        kind, label = e["meta"]["relation"], e["meta"]["label"]
        (a, area_a), (b, area_b) = truth(e["meta"]["target"]), truth(e["meta"]["other"])
        (ax, ay), (bx, by) = a.center, b.center
        if kind == "above_below":
            assert label == ("above" if ay < by else "below") and abs(ay - by) >= 0.05 * h
            assert "above or below" in _question(e)
        elif kind == "image_left_right":
            assert label == ("image left" if ax < bx else "image right") and abs(ax - bx) >= 0.05 * w
            assert "image left or the image right" in _question(e)
        elif kind == "patient_left_right":
            # radiographic display: the patient's right is at smaller x (image left)
            assert label == ("patient's right" if ax < bx else "patient's left") and abs(ax - bx) >= 0.05 * w
            assert "patient's right or to the patient's left" in _question(e)
        else:
            larger = e["meta"]["target"] if area_a > area_b else e["meta"]["other"]
            assert label == larger and max(area_a, area_b) >= 1.25 * min(area_a, area_b)
            assert (a.area > b.area) == (area_a > area_b)
            if larger == e["meta"]["other"]:
                a, b = b, a  # the answer quotes the larger first
        assert _answer(e).startswith("the " if kind == "larger" else f"{label}:")
        got = _answer_boxes(e, h, w)
        assert len(got) == 2 and got[0].iou(a) > 0.99 and got[1].iou(b) > 0.99

    # the classic trap: the patient's right lung is the IMAGE-left one
    [lungs] = [e for e in relative_position(sample, random.Random(0), n=1000, kinds=("patient_left_right",))
               if {e["meta"]["target"], e["meta"]["other"]} == {"right lung", "left lung"}]
    right_first = lungs["meta"]["target"] == "right lung"
    assert lungs["meta"]["label"] == ("patient's right" if right_first else "patient's left")
    assert sample.mask("right lung").to_box().center[0] < sample.mask("left lung").to_box().center[0]
    [image] = [e for e in relative_position(sample, random.Random(0), n=1000, kinds=("image_left_right",))
               if {e["meta"]["target"], e["meta"]["other"]} == {"right lung", "left lung"}]
    assert image["meta"]["label"] == ("image left" if image["meta"]["target"] == "right lung" else "image right")

    four = relative_position(sample, random.Random(3))
    assert len(four) == 4 and four == relative_position(sample, random.Random(3))  # deterministic given rng
    assert four != relative_position(sample, random.Random(4))


def _synthetic_drr():
    from finetune.drr import drr_from_volume

    hu = np.full((40, 20, 30), -1000.0, dtype=np.float32)  # LPS: X = patient left, Y = posterior, Z = superior
    labels = np.zeros(hu.shape, np.int32)
    hu[4:16, 5:15, 14:26] = 40.0
    labels[4:16, 5:15, 14:26] = 1  # on the patient's right (small X): image left, upper half
    hu[24:36, 5:15, 3:12] = 40.0
    labels[24:36, 5:15, 3:12] = 2  # patient's left: image right, lower half
    labels[20, 10, 15] = 3  # one voxel: 1 pixel of 1200 (< 0.1 %), skipped
    names = {1: "liver", 2: "spleen", 3: "kidney_right"}
    return drr_from_volume(hu, (1.0, 1.0, 1.0), labels, names, isotropic=False)


def test_drr_examples_on_a_synthetic_drr(tmp_path):
    from eval.metrics import dice
    from finetune.tasks import drr_examples
    from medvlm.errors import InputError
    from medvlm.io import save_png
    from medvlm.tokens import decode_box, decode_mask
    from medvlm.types import Box

    drr = _synthetic_drr()
    h, w = drr.image.shape
    assert (h, w) == (30, 40) and drr.masks["kidney_right"].sum() == 1
    png = str(save_png((drr.image * 255).round().astype(np.uint8), tmp_path / "drr.png"))
    ex = drr_examples(drr, png, random.Random(0))
    assert [(e["task"], e["meta"]["target"]) for e in ex] == [
        ("drr_grounding", "liver"), ("drr_grounding", "spleen"),
        ("drr_segmentation", "liver"), ("drr_segmentation", "spleen")]
    assert all(e["images"] == [png] and e["prompt"][0]["content"][0] == {"type": "image"} for e in ex)
    # rows = superior -> inferior (Z reversed), columns = patient's right -> left
    expected = {"liver": Box(4, 30 - 26, 16, 30 - 14), "spleen": Box(24, 30 - 12, 36, 30 - 3)}
    for e in ex[:2]:
        name = e["meta"]["target"]
        box = decode_box(_answer(e), h, w)
        assert box is not None and box.iou(expected[name]) > 0.99
        assert _question(e).startswith("Locate the ")
    for e in ex[2:]:
        assert dice(decode_mask(_answer(e), h, w), drr.masks[e["meta"]["target"]]) > 0.95
        assert _question(e).startswith("Segment the ")
    asked = {_question(drr_examples(drr, png, random.Random(s))[0]) for s in range(20)}
    assert len(asked) >= 3  # "liver" is in the vocabulary: asked with its synonyms
    assert drr_examples(drr, png, random.Random(0), min_fraction=0.0)[0]["meta"]["target"] == "right kidney"
    with pytest.raises(InputError):
        drr_examples(drr, str(tmp_path / "missing.png"), random.Random(0))


@pytest.mark.data
def test_drr_examples_on_the_totalsegmentator_example(tmp_path):
    from eval.metrics import dice
    from finetune.tasks import drr_examples, write_drr_sample
    from medvlm.io import load_image
    from medvlm.tokens import decode_box, decode_mask
    from medvlm.types import Box, Mask

    root = data_dir("ct_totalsegmentator_example")
    names = {int(k): v for k, v in json.loads((root / "labels.json").read_text())["total"]["label_names"].items()}
    drr, png = write_drr_sample(root / "example_ct_sm.nii.gz", root / "example_seg.nii.gz", tmp_path, names)
    assert png == str(tmp_path / "example_ct_sm.drr.png") and load_image(png).shape == drr.image.shape == (30, 122)
    ex = drr_examples(drr, png, random.Random(0))
    h, w = drr.image.shape
    by_name = {e["meta"]["mask"]: e for e in ex if e["task"] == "drr_grounding"}
    kept = {k for k, m in drr.masks.items() if m.sum() >= 0.001 * h * w}
    assert set(by_name) == kept and "lung_middle_lobe_right" not in kept  # its 1-pixel projection is dropped
    assert by_name["kidney_right"]["meta"]["target"] == "right kidney"
    for raw, e in by_name.items():
        truth = Mask(drr.masks[raw]).to_box()
        box = decode_box(_answer(e), h, w)
        # 1024 bins are finer than 30 or 122 pixels: rounding the decoded box gives back the exact pixel box
        assert box is not None and Box(*np.round(box.to_list())) == truth and box.iou(truth) > 0.95
    seg = {e["meta"]["mask"]: dice(decode_mask(_answer(e), h, w), drr.masks[e["meta"]["mask"]])
           for e in ex if e["task"] == "drr_segmentation"}
    assert set(seg) == kept and np.median(list(seg.values())) > 0.99
    assert min(seg[k] for k in ("liver", "spleen", "kidney_right", "kidney_left", "stomach")) > 0.95
    liver = decode_box(_answer(by_name["liver"]), h, w)
    spleen = decode_box(_answer(by_name["spleen"]), h, w)
    assert liver is not None and spleen is not None and liver.center[0] < spleen.center[0]  # patient right = image left
