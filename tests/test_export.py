"""medvlm.export: every writer's file is read back (Pillow, zipfile, nibabel, pydicom/highdicom) and its pixels,
geometry and UIDs compared with what was written."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from medvlm.errors import InputError
from medvlm.export import (
    dicom_affine,
    geometry_of,
    label_map,
    write_dicom_seg,
    write_label_png,
    write_mask_zip,
    write_nifti,
)
from medvlm.io import MedicalImage, load_image
from tests.conftest import data_dir
from tests.server_fakes import dicom_bytes


def two_masks(shape: tuple[int, int]) -> list[np.ndarray]:
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    a[5:30, 10:40] = True
    b[20:50, 30:60] = True  # overlaps a in rows 20-29, cols 30-39
    return [a, b]


def ct_small() -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm", download=False)
    if path is None:
        pytest.skip("pydicom's bundled CT_small.dcm is absent")
    return Path(path)


def test_label_map_png_and_16_bit(tmp_path: Path) -> None:
    masks = two_masks((64, 80))
    out = np.array(Image.open(write_label_png(masks, (64, 80), tmp_path / "m.png")))
    assert out.dtype == np.uint8 and out.shape == (64, 80)
    assert out[10, 15] == 1 and out[25, 35] == 2 and out[40, 50] == 2 and out[60, 5] == 0  # higher id wins
    assert set(np.unique(out)) == {0, 1, 2}
    many = [np.zeros((20, 20), bool) for _ in range(300)]
    for k, m in enumerate(many):
        m.flat[k] = True
    big = np.array(Image.open(write_label_png(many, (20, 20), tmp_path / "big.png")))
    assert big.dtype in (np.uint16, np.int32) and int(big.flat[299]) == 300 and int(big.flat[0]) == 1
    with pytest.raises(InputError, match="shape"):
        label_map([np.zeros((5, 5), bool)], (6, 5))


def test_mask_zip_has_one_png_per_region_and_safe_names(tmp_path: Path) -> None:
    masks = two_masks((64, 80))
    zf = zipfile.ZipFile(write_mask_zip(masks, ["heart", "../../etc/passwd"], tmp_path / "m.zip"))
    assert zf.namelist() == ["1-heart.png", "2-etc-passwd.png", "regions.json"]
    index = json.loads(zf.read("regions.json"))
    assert [r["label"] for r in index] == ["heart", "../../etc/passwd"]
    for k, name in enumerate(["1-heart.png", "2-etc-passwd.png"]):
        png = np.array(Image.open(io.BytesIO(zf.read(name))))
        assert set(np.unique(png)) == {0, 255}
        np.testing.assert_array_equal(png > 0, masks[k])  # each region whole, overlap included


def test_nifti_without_source_geometry_reads_back_on_the_same_grid(tmp_path: Path) -> None:
    import nibabel as nib

    image = MedicalImage(np.zeros((64, 80), np.float32), spacing_mm=(0.5, 0.25), meta={"format": "png"})
    geometry = geometry_of(image)
    assert geometry.source == "none"
    path = write_nifti(two_masks((64, 80)), geometry, tmp_path / "m.nii.gz")
    img = nib.load(str(path))
    assert img.shape == (64, 80, 1)
    np.testing.assert_allclose(img.affine, np.diag([0.5, 0.25, 1.0, 1.0]))
    assert img.header.get_zooms()[:2] == (0.5, 0.25)
    np.testing.assert_array_equal(np.asarray(img.dataobj)[:, :, 0], label_map(two_masks((64, 80)), (64, 80)))
    back = load_image(path)  # the project's own reader sees the mask on the image's grid
    assert back.shape == (64, 80) and back.spacing_mm == (0.5, 0.25)
    np.testing.assert_array_equal(back.pixels, label_map(two_masks((64, 80)), (64, 80)))
    unknown = geometry_of(MedicalImage(np.zeros((4, 4), np.float32)))
    assert unknown.notes and np.allclose(unknown.affine, np.eye(4))


@pytest.mark.data
@pytest.mark.parametrize(("axis", "index"), [(2, 7), (0, 30)])
def test_nifti_of_a_nifti_slice_keeps_the_source_world_position(tmp_path: Path, axis: int, index: int) -> None:
    import nibabel as nib

    src = data_dir("ct_totalsegmentator_example") / "example_ct_sm.nii.gz"
    image = load_image(src, slice_index=index, axis=axis)
    mask = np.zeros(image.shape, bool)
    mask[3:12, 5:20] = True
    geometry = geometry_of(image)
    assert geometry.source == "nifti" and geometry.slice_axis == axis
    path = write_nifti([mask], geometry, tmp_path / "slice.nii.gz")
    out = nib.load(str(path))
    source = nib.load(str(src))
    expected_shape = list(source.shape[:3])
    expected_shape[axis] = 1
    assert list(out.shape) == expected_shape
    data = np.asarray(out.dataobj)
    voxels = np.argwhere(data > 0)  # (i, j, k) in the written array, k along the slice axis = 0
    assert len(voxels) == mask.sum()
    src_voxels = voxels.copy()
    src_voxels[:, axis] = index
    world_out = nib.affines.apply_affine(out.affine, voxels)
    world_src = nib.affines.apply_affine(source.affine, src_voxels)
    np.testing.assert_allclose(world_out, world_src, atol=1e-3)  # the same points of the patient
    back = load_image(path)  # and read back as a 2D slice: the mask on the slice's own grid
    np.testing.assert_array_equal(back.pixels > 0, mask)


def test_nifti_of_a_dicom_uses_patient_geometry(tmp_path: Path) -> None:
    import nibabel as nib

    path = ct_small()
    ds = pydicom.dcmread(path)
    image = load_image(path)
    geometry = geometry_of(image, ds)
    assert geometry.source == "dicom"
    mask = np.zeros((128, 128), bool)
    mask[40, 70] = True  # row 40, column 70
    out = nib.load(str(write_nifti([mask], geometry, tmp_path / "ct.nii.gz")))
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)
    lps = ipp + 70 * dc * iop[:3] + 40 * dr * iop[3:]  # DICOM: column index along IOP[:3], row along IOP[3:]
    ras = nib.affines.apply_affine(out.affine, np.argwhere(np.asarray(out.dataobj) > 0))[0]
    np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-4)
    assert dicom_affine(pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((4, 4), np.uint16)))), (4, 4)) is None


def test_dicom_seg_of_a_ct_references_uids_geometry_and_pixels(tmp_path: Path) -> None:
    import highdicom as hd

    src = pydicom.dcmread(ct_small())
    header = pydicom.dcmread(ct_small(), stop_before_pixels=True)  # what the server keeps
    masks = two_masks((128, 128))
    path = write_dicom_seg(masks, ["heart", "left lung"], header, tmp_path / "seg.dcm", software_version="9.9")
    seg = pydicom.dcmread(path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.Modality == "SEG"
    assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert seg.PatientID == src.PatientID  # same patient, as the standard requires
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID and seg.SOPInstanceUID != src.SOPInstanceUID
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == src.SeriesInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == pytest.approx([float(v) for v in src.PixelSpacing])
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ipp = frame.PlanePositionSequence[0].ImagePositionPatient
        assert [float(v) for v in ipp] == pytest.approx([float(v) for v in src.ImagePositionPatient])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["heart", "left lung"]
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning for s in seg.SegmentSequence] == ["Heart", "Lung"]
    assert seg.SoftwareVersions == "9.9"
    read = hd.seg.segread(path)
    pixels = read.get_pixels_by_source_instance([src.SOPInstanceUID], combine_segments=False)
    assert pixels.shape == (1, 128, 128, 2)
    for k in range(2):
        np.testing.assert_array_equal(pixels[0, :, :, k] > 0, masks[k])  # overlap kept in both segments


def test_dicom_seg_of_a_radiograph_without_frame_of_reference(tmp_path: Path) -> None:
    src = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((64, 80), np.uint16), ImagerPixelSpacing=[0.2, 0.2])))
    assert "FrameOfReferenceUID" not in src
    masks = two_masks((64, 80))
    seg = pydicom.dcmread(write_dicom_seg(masks, ["a", "b"], src, tmp_path / "cr.dcm"))
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    frames = seg.pixel_array.reshape(-1, 64, 80)
    np.testing.assert_array_equal(frames[0] > 0, masks[0])
    np.testing.assert_array_equal(frames[1] > 0, masks[1])


def test_dicom_seg_refuses_what_it_cannot_reference(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="DICOM source"):
        write_dicom_seg(two_masks((64, 80)), ["a", "b"], None, tmp_path / "x.dcm")
    src = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((64, 80), np.uint16))))
    with pytest.raises(InputError, match="shape"):
        write_dicom_seg([np.zeros((10, 10), bool)], ["a"], src, tmp_path / "x.dcm")
    with pytest.raises(InputError, match="one label per mask"):
        write_dicom_seg(two_masks((64, 80)), ["a"], src, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()
