"""Read medical images (PNG, JPEG, DICOM, NIfTI) into one 2D type, and write PNG outputs atomically.

Everything that enters the project goes through :func:`load_image`, which returns a :class:`MedicalImage`:
an ``(H, W)`` float32 array in modality units plus the physical pixel spacing, a display window and
non-identifying metadata. Its pixel grid is "the original image" of :mod:`medvlm.types`: every box, point
and mask is expressed on it.

Design choices, and why:

- The format is detected from the file's leading bytes, not its name, because exported medical images
  are often misnamed (``.png`` that is a JPEG, DICOM without an extension). The one exception is DICOM
  without the 128-byte preamble: it has no magic, so it is only tried when the name ends in ``.dcm`` or
  the caller passes ``format="dicom"``.
- The image size is checked against ``max_pixels`` from the header, before any pixel is decoded, so a
  small file that claims a huge image (a decompression bomb) costs nothing.
- Patient identifiers (name, ID, birth date, ...) are never copied into :attr:`MedicalImage.meta`, which
  ends up in logs and JSON results.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import struct
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np
import numpy.typing as npt

from medvlm.errors import input_error, missing_dependency

__all__ = [
    "MAX_PIXELS_DEFAULT",
    "MAX_VOXELS_DEFAULT",
    "SUPPORTED_FORMATS",
    "MedicalImage",
    "atomic_open",
    "check_spacing",
    "color_or_none",
    "load_image",
    "load_volume",
    "mask_png_bytes",
    "model_input_rgb",
    "save_mask_png",
    "save_png",
    "sniff_format",
]

MAX_PIXELS_DEFAULT = 60_000_000
"""Largest 2D image (rows x columns) :func:`load_image` decodes unless the caller passes ``max_pixels``.

60 M pixels is about 7700 x 7700, above any radiograph or CT slice; a 4-byte float copy of it is 240 MB.
"""

MAX_VOXELS_DEFAULT = 500_000_000
"""Largest volume :func:`load_volume` reads (2 GB as float32)."""

SUPPORTED_FORMATS = "PNG, JPEG, DICOM (.dcm) and NIfTI (.nii, .nii.gz)"

_FORMAT_ALIASES = {
    "png": "png",
    "jpeg": "jpeg",
    "jpg": "jpeg",
    "dicom": "dicom",
    "dcm": "dicom",
    "nifti": "nifti",
    "nii": "nifti",
    "nii.gz": "nifti",
}

# Signatures of formats we do not read, so that the error can say what the file actually is.
_KNOWN_UNSUPPORTED = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"\x93NUMPY", "NumPy .npy array"),
    (b"RIFF", "RIFF (WebP/AVI) file"),
)

# ITU-R BT.601 luma weights, the same ones Pillow uses for RGB -> L.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

_HEAD_BYTES = 1024


@dataclass(eq=False)
class MedicalImage:
    """One 2D medical image on its original pixel grid.

    Attributes:
        pixels: ``(H, W)`` float32 in modality units. CT: Hounsfield units (DICOM Rescale Slope/Intercept
            or the NIfTI scaling applied). X-ray, PNG, JPEG: the stored values (16-bit values kept, not
            squashed to 8 bit). DICOM MONOCHROME1 is already inverted, so higher is always brighter (air is
            dark on a chest X-ray).
        spacing_mm: ``(row_mm, col_mm)``: physical size of one pixel along rows (y) and columns (x), in
            millimetres; None when the file does not say.
        modality: DICOM modality ("CR", "DX", "CT", "MR", ...), the caller's ``modality=``, or "unknown".
        source: the file path, or ``"<bytes>"``.
        window: ``(center, width)`` display window in the units of ``pixels``; None means min-max.
        meta: non-identifying facts about the file (format, bit depth, original mode, slice axis and index,
            affine, ...). Never patient identifiers.
        color: ``(H, W, 3)`` uint8 RGB of a colour image (dermoscopy, endoscopy, photographs), else None.
            ``pixels`` then holds its BT.601 luminance (measurements, windows, masks' grid); the models read
            the colour (:meth:`to_rgb_uint8`), because colour is what tells a lesion or a polyp from its
            surroundings (LiteMedSAM with the true box: skin lesion Dice 0.881 grey, 0.907 in colour; polyp
            0.878 grey, 0.947 in colour).
    """

    pixels: npt.NDArray[np.float32]
    spacing_mm: tuple[float, float] | None = None
    modality: str = "unknown"
    source: str = "<array>"
    window: tuple[float, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    color: npt.NDArray[np.uint8] | None = None

    def __post_init__(self) -> None:
        pixels = np.asarray(self.pixels)
        if pixels.ndim != 2 or pixels.size == 0:
            raise input_error("MedicalImage", expected="a non-empty 2D array (H, W)", received=f"shape {pixels.shape}",
                              fix="select one slice or channel before building a MedicalImage")
        self.pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if self.window is not None:
            self.window = _check_window(self.window, "MedicalImage.window")
        if self.color is not None:
            color = np.asarray(self.color)
            if color.shape != (*pixels.shape, 3) or color.dtype != np.uint8:
                raise input_error("MedicalImage.color", expected=f"uint8 RGB of shape {(*pixels.shape, 3)}",
                                  received=f"{color.dtype} of shape {color.shape}",
                                  fix="pass the colour image as uint8 (H, W, 3) on the same grid as pixels, or None")
            self.color = np.ascontiguousarray(color)

    @property
    def height(self) -> int:
        """Number of rows (pixels)."""
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        """Number of columns (pixels)."""
        return int(self.pixels.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` in pixels."""
        return (self.height, self.width)

    def to_uint8(self, window: tuple[float, float] | None = None) -> npt.NDArray[np.uint8]:
        """Display image, ``(H, W)`` uint8.

        ``window`` (else :attr:`window`) is ``(center, width)`` in the units of :attr:`pixels`; values in
        ``[center - width/2, center + width/2]`` map linearly to ``[0, 255]`` and are clipped outside.
        With no window the image's own min-max is used; a constant image gives zeros. NaN maps to 0.
        """
        win = _check_window(window, "to_uint8 window") if window is not None else self.window
        data = self.pixels
        finite = np.isfinite(data)
        if win is None:
            if not finite.any():
                return np.zeros(self.shape, dtype=np.uint8)
            lo = float(data[finite].min())
            hi = float(data[finite].max())
        else:
            lo = win[0] - win[1] / 2.0
            hi = win[0] + win[1] / 2.0
        if hi <= lo:
            return np.zeros(self.shape, dtype=np.uint8)
        scaled = (data.astype(np.float64) - lo) / (hi - lo) * 255.0
        scaled = np.where(finite, scaled, 0.0)
        return np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)  # round half up, not half to even

    def to_rgb_uint8(self, window: tuple[float, float] | None = None) -> npt.NDArray[np.uint8]:
        """``(H, W, 3)`` uint8 (model input, overlays): a colour image's :attr:`color` as stored (a display
        window is a grey-scale notion and does not apply to it), else the windowed gray image repeated in R, G
        and B."""
        if self.color is not None:
            return self.color.copy()
        return self.gray_rgb_uint8(window)

    def gray_rgb_uint8(self, window: tuple[float, float] | None = None) -> npt.NDArray[np.uint8]:
        """``(H, W, 3)`` uint8: the windowed gray image (a colour image's luminance) repeated in R, G and B."""
        gray = self.to_uint8(window)
        return np.repeat(gray[:, :, None], 3, axis=2)


