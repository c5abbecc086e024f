"""Whole-volume text-guided segmentation: reading (NIfTI, DICOM series), 3D post-processing, outputs and the CLI.

Fast tests use synthetic volumes and a fake text segmenter; the ``slow`` ones run the shipped Med-VLM checkpoint
on the TotalSegmentator example CT (``data``: skipped with a reason when ../shared/data is absent).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medvlm.app.cli import main
from medvlm.errors import InputError
from medvlm.types import Mask
from medvlm.volume import Volume, is_volume_input, read_volume, volume_ml
from medvlm.volume_outputs import montage_slices, write_volume_outputs
from segmentation.volume import keep_largest_component, segment_volume
from tests.conftest import data_dir
from tests.dicom_fixtures import write_series

CT_EXAMPLE = "ct_totalsegmentator_example"


# ----------------------------------------------------------------------------------------------- helpers


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=2)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return path


class FakeTextSegmenter:
    """A text "segmenter" for fast tests: the mask of text ``t`` is where the slice is brighter than ``t``'s level.

    ``existence`` mimics an existence head (0.9 where found, 0.1 elsewhere); ``batched`` adds ``encode_batch``.
    """

    name = "fake"
    accepts_text = True
    LEVELS: ClassVar[dict[str, float]] = {"bright": 50.0, "very bright": 250.0, "nothing": 1e9}

    def __init__(self, batched: bool = False, existence: bool = True) -> None:
        self.encoded = 0
        self.batches: list[int] = []
        self.with_existence = existence
        if batched:
            self.encode_batch = self._encode_batch

    def encode(self, image: Any) -> Any:
        self.encoded += 1
        return image

    def _encode_batch(self, images: list[Any]) -> list[Any]:
        self.batches.append(len(images))
        return [self.encode(im) for im in images]

    def predict_many(self, embedding: Any, prompts: list[Any]) -> list[Any]:
        out = []
        for p in prompts:
            mask = embedding.pixels > self.LEVELS[p.text]
            found = bool(mask.any())
            meta = {"found": found, "structure": p.text}
            if self.with_existence:
                meta["existence"] = 0.9 if found else 0.1
            out.append(SimpleNamespace(mask=Mask(mask), score=0.8 if found else 0.0, meta=meta))
        return out


def _synthetic_ct(z_flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) int16 with a bright 'organ' (a box of 200 HU, stored slices 1-6) holding a 300 HU core (slices
    3-4), and a detached bright speck; voxels of 1.5 x 1.5 x 2.5 mm."""
    data = np.full((24, 20, 10), -1000, dtype=np.int16)
    data[4:16, 5:15, 1:7] = 200  # organ: 12 x 10 x 6 = 720 voxels
    data[8:12, 8:12, 3:5] = 300  # core: 4 x 4 x 2 = 32 voxels inside the organ
    data[20, 18, 0] = 200  # a speck, far from the organ (dropped by the 3D post-processing)
    affine = np.diag([1.5, 1.5, 2.5, 1.0])
    affine[:3, 3] = [-20.0, 10.0, 30.0]
    if z_flip:
        affine[2, 2] = -2.5
    return data, affine


# ------------------------------------------------------------------------------------------- pure units


