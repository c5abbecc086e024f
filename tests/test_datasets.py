"""Dataset readers: one Sample schema for every folder of ../shared/data, orientation and left/right checks.

Tests that read real data skip (with a reason) when the folder is absent; the rest use tiny synthetic folders.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvlm.datasets import (
    DATASETS,
    STRUCTURE_VOCABULARY,
    BoxAnnotation,
    Sample,
    ShenzhenLungs,
    canonical_structure,
    open_dataset,
    split_ids,
)
from medvlm.datasets.base import centroid_x, centroid_y, lateral_evidence, split_left_right
from medvlm.datasets.ct import display_transform
from medvlm.errors import InputError
from medvlm.io import MedicalImage
from medvlm.types import Box
from tests.conftest import data_dir


def _check_schema(ds, sample: Sample) -> None:
    assert sample.id in ds.ids()
    assert sample.image.pixels.ndim == 2 and sample.image.pixels.dtype == np.float32
    for name, mask in sample.masks.items():
        assert name in ds.structures, name
        assert name in STRUCTURE_VOCABULARY, name
        assert mask.dtype == bool and mask.shape == sample.image.shape
        assert mask.any(), f"{sample.id}: empty mask {name}"
    for ann in sample.boxes:
        assert isinstance(ann, BoxAnnotation) and isinstance(ann.box, Box)
        assert ann.phrase and ann.label
    assert sample.licence and sample.source


# --------------------------------------------------------------------------------------------- no data


def test_split_ids_deterministic_disjoint_and_stable():
    ids = [f"img{i:04d}" for i in range(1000)]
    train, val = split_ids(ids, 0.2, seed=0)
    assert (train, val) == split_ids(list(ids), 0.2, seed=0)
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(ids)
    assert 150 < len(val) < 250
    assert [i for i in ids if i in set(val)] == val  # input order kept
    # adding ids never moves existing ones
    train2, val2 = split_ids(ids + [f"new{i}" for i in range(200)], 0.2, seed=0)
    assert set(val) <= set(val2) and set(train) <= set(train2)
    # another seed gives another split; extremes
    assert split_ids(ids, 0.2, seed=1)[1] != val
    assert split_ids(ids, 0.0)[1] == [] and split_ids(ids, 1.0)[0] == []


def test_split_ids_groups_stay_together_and_bad_input():
    ids = [f"vol{v}_z{k:03d}" for v in range(50) for k in range(10)]
    train, val = split_ids(ids, 0.3, group=lambda i: i.split("_z")[0])
    vols_val = {i.split("_z")[0] for i in val}
    assert vols_val and vols_val.isdisjoint({i.split("_z")[0] for i in train})
    mapping = {i: i.split("_z")[0] for i in ids}
    assert split_ids(ids, 0.3, group=mapping) == (train, val)
    with pytest.raises(InputError, match="unique"):
        split_ids(["a", "b", "a"])
    with pytest.raises(InputError, match="0, 1"):
        split_ids(["a"], 1.5)
    with pytest.raises(InputError):
        split_ids("abc")


def test_canonical_structure_names():
    cases = {
        "kidney_right": "right kidney", "lung_upper_lobe_left": "left upper lobe", "lung_left": "left lung",
        "vertebrae_T9": "T9 vertebra", "rib_left_9": "left 9th rib", "rib_right_1": "right 1st rib",
        "heart_atrium_left": "left atrium", "inferior_vena_cava": "inferior vena cava",
        "iliac_vena_left": "left iliac vein", "clavicula_right": "right clavicle", "hip_left": "left hip bone",
        "right lung": "right lung", "heart": "heart",
        "urinary_bladder": "urinary bladder", "bladder": "urinary bladder",
    }
    for raw, want in cases.items():
        assert canonical_structure(raw) == want
        assert want in STRUCTURE_VOCABULARY
    with pytest.raises(InputError):
        canonical_structure(" ")


def test_sample_rejects_mask_off_the_image_grid():
    image = MedicalImage(np.zeros((4, 5), np.float32))
    with pytest.raises(InputError, match=r"\(4, 5\)"):
        Sample(id="x", image=image, masks={"heart": np.zeros((5, 4), bool)})
    with pytest.raises(InputError, match="bool"):
        Sample(id="x", image=image, masks={"heart": np.zeros((4, 5), np.uint8)})
    sample = Sample(id="x", image=image, masks={"heart": np.ones((4, 5), bool)})
    assert sample.mask("heart").area_px == 20
    with pytest.raises(InputError, match="heart"):
        sample.mask("liver")


def test_split_left_right_and_lateral_evidence():
    mask = np.zeros((20, 40), bool)
    mask[5:15, 3:15] = True  # image left = patient's right
    mask[5:15, 25:37] = True
    masks, _ = split_left_right(mask)
    assert centroid_x(masks["right lung"]) < 20 < centroid_x(masks["left lung"])
    assert lateral_evidence(masks) == 1
    mirrored = {k: v[:, ::-1] for k, v in masks.items()}
    assert lateral_evidence(mirrored) == -1
    assert lateral_evidence({}) == 0
    touching = np.zeros((20, 40), bool)
    touching[5:15, 3:37] = True
    touching[5:12, 19:21] = False  # narrow bridge at the bottom: one component
    halves, note = split_left_right(touching)
    assert "cut" in note and set(halves) == {"right lung", "left lung"}


def test_display_transform_from_direction():
    assert display_transform([1, 0, 0, 0, 1, 0, 0, 0, 1])[:3] == (False, False, False)
    assert display_transform([0, 1, 0, 1, 0, 0, 0, 0, -1])[:3] == (True, False, False)  # MedSAM2 npz
    assert display_transform([-1, 0, 0, 0, -1, 0, 0, 0, 1])[:3] == (False, True, True)  # RAS-stored slice
    assert display_transform(None)[:3] == (False, False, False)


def test_open_dataset_unknown_name_lists_known(tmp_path):
    with pytest.raises(InputError) as err:
        open_dataset("no_such_dataset", root=tmp_path)
    for name in DATASETS:
        assert name in str(err.value)
    with pytest.raises(InputError, match="MEDVLM_DATA"):
        open_dataset("cxr_jsrt_scr", root=tmp_path)  # known name, folder missing
    (tmp_path / "random").mkdir()
    with pytest.raises(InputError, match="known"):
        open_dataset(tmp_path / "random")


def test_shenzhen_reader_on_synthetic_antialiased_mask(tmp_path):
    root = tmp_path / "cxr_shenzhen_lungs"
    (root / "lungs").mkdir(parents=True)
    (root / "lungmasks").mkdir()
    Image.fromarray(np.full((30, 40), 100, np.uint8)).save(root / "lungs" / "CHNCXR_0001_0.png")
    mask = np.zeros((30, 40), np.uint8)
    mask[5:25, 4:16] = 255
    mask[5:25, 24:36] = 255
    mask[4, 4:16] = 127  # anti-aliased edge below the threshold
    mask[25, 24:36] = 128  # at the threshold: inside
    Image.fromarray(mask).save(root / "lungmasks" / "CHNCXR_0001_0_mask.png")
    ds = open_dataset(root)
    assert isinstance(ds, ShenzhenLungs) and ds.ids() == ["CHNCXR_0001_0"]
    sample = ds.load("CHNCXR_0001_0")
    assert not sample.masks["right lung"][4].any() and sample.masks["left lung"][25, 24:36].all()
    assert centroid_x(sample.masks["left lung"]) > centroid_x(sample.masks["right lung"])
    with pytest.raises(InputError, match="CHNCXR_0001_0"):
        ds.load("CHNCXR_9999_0")


# ----------------------------------------------------------------------------------------------- real data


def test_open_dataset_by_name_path_and_renamed_copy(shared_data, tmp_path):
    data_dir("cxr_nih_bbox")
    by_name = open_dataset("cxr_nih_bbox", root=shared_data)
    by_path = open_dataset(shared_data / "cxr_nih_bbox")
    assert by_name.ids() == by_path.ids() and by_name.name == "cxr_nih_bbox"
    link = tmp_path / "my_copy"
    link.symlink_to(shared_data / "cxr_nih_bbox", target_is_directory=True)
    assert open_dataset(link).name == "cxr_nih_bbox"


def test_jsrt_scr(shared_data):
    root = data_dir("cxr_jsrt_scr")
    ds = open_dataset(root)
    ids = ds.ids()
    assert len(ds) == 164
    assert sum(i.startswith("JPCLN") for i in ids) == 102 and sum(i.startswith("JPCNN") for i in ids) == 62
    assert ds.structures == ("heart", "right lung", "left lung", "right clavicle", "left clavicle")
    rows = {Path(r["image"]).stem: r for r in csv.DictReader((root / "nodules.csv").open())}
    for sample_id in ("JPCLN003", "JPCLN006", "JPCNN001"):
        sample = ds.load(sample_id)
        _check_schema(ds, sample)
        assert sample.image.shape == (1024, 1024) and sample.image.spacing_mm == (0.35, 0.35)
        assert set(sample.masks) == set(ds.structures)
        m = sample.masks
        # SCR left/right are the patient's: the left lung lies on the IMAGE right
        assert centroid_x(m["left lung"]) > 512 > centroid_x(m["right lung"])
        assert centroid_x(m["left clavicle"]) > centroid_x(m["right clavicle"])
        assert 0.35 * 1024 < centroid_x(m["heart"]) < 0.65 * 1024
        assert centroid_y(m["heart"]) > centroid_y(m["right clavicle"])
        row = rows.get(sample_id)
        if row is None:
            assert sample.boxes == [] and not sample.meta["has_nodule"]
            continue
        (ann,) = sample.boxes
        assert ann.box.to_list() == [float(row[k]) for k in ("box_x0", "box_y0", "box_x1", "box_y1")]
        assert ann.phrase == row["phrase"] and ann.label == "nodule"
        # the phrase's side is the patient's: "left" nodules are on the image right
        assert (ann.box.center[0] > 512) == ("left" in ann.phrase)
    assert ds.load("JPCLN003").boxes[0].phrase == "30 mm malignant lung nodule in the left upper lobe"


def test_covid_v7_lungs(shared_data):
    root = data_dir("cxr_covid_v7_lungs")
    ds = open_dataset(root)
    assert len(ds) == 90 and ds.structures == ("right lung", "left lung")
    with_ignore = sorted(p.stem for p in (root / "masks" / "ignore").glob("*.png"))
    assert len(with_ignore) == 4
    for sample_id in (with_ignore[0], ds.ids()[0], "40779_2020_233_Fig2_HTML-a"):
        sample = ds.load(sample_id)
        _check_schema(ds, sample)
        assert set(sample.masks) == {"right lung", "left lung"}
        assert centroid_x(sample.masks["left lung"]) > centroid_x(sample.masks["right lung"])
        assert "ignore" not in sample.masks
        assert (sample.ignore is not None) == (sample_id in with_ignore)
        if sample.ignore is not None:
            assert sample.ignore.shape == sample.image.shape and sample.ignore.any()
        assert sample.meta["image_licence"] in ("CC BY 3.0", "CC BY 4.0")
    small = ds.load("40779_2020_233_Fig2_HTML-a")
    assert small.image.shape == (481, 479) and small.meta["image_licence"] == "CC BY 4.0"


def test_nih_bbox(shared_data):
    root = data_dir("cxr_nih_bbox")
    ds = open_dataset(root)
    assert len(ds) == 12
    official: dict[str, list[tuple]] = {}
    with (root / "BBox_List_2017.csv").open() as fh:
        reader = csv.reader(fh)
        next(reader)
        for row in reader:
            official.setdefault(Path(row[0]).stem, []).append((row[1], *map(float, row[2:6])))
    assert len(official) > 800  # the full list: only the 12 images present are samples
    for sample_id in ("00009745_000", "00001369_000", "00015649_000"):
        sample = ds.load(sample_id)
        _check_schema(ds, sample)
        assert sample.image.shape == (1024, 1024) and sample.masks == {}
        ((finding, x, y, w, h),) = official[sample_id]
        (ann,) = sample.boxes
        assert ann.box.to_list() == [x, y, x + w, y + h]
        assert ann.label == finding.lower()
    assert ds.load("00009745_000").boxes[0].phrase == "cardiomegaly"
    rgba = ds.load("00001369_000")  # stored RGBA: read as one gray channel
    assert rgba.image.meta.get("original_mode") == "RGBA" and rgba.image.pixels.max() > 200
    assert "cardiomegaly" in rgba.meta["labels"]


def test_shenzhen_lungs(shared_data):
    root = data_dir("cxr_shenzhen_lungs")
    ds = open_dataset(root)
    assert len(ds) == 11
    sample_id = "CHNCXR_0001_0"
    raw = np.asarray(Image.open(root / "lungmasks" / f"{sample_id}_mask.png"))
    assert len(np.unique(raw)) > 2  # not binary in the file
    sample = ds.load(sample_id)
    _check_schema(ds, sample)
    assert set(sample.masks) == {"right lung", "left lung"}
    assert np.array_equal(sample.masks["right lung"] | sample.masks["left lung"], raw >= 128)
    assert not (sample.masks["right lung"] & sample.masks["left lung"]).any()
    w = sample.image.width
    assert centroid_x(sample.masks["right lung"]) < w / 2 < centroid_x(sample.masks["left lung"])
    odd = ds.load("CHNCXR_0007_0")
    assert odd.image.shape == (580, 577) and odd.masks["left lung"].shape == (580, 577)


def test_txv_tests(shared_data):
    root = data_dir("cxr_txv_tests")
    ds = open_dataset(root)
    assert len(ds) == 6
    coco = json.loads((root / "tbx11k" / "TBX11K_train_subset.json").read_text())
    tb7 = ds.load("tbx11k_tb0007")
    _check_schema(ds, tb7)
    expected = [a["bbox"] for a in coco["annotations"] if a["image_id"] == 2]
    got = sorted(a.box.to_list() for a in tb7.boxes)
    assert got == sorted([x, y, x + w, y + h] for x, y, w, h in expected)
    assert {a.label for a in tb7.boxes} == {"obsolete pulmonary tuberculosis"}
    assert ds.load("tbx11k_h0001").boxes == []
    assert ds.load("nih_00000001_000").image.shape == (512, 512)
    cov = ds.load("covid_v7labs_16747_3_1")
    _check_schema(ds, cov)
    assert cov.image.shape == (885, 1036)
    assert centroid_x(cov.masks["left lung"]) > centroid_x(cov.masks["right lung"])


def test_sam_med2d_demo_is_flipped_to_radiological_display(shared_data):
    root = data_dir("ct_sam_med2d_demo")
    ds = open_dataset(root)
    assert ds.ids() == ["amos_0004_75", "amos_0006_90", "amos_0507_31", "s0114_111", "s0619_32"]
    assert len([p for p in (root / "masks").glob("*.png")]) == 30
    thorax = ds.load("s0114_111")
    _check_schema(ds, thorax)
    stored_t9 = np.asarray(Image.open(root / "masks" / "s0114_111_vertebrae_T9_000.png")) > 127
    h = thorax.image.height
    assert centroid_y(stored_t9) < h / 2  # stored: spine at the top
    assert centroid_y(thorax.masks["T9 vertebra"]) > h / 2  # read: spine at the bottom
    assert centroid_y(thorax.masks["right autochthonous back muscle"]) > 0.8 * h
    # stored with the patient's left on the image left, so the reader also mirrors it: left lobes on the image right
    assert centroid_x(thorax.masks["left lower lobe"]) > centroid_x(thorax.masks["right lower lobe"])
    assert np.array_equal(thorax.masks["T9 vertebra"], stored_t9[::-1, ::-1])
    stored_pixels = np.asarray(Image.open(root / "images" / "s0114_111.png").convert("L"), np.float32)
    assert np.array_equal(thorax.image.pixels, stored_pixels[::-1, ::-1])
    abdomen = ds.load("amos_0006_90")  # AMOS CT: only flipped vertically
    stored_liver = np.asarray(Image.open(root / "masks" / "amos_0006_90_liver_000.png")) > 127
    assert np.array_equal(abdomen.masks["liver"], stored_liver[::-1])
    assert centroid_x(abdomen.masks["liver"]) < centroid_x(abdomen.masks["spleen"])
    assert abdomen.meta["orientation"].startswith("stored upside down")
    pelvis = ds.load("s0619_32")  # two instances of each hip bone merged
    assert pelvis.masks["left hip bone"].sum() == sum(
        (np.asarray(Image.open(root / "masks" / f"s0619_32_hip_left_00{i}.png")) > 127).sum() for i in (0, 1))
    mr = ds.load("amos_0507_31")
    assert mr.masks == {} and mr.image.modality == "MR"
    for sample in (thorax, abdomen, pelvis):
        assert lateral_evidence(sample.masks) == 1, sample.id
    # partial labels: the lungs of an AMOS slice are unlabelled there, not absent ("not in this image" in training),
    # while a folder labelled throughout (TotalSegmentator example) covers every structure it has on every slice
    assert "right lower lobe" in ds.structures and "right lower lobe" not in ds.annotated(abdomen)
    assert ds.annotated(abdomen) == ("aorta", "inferior vena cava", "liver", "spleen")
    assert "right lower lobe" in ds.annotated(thorax)
    full = open_dataset(data_dir("ct_totalsegmentator_example"))
    assert full.annotated(full.load(full.ids()[0])) == full.structures


def test_totalsegmentator_example(shared_data):
    root = data_dir("ct_totalsegmentator_example")
    ds = open_dataset(root)
    ids = ds.ids()
    assert len(ids) == 50  # every slice has a label: 30 CT + 20 MR
    assert sum(i.startswith("example_ct_sm_z") for i in ids) == 30
    assert {ds.group(i) for i in ids} == {"example_ct_sm", "example_mr_sm"}
    labels = json.loads((root / "labels.json").read_text())
    assert len(labels["total"]["labels_present"]) == 41 and len(labels["total_mr"]["labels_present"]) == 23
    ct = ds.load("example_ct_sm_z015")
    _check_schema(ds, ct)
    assert ct.image.shape == (101, 122) and ct.image.spacing_mm == (3.0, 3.0)
    assert ct.image.modality == "CT" and ct.image.meta["slice_thickness_mm"] == 3.0
    assert ct.image.pixels.min() < -500  # HU
    m = ct.masks
    assert centroid_x(m["liver"]) < ct.image.width / 2 < centroid_x(m["spleen"])
    assert centroid_y(m["spinal cord"]) > ct.image.height / 2  # spine at the bottom
    assert lateral_evidence(m) == 1
    mr = ds.load("example_mr_sm_z010")
    _check_schema(ds, mr)
    assert mr.image.shape == (91, 117) and mr.image.modality == "MR" and mr.image.spacing_mm == (3.0, 3.0)
    assert centroid_x(mr.masks["liver"]) < mr.image.width / 2
    assert centroid_x(mr.masks["left kidney"]) > centroid_x(mr.masks["right kidney"])


def test_medsam2_lesions(shared_data):
    root = data_dir("ct_medsam2_lesions")
    ds = open_dataset(root)
    ids = ds.ids()
    assert len(ids) == 16 + 5 * 13
    assert ds.structures == ("lesion",)
    stem = "CT_Lesion_000001_02_01_008-023"
    assert sum(i.startswith(stem) for i in ids) == 16
    with np.load(root / f"{stem}.npz") as z:
        gts = z["gts"]
        imgs = z["imgs"]
        spacing = z["spacing"]
    k = int(np.argmax(gts.reshape(gts.shape[0], -1).sum(1)))
    sample = ds.load(f"{stem}_s{k:02d}")
    _check_schema(ds, sample)
    assert sample.image.spacing_mm == pytest.approx((spacing[0], spacing[1]))
    assert sample.image.spacing_mm == pytest.approx((0.314453, 0.314453), abs=1e-5)
    assert np.array_equal(sample.masks["lesion"], gts[k].T > 0)  # stored transposed: direction swaps x and y
    assert np.array_equal(sample.image.pixels, imgs[k].T.astype(np.float32))
    empty = next(i for i in range(gts.shape[0]) if not gts[i].any())
    assert ds.load(f"{stem}_s{empty:02d}").masks == {}
    assert ds.group(f"{stem}_s00") == ds.group("CT_Lesion_000001_02_01_008-023_s05") == "CT_Lesion_000001"


def test_iteration_is_lazy_and_matches_ids(shared_data):
    data_dir("ct_sam_med2d_demo")
    ds = open_dataset("ct_sam_med2d_demo", root=shared_data)
    it = iter(ds)
    first = next(it)
    assert first.id == ds.ids()[0]
    assert [s.id for s in ds] == ds.ids()