def model_input_rgb(image: MedicalImage, *, color: bool, slice_context: int = 0) -> npt.NDArray[np.uint8]:
    """``(H, W, 3)`` uint8: what a model reads of ``image``, given how it was trained: its
    :meth:`~MedicalImage.to_rgb_uint8`, except that a colour image is read as its luminance in R, G and B by a
    model that does not read colour (``color=False``: every model trained before colour images kept their colour)
    and a volume slice shown with its neighbours (:class:`medvlm.volume.SliceWithNeighbours`, whose ``context``
    differs from the model's ``slice_context``) as its grey centre (:meth:`~MedicalImage.gray_rgb_uint8`)."""
    context = getattr(image, "context", None)  # only a slice with neighbours has one
    if (context is not None and context != slice_context) or (image.color is not None and not color):
        return image.gray_rgb_uint8()
    return image.to_rgb_uint8()


# --------------------------------------------------------------------------------------------------- entry


def load_image(
    source: str | os.PathLike[str] | bytes,
    *,
    modality: str | None = None,
    slice_index: int | None = None,
    axis: int = 2,
    window: tuple[float, float] | None = None,
    max_pixels: int = MAX_PIXELS_DEFAULT,
    format: str | None = None,
) -> MedicalImage:
    """Read one 2D image from a PNG, JPEG, DICOM or NIfTI file (path or raw bytes).

    Args:
        source: a file path, or the file's bytes (e.g. an upload).
        modality: overrides the modality; PNG, JPEG and NIfTI are "unknown" without it.
        slice_index: which slice of a 3D NIfTI volume (along ``axis``) or which frame of a multi-frame
            DICOM; required for those, else an error is raised rather than guessing.
        axis: NIfTI array axis the slice is taken along: 0, 1 or 2 (2 = the third stored axis, axial for
            the usual RAS/LPS volumes). The slice keeps the stored order: rows are the first remaining
            array axis, columns the second (no flip or rotation to a display orientation).
        window: ``(center, width)`` display window in modality units; overrides the DICOM window.
        max_pixels: largest ``rows x columns`` accepted, checked from the header before decoding. For a
            multi-frame DICOM or a NIfTI volume it applies to one frame or slice, the only part decoded.
        format: "png", "jpeg", "dicom" or "nifti" to skip detection from the leading bytes.

    Returns:
        A :class:`MedicalImage` with ``pixels`` of shape ``(H, W)`` float32 and ``spacing_mm`` as
        ``(row_mm, col_mm)`` or None.

    Raises:
        InputError: missing, empty, truncated or unsupported file; 3D data without ``slice_index``; an
            image larger than ``max_pixels``; a DICOM without pixel data.
        MissingDependencyError: a compressed DICOM whose decoder package is not installed.
    """
    if window is not None:
        window = _check_window(window, "load_image window")
    if not isinstance(max_pixels, int) or max_pixels <= 0:
        raise input_error("load_image max_pixels", expected="a positive integer", received=repr(max_pixels),
                          fix=f"pass a pixel count such as {MAX_PIXELS_DEFAULT}")
    with _opened(source) as src:
        fmt = _resolve_format(src, format)
        if fmt in ("png", "jpeg"):
            if slice_index not in (None, 0):
                raise input_error(f"{fmt.upper()} image {src.label}", expected="slice_index None or 0 for a 2D image",
                                  received=f"slice_index={slice_index}", fix="drop slice_index for 2D images")
            image = _load_pil(src, fmt, max_pixels)
        elif fmt == "dicom":
            image = _load_dicom(src, slice_index, max_pixels, force=format is not None or src.suffix == ".dcm")
        else:
            image = _load_nifti_slice(src, slice_index, axis, max_pixels)
    if modality is not None:
        image.modality = modality.strip().upper() or "unknown"
    if window is not None:
        image.window = window
    return image


