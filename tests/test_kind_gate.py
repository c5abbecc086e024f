"""The kind-of-image gate of Med-VLM ("polyp" on a fetal ultrasound is not in the image) and the faint-mask
fallback (the existence head says present, no pixel passes the threshold): pooling, the linear fit, strict
save/load, the anatomy rule, and both inside a tiny random checkpoint; then the packaged `multi` classifier on
real images of every kind when it and the data are there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medvlm.errors import InputError
from segmentation.base import Prompt
from segmentation.textseg.kind_gate import KIND_CLASSIFIER_JSON, KindClassifier, KindVerdict, pool_features


def test_pool_features_is_mean_then_std_per_channel() -> None:
    x = np.zeros((1, 2, 2, 2), dtype=np.float32)
    x[0, 0] = [[1, 1], [3, 3]]  # mean 2, std 1
    x[0, 1] = 5.0  # mean 5, std 0
    want = np.array([2, 5, 1, 0], dtype=np.float32)
    assert np.allclose(pool_features(x), want)
    assert np.allclose(pool_features(torch.from_numpy(x[0]).to(torch.bfloat16)), want)
    with pytest.raises(InputError, match="one image"):
        pool_features(np.zeros((2, 2, 2, 2)))


def test_fit_separates_kinds_and_round_trips_strictly(tmp_path: Path) -> None:
    from finetune.kind_classifier import fit_linear_softmax

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 8)).astype(np.float32)
    y = np.repeat(np.arange(3), [30, 5, 12])  # unbalanced on purpose
    x = (centres[y] + rng.normal(0, 0.5, (len(y), 8))).astype(np.float32)
    weight, bias, mean, std = fit_linear_softmax(x, y, 3)
    clf = KindClassifier(["body_ct", "fetal_us", "skin"], weight, bias, mean, std, {"note": "test"})
    assert (clf.logits(x).argmax(1) == y).mean() == 1.0
    clf.save(tmp_path)
    back = KindClassifier.load(tmp_path)
    assert back is not None and back.kinds == clf.kinds and back.info["note"] == "test"
    assert np.array_equal(back.logits(x), clf.logits(x))
    assert KindClassifier.load(tmp_path / "nothing-here") is None
    (tmp_path / KIND_CLASSIFIER_JSON).unlink()
    with pytest.raises(InputError, match=KIND_CLASSIFIER_JSON):
        KindClassifier.load(tmp_path)
    with pytest.raises(InputError, match="names among"):
        KindClassifier(["x-ray"], weight[:1], bias[:1], mean, std)
    with pytest.raises(InputError, match="weight"):
        KindClassifier(["body_ct", "skin"], weight, bias, mean, std)


def test_a_confident_kind_rules_out_what_it_cannot_show() -> None:
    def verdict(kind: str, p: float, rest: str = "endoscopy") -> KindVerdict:
        return KindVerdict(kind, p, {kind: p, rest: 1.0 - p})

    us = verdict("fetal_us", 0.97)
    assert us.rules_out("polyp", 0.9) and us.rules_out("liver", 0.9) and us.rules_out("left kidney", 0.9)
    assert not us.rules_out("fetal head", 0.9)
    assert not us.rules_out("brain", 0.9)  # a fetal head holds a brain
    assert not us.rules_out(None, 0.9)  # a phrase the anatomy tables do not know: the existence head decides
    assert not verdict("fetal_us", 0.6).rules_out("polyp", 0.9)  # 0.4 on endoscopy, which shows polyps
    # unsure of the top kind, but no likely kind shows it (an endoscopy frame half taken for CT: no brain)
    mixed = KindVerdict("endoscopy", 0.55, {"endoscopy": 0.55, "body_ct": 0.35, "brain_mr": 0.05, "fetal_us": 0.05})
    assert mixed.rules_out("skin lesion", 0.9) and mixed.possible("brain") == pytest.approx(0.1)
    assert not mixed.rules_out("liver", 0.9) and not mixed.rules_out("polyp", 0.9)
    # kinds that image the same body parts never rule each other's structures out
    assert not verdict("chest_xray", 0.99).rules_out("liver", 0.9)
    assert not verdict("body_ct", 0.99).rules_out("heart", 0.9)


def _tiny_checkpoint(tmp_path: Path, tiny: tuple[Path, int], kind_bias: dict[str, float] | None) -> Path:
    import shutil

    base, channels = tiny
    folder = Path(shutil.copytree(base, tmp_path / "ckpt"))
    if kind_bias is not None:
        kinds = sorted(kind_bias)
        d = 2 * channels
        KindClassifier(kinds, np.zeros((len(kinds), d), np.float32),
                       np.asarray([kind_bias[k] for k in kinds], np.float32), np.zeros(d, np.float32),
                       np.ones(d, np.float32)).save(folder)
    return folder


def _image() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 255, (48, 64), dtype=np.uint8)


def test_the_gate_and_the_fallback_inside_the_segmenter(tmp_path: Path, tiny_folder: tuple[Path, int]) -> None:
    from segmentation.textseg.predictor import MedVLMSegmenter

    # a classifier whose bias makes every image a fetal ultrasound with p ~ 0.9999
    folder = _tiny_checkpoint(tmp_path, tiny_folder, {"fetal_us": 10.0, "endoscopy": 0.0, "skin": 0.0})
    seg = MedVLMSegmenter(folder, precision="fp32", threshold=0.0, existence_threshold=0.0)
    polyp, head, other = seg.segment(_image(), [Prompt(text="polyp"), Prompt(text="fetal head"),
                                                Prompt(text="pneumothorax")])
    assert polyp.meta["ruled_out_by_kind"] and not polyp.meta["found"] and not polyp.mask.data.any()
    assert polyp.meta["image_kind"]["kind"] == "fetal_us" and polyp.meta["image_kind"]["probability"] > 0.99
    assert not head.meta["ruled_out_by_kind"] and head.meta["found"] and head.mask.data.shape == (48, 64)
    assert not other.meta["ruled_out_by_kind"] and other.meta["found"]  # unknown to the tables: the head decides
    off = MedVLMSegmenter(folder, precision="fp32", threshold=0.0, existence_threshold=0.0, kind_gate=False)
    assert off.kind_classifier is None and off.segment(_image(), [Prompt(text="polyp")])[0].meta["found"]
    assert "image_kind" not in off.segment(_image(), [Prompt(text="polyp")])[0].meta

    # no pixel passes a threshold above 1: the fallback keeps the top of the map when the head says present
    faint = MedVLMSegmenter(folder, precision="fp32", threshold=1.01, existence_threshold=0.0)
    r = faint.segment(_image(), [Prompt(text="fetal head")])[0]
    assert r.meta["found"] and r.mask.data.any() and r.meta["mask_threshold"] < 1.0
    strict = MedVLMSegmenter(folder, precision="fp32", threshold=1.01, existence_threshold=0.0,
                             empty_fallback=False)
    r = strict.segment(_image(), [Prompt(text="fetal head")])[0]
    assert not r.meta["found"] and not r.mask.data.any() and r.meta["mask_threshold"] == 1.01
    # a head that says absent gets no fallback
    absent = MedVLMSegmenter(folder, precision="fp32", threshold=1.01, existence_threshold=1.0)
    r = absent.segment(_image(), [Prompt(text="fetal head")])[0]
    assert not r.meta["found"] and not r.mask.data.any()


def test_a_checkpoint_without_a_classifier_has_no_gate(tmp_path: Path, tiny_folder: tuple[Path, int]) -> None:
    from segmentation.textseg.predictor import MedVLMSegmenter

    seg = MedVLMSegmenter(_tiny_checkpoint(tmp_path, tiny_folder, None), precision="fp32",
                          existence_threshold=0.0, threshold=0.0)
    r = seg.segment(_image(), [Prompt(text="polyp")])[0]
    assert seg.kind_classifier is None and "ruled_out_by_kind" not in r.meta and r.meta["found"]


def _routed_pair(tmp_path: Path, tiny: tuple[Path, int], kind: str) -> tuple[Path, Path]:
    """Checkpoint ``a`` (its classifier always says ``kind``) routes everything but chest X-rays to ``b``."""
    import json

    a = _tiny_checkpoint(tmp_path / "a", tiny, {kind: 10.0, "chest_xray" if kind != "chest_xray" else "skin": 0.0})
    b = _tiny_checkpoint(tmp_path / "b", tiny, None)
    (a / "routes.json").write_text(json.dumps({"kinds": ["chest_xray"], "otherwise": "../../b/ckpt",
                                               "min_confidence": 0.9}))
    return a, b


def test_routes_hand_other_kinds_to_the_other_checkpoint(tmp_path: Path, tiny_folder: tuple[Path, int]) -> None:
    from segmentation.textseg.predictor import MedVLMSegmenter

    a, b = _routed_pair(tmp_path, tiny_folder, "body_ct")
    opts = {"precision": "fp32", "threshold": 0.0, "existence_threshold": 0.0}
    routed = MedVLMSegmenter(a, **opts)
    assert routed.routes is not None and routed.routes["otherwise"].resolve() == b.resolve()
    emb = routed.encode(_image())
    assert emb.extra["routed_to"] == routed.routed_segmenter().checkpoint  # type: ignore[union-attr]
    assert emb.extra["routed_from"]["image_kind"]["kind"] == "body_ct"
    got = routed.predict_many(emb, [Prompt(text="liver")])[0]
    direct = MedVLMSegmenter(b, **opts).segment(_image(), [Prompt(text="liver")])[0]
    assert got.meta["routed_to"] == emb.extra["routed_to"]
    assert np.array_equal(got.mask.data, direct.mask.data) and np.allclose(got.logits, direct.logits)
    assert all(e.extra.get("routed_to") for e in routed.encode_batch([_image(), _image()]))
    # the val split of a CT folder is the other checkpoint's; of a chest X-ray folder, this one's
    routed.meta = {"val_ids": ["own"]}
    routed.routed_segmenter().meta = {"val_ids": ["other"]}  # type: ignore[union-attr]
    assert routed.meta_for("ct_curvas_abdomen")["val_ids"] == ["other"]
    assert routed.meta_for("cxr_jsrt_scr")["val_ids"] == ["own"]
    # route=False: the folder's own model answers everything
    plain = MedVLMSegmenter(a, route=False, **opts)
    assert "routed_to" not in plain.encode(_image()).extra


def test_a_kept_kind_stays_and_bad_routes_are_refused(tmp_path: Path, tiny_folder: tuple[Path, int]) -> None:
    import json

    from segmentation.textseg.predictor import MedVLMSegmenter

    a, _ = _routed_pair(tmp_path, tiny_folder, "chest_xray")
    seg = MedVLMSegmenter(a, precision="fp32")
    assert "routed_to" not in seg.encode(_image()).extra and seg._routed is None  # never built
    for bad in ({"kinds": ["x-ray"], "otherwise": "multi"}, {"kinds": ["chest_xray"]},
                {"kinds": ["chest_xray"], "otherwise": ".", "min_confidence": 0.9}):
        (a / "routes.json").write_text(json.dumps(bad))
        with pytest.raises(InputError, match="routes"):
            MedVLMSegmenter(a, precision="fp32")


def test_a_known_modality_routes_without_the_classifier(tmp_path: Path, tiny_folder: tuple[Path, int]) -> None:
    import json

    from medvlm.io import MedicalImage
    from segmentation.textseg.predictor import MedVLMSegmenter

    a, _ = _routed_pair(tmp_path, tiny_folder, "body_ct")  # its classifier calls everything CT
    routes = json.loads((a / "routes.json").read_text())
    (a / "routes.json").write_text(json.dumps({**routes, "modalities": ["CR", "DX"]}))
    seg = MedVLMSegmenter(a, precision="fp32")
    pixels = _image().astype(np.float32)
    radiograph = MedicalImage(pixels, spacing_mm=None, modality="CR", source="cr")
    ct = MedicalImage(pixels, spacing_mm=None, modality="CT", source="ct")
    assert "routed_to" not in seg.encode(radiograph).extra  # DICOM says radiograph: kept, classifier or not
    routed = seg.encode(ct)
    assert routed.extra["routed_to"] and routed.extra["routed_from"]["image_kind"] is None  # never classified
    batch = seg.encode_batch([ct, radiograph, _image()])
    assert [("routed_to" in e.extra) for e in batch] == [True, False, True]
    # a volume picks its model once: by modality, else by the classifier on one slice
    assert seg.for_image(radiograph) is seg
    assert seg.for_image(ct) is seg.routed_segmenter() and seg.for_image(_image()) is seg.routed_segmenter()
    assert seg.routed_segmenter().for_image(ct) is seg.routed_segmenter()  # type: ignore[union-attr]  # no routes


@pytest.mark.slow
@pytest.mark.data
def test_packaged_classifiers_on_held_out_images_of_every_kind() -> None:
    """The packaged `multi` kind classifier names the kind of one held-out image per kind with p >= 0.9 and rules
    out "polyp" on the fetal ultrasound; the packaged default (routes.json) keeps the bundled NIH radiograph
    (PNG: no modality, so its own classifier decides) and hands the bundled CT slice to `multi`, which finds the
    liver there."""
    from medvlm.assets import DEMO_IMAGE, asset_path
    from medvlm.datasets import open_dataset
    from medvlm.datasets.kinds import kind_of
    from medvlm.io import load_image
    from segmentation.textseg.checkpoint import read_checkpoint_config
    from segmentation.textseg.predictor import MedVLMSegmenter, packaged_checkpoints
    from tests.conftest import data_dir

    packaged = packaged_checkpoints()
    if not (packaged["multi"] / "kind_classifier.json").is_file():
        pytest.skip("the packaged multi checkpoint has no kind classifier")
    multi = MedVLMSegmenter("multi")
    val = set(read_checkpoint_config(packaged["multi"])[1]["val_ids"])
    for folder in ("cxr_jsrt_scr", "ct_curvas_abdomen", "mr_hippocampus_msd", "mr_acdc_cardiac",
                   "us_hc18_fetal_head", "derm_ham10000", "endo_kvasir_polyp"):
        ds = open_dataset(data_dir(folder))
        sample = ds.load(next(i for i in ds.ids() if i in val))
        verdict = multi.kind_classifier.predict(multi.encode(sample.image).features)  # type: ignore[union-attr]
        assert verdict.kind == kind_of(folder) and verdict.probability >= 0.9, (folder, verdict)
        if folder == "us_hc18_fetal_head":
            polyp, head = multi.segment(sample.image, [Prompt(text="polyp"), Prompt(text="fetal head")])
            assert polyp.meta["ruled_out_by_kind"] and not polyp.mask.data.any()
            assert not head.meta["ruled_out_by_kind"]

    default = MedVLMSegmenter()
    assert default.routes is not None and default.routes["otherwise"].resolve() == packaged["multi"].resolve()
    radiograph = default.encode(load_image(asset_path(DEMO_IMAGE)))
    assert "routed_to" not in radiograph.extra and radiograph.extra["image_kind"].kind == "chest_xray"
    ct = load_image(asset_path("ct_amos_0006_90.png"))
    embedding = default.encode(ct)
    assert Path(embedding.extra["routed_to"]).name == "multi"
    liver = default.predict_many(embedding, [Prompt(text="liver")])[0]
    assert liver.meta["found"] and liver.meta["routed_to"] and liver.mask.data.mean() > 0.02


def test_the_model_card_section_is_written_from_the_files_and_rewritten_in_place(tmp_path: Path) -> None:
    import json

    from finetune.model_card import KIND_HEADING, update_kind_section

    d = 4
    KindClassifier(["body_ct", "skin"], np.zeros((2, d), np.float32), np.zeros(2, np.float32),
                   np.zeros(d, np.float32), np.ones(d, np.float32),
                   {"command": "python -m finetune.kind_classifier --checkpoint X", "seconds": 1.5,
                    "train_accuracy": {"all": 1.0, "n": 6, "per_kind": {"body_ct": 1.0, "skin": 1.0}},
                    "val_accuracy": {"all": 0.5, "n": 2, "per_kind": {"body_ct": 1.0, "skin": 0.0}}}).save(tmp_path)
    (tmp_path / "routes.json").write_text(json.dumps({"kinds": ["body_ct"], "otherwise": "multi"}))
    (tmp_path / "README.md").write_text("# card\n\nbody\n\nLicences: research use.\n")
    first = update_kind_section(tmp_path).read_text()
    assert first.count(KIND_HEADING) == 1 and "| skin | 1.0 | 0.0 |" in first and "`multi`" in first
    assert first.index(KIND_HEADING) < first.index("Licences:") and first.startswith("# card\n\nbody\n")
    assert update_kind_section(tmp_path).read_text() == first  # idempotent


def test_a_checkpoint_trained_without_wholes_answers_a_whole_with_the_union_of_its_parts(
        tmp_path: Path, tiny_folder: tuple[Path, int]) -> None:
    from segmentation.textseg.predictor import MedVLMSegmenter

    folder = _tiny_checkpoint(tmp_path, tiny_folder, None)  # no train_config: trained without wholes
    seg = MedVLMSegmenter(folder, precision="fp32", existence_threshold=0.0, threshold=0.45)
    assert seg.compose_wholes
    emb = seg.encode(_image())
    lung, left, right, heart = seg.predict_many(emb, [Prompt(text="lungs"), Prompt(text="left lung"),
                                                       Prompt(text="right lung"), Prompt(text="heart")])
    assert lung.meta["parts"] == ["left lung", "right lung"] and lung.meta["structure"] == "lung"
    assert np.array_equal(lung.mask.data, left.mask.data | right.mask.data)
    assert lung.logits is not None and np.array_equal(lung.logits, np.maximum(left.logits, right.logits))
    assert "parts" not in heart.meta
    plain = MedVLMSegmenter(folder, precision="fp32", existence_threshold=0.0, threshold=0.45, compose_wholes=False)
    assert "parts" not in plain.segment(_image(), [Prompt(text="lungs")])[0].meta