def test_keep_largest_component_26_connectivity_size_bound_and_volume_ml() -> None:
    mask = np.zeros((8, 8, 8), dtype=bool)
    mask[1:5, 1:5, 1:5] = True  # 64 voxels
    mask[5, 5, 5] = True  # touches the cube only at a corner: same component with 26-connectivity
    mask[7, 0, 7] = mask[7, 0, 6] = True  # 2-voxel blob
    mask[0, 7, 0] = True  # 1-voxel speck
    spacing = (2.0, 1.0, 1.0)  # 2 mm^3 per voxel
    largest = keep_largest_component(mask, spacing, min_ml=0.0)
    assert int(largest.sum()) == 65 and largest[5, 5, 5] and not largest[7, 0, 7]
    assert volume_ml(largest, spacing) == pytest.approx(65 * 2 / 1000)
    assert volume_ml(mask, spacing) == pytest.approx(68 * 2 / 1000)
    # the size bound: 0.2 mL = 100 voxels of 2 mm^3 -> even the largest component (0.13 mL) is dropped
    assert not keep_largest_component(mask, spacing, min_ml=0.2).any()
    # all components at or above 2 voxels (0.003 mL -> ceil(1.5) = 2 voxels)
    kept = keep_largest_component(mask, spacing, min_ml=0.003, largest_only=False)
    assert int(kept.sum()) == 67 and kept[7, 0, 7] and not kept[0, 7, 0]
    assert not keep_largest_component(np.zeros((3, 3, 3), bool), spacing).any()
    with pytest.raises(InputError):
        keep_largest_component(np.zeros((3, 3), bool), spacing)
    assert montage_slices(30) == [0, 3, 5, 8, 11, 13, 16, 18, 21, 24, 26, 29]
    assert montage_slices(5) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("z_flip", [False, True])
def test_nifti_volume_display_order_and_back(tmp_path: Path, z_flip: bool) -> None:
    data, affine = _synthetic_ct(z_flip)
    data[:, :, 5:] = np.random.default_rng(0).integers(-1000, 1000, size=data[:, :, 5:].shape)
    path = _write_nifti(tmp_path / "ct.nii.gz", data, affine)
    assert is_volume_input(path)
    vol = read_volume(path)
    assert vol.modality == "CT" and vol.window == (40.0, 400.0) and vol.format == "nifti"
    assert vol.shape == (10, 20, 24) and vol.spacing == (2.5, 1.5, 1.5)
    assert np.array_equal(vol.to_stored(vol.array), data.astype(np.float32))
    assert np.allclose(vol.affine, affine)
    # display: k from inferior to superior; rows anterior -> posterior; columns the patient's right -> left
    world = vol.affine @ np.array([0, 0, vol.stored_slice(0), 1.0])
    world_last = vol.affine @ np.array([0, 0, vol.stored_slice(9), 1.0])
    assert world[2] < world_last[2]
    assert vol.stored_slice(0) == (9 if z_flip else 0)
    assert vol.display_slices_in_stored_order()[0] == (9 if z_flip else 0)
    # RAS stored: first stored x index is the patient's left-most -> last display column
    assert np.array_equal(vol.array[:, 0, -1], data[0, -1, :][::-1] if z_flip else data[0, -1, :])
    image = vol.slice_image(3)
    assert image.shape == (20, 24) and image.spacing_mm == (1.5, 1.5) and image.window == (40.0, 400.0)


def test_2d_nifti_is_not_a_volume(tmp_path: Path) -> None:
    flat = _write_nifti(tmp_path / "flat.nii.gz", np.zeros((32, 24), np.int16), np.eye(4))
    thin = _write_nifti(tmp_path / "thin.nii.gz", np.zeros((32, 24, 1), np.int16), np.eye(4))
    for path in (flat, thin):
        assert not is_volume_input(path)  # `medvlm segment` keeps the 2D path for these
        with pytest.raises(InputError) as err:
            read_volume(path)
        assert "3D NIfTI volume" in err.value.expected and "2D image" in err.value.received
        assert "2D image" in err.value.fix
    assert not is_volume_input(tmp_path / "missing.nii.gz")