def load_volume(
    source: str | os.PathLike[str] | bytes, *, max_voxels: int = MAX_VOXELS_DEFAULT
) -> tuple[npt.NDArray[np.float32], tuple[float, float, float], npt.NDArray[np.float64]]:
    """Read a whole NIfTI volume, for readers that iterate over slices.

    Returns:
        ``(volume, spacing_mm, affine)``: ``volume`` is ``(X, Y, Z)`` float32 in stored array order with the
        NIfTI scaling applied (HU for CT); a 2D file gives ``(X, Y, 1)``. ``spacing_mm`` is the voxel size
        along the three array axes in millimetres (header zooms). ``affine`` is the ``(4, 4)`` float64
        voxel-index -> world (RAS+, mm) matrix.
    """
    with _opened(source) as src:
        if _resolve_format(src, None) != "nifti":
            raise input_error(f"load_volume({src.label})", expected="a NIfTI volume (.nii or .nii.gz)",
                              received="a 2D image format", fix="use load_image for PNG, JPEG and DICOM files")
        with _nifti_image(src) as img:
            shape = _nifti_shape(img, src.label)
            count = int(np.prod(shape))
            if count > max_voxels:
                raise _too_big(src.label, f"{' x '.join(map(str, shape))} = {count} voxels", max_voxels, "max_voxels")
            data = _nifti_read(img, tuple(slice(None) for _ in img.shape), src.label)
            volume = data.reshape(shape).astype(np.float32, copy=False)
            if volume.ndim == 2:
                volume = volume[:, :, None]
            zooms = [float(z) for z in img.header.get_zooms()[:3]] + [1.0, 1.0]
            affine = np.asarray(img.affine, dtype=np.float64)
    return volume, (zooms[0], zooms[1], zooms[2]), affine


def mask_png_bytes(mask: npt.ArrayLike) -> bytes:
    """A binary mask ``(H, W)`` as the bytes of the 8-bit PNG :func:`save_mask_png` writes (0 outside, 255 inside):
    for masks computed in one process and written by another (``medvlm batch --engine ray``)."""
    from PIL import Image

    data = np.asarray(getattr(mask, "data", mask))
    if data.ndim != 2 or data.size == 0:
        raise input_error("mask_png_bytes", expected="a non-empty 2D mask (H, W)", received=f"shape {data.shape}",
                          fix="pass one mask at a time, e.g. Mask.data")
    buf = io.BytesIO()
    Image.fromarray(np.where(data.astype(bool), 255, 0).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def save_mask_png(mask: npt.ArrayLike, path: str | os.PathLike[str]) -> Path:
    """Write a binary mask ``(H, W)`` (bool, or anything non-zero = inside; a Mask's ``.data``) as an 8-bit
    PNG with 0 outside and 255 inside, atomically. Returns the path."""
    data = np.asarray(getattr(mask, "data", mask))
    if data.ndim != 2 or data.size == 0:
        raise input_error("save_mask_png", expected="a non-empty 2D mask (H, W)", received=f"shape {data.shape}",
                          fix="pass one mask at a time, e.g. Mask.data")
    return _write_png_atomic(np.where(data.astype(bool), 255, 0).astype(np.uint8), path)


def save_png(image: npt.NDArray[np.uint8], path: str | os.PathLike[str]) -> Path:
    """Write a uint8 image ``(H, W)`` gray, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA as PNG, atomically.

    Other dtypes are refused rather than rescaled, so the caller decides the window (see
    :meth:`MedicalImage.to_uint8`). Returns the path.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise input_error("save_png", expected="a uint8 array", received=f"dtype {arr.dtype}",
                          fix="convert first, e.g. MedicalImage.to_uint8() or (mask * 255).astype(np.uint8)")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))) or arr.size == 0:
        raise input_error("save_png", expected="shape (H, W), (H, W, 3) or (H, W, 4)", received=f"shape {arr.shape}",
                          fix="pass a gray, RGB or RGBA image")
    return _write_png_atomic(arr, path)


# -------------------------------------------------------------------------------------------------- source


@dataclass
class _Source:
    """The input as a path or bytes, with the leading bytes used for format detection."""

    label: str
    path: Path | None
    data: bytes | None
    head: bytes

    @property
    def suffix(self) -> str:
        if self.path is None:
            return ""
        name = self.path.name.lower()
        return ".nii.gz" if name.endswith(".nii.gz") else self.path.suffix.lower()

    def open(self) -> BinaryIO:
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.path is not None
        return open(self.path, "rb")


@contextlib.contextmanager
def _opened(source: str | os.PathLike[str] | bytes) -> Iterator[_Source]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise input_error("load_image(<bytes>)", expected="the bytes of an image file", received="0 bytes",
                              fix="check the upload: the body was empty")
        yield _Source("<bytes>", None, data, data[:_HEAD_BYTES])
        return
    if not isinstance(source, (str, os.PathLike)):
        raise input_error("load_image", expected="a file path or the file's bytes", received=type(source).__name__,
                          fix="pass a str/pathlib.Path path or bytes")
    path = Path(source).expanduser()
    if not path.exists():
        raise input_error(f"load_image({path})", expected="an existing file", received="file not found",
                          fix=f"check the path; the current directory is {Path.cwd()}")
    if path.is_dir():
        raise input_error(f"load_image({path})", expected="a file", received="a directory",
                          fix="pass one image file (for a DICOM series, pass one instance)")
    try:
        with open(path, "rb") as fh:
            head = fh.read(_HEAD_BYTES)
    except OSError as exc:
        raise input_error(f"load_image({path})", expected="a readable file", received=f"{exc.strerror or exc}",
                          fix="check the file permissions") from exc
    if not head:
        raise input_error(f"load_image({path})", expected="an image file", received="an empty file (0 bytes)",
                          fix="re-export or re-download the file")
    yield _Source(str(path), path, None, head)


def sniff_format(head: bytes) -> str | None:
    """The container a file's leading bytes (at least 348 of them for NIfTI-1) announce: "png", "jpeg", "dicom"
    (Part 10: "DICM" at offset 128), "nifti" (NIfTI-1/2 magic), "gzip" (maybe a .nii.gz; look inside), or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[128:132] == b"DICM":
        return "dicom"
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] == b"n+2\x00":
        return "nifti"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    return None


