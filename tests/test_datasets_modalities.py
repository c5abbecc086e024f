"""Readers of the CT, MR, ultrasound, dermoscopy and endoscopy folders (medvlm.datasets.modalities).

Tests that read real data are marked ``data`` and skip (with a reason) when the folder is absent; the others use
tiny synthetic folders. Known values (pixel counts) were measured once by reading the PNGs with PIL.
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
    AcdcCardiac,
    Brats2015Slices,
    CurvasAbdomen,
    Ham10000Lesions,
    Hc18FetalHead,
    KvasirPolyps,
    MsdHippocampus,
    MsdSpleen,
    Sample,
    canonical_structure,
    open_dataset,
    split_ids,
)
from medvlm.datasets.base import centroid_x, lateral_evidence
from medvlm.datasets.ct import to_lps
from medvlm.errors import InputError
from tests.conftest import data_dir

# folder -> (reader, ids, distinct case ids, structures)
EXPECTED: dict[str, tuple[type, int, int, tuple[str, ...]]] = {
    "ct_curvas_abdomen": (CurvasAbdomen, 77, 10, ("liver", "kidney", "pancreas")),
    "ct_msd_spleen": (MsdSpleen, 12, 7, ("spleen",)),
    "mr_hippocampus_msd": (MsdHippocampus, 2562, 100, ("anterior hippocampus", "posterior hippocampus")),
    "mr_brats2015_slices": (Brats2015Slices, 64, 4, ("whole tumor", "tumor core", "enhancing tumor", "brain")),
    "mr_acdc_cardiac": (AcdcCardiac, 27, 27, ("left ventricle", "myocardium", "right ventricle")),
    "us_hc18_fetal_head": (Hc18FetalHead, 240, 194, ("fetal head",)),
    "derm_ham10000": (Ham10000Lesions, 27, 27, ("skin lesion",)),
    "endo_kvasir_polyp": (KvasirPolyps, 16, 16, ("polyp",)),
}


def _check_schema(ds, sample: Sample) -> None:
    assert sample.id in ds
    assert sample.image.pixels.ndim == 2 and sample.image.pixels.dtype == np.float32
    for name, mask in sample.masks.items():
        assert name in ds.structures and name in STRUCTURE_VOCABULARY, name
        assert mask.dtype == bool and mask.shape == sample.image.shape
        assert mask.any(), f"{sample.id}: empty mask {name}"
    assert sample.licence and sample.source
    assert sample.meta["orientation"]


def _png_mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)) >= 128


def _png_pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), dtype=np.float32)


# --------------------------------------------------------------------------------------------- no data


def test_registry_vocabulary_and_mask_folders():
    for name, (cls, _n, _cases, structures) in EXPECTED.items():
        assert DATASETS[name] is cls and cls.name == name
        assert cls.structures == structures
        for structure in structures:
            assert structure in STRUCTURE_VOCABULARY
            assert canonical_structure(structure.replace(" ", "_")) == structure  # masks/<folder> -> name


def _write_png_folder(root: Path, rows: list[dict[str, str]], images: dict[str, np.ndarray],
                      masks: dict[tuple[str, str], np.ndarray]) -> None:
    (root / "images").mkdir(parents=True)
    for key, arr in images.items():
        Image.fromarray(arr).save(root / "images" / f"{key}.png")
    for (folder, key), arr in masks.items():
        (root / "masks" / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / "masks" / folder / f"{key}.png")
    columns = ["id", "modality", "site", "view_or_sequence", "spacing_mm", "structures", "case_id", "source_file",
               "extra"]
    with (root / "index.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})


def test_png_reader_on_synthetic_mirrored_folder(tmp_path):
    root = tmp_path / "renamed_spleen"  # found by its masks/spleen folder
    image = np.arange(6 * 8, dtype=np.uint8).reshape(6, 8)
    mask = np.zeros((6, 8), np.uint8)
    mask[2:4, 1:3] = 255  # stored on the image left (mirrored source)
    rows = [{"id": "1_spleen_3", "modality": "CT", "view_or_sequence": "axial", "spacing_mm": "0.5 0.7",
             "structures": "spleen", "case_id": "spleen_3", "extra": "-1.5 2"},
            {"id": "2_spleen_3", "modality": "CT", "view_or_sequence": "axial", "case_id": "spleen_3"},
            {"id": "3_spleen_4", "modality": "CT", "view_or_sequence": "axial", "case_id": "spleen_4"}]
    _write_png_folder(root, rows, {r["id"]: image for r in rows}, {("spleen", "1_spleen_3"): mask})
    ds = open_dataset(root)
    assert isinstance(ds, MsdSpleen) and ds.ids() == ["1_spleen_3", "2_spleen_3", "3_spleen_4"]
    assert ds.cases() == ["spleen_3", "spleen_4"] and ds.group("2_spleen_3") == "spleen_3"
    sample = ds.load("1_spleen_3")
    assert np.array_equal(sample.masks["spleen"], mask[:, ::-1] > 0)
    assert np.array_equal(sample.image.pixels, image[:, ::-1].astype(np.float32))
    assert np.array_equal(ds.image_rgb("1_spleen_3")[:, :, 0], image[:, ::-1])
    assert sample.image.spacing_mm == (0.5, 0.7) and sample.meta["extra"] == [-1.5, 2.0]
    assert "flipped horizontally" in sample.meta["orientation"]
    assert ds.load("2_spleen_3").masks == {} and ds.load("2_spleen_3").image.spacing_mm is None
    with pytest.raises(InputError, match="1_spleen_3"):
        ds.load("9_spleen_9")
    # a mask index.csv lists but that is missing is an error, not a silently absent structure
    (root / "masks" / "spleen" / "1_spleen_3.png").unlink()
    with pytest.raises(InputError, match=r"index\.csv lists"):
        ds.load("1_spleen_3")
    # an image listed in index.csv but missing
    (root / "images" / "3_spleen_4.png").unlink()
    with pytest.raises(InputError, match="missing"):
        MsdSpleen(root).ids()


def _write_volume(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def test_hippocampus_reader_on_synthetic_oblique_storage(tmp_path):
    root = tmp_path / "hippo"
    rng = np.random.default_rng(0)
    shape = (5, 6, 4)  # stored axes: patient P, L, I (axis codes P L I), spacing 2, 3, 1.5 mm
    affine = np.array([[0.0, -3.0, 0.0, 10.0], [-2.0, 0.0, 0.0, 20.0], [0.0, 0.0, -1.5, 30.0], [0, 0, 0, 1]])
    image = rng.normal(size=shape).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    labels[1:3, 2:4, 1] = 1
    labels[3, 1:5, 2] = 2
    _write_volume(root / "images" / "vol_a.nii.gz", image, affine)
    _write_volume(root / "labels" / "vol_a.nii.gz", labels, affine)
    (root / "labels.json").write_text(json.dumps({"1": "anterior_hippocampus", "2": "posterior_hippocampus"}))
    (root / "index.csv").write_text("id,case_id\nvol_a,vol_a\n")
    ds = open_dataset(root)
    assert isinstance(ds, MsdHippocampus)
    # stored axis 2 runs inferior: display slice k (inferior -> superior) = stored index 3 - k
    assert ds.ids() == ["vol_a_z001", "vol_a_z002"] and ds.slices("vol_a") == [1, 2]
    assert MsdHippocampus(root, all_slices=True).ids() == [f"vol_a_z{k:03d}" for k in range(4)]
    vol = ds.volume("vol_a")
    assert vol.shape == (4, 5, 6) and vol.spacing_mm == (1.5, 2.0, 3.0)
    assert vol.stored_shape == shape and np.array_equal(vol.stored_affine, affine)
    # every display voxel maps to the same world point as the stored voxel holding the same value
    to_stored = np.linalg.inv(affine) @ vol.affine
    for k, r, c in np.ndindex(*vol.shape):
        i, j, l_ = np.rint(to_stored @ [k, r, c, 1]).astype(int)[:3]
        assert vol.image[k, r, c] == image[i, j, l_]
    assert vol.labels["anterior hippocampus"].sum() == (labels == 1).sum()
    sample = ds.load("vol_a_z002")
    assert sample.image.spacing_mm == (2.0, 3.0) and sample.meta["slice_index"] == 2
    assert np.array_equal(sample.image.pixels, vol.image[2])
    assert set(sample.masks) == {"anterior hippocampus"}
    assert sample.meta["affine"] == affine.tolist() and sample.meta["volume_shape"] == list(shape)


# ----------------------------------------------------------------------------------------------- real data


@pytest.mark.data
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts_cases_splits_and_detection(shared_data, tmp_path, name):
    root = data_dir(name)
    cls, n_ids, n_cases, structures = EXPECTED[name]
    ds = open_dataset(name, root=shared_data)
    assert type(ds) is cls and ds.structures == structures
    ids = ds.ids()
    assert len(ids) == n_ids and len(set(ids)) == n_ids
    groups = {ds.group(i) for i in ids}
    assert len(groups) == n_cases
    if name != "mr_hippocampus_msd":
        rows = list(csv.DictReader((root / "index.csv").open()))
        assert {r["case_id"] for r in rows} == groups and sorted(r["id"] for r in rows) == ids
    train, val = split_ids(ids, 0.3, seed=1, group=ds.group)
    assert sorted(train + val) == sorted(ids)
    assert {ds.group(i) for i in train}.isdisjoint({ds.group(i) for i in val})
    # a renamed copy is recognised from its files
    link = tmp_path / "renamed"
    link.symlink_to(root, target_is_directory=True)
    assert type(open_dataset(link)) is cls
    sample = ds.load(ids[0])
    _check_schema(ds, sample)


@pytest.mark.data
def test_curvas_abdomen(shared_data):
    root = data_dir("ct_curvas_abdomen")
    ds = open_dataset(root)
    sample = ds.load("10002_425")
    _check_schema(ds, sample)
    assert sample.image.shape == (512, 512) and sample.image.spacing_mm is None and sample.image.modality == "CT"
    assert set(sample.masks) == {"liver", "kidney", "pancreas"}
    assert {k: int(v.sum()) for k, v in sample.masks.items()} == {"liver": 10695, "kidney": 2353, "pancreas": 125}
    assert np.array_equal(sample.masks["liver"], _png_mask(root / "masks" / "liver" / "10002_425.png"))
    assert np.array_equal(sample.image.pixels, _png_pixels(root / "images" / "10002_425.png"))  # not flipped
    assert sample.meta["annotation_set"] == 1 and ds.group("10002_425") == "10002"
    assert set(ds.load("10002_275").masks) == {"liver"}
    # radiological display: the liver lies on the image left (patient's right)
    assert centroid_x(sample.masks["liver"]) < 256 and lateral_evidence(sample.masks) == 1


@pytest.mark.data
def test_msd_spleen_is_unmirrored(shared_data):
    root = data_dir("ct_msd_spleen")
    ds = open_dataset(root)
    assert ds.group("10003_spleen_26") == ds.group("10004_spleen_26") == "spleen_26"
    sample = ds.load("10003_spleen_26")
    _check_schema(ds, sample)
    stored = _png_mask(root / "masks" / "spleen" / "10003_spleen_26.png")
    assert int(stored.sum()) == 6911 and int(sample.masks["spleen"].sum()) == 6911
    assert np.array_equal(sample.masks["spleen"], stored[:, ::-1])  # the stored PNG mirrored
    assert np.array_equal(sample.image.pixels, _png_pixels(root / "images" / "10003_spleen_26.png")[:, ::-1])
    assert centroid_x(stored) < 256  # stored: spleen (patient's left) on the image LEFT
    for sample_id in ds.ids():  # read: spleen on the image right for every slice
        spleen = ds.load(sample_id).masks["spleen"]
        assert centroid_x(spleen) > 256 and lateral_evidence({"spleen": spleen}) == 1, sample_id
    assert "flipped horizontally" in sample.meta["orientation"]


@pytest.mark.data
def test_msd_hippocampus_slices_and_volume(shared_data):
    root = data_dir("mr_hippocampus_msd")
    ds = open_dataset(root)
    assert len(ds.volume_ids()) == 100
    rows = {r["id"]: r for r in csv.DictReader((root / "index.csv").open())}
    vid = "hippocampus_003"
    slice_ids = [i for i in ds.ids() if ds.group(i) == vid]
    assert len(slice_ids) == 26 and slice_ids[0] == "hippocampus_003_z004"
    vol = ds.volume(vid)
    assert vol.stored_shape == (34, 52, 35) == tuple(int(v) for v in rows[vid]["shape"].split())
    assert vol.shape == (35, 52, 34) and vol.spacing_mm == (1.0, 1.0, 1.0)
    assert int(vol.labels["anterior hippocampus"].sum()) == int(rows[vid]["voxels_label1"]) == 1550
    assert int(vol.labels["posterior hippocampus"].sum()) == int(rows[vid]["voxels_label2"]) == 1803
    # stacking the slice samples gives the volume (listed slices: those with a label)
    samples = [ds.load(i) for i in slice_ids]
    ks = [s.meta["slice_index"] for s in samples]
    assert ks == ds.slices(vid) == [int(i.rsplit("_z", 1)[1]) for i in slice_ids]
    assert np.array_equal(np.stack([s.image.pixels for s in samples]), vol.image[ks])
    for name, labels in vol.labels.items():
        stacked = np.stack([s.masks.get(name, np.zeros(s.image.shape, bool)) for s in samples])
        assert np.array_equal(stacked, labels[ks]), name
    unlisted = sorted(set(range(vol.shape[0])) - set(ks))
    assert not any(m[unlisted].any() for m in vol.labels.values())
    # affine and shape kept in every sample; the whole volume is the stored one, reoriented
    stored_img, spacing, affine = _load_nifti(root / "images" / f"{vid}.nii.gz")
    for s in samples:
        assert s.meta["affine"] == affine.tolist() and s.meta["volume_shape"] == [34, 52, 35]
        assert s.image.shape == (52, 34) and s.image.spacing_mm == (1.0, 1.0) and s.image.modality == "MR"
    assert np.array_equal(vol.stored_affine, affine)
    lps, _, _ = to_lps(stored_img, affine, spacing)
    assert np.array_equal(vol.image, lps.transpose(2, 1, 0))
    to_stored = np.linalg.inv(affine) @ vol.affine
    for k, r, c in ((0, 0, 0), (20, 30, 10), (34, 51, 33)):
        i, j, l_ = np.rint(to_stored @ [k, r, c, 1]).astype(int)[:3]
        assert vol.image[k, r, c] == stored_img[i, j, l_]
    # header frame: the hippocampal head (label 1) lies anterior (upper rows) and inferior (lower k) to the body
    ant, post = vol.labels["anterior hippocampus"], vol.labels["posterior hippocampus"]
    assert np.nonzero(ant)[1].mean() < np.nonzero(post)[1].mean()
    assert np.nonzero(ant)[0].mean() < np.nonzero(post)[0].mean()
    all_slices = MsdHippocampus(root, all_slices=True)
    assert len(all_slices) == sum(int(r["shape"].split()[2]) for r in rows.values()) == 3591
    full = [all_slices.load(f"{vid}_z{k:03d}").image.pixels for k in range(vol.shape[0])]
    assert np.array_equal(np.stack(full), vol.image)
    with pytest.raises(InputError):
        ds.volume("hippocampus_999")


def _load_nifti(path: Path):
    from medvlm.io import load_volume

    return load_volume(path)


@pytest.mark.data
def test_brats2015_slices(shared_data):
    root = data_dir("mr_brats2015_slices")
    ds = open_dataset(root)
    flair = ds.load("brats_2013_pat0002_1_076_flair")
    t1c = ds.load("brats_2013_pat0002_1_076_t1c")
    for sample in (flair, t1c):
        _check_schema(ds, sample)
        assert sample.image.shape == (240, 240) and sample.image.spacing_mm == (1.0, 1.0)
        assert set(sample.masks) == {"whole tumor", "tumor core", "enhancing tumor", "brain"}
        assert sample.meta["slice_z"] == 76 and sample.meta["slice_id"] == "brats_2013_pat0002_1_076"
    assert flair.meta["sequence"] == "FLAIR" and t1c.meta["sequence"] == "T1c"
    assert flair.meta["intensity_window"] == [-3.132, 3.342]
    assert int(flair.masks["enhancing tumor"].sum()) == 80 and int(t1c.masks["whole tumor"].sum()) == 863
    for name in flair.masks:  # one slice, identical masks for both sequences
        assert np.array_equal(flair.masks[name], t1c.masks[name])
    assert (flair.masks["enhancing tumor"] <= flair.masks["tumor core"]).all()
    assert (flair.masks["tumor core"] <= flair.masks["whole tumor"]).all()
    assert ds.group("brats_2013_pat0002_1_076_t1c") == "brats_2013_pat0002_1"
    assert set(ds.load("brats_2013_pat0002_1_067_flair").masks) == {"whole tumor", "brain"}


@pytest.mark.data
def test_acdc_cardiac(shared_data):
    root = data_dir("mr_acdc_cardiac")
    ds = open_dataset(root)
    sample = ds.load("10007")
    _check_schema(ds, sample)
    assert sample.image.shape == (512, 512) and sample.image.spacing_mm is None
    assert {k: int(v.sum()) for k, v in sample.masks.items()} == {
        "left ventricle": 7060, "myocardium": 3482, "right ventricle": 3151}
    assert not (sample.masks["left ventricle"] & sample.masks["myocardium"]).any()
    empty = ds.load("10020")  # no structure drawn: a legitimate sample without masks
    assert empty.masks == {} and empty.meta["structures_listed"] == [] and empty.image.shape == (512, 512)


@pytest.mark.data
def test_hc18_fetal_head_spacing(shared_data):
    root = data_dir("us_hc18_fetal_head")
    ds = open_dataset(root)
    sample = ds.load("002_HC")
    _check_schema(ds, sample)
    assert sample.image.shape == (540, 800) and sample.image.modality == "US"
    assert sample.image.spacing_mm == (0.062032562715, 0.062032562715)
    assert sample.meta["head_circumference_mm"] == 68.75
    assert int(sample.masks["fetal head"].sum()) == 97958
    odd = ds.load("310_HC")
    assert odd.image.shape == (539, 790) and odd.image.spacing_mm == (0.121394948262, 0.121394948262)
    assert ds.group("017_2HC") == "017"
    rows = list(csv.DictReader((root / "index.csv").open()))
    spacings = {r["id"]: float(r["spacing_mm"].split()[0]) for r in rows}
    assert min(spacings.values()) >= 0.054 and max(spacings.values()) <= 0.327
    assert all(ds.load(i).image.spacing_mm == (spacings[i], spacings[i]) for i in ds.ids()[:20])


@pytest.mark.data
def test_ham10000_and_kvasir_colour_images(shared_data):
    data_dir("derm_ham10000")
    derm = open_dataset("derm_ham10000", root=shared_data)
    lesion = derm.load("ISIC_0024355")
    _check_schema(derm, lesion)
    assert lesion.image.shape == (450, 600) and lesion.image.modality == "DMS"
    assert int(lesion.masks["skin lesion"].sum()) == 33917
    rgb = derm.image_rgb("ISIC_0024355")
    assert rgb.shape == (450, 600, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114]) - lesion.image.pixels).max() < 1.0
    inside = lesion.masks["skin lesion"]
    assert lesion.image.pixels[inside].mean() < lesion.image.pixels[~inside].mean()  # darker than the skin
    data_dir("endo_kvasir_polyp")
    endo = open_dataset("endo_kvasir_polyp", root=shared_data)
    polyp = endo.load("cju414lf2l1lt0801rl3hjllj")
    _check_schema(endo, polyp)
    assert polyp.image.shape == (528, 610) and polyp.image.modality == "ES"
    assert int(polyp.masks["polyp"].sum()) == 46954
    from scipy import ndimage

    assert ndimage.label(polyp.masks["polyp"])[1] == 4  # four polyp regions