def test_segment_volume_fake_segmenter_outputs_and_dicom_seg(tmp_path: Path) -> None:
    pytest.importorskip("highdicom")
    import highdicom as hd

    data, affine = _synthetic_ct(z_flip=True)
    sop_uids = write_series(tmp_path / "series", data, affine)
    vol = read_volume(tmp_path / "series")
    assert vol.format == "dicom" and vol.modality == "CT" and vol.n_slices == 10
    assert vol.stored_shape == (20, 24, 10)  # (rows, columns, slices)
    # sorted along the normal: the series order is the display order here (IOP [-1 0 0 0 -1 0] -> normal +S)
    assert vol.sop_instance_uids == sop_uids[::-1]  # written with a z-flipped affine: first file most superior
    assert [vol.stored_slice(k) for k in range(10)] == list(range(10))  # series order = inferior -> superior
    nifti = read_volume(_write_nifti(tmp_path / "ct.nii.gz", data, affine))
    assert np.array_equal(vol.array, nifti.array) and vol.spacing == pytest.approx(nifti.spacing)

    seg = FakeTextSegmenter(batched=True)
    result = segment_volume(seg, vol, ["bright", "very bright", "nothing"], ["organ", "core", "absent"],
                            window=(0.0, 2000.0), encode_batch=4, min_component_ml=0.1)
    assert seg.batches == [4, 4, 2] and seg.encoded == 10 and result.encode_mode.startswith("batched")
    assert result.window == (0.0, 2000.0)
    organ, core, absent = result.results
    assert organ.raw_voxels == 721 and organ.voxels == 720  # the speck is gone
    assert core.voxels == 32 and organ.found and core.found and not absent.found
    assert organ.existence_source == "existence head" and organ.existence.count(0.9) == 7  # 6 organ slices + speck
    assert organ.slice_found.count(True) == 7 and absent.existence == [0.1] * 10
    assert result.volume_ml(0) == pytest.approx(720 * 1.5 * 1.5 * 2.5 / 1000)

    written = write_volume_outputs(tmp_path / "out", "series", vol, result.masks(), ["organ", "core", "absent"],
                                   existence=[r.existence for r in result.results])
    labels = nib.load(str(written.label_path))
    assert labels.shape == vol.stored_shape and np.allclose(labels.affine, vol.affine)
    lab = np.asarray(labels.dataobj)
    assert lab.dtype == np.uint8 and int((lab == 1).sum()) == 688 and int((lab == 2).sum()) == 32  # core wins
    entries = written.payload["texts"]
    assert [e["found"] for e in entries] == [True, True, False]
    # series order is the reverse of the NIfTI's stored order here: organ NIfTI slices 1-6 -> series 3-8
    assert entries[0]["slice_range"] == [3, 8] and entries[1]["slice_range"] == [5, 6]
    assert entries[0]["volume_ml"] == pytest.approx(4.05) and entries[0]["voxels"] == 720
    assert entries[0]["existence"] == [0.1, 0.1, 0.1] + [0.9] * 7  # stored order; the speck is on series 9
    assert len(entries[0]["existence"]) == 10 and entries[2]["slice_range"] is None
    # the DICOM SEG: one frame per non-empty (segment, slice), referencing the series
    assert written.dicom_seg_path is not None
    dcm = hd.seg.segread(written.dicom_seg_path)
    assert int(dcm.NumberOfFrames) == 6 + 2
    referenced = {str(item.ReferencedSOPInstanceUID) for s in dcm.ReferencedSeriesSequence
                  for item in s.ReferencedInstanceSequence}
    assert referenced == set(sop_uids)
    assert Image.open(written.overlay_path).size[0] >= 512 and Image.open(written.montage_path).size[0] > 0


def test_segment_volume_without_existence_head_and_one_by_one(tmp_path: Path) -> None:
    data, affine = _synthetic_ct()
    vol = read_volume(_write_nifti(tmp_path / "ct.nii.gz", data, affine))
    seg = FakeTextSegmenter(batched=False, existence=False)
    result = segment_volume(seg, vol, ["bright"], window=(0.0, 2000.0))
    assert seg.encoded == 10 and result.encode_mode == "one slice at a time"
    r = result.results[0]
    assert r.existence_source.startswith("non-empty mask") and set(r.existence) == {0.0, 1.0}
    written = write_volume_outputs(tmp_path / "out", "ct", vol, result.masks(), ["bright"])
    assert written.dicom_seg_path is None  # NIfTI input: no DICOM SEG
    img = nib.load(str(written.label_path))
    assert img.shape == data.shape and np.allclose(img.affine, affine)
    expected = data >= 200
    expected[20, 18, 0] = False  # the speck
    assert np.array_equal(np.asarray(img.dataobj) == 1, expected)