def _resolve_format(src: _Source, format: str | None) -> str:
    if format is not None:
        fmt = _FORMAT_ALIASES.get(format.strip().lower().lstrip("."))
        if fmt is None:
            raise input_error("load_image format", expected=f"one of {sorted(set(_FORMAT_ALIASES.values()))}",
                              received=repr(format), fix="leave format=None to detect it from the file's bytes")
        return fmt
    head = src.head
    sniffed = sniff_format(head)
    if sniffed == "gzip":
        if sniff_format(_gunzip_head(src)) == "nifti":
            return "nifti"
        raise _unsupported(src, "a gzip-compressed file that is not NIfTI")
    if sniffed is not None:
        return sniffed
    if src.suffix == ".dcm":
        return "dicom"  # DICOM without the 128-byte preamble has no magic number; the name is all we have
    for magic, name in _KNOWN_UNSUPPORTED:
        if head.startswith(magic):
            raise _unsupported(src, f"a {name} file")
    raise _unsupported(src, f"unrecognised leading bytes {head[:8]!r}")


def _gunzip_head(src: _Source) -> bytes:
    try:
        with src.open() as raw, gzip.GzipFile(fileobj=raw) as gz:
            return gz.read(352)
    except (OSError, EOFError, zlib.error):
        return b""


def _unsupported(src: _Source, what: str) -> Exception:
    return input_error(f"load_image({src.label})", expected=f"a supported format: {SUPPORTED_FORMATS}",
                       received=what, fix="convert the image to PNG (or pass DICOM/NIfTI as is)")


def _corrupt(label: str, fmt: str, detail: object) -> Exception:
    return input_error(f"load_image({label})", expected=f"a complete {fmt} file",
                       received=f"a truncated or corrupt {fmt} file ({detail})",
                       fix="re-export or re-download the file, and check that the copy finished")


def _too_big(label: str, size: str, limit: int, knob: str = "max_pixels") -> Exception:
    return input_error(f"load_image({label})", expected=f"at most {limit} pixels ({knob})",
                       received=f"an image of {size} (decompression-bomb limit)",
                       fix=f"if you trust this file, pass a larger {knob}=; otherwise downsample it first")


def _check_window(window: Any, what: str) -> tuple[float, float]:
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError) as exc:
        raise input_error(what, expected="(center, width), two numbers", received=repr(window),
                          fix="pass e.g. (40, 400) for a CT soft-tissue window") from exc
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0:
        raise input_error(what, expected="a finite center and a width > 0", received=repr(window),
                          fix="pass e.g. (40, 400) for a CT soft-tissue window")
    return (center, width)


def check_spacing(spacing: Any, what: str = "--spacing") -> tuple[float, float]:
    """``spacing`` as ``(row_mm, col_mm)``, two finite numbers > 0 (mm per pixel along rows and columns)."""
    try:
        row_mm, col_mm = (float(v) for v in spacing)
    except (TypeError, ValueError) as exc:
        raise input_error(what, expected="(row_mm, col_mm), two numbers", received=repr(spacing),
                          fix="pass the pixel size in mm, e.g. 0.15 0.15 for an ultrasound frame") from exc
    if not (np.isfinite(row_mm) and np.isfinite(col_mm)) or row_mm <= 0 or col_mm <= 0:
        raise input_error(what, expected="a pixel size in mm > 0 along rows and columns", received=repr(spacing),
                          fix="pass the pixel size in mm, e.g. 0.15 0.15 for an ultrasound frame")
    return (row_mm, col_mm)


