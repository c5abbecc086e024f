"""SFT task builders on a real JSRT sample: formats, synonym augmentation, tokens that decode to the truth."""

from __future__ import annotations

import random

import pytest

from tests.conftest import data_dir

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def samples():
    from medvlm.datasets import open_dataset

    ds = open_dataset(data_dir("cxr_jsrt_scr"))
    return ds.load("JPCLN002"), ds.load("JPCNN001")


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