# ------------------------------------------------------------------------------------ errors (DICOM, CLI)


def _series_data() -> tuple[np.ndarray, np.ndarray]:
    data = np.zeros((12, 10, 6), dtype=np.int16)
    return data, np.diag([1.0, 1.0, 2.0, 1.0])


def _cli_error(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["segment", str(folder), "--text", "liver", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "expected" in err and "received" in err and "How to fix" in err
    return err


def test_dicom_folder_with_two_series_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, affine = _series_data()
    write_series(tmp_path / "mixed", data, affine)
    other = write_series(tmp_path / "other", data, affine, [0, 1], seed=1)
    for f in (tmp_path / "other").iterdir():
        f.rename(tmp_path / "mixed" / f"B{f.name}")
    err = _cli_error(tmp_path / "mixed", tmp_path, capsys)
    assert "ONE series" in err and "2 series" in err and "6 file(s)" in err and "2 file(s)" in err
    assert other


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, affine = _series_data()
    write_series(tmp_path / "gap", data, affine, [0, 1, 2, 4, 5])
    err = _cli_error(tmp_path / "gap", tmp_path, capsys)
    assert "missing slice(s)" in err and "4.000 mm" in err and "about 1 slice(s) missing" in err


def test_dicom_series_errors_orientation_duplicates_and_no_dicom(tmp_path: Path) -> None:
    import pydicom

    data, affine = _series_data()
    write_series(tmp_path / "orient", data, affine)
    victim = sorted((tmp_path / "orient").iterdir())[2]
    ds = pydicom.dcmread(victim)
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # a sagittal slice in an axial stack
    ds.save_as(victim)
    with pytest.raises(InputError, match="inconsistent orientation"):
        read_volume(tmp_path / "orient")

    write_series(tmp_path / "dup", data, affine, [0, 1, 2, 2, 3])
    with pytest.raises(InputError, match="duplicate position"):
        read_volume(tmp_path / "dup")

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an image")
    with pytest.raises(InputError, match="none a DICOM image"):
        read_volume(tmp_path / "notes")

    write_series(tmp_path / "one", data, affine, [3])
    with pytest.raises(InputError, match="at least 2 slices"):
        read_volume(tmp_path / "one")


def test_cli_volume_argument_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, affine = _series_data()
    write_series(tmp_path / "s", data, affine)
    # a series folder needs --text; --box is refused with a way out
    assert main(["segment", str(tmp_path / "s"), "--box", "0", "0", "4", "4", "--out", str(tmp_path)]) == 2
    assert "--text" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "s"), "--text", "x", "--refine", "litemedsam", "--out",
                 str(tmp_path)]) == 2
    assert "--refine" in capsys.readouterr().err


# ------------------------------------------------------------------------------- real model on real data


@pytest.fixture(scope="module")
def ct_nifti_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = data_dir(CT_EXAMPLE)
    src = folder / "example_ct_sm.nii.gz"
    out = tmp_path_factory.mktemp("ct_volume")
    assert main(["segment", str(src), "--text", "liver", "--out", str(out)]) == 0
    return {"src": src, "out": out, "payload": json.loads((out / "example_ct_sm.json").read_text())}