# ----------------------------------------------------------------------------------------------- PNG/JPEG


def _load_pil(src: _Source, fmt: str, max_pixels: int) -> MedicalImage:
    from PIL import Image

    meta: dict[str, Any] = {"format": fmt}
    with src.open() as fh:
        try:
            # Pillow keeps its own global bomb limit; ours is per call, so Pillow's warning is silenced and its
            # hard error (at 2x its limit) is mapped to ours below.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(fh, formats=["PNG" if fmt == "png" else "JPEG"])
        except Image.DecompressionBombError as exc:
            raise input_error(f"load_image({src.label})", expected=f"at most {max_pixels} pixels (max_pixels)",
                              received=f"an image over Pillow's own decompression-bomb limit ({exc})",
                              fix="if you trust this file, raise max_pixels= and PIL.Image.MAX_IMAGE_PIXELS; "
                                  "otherwise downsample it first") from exc
        except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
            raise _corrupt(src.label, fmt.upper(), exc) from exc
        with im:
            width, height = im.size
            if width * height == 0:
                raise input_error(f"load_image({src.label})", expected="an image with at least one pixel",
                                  received=f"size {width} x {height}", fix="re-export the image")
            if width * height > max_pixels:
                raise _too_big(src.label, f"{width} x {height} = {width * height} pixels", max_pixels)
            meta["original_mode"] = im.mode
            meta["bit_depth"] = _pil_bit_depth(src.head, fmt, im.mode)
            try:
                orientation = im.getexif().get(0x0112) if fmt == "jpeg" else None
                if orientation not in (None, 1):
                    # Kept as stored: the annotation tools this project reads from index the stored grid.
                    meta["exif_orientation_ignored"] = int(orientation)
                im.load()
                pixels, color = _pil_to_gray(im, meta)
            except (OSError, SyntaxError, ValueError, struct.error, EOFError, zlib.error) as exc:
                raise _corrupt(src.label, fmt.upper(), exc) from exc
    # dpi/pHYs describe print or screen resolution, not the size of the patient in a pixel, so they are never
    # turned into spacing_mm; the caller passes known spacing (e.g. JSRT 0.35 mm) itself.
    return MedicalImage(pixels, spacing_mm=None, modality="unknown", source=src.label, meta=meta, color=color)


def _pil_bit_depth(head: bytes, fmt: str, mode: str) -> int:
    if fmt == "png" and len(head) >= 25 and head[12:16] == b"IHDR":
        return int(head[24])
    return {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}.get(mode, 8)


# Mean spread between a pixel's R, G and B (0-255) below which an RGB file is a grey image: a grey X-ray saved
# as an RGB JPEG decodes with channels that differ by rounding (<= 1-2), a dermoscopy photograph by tens.
_COLOR_SPREAD = 2.0


def color_or_none(rgb: npt.NDArray[Any]) -> npt.NDArray[np.uint8] | None:
    """``rgb`` ``(H, W, 3)`` (any numeric dtype, 0-255) as uint8 when it is a colour image, None when its
    channels are equal up to rounding (mean max-min spread over the pixels <= 2 grey levels)."""
    arr = np.asarray(rgb)
    spread = float((arr.max(axis=2).astype(np.float32) - arr.min(axis=2).astype(np.float32)).mean())
    if spread <= _COLOR_SPREAD:
        return None
    return np.clip(np.floor(arr.astype(np.float32) + 0.5), 0, 255).astype(np.uint8)


def _pil_to_gray(im: Any, meta: dict[str, Any]
                 ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8] | None]:
    """The image's gray ``pixels`` (luminance for colour) and, for a colour image, its RGB."""
    mode = im.mode
    if mode in ("P", "PA"):
        im = im.convert("RGBA")
        mode = "RGBA"
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
        mode = "RGB"
    elif mode == "1":
        im = im.convert("L")
        mode = "L"
    if mode in ("L", "I", "F") or mode.startswith("I;16"):
        return np.asarray(im).astype(np.float32), None
    if mode == "LA":
        meta["alpha_dropped"] = True
        return np.asarray(im)[:, :, 0].astype(np.float32), None
    if mode in ("RGB", "RGBA", "RGBX"):
        arr = np.asarray(im)
        if arr.shape[2] == 4:
            meta["alpha_dropped"] = True
        rgb = arr[:, :, :3]
        if np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 1], rgb[:, :, 2]):
            meta["color"] = "gray stored as RGB"
            return rgb[:, :, 0].astype(np.float32), None
        color = color_or_none(rgb)
        meta["color"] = ("RGB kept; pixels = luminance (BT.601)" if color is not None
                         else "gray stored as RGB (channels equal up to rounding); luminance (BT.601)")
        return (rgb.astype(np.float32) @ _LUMA).astype(np.float32), color
    raise input_error(f"Pillow image mode {mode!r}", expected="L, I;16, I, F, RGB or RGBA",
                      received=f"mode {mode}", fix="re-export the image as 8- or 16-bit grayscale PNG")


# -------------------------------------------------------------------------------------------------- DICOM


