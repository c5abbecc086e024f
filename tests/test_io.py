"""Tests of medvlm.io: synthetic files with known values, a few real files, and every bad-input path."""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    generate_uid,
)

from medvlm.errors import InputError, MissingDependencyError
from medvlm.io import (
    MAX_PIXELS_DEFAULT,
    MedicalImage,
    load_image,
    load_volume,
    save_mask_png,
    save_png,
)
from tests.conftest import data_dir

# ------------------------------------------------------------------------------------------------ helpers


def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    image = Image.fromarray(arr) if mode is None else Image.fromarray(arr, mode=mode)
    image.save(path, format="PNG")
    return path


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` 8-bit gray, with one tiny IDAT: a bomb-style header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def _dicom(
    arr: np.ndarray | None,
    *,
    frames: int = 1,
    transfer_syntax: str = ExplicitVRLittleEndian,
    sop_class: str = CTImageStorage,
    **attrs: Any,
) -> bytes:
    """Bytes of a DICOM file holding ``arr`` (uint16 (H, W) or (F, H, W)); ``arr=None`` gives no PixelData."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = transfer_syntax
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset("test.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET-123"
    if arr is not None:
        ds.Rows, ds.Columns = int(arr.shape[-2]), int(arr.shape[-1])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = arr.astype("<u2").tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


GRID = np.array([[0, 100], [200, 300]], dtype=np.uint16)


# ---------------------------------------------------------------------------------------------- PNG/JPEG


def test_png_8bit_gray(tmp_path: Path) -> None:
    arr = np.arange(48, dtype=np.uint8).reshape(6, 8)
    image = load_image(_png(tmp_path / "a.png", arr))
    assert isinstance(image, MedicalImage)
    assert image.pixels.dtype == np.float32 and image.shape == (6, 8) == (image.height, image.width)
    np.testing.assert_array_equal(image.pixels, arr)
    assert image.meta["format"] == "png" and image.meta["original_mode"] == "L" and image.meta["bit_depth"] == 8
    assert image.spacing_mm is None and image.modality == "unknown" and image.source.endswith("a.png")


def test_png_16bit_keeps_values_above_255(tmp_path: Path) -> None:
    arr = np.array([[0, 255, 256], [1000, 4095, 65535]], dtype=np.uint16)
    image = load_image(_png(tmp_path / "b.png", arr))
    assert image.meta["original_mode"].startswith("I;16") and image.meta["bit_depth"] == 16
    np.testing.assert_array_equal(image.pixels, arr.astype(np.float32))


def test_png_rgb_gray_takes_one_channel_and_colour_uses_luminance(tmp_path: Path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    image = load_image(_png(tmp_path / "g.png", np.stack([gray] * 3, axis=2)))
    assert image.meta["original_mode"] == "RGB" and image.meta["color"] == "gray stored as RGB"
    np.testing.assert_array_equal(image.pixels, gray)

    colour = np.zeros((2, 2, 3), dtype=np.uint8)
    colour[0, 0] = (255, 0, 0)
    colour[1, 1] = (0, 0, 200)
    image = load_image(_png(tmp_path / "c.png", colour))
    assert "luminance" in image.meta["color"]
    np.testing.assert_allclose(image.pixels, [[0.299 * 255, 0], [0, 0.114 * 200]], rtol=1e-5)


def test_png_rgba_alpha_ignored(tmp_path: Path) -> None:
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
    alpha = np.where(np.arange(16).reshape(4, 4) % 2 == 0, 0, 255).astype(np.uint8)
    image = load_image(_png(tmp_path / "r.png", np.dstack([gray, gray, gray, alpha])))
    assert image.meta["original_mode"] == "RGBA" and image.meta["alpha_dropped"] is True
    np.testing.assert_array_equal(image.pixels, gray)


def test_jpeg_gray(tmp_path: Path) -> None:
    arr = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (16, 1))
    path = tmp_path / "x.jpg"
    Image.fromarray(arr).save(path, format="JPEG", quality=95)
    image = load_image(path)
    assert image.meta["format"] == "jpeg" and image.shape == (16, 32)
    assert np.abs(image.pixels - arr).max() < 12  # lossy


def test_format_is_detected_from_bytes_not_name(tmp_path: Path) -> None:
    arr = np.full((4, 4), 7, dtype=np.uint8)
    path = tmp_path / "really_a_png.jpg"
    Image.fromarray(arr).save(path, format="PNG")
    assert load_image(path).meta["format"] == "png"
    from_bytes = load_image(path.read_bytes(), modality="dx")
    assert from_bytes.source == "<bytes>" and from_bytes.modality == "DX"
    np.testing.assert_array_equal(from_bytes.pixels, arr)


def test_dpi_is_not_spacing(tmp_path: Path) -> None:
    path = tmp_path / "dpi.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path, format="PNG", dpi=(300, 300))
    assert load_image(path).spacing_mm is None


# ----------------------------------------------------------------------------------------------- windowing


def test_to_uint8_window_and_minmax() -> None:
    image = MedicalImage(np.array([[-1000.0, -160.0], [40.0, 240.0]], dtype=np.float32))
    np.testing.assert_array_equal(image.to_uint8(), [[0, 173], [214, 255]])  # min-max: [-1000, 240]
    # Window (40, 400) spans [-160, 240].
    np.testing.assert_array_equal(image.to_uint8((40, 400)), [[0, 0], [128, 255]])
    image.window = (40.0, 400.0)
    rgb = image.to_rgb_uint8()
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    np.testing.assert_array_equal(MedicalImage(np.full((3, 3), 5.0)).to_uint8(), np.zeros((3, 3)))
    with pytest.raises(InputError, match="width > 0"):
        image.to_uint8((40, 0))


def test_load_image_window_override(tmp_path: Path) -> None:
    image = load_image(_png(tmp_path / "w.png", np.zeros((2, 2), np.uint8)), window=(100, 50))
    assert image.window == (100.0, 50.0)


# -------------------------------------------------------------------------------------------------- DICOM


def test_dicom_rescale_to_hu_window_and_spacing(tmp_path: Path) -> None:
    path = _write(tmp_path / "ct.dcm", _dicom(GRID, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=40,
                                             WindowWidth=400, PixelSpacing=[0.5, 0.7]))
    image = load_image(path)
    np.testing.assert_array_equal(image.pixels, [[-1024, -824], [-624, -424]])
    assert image.modality == "CT" and image.window == (40.0, 400.0)
    assert image.spacing_mm == (0.5, 0.7) and image.meta["spacing_source"] == "PixelSpacing"
    assert image.meta["rescale_slope"] == 2.0 and image.meta["rescale_intercept"] == -1024.0
    text = repr(image.meta)
    assert "Doe" not in text and "SECRET" not in text


def test_dicom_multivalued_window_takes_first(tmp_path: Path) -> None:
    image = load_image(_dicom(GRID, WindowCenter=[40, 300], WindowWidth=[400, 1500]))
    assert image.window == (40.0, 400.0)


def test_dicom_monochrome1_inverted_after_rescale(tmp_path: Path) -> None:
    image = load_image(_dicom(GRID, PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_array_equal(image.pixels, [[300, 200], [100, 0]])
    assert image.meta["inverted_monochrome1"] is True

    image = load_image(_dicom(GRID, PhotometricInterpretation="MONOCHROME1", RescaleSlope=2,
                              RescaleIntercept=-1024, WindowCenter=-900, WindowWidth=100))
    # Rescaled: [[-1024, -824], [-624, -424]]; inverted as max + min - x = -1448 - x.
    np.testing.assert_array_equal(image.pixels, [[-424, -624], [-824, -1024]])
    assert image.window == (-548.0, 100.0)  # the window is mirrored with the pixels


def test_dicom_imager_pixel_spacing_fallback(tmp_path: Path) -> None:
    image = load_image(_dicom(GRID, ImagerPixelSpacing=[0.143, 0.15]))
    assert image.spacing_mm == (0.143, 0.15) and image.meta["spacing_source"] == "ImagerPixelSpacing"
    both = load_image(_dicom(GRID, ImagerPixelSpacing=[0.143, 0.143], PixelSpacing=[0.2, 0.2]))
    assert both.spacing_mm == (0.2, 0.2)
    none = load_image(_dicom(GRID))
    assert none.spacing_mm is None and none.meta["spacing_source"] is None


def test_dicom_multiframe_slice_index(tmp_path: Path) -> None:
    frames = np.stack([GRID + 10 * k for k in range(3)])
    path = _write(tmp_path / "mf.dcm", _dicom(frames, frames=3))
    image = load_image(path, slice_index=2)
    np.testing.assert_array_equal(image.pixels, GRID + 20)
    assert image.meta["frame_index"] == 2 and image.meta["number_of_frames"] == 3
    with pytest.raises(InputError, match=r"3D where 2D expected.*slice_index \(0\.\.2\)"):
        load_image(path)
    with pytest.raises(InputError, match=r"slice_index in 0\.\.2"):
        load_image(path, slice_index=3)


def test_dicom_without_preamble_needs_dcm_name(tmp_path: Path) -> None:
    ds = pydicom.dcmread(io.BytesIO(_dicom(GRID)))
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)  # the bare data set: no preamble, no "DICM", no file meta
    raw = fp.getvalue()
    image = load_image(_write(tmp_path / "nopreamble.dcm", raw))
    np.testing.assert_array_equal(image.pixels, GRID)
    with pytest.raises(InputError, match="supported format"):
        load_image(_write(tmp_path / "nopreamble.bin", raw))


# -------------------------------------------------------------------------------------------------- NIfTI


def _nifti(tmp_path: Path, name: str = "vol.nii.gz") -> tuple[Path, np.ndarray]:
    vol = (np.arange(4)[:, None, None] * 100 + np.arange(5)[None, :, None] * 10 + np.arange(6)[None, None, :])
    vol = vol.astype(np.int16)
    path = tmp_path / name
    nib.save(nib.Nifti1Image(vol, np.diag([0.5, 0.7, 2.0, 1.0])), path)
    return path, vol


@pytest.mark.parametrize(("axis", "spacing"), [(0, (0.7, 2.0)), (1, (0.5, 2.0)), (2, (0.5, 0.7))])
def test_nifti_slice_along_each_axis(tmp_path: Path, axis: int, spacing: tuple[float, float]) -> None:
    path, vol = _nifti(tmp_path)
    image = load_image(path, slice_index=2, axis=axis)
    np.testing.assert_array_equal(image.pixels, np.take(vol, 2, axis=axis))
    assert image.spacing_mm == pytest.approx(spacing)
    assert image.meta["slice_axis"] == axis and image.meta["slice_index"] == 2
    assert image.meta["volume_shape"] == [4, 5, 6] and len(image.meta["affine"]) == 4


def test_nifti_from_bytes_and_uncompressed(tmp_path: Path) -> None:
    path, vol = _nifti(tmp_path)
    np.testing.assert_array_equal(load_image(path.read_bytes(), slice_index=1).pixels, vol[:, :, 1])
    raw_path, _ = _nifti(tmp_path, "vol.nii")
    np.testing.assert_array_equal(load_image(raw_path.read_bytes(), slice_index=3).pixels, vol[:, :, 3])
    odd = _write(tmp_path / "volume.data", path.read_bytes())  # gzip NIfTI with an unhelpful name
    np.testing.assert_array_equal(load_image(odd, slice_index=0).pixels, vol[:, :, 0])


def test_nifti_singleton_and_2d_load_directly(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    nib.save(nib.Nifti1Image(arr[:, :, None], np.diag([0.8, 0.9, 3.0, 1.0])), tmp_path / "s.nii.gz")
    image = load_image(tmp_path / "s.nii.gz")
    np.testing.assert_array_equal(image.pixels, arr)
    assert image.spacing_mm == pytest.approx((0.8, 0.9))
    nib.save(nib.Nifti1Image(arr[:, None, :], np.diag([0.8, 0.9, 3.0, 1.0])), tmp_path / "m.nii.gz")
    np.testing.assert_array_equal(load_image(tmp_path / "m.nii.gz").pixels, arr)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "flat.nii")
    np.testing.assert_array_equal(load_image(tmp_path / "flat.nii").pixels, arr)


def test_load_volume(tmp_path: Path) -> None:
    path, vol = _nifti(tmp_path)
    data, spacing, affine = load_volume(path)
    assert data.dtype == np.float32 and data.shape == (4, 5, 6)
    np.testing.assert_array_equal(data, vol)
    assert spacing == pytest.approx((0.5, 0.7, 2.0)) and affine.shape == (4, 4)
    with pytest.raises(InputError, match="NIfTI"):
        load_volume(_png(tmp_path / "a.png", np.zeros((2, 2), np.uint8)))


# ------------------------------------------------------------------------------------------------- writing


def test_save_mask_png_and_save_png_roundtrip(tmp_path: Path) -> None:
    mask = np.zeros((5, 7), dtype=bool)
    mask[1:3, 2:6] = True
    out = save_mask_png(mask, tmp_path / "sub" / "mask.png")
    with Image.open(out) as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), mask.astype(np.uint8) * 255)
    rgb = np.random.default_rng(0).integers(0, 256, (4, 3, 3), dtype=np.uint8)
    with Image.open(save_png(rgb, tmp_path / "rgb.png")) as im:
        np.testing.assert_array_equal(np.asarray(im), rgb)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["mask.png", "rgb.png"]  # no temp left
    with pytest.raises(InputError, match="uint8"):
        save_png(rgb.astype(np.float32), tmp_path / "f.png")
    with pytest.raises(InputError, match="2D mask"):
        save_mask_png(np.zeros((2, 2, 2), bool), tmp_path / "m3.png")


# ----------------------------------------------------------------------------------------------- real data


@pytest.mark.data
def test_real_nih_rgba_png() -> None:
    path = data_dir("cxr_nih_bbox") / "images" / "00001369_000.png"
    image = load_image(path)
    assert image.shape == (1024, 1024) and image.meta["original_mode"] == "RGBA"
    assert image.meta["color"] == "gray stored as RGB" and image.meta["alpha_dropped"] is True
    with Image.open(path) as im:
        np.testing.assert_array_equal(image.pixels, np.asarray(im)[:, :, 0])
    assert image.spacing_mm is None  # its 96 dpi pHYs chunk is screen resolution, not anatomy


@pytest.mark.data
def test_real_jsrt_png() -> None:
    image = load_image(data_dir("cxr_jsrt_scr") / "images" / "JPCLN002.png", modality="CR")
    assert image.shape == (1024, 1024) and image.meta["original_mode"] == "L" and image.meta["bit_depth"] == 8
    assert image.modality == "CR" and image.pixels.min() >= 0 and image.pixels.max() <= 255


@pytest.mark.data
def test_real_ct_nifti() -> None:
    path = data_dir("ct_totalsegmentator_example") / "example_ct_sm.nii.gz"
    with pytest.raises(InputError, match=r"pass slice_index \(0\.\.29\) along axis 2"):
        load_image(path)
    image = load_image(path, slice_index=15, modality="ct", window=(40, 400))
    assert image.shape == (122, 101) and image.spacing_mm == pytest.approx((3.0, 3.0))
    assert image.modality == "CT" and image.meta["axcodes"] == "RAS"
    assert -1100 <= image.pixels.min() < -900 and image.pixels.max() > 100  # HU: air and soft tissue/bone
    np.testing.assert_array_equal(image.pixels, np.asarray(nib.load(path).dataobj[:, :, 15], dtype=np.float32))


# ----------------------------------------------------------------------------------------------- bad input


def test_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "cxr.png"
    with pytest.raises(InputError, match=r"not found") as info:
        load_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(InputError, match="directory"):
        load_image(tmp_path)


def test_empty_file_and_empty_bytes(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"empty file \(0 bytes\)"):
        load_image(_write(tmp_path / "empty.png", b""))
    with pytest.raises(InputError, match="0 bytes"):
        load_image(b"")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"GIF89a" + b"\x00" * 40, "GIF file"),
        (b"patient notes, not an image\n" * 4, "unrecognised leading bytes"),
        (bytes(np.random.default_rng(1).integers(0, 256, 600, dtype=np.uint8)), "unrecognised"),
        (gzip.compress(b"hello" * 100), "gzip-compressed file that is not NIfTI"),
    ],
)
def test_unsupported_formats_list_supported_ones(tmp_path: Path, data: bytes, words: str) -> None:
    with pytest.raises(InputError, match="supported format") as info:
        load_image(_write(tmp_path / "file.png", data))
    message = str(info.value)
    assert words in message and "PNG, JPEG, DICOM" in message and "NIfTI" in message


def test_bad_format_argument() -> None:
    with pytest.raises(InputError, match="format"):
        load_image(b"\x89PNG", format="webp")


def test_truncated_png(tmp_path: Path) -> None:
    arr = np.random.default_rng(2).integers(0, 256, (64, 64), dtype=np.uint8)
    data = _png(tmp_path / "full.png", arr).read_bytes()
    path = _write(tmp_path / "cut.png", data[: len(data) // 2])
    with pytest.raises(InputError, match=r"truncated or corrupt PNG.*re-export or re-download") as info:
        load_image(path)
    assert "cut.png" in str(info.value)


def test_truncated_jpeg(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64), dtype=np.uint8)).save(buf, format="JPEG")
    with pytest.raises(InputError, match="truncated or corrupt JPEG"):
        load_image(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_truncated_dicom(tmp_path: Path) -> None:
    data = _dicom(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    with pytest.raises(InputError, match=r"truncated or corrupt DICOM.*re-export or re-download"):
        load_image(_write(tmp_path / "cut.dcm", data[: len(data) - 3000]))
    with pytest.raises(InputError, match="truncated or corrupt DICOM"):
        load_image(_write(tmp_path / "head.dcm", data[:300]))


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    data = _dicom(None, sop_class=BasicTextSRStorage, Modality="SR")
    with pytest.raises(InputError, match=r"wrong DICOM.*without pixel data.*Basic Text SR"):
        load_image(_write(tmp_path / "report.dcm", data))


def test_dicom_compressed_without_plugin_names_it(tmp_path: Path) -> None:
    data = _dicom(None, transfer_syntax=JPEGLSLossless, Rows=4, Columns=4, SamplesPerPixel=1,
                  PhotometricInterpretation="MONOCHROME2", BitsAllocated=16, BitsStored=16, HighBit=15,
                  PixelRepresentation=0, PixelData=encapsulate([b"\xff\xd8\xff\xf7" + b"\x00" * 32]))
    with pytest.raises(MissingDependencyError, match="pylibjpeg"):
        load_image(data)


def test_nifti_3d_without_slice_index_and_out_of_range(tmp_path: Path) -> None:
    path, _ = _nifti(tmp_path)
    with pytest.raises(InputError, match=r"3D volume: pass slice_index \(0\.\.5\) along axis 2"):
        load_image(path)
    with pytest.raises(InputError, match=r"slice_index in 0\.\.3 along axis 0.*out of range"):
        load_image(path, slice_index=4, axis=0)
    with pytest.raises(InputError, match="out of range"):
        load_image(path, slice_index=-1)
    with pytest.raises(InputError, match="axis"):
        load_image(path, slice_index=0, axis=3)


def test_nifti_4d_refused(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3, 2), np.float32), np.eye(4)), tmp_path / "t.nii.gz")
    with pytest.raises(InputError, match="4D array"):
        load_image(tmp_path / "t.nii.gz", slice_index=0)


def test_truncated_nifti(tmp_path: Path) -> None:
    vol = np.random.default_rng(4).normal(size=(32, 32, 16)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    data = (tmp_path / "v.nii.gz").read_bytes()
    with pytest.raises(InputError, match="truncated or corrupt NIfTI"):
        load_image(_write(tmp_path / "cut.nii.gz", data[: len(data) // 2]), slice_index=15)


def test_decompression_bomb_small_limit(tmp_path: Path) -> None:
    path = _png(tmp_path / "n.png", np.zeros((20, 20), np.uint8))
    with pytest.raises(InputError, match=r"20 x 20 = 400 pixels.*decompression-bomb.*max_pixels"):
        load_image(path, max_pixels=399)
    assert load_image(path, max_pixels=400).shape == (20, 20)
    with pytest.raises(InputError, match="pixels per frame"):
        load_image(_dicom(GRID), max_pixels=3)
    nifti, _ = _nifti(tmp_path)
    with pytest.raises(InputError, match="pixels per slice"):
        load_image(nifti, slice_index=0, max_pixels=10)


@pytest.mark.parametrize("side", [8_000, 100_000])  # above our 60 M default; the second is above Pillow's own limit
def test_decompression_bomb_header(tmp_path: Path, side: int) -> None:
    assert side * side > MAX_PIXELS_DEFAULT
    path = _write(tmp_path / "bomb.png", _png_header_only(side, side))
    assert path.stat().st_size < 100
    with pytest.raises(InputError, match="decompression-bomb"):
        load_image(path)


def test_bad_window_and_max_pixels() -> None:
    png = _png_header_only(2, 2)
    with pytest.raises(InputError, match="center, width"):
        load_image(png, window=(40,))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="max_pixels"):
        load_image(png, max_pixels=0)


def test_real_pydicom_ct_sample() -> None:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm", download=False)
    if path is None:
        pytest.skip("pydicom's bundled CT_small.dcm is absent")
    image = load_image(path)
    assert image.modality == "CT" and image.shape == (128, 128)
    assert image.spacing_mm == pytest.approx((0.661468, 0.661468)) and image.meta["spacing_source"] == "PixelSpacing"
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(image.pixels, expected.astype(np.float32))