@pytest.mark.slow
@pytest.mark.data
def test_cli_nifti_volume_round_trip(ct_nifti_run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    src, out, payload = ct_nifti_run["src"], ct_nifti_run["out"], ct_nifti_run["payload"]
    source = nib.load(str(src))
    labels = nib.load(str(out / "example_ct_sm.seg.nii.gz"))
    assert labels.shape == source.shape and np.allclose(labels.affine, source.affine)
    lab = np.asarray(labels.dataobj)
    assert lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 1}
    liver = payload["texts"][0]
    for key in ("label", "structure", "found", "volume_ml", "slice_range", "existence"):
        assert key in liver
    assert liver["label"] == "liver" and liver["structure"] == "liver" and liver["found"]
    assert len(liver["existence"]) == source.shape[2] == payload["n_slices"]
    first, last = liver["slice_range"]
    assert 0 <= first <= last < source.shape[2]
    assert liver["volume_ml"] == pytest.approx(int((lab == 1).sum()) * 0.027, rel=1e-3)
    # TotalSegmentator's own liver in this CT is 1043 mL; the CT is (partly) in the checkpoint's training data
    truth = np.asarray(nib.load(str(src.parent / "example_seg.nii.gz")).dataobj) == 5
    pred = lab == 1
    assert 2 * (pred & truth).sum() / (pred.sum() + truth.sum()) > 0.5
    for name in (payload["overlay"], payload["montage"]):
        png = np.asarray(Image.open(out / name))
        assert png.ndim == 3 and (np.ptp(png[..., :3].astype(int), axis=2) > 30).mean() > 0.005  # masks in colour
    assert payload["dicom_seg"] is None


@pytest.mark.slow
@pytest.mark.data
def test_cli_dicom_series_writes_seg_referencing_the_series(
        ct_nifti_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("highdicom")
    import highdicom as hd

    src = ct_nifti_run["src"]
    img = nib.load(str(src))
    data = np.asarray(img.dataobj)
    ks = list(range(data.shape[2]))  # the whole CT, one file per slice
    sop_uids = write_series(tmp_path / "ct_series", data, img.affine, ks)
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "ct_series"), "--text", "liver", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "liver" in printed and "mL" in printed
    payload = json.loads((out / "ct_series.json").read_text())
    assert payload["format"] == "dicom" and payload["sop_instance_uids"] == sop_uids
    labels = nib.load(str(out / "ct_series.seg.nii.gz"))
    lab = np.asarray(labels.dataobj)
    assert lab.shape == (data.shape[1], data.shape[0], len(ks))  # (rows, columns, slices)
    # the DICOM label volume lies where the NIfTI one does: voxel (r, c, j) <-> NIfTI voxel (c, r, ks[j])
    for r, c, j in ((0, 0, 0), (50, 70, 5), (100, 121, 9)):
        assert np.allclose(labels.affine @ [r, c, j, 1], img.affine @ [c, r, ks[j], 1], atol=1e-3)
    # the same display slices went through the model: the same liver as the NIfTI run, voxel for voxel
    nifti_lab = np.asarray(nib.load(str(ct_nifti_run["out"] / "example_ct_sm.seg.nii.gz")).dataobj)
    assert np.array_equal(lab, nifti_lab.transpose(1, 0, 2))
    assert payload["texts"][0]["slice_range"] == ct_nifti_run["payload"]["texts"][0]["slice_range"]

    seg = hd.seg.segread(out / "ct_series.seg.dcm")
    nonempty_pairs = sum(int((lab[:, :, j] == 1).any()) for j in range(len(ks)))  # one text: one segment
    assert nonempty_pairs > 0 and int(seg.NumberOfFrames) == nonempty_pairs
    referenced = [str(item.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence
                  for item in s.ReferencedInstanceSequence]
    assert sorted(referenced) == sorted(sop_uids)
    assert seg.SegmentSequence[0].SegmentLabel == "liver"
    for name in ("ct_series.overlay.png", "ct_series.montage.png"):
        assert (out / name).is_file()


def test_volume_refuses_a_mask_of_another_shape(tmp_path: Path) -> None:
    data, affine = _synthetic_ct()
    vol: Volume = read_volume(_write_nifti(tmp_path / "ct.nii", data, affine))
    with pytest.raises(InputError):
        vol.to_stored(np.zeros((3, 3, 3)))
    with pytest.raises(InputError):
        write_volume_outputs(tmp_path, "x", vol, [np.zeros((3, 3, 3), bool)], ["x"])