def _load_dicom(src: _Source, slice_index: int | None, max_pixels: int, *, force: bool) -> MedicalImage:
    import pydicom
    from pydicom import uid
    from pydicom.errors import InvalidDicomError

    label = src.label
    with src.open() as fh:
        try:
            # Values over 4 KB (PixelData) are read only when touched, so the size check below runs first.
            ds = pydicom.dcmread(fh, defer_size=4096, force=force)
        except InvalidDicomError as exc:
            raise _corrupt(label, "DICOM", exc) from exc
        except (OSError, EOFError, ValueError, KeyError, struct.error, NotImplementedError) as exc:
            raise _corrupt(label, "DICOM", exc) from exc

        if "TransferSyntaxUID" not in ds.file_meta:
            # Files without a file meta header (no preamble) state their encoding nowhere but in how they parsed.
            implicit, little = ds.original_encoding
            ds.file_meta.TransferSyntaxUID = (
                uid.ImplicitVRLittleEndian if implicit else uid.ExplicitVRLittleEndian if little
                else uid.ExplicitVRBigEndian
            )
        return _dicom_to_image(ds, label, slice_index, max_pixels)


def _dicom_to_image(ds: Any, label: str, slice_index: int | None, max_pixels: int) -> MedicalImage:
    """Decode one frame of ``ds``; runs while the file is open because large values are read lazily."""
    from pydicom.pixels import apply_modality_lut, pixel_array

    if len(ds) == 0:
        raise _corrupt(label, "DICOM", "no data elements after the file meta header")
    pixel_keyword = next((k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
    if pixel_keyword is None or "Rows" not in ds or "Columns" not in ds:
        sop = getattr(ds.get("SOPClassUID"), "name", None) or "unknown SOP class"
        received = f"a DICOM without pixel data ({sop}, Modality {ds.get('Modality', 'unknown')})"
        if "Rows" in ds and pixel_keyword is None:
            received += "; it has image dimensions, so it may be truncated"
        raise input_error(f"load_image({label})", expected="an image DICOM with PixelData",
                          received=f"wrong DICOM: {received}",
                          fix="pass an image instance of the series (CR/DX/CT/MR), not a report, "
                              "presentation state or structured report; re-export it if it is truncated")

    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as exc:
        raise _corrupt(label, "DICOM", f"unreadable Rows/Columns/NumberOfFrames: {exc}") from exc
    if rows * cols == 0 or frames == 0:
        raise input_error(f"load_image({label})", expected="an image with at least one pixel",
                          received=f"Rows={rows}, Columns={cols}, NumberOfFrames={frames}",
                          fix="re-export the DICOM")
    # One frame is decoded at a time (pixel_array(index=...)), so the frame count does not multiply memory.
    if rows * cols > max_pixels:
        raise _too_big(label, f"{rows} x {cols} = {rows * cols} pixels per frame", max_pixels)
    if frames > 1 and slice_index is None:
        raise input_error(f"load_image({label})", expected="a 2D image",
                          received=f"3D where 2D expected: a multi-frame DICOM with {frames} frames",
                          fix=f"pass slice_index (0..{frames - 1}) to pick one frame")
    index = 0 if slice_index is None else int(slice_index)
    if not 0 <= index < frames:
        raise input_error(f"load_image({label})", expected=f"slice_index in 0..{frames - 1}",
                          received=f"slice_index={slice_index}", fix=f"pass a frame index from 0 to {frames - 1}")

    try:
        raw = pixel_array(ds, index=index if frames > 1 else None)
    except (RuntimeError, NotImplementedError) as exc:
        if "missing dependencies" in str(exc) or "plugin" in str(exc).lower():
            raise missing_dependency(
                f"Reading {label} (transfer syntax {ds.file_meta.get('TransferSyntaxUID', '?')!s}): {exc}",
                "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg  (or: pip install "
                "python-gdcm / pyjpegls)",
            ) from exc
        raise _corrupt(label, "DICOM", exc) from exc
    except (ValueError, OSError, EOFError, KeyError, AttributeError, TypeError, struct.error) as exc:
        raise _corrupt(label, "DICOM", exc) from exc

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    meta: dict[str, Any] = {
        "format": "dicom",
        "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else "",
        "sop_class": getattr(ds.get("SOPClassUID"), "name", ""),
        "photometric_interpretation": photometric,
        "bit_depth": int(ds.get("BitsStored") or ds.get("BitsAllocated") or 0),
        "bits_allocated": int(ds.get("BitsAllocated") or 0),
        "pixel_representation": int(ds.get("PixelRepresentation") or 0),
        "number_of_frames": frames,
    }
    if frames > 1:
        meta["frame_index"] = index
    for keyword, key in (("ViewPosition", "view_position"), ("BodyPartExamined", "body_part")):
        if ds.get(keyword):
            meta[key] = str(ds.get(keyword))

    pixels: npt.NDArray[np.float32]
    dicom_color: npt.NDArray[np.uint8] | None = None
    if photometric == "PALETTE COLOR" or raw.ndim == 3:
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(raw, ds) if photometric == "PALETTE COLOR" else raw
        rgb = np.asarray(rgb[..., :3])
        pixels = (rgb.astype(np.float32) @ _LUMA).astype(np.float32)
        if rgb.dtype == np.uint8:  # pydicom decodes YBR to RGB; a 16-bit palette is not a photograph
            dicom_color = color_or_none(rgb)
        meta["color"] = ("RGB kept; pixels = luminance (BT.601)" if dicom_color is not None
                         else "converted to luminance (BT.601)")
    elif ds.get("ModalityLUTSequence"):
        pixels = np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
        meta["modality_lut"] = "ModalityLUTSequence"
    else:
        slope, intercept = _rescale(ds, index)
        pixels = (raw.astype(np.float64) * slope + intercept).astype(np.float32)
        meta["rescale_slope"], meta["rescale_intercept"] = slope, intercept

    window = _dicom_window(ds, index)
    if photometric == "MONOCHROME1":
        # MONOCHROME1 stores "high = dark". Inverting after the modality LUT keeps the units' range; the DICOM
        # window is defined on the values before inversion, so it is mirrored the same way.
        lo, hi = float(pixels.min()), float(pixels.max())
        pixels = (hi + lo) - pixels
        meta["inverted_monochrome1"] = True
        if window is not None:
            window = (hi + lo - window[0], window[1])

    spacing, spacing_source = _dicom_spacing(ds, index)
    meta["spacing_source"] = spacing_source
    modality = str(ds.get("Modality") or "unknown").strip().upper() or "unknown"
    return MedicalImage(pixels, spacing_mm=spacing, modality=modality, source=label, window=window, meta=meta,
                        color=dicom_color)


def _frame_attr(ds: Any, index: int, sequence: str, keyword: str) -> Any:
    """``keyword`` from the enhanced multi-frame functional groups (per-frame first, then shared), or None."""
    for groups, item_index in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if not seq or item_index >= len(seq):
            continue
        inner = seq[item_index].get(sequence)
        if inner and keyword in inner[0]:
            return inner[0].get(keyword)
    return None


def _rescale(ds: Any, index: int) -> tuple[float, float]:
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    if slope is None:
        slope = _frame_attr(ds, index, "PixelValueTransformationSequence", "RescaleSlope")
    if intercept is None:
        intercept = _frame_attr(ds, index, "PixelValueTransformationSequence", "RescaleIntercept")
    return (float(slope) if slope not in (None, "") else 1.0, float(intercept) if intercept not in (None, "") else 0.0)


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if len(value) == 0:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _dicom_window(ds: Any, index: int) -> tuple[float, float] | None:
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is None or width is None:
        center = _first(_frame_attr(ds, index, "FrameVOILUTSequence", "WindowCenter"))
        width = _first(_frame_attr(ds, index, "FrameVOILUTSequence", "WindowWidth"))
    if center is None or width is None or not np.isfinite(center) or not np.isfinite(width) or width <= 0:
        return None
    return (center, width)


def _dicom_spacing(ds: Any, index: int) -> tuple[tuple[float, float] | None, str | None]:
    # PixelSpacing is in the patient; ImagerPixelSpacing is at the detector, so it overstates anatomy by the
    # geometric magnification (about 10% on a PA chest film). Both are (row spacing, column spacing).
    candidates = (
        ("PixelSpacing", ds.get("PixelSpacing")),
        ("PixelMeasuresSequence.PixelSpacing", _frame_attr(ds, index, "PixelMeasuresSequence", "PixelSpacing")),
        ("ImagerPixelSpacing", ds.get("ImagerPixelSpacing")),
    )
    for name, value in candidates:
        try:
            row_mm, col_mm = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if row_mm > 0 and col_mm > 0 and np.isfinite(row_mm) and np.isfinite(col_mm):
            return (row_mm, col_mm), name
    return None, None


# -------------------------------------------------------------------------------------------------- NIfTI


@contextlib.contextmanager
def _nifti_image(src: _Source) -> Iterator[Any]:
    """Yield a lazily-read nibabel image; bytes and oddly named files go through a temporary file."""
    import nibabel as nib

    gz = src.head.startswith(b"\x1f\x8b")
    suffix = ".nii.gz" if gz else ".nii"
    tmp_dir: str | None = None
    try:
        if src.path is not None and src.suffix in (".nii", ".nii.gz", ".hdr") and (src.suffix == ".nii.gz") == gz:
            path = src.path
        else:
            # nibabel picks its reader from the file name, so the bytes need a correctly named file.
            tmp_dir = tempfile.mkdtemp(prefix="medvlm_nifti_")
            path = Path(tmp_dir) / f"image{suffix}"
            if src.data is not None:
                path.write_bytes(src.data)
            else:
                assert src.path is not None
                try:
                    os.symlink(src.path.resolve(), path)
                except OSError:
                    shutil.copyfile(src.path, path)
        if src.head[344:348] == b"ni1\x00" and src.path is None:
            raise input_error("load_image(<bytes>)", expected="a single-file NIfTI (.nii or .nii.gz)",
                              received="a NIfTI header whose data is in a separate .img file",
                              fix="convert the .hdr/.img pair to one .nii.gz file")
        try:
            img = nib.load(str(path))
        except Exception as exc:  # nibabel raises many types (ImageFileError, HeaderDataError, EOFError, ...)
            raise _corrupt(src.label, "NIfTI", exc) from exc
        yield img
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _nifti_shape(img: Any, label: str) -> tuple[int, ...]:
    """Stored shape with trailing singleton axes (time = 1) removed; 2D or 3D, else an error."""
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise input_error(f"load_image({label})", expected="a 2D or 3D NIfTI",
                          received=f"a {len(shape)}D array of shape {shape}",
                          fix="extract one 3D volume first (e.g. one time point: nibabel img.slicer[..., t])")
    if len(shape) < 2 or 0 in shape:
        raise input_error(f"load_image({label})", expected="a non-empty 2D or 3D NIfTI", received=f"shape {shape}",
                          fix="re-export the volume")
    dtype = np.dtype(img.get_data_dtype())
    if dtype.fields is not None or dtype.kind == "c":
        raise input_error(f"load_image({label})", expected="a scalar (gray) NIfTI", received=f"data type {dtype}",
                          fix="convert the volume to a scalar type (int16 / float32)")
    return shape


def _nifti_read(img: Any, index: tuple[Any, ...], label: str) -> npt.NDArray[np.float32]:
    try:
        # dataobj slicing reads only what is needed and applies scl_slope / scl_inter.
        data = np.asarray(img.dataobj[index])
    except Exception as exc:  # gzip/zlib/EOF errors surface with several types from nibabel's proxies
        raise _corrupt(label, "NIfTI", exc) from exc
    return data.astype(np.float32, copy=False)


def _load_nifti_slice(src: _Source, slice_index: int | None, axis: int, max_pixels: int) -> MedicalImage:
    label = src.label
    with _nifti_image(src) as img:
        shape = _nifti_shape(img, label)
        zooms = [float(z) for z in img.header.get_zooms()]
        if axis not in (0, 1, 2, -1, -2, -3):
            raise input_error(f"load_image({label}) axis", expected="0, 1 or 2", received=repr(axis),
                              fix="pass axis=2 for axial slices of a usual RAS/LPS volume")
        axis = axis % 3
        if len(shape) == 2:
            if slice_index not in (None, 0):
                raise input_error(f"load_image({label})", expected="slice_index None or 0 for a 2D NIfTI",
                                  received=f"slice_index={slice_index}", fix="drop slice_index")
            keep = [0, 1]
            index: list[Any] = [slice(None), slice(None)]
            axis_used, index_used = None, None
        else:
            singletons = [a for a in range(3) if shape[a] == 1]
            if slice_index is None and shape[axis] != 1 and len(singletons) == 1:
                axis = singletons[0]  # a 3D file holding one 2D image: its singleton axis is the slice axis
            n = shape[axis]
            if slice_index is None and n > 1:
                raise input_error(f"load_image({label})", expected="a 2D image",
                                  received=f"3D volume of shape {shape}",
                                  fix=f"3D volume: pass slice_index (0..{n - 1}) along axis {axis} "
                                      "(axis=0, 1 or 2 picks the array axis)")
            k = 0 if slice_index is None else int(slice_index)
            if not 0 <= k < n:
                raise input_error(f"load_image({label})", expected=f"slice_index in 0..{n - 1} along axis {axis}",
                                  received=f"slice_index={slice_index} (out of range)",
                                  fix=f"pass a slice index from 0 to {n - 1}")
            keep = [a for a in range(3) if a != axis]
            index = [slice(None)] * 3
            index[axis] = k
            axis_used, index_used = axis, k
        rows, cols = shape[keep[0]], shape[keep[1]]
        if rows * cols > max_pixels:
            raise _too_big(label, f"{rows} x {cols} = {rows * cols} pixels per slice", max_pixels)
        full_index = tuple(index) + (0,) * (len(img.shape) - len(index))
        pixels = _nifti_read(img, full_index, label).reshape(rows, cols)
        spacing = (zooms[keep[0]], zooms[keep[1]]) if len(zooms) > max(keep) else None
        if spacing is not None and not (spacing[0] > 0 and spacing[1] > 0):
            spacing = None
        import nibabel as nib

        meta: dict[str, Any] = {
            "format": "nifti",
            "volume_shape": list(shape),
            "slice_axis": axis_used,
            "slice_index": index_used,
            "affine": np.asarray(img.affine, dtype=np.float64).round(6).tolist(),
            "axcodes": "".join(str(c) for c in nib.aff2axcodes(img.affine)),
            "dtype": str(img.get_data_dtype()),
            "orientation": "stored array order: rows = first remaining array axis, columns = second",
        }
    return MedicalImage(pixels, spacing_mm=spacing, modality="unknown", source=label, meta=meta)


# --------------------------------------------------------------------------------------------------- write


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` atomically, on error it is removed.

    Readers never see half a file and an interrupted job leaves the previous version intact. The file gets the
    usual permissions (0666 minus the umask), not mkstemp's private 0600.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def _write_png_atomic(arr: npt.NDArray[np.uint8], path: str | os.PathLike[str]) -> Path:
    from PIL import Image

    with atomic_open(path, "wb") as fh:
        # zlib level 3: 2.4x faster than PIL's default 6 on a 1024 px RGB overlay (0.11 vs 0.26 s), 3 % larger
        Image.fromarray(np.ascontiguousarray(arr)).save(fh, format="PNG", compress_level=3)
    return Path(path)
