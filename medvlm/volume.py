"""Read a whole 3D volume (a NIfTI file or a folder holding one DICOM series) as axial display slices.

:func:`read_volume` returns a :class:`Volume`: ``array`` is ``(Z, H, W)`` float32 in modality units (HU for CT),
each ``array[k]`` an axial slice in radiological display (anterior at the top, the patient's right on the image
left), ``k`` counted from inferior to superior, the frame :mod:`medvlm.datasets.ct` gives its slice samples in.
The volume also remembers how it was stored, so that results computed on the display slices are written back
in the input's own voxel order (:meth:`Volume.to_stored`) and slice numbering (:meth:`Volume.stored_slice`).

"Stored order":

- **NIfTI**: the file's array ``(X, Y, Z)`` (trailing length-1 axes dropped) and its affine
  (voxel index -> RAS+ millimetres).
- **DICOM series**: ``(rows, columns, slices)``, indexed ``[row, column, k]`` as :mod:`medvlm.export` writes a
  DICOM image's NIfTI, with ``k`` the position of the instance in the series sorted along the slice normal
  (``cross(row direction, column direction)`` of ImageOrientationPatient, ascending). Its affine is built from
  ImagePositionPatient, ImageOrientationPatient and PixelSpacing (LPS turned to RAS).

A DICOM folder must hold exactly one series of single-frame images with one orientation, one size and evenly
spaced positions; anything else (two series, a missing slice, a tilted or mixed orientation) is refused with an
:class:`~medvlm.errors.InputError` that says what was expected, what was found and how to fix it, rather than
guessed around. Files that are not DICOM, and DICOM objects that are not images (SEG, SR, RTSTRUCT, ...), are
skipped and counted in ``meta``.

This module is the core: it reads and reorients, it never segments (see ``segmentation/volume.py``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medvlm.datasets.ct import CT_SOFT_TISSUE_WINDOW, to_lps
from medvlm.errors import input_error, missing_dependency
from medvlm.io import MAX_VOXELS_DEFAULT, MedicalImage, load_image, load_volume, sniff_format

__all__ = [
    "NON_IMAGE_MODALITIES",
    "SliceWithNeighbours",
    "Volume",
    "default_window",
    "is_volume_input",
    "read_dicom_series",
    "read_nifti_volume",
    "read_volume",
    "volume_ml",
    "with_neighbours",
]

#: DICOM modalities that are not images to segment (a SEG written into the series folder must not count as one).
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "RTSTRUCT", "RTPLAN", "RTRECORD", "PR", "KO", "REG", "DOC", "PLAN"})

#: Largest relative deviation of one slice step from the median step before the series counts as irregular.
SPACING_TOLERANCE = 0.1

# LPS (DICOM patient coordinates) <-> RAS (NIfTI world coordinates): x and y change sign.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_LPS_CODES = ("L", "P", "S")


@dataclass(eq=False)
class SliceWithNeighbours(MedicalImage):
    """An axial slice that also carries the slices next to it, for a model trained with neighbouring-slice context
    (``slice_context`` in its Med-VLM config).

    It is a :class:`~medvlm.io.MedicalImage` of the centre slice (``pixels``, ``window``, ``spacing_mm``,
    ``modality`` and ``meta`` are the centre's, so everything that reads a 2D image reads it unchanged); only
    :meth:`to_rgb_uint8` differs: R = the slice below (``k - context``), G = slice ``k``, B = the slice above
    (``k + context``), each windowed like the centre. ``below`` / ``above``: ``(H, W)`` float32 in the centre's
    units, clamped to the volume's first / last slice at its ends. :meth:`gray_rgb_uint8` (inherited) is the plain
    grey slice, what a model trained without context reads.
    """

    below: npt.NDArray[np.float32] | None = None
    above: npt.NDArray[np.float32] | None = None
    context: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("below", "above"):
            arr = getattr(self, name)
            if arr is None or np.shape(arr) != self.pixels.shape:
                raise input_error(f"SliceWithNeighbours.{name}", expected=f"an array of the centre's shape "
                                  f"{self.pixels.shape}", received="none" if arr is None else f"shape {np.shape(arr)}",
                                  fix="build it with medvlm.volume.with_neighbours(image, stack, k)")
            setattr(self, name, np.ascontiguousarray(arr, dtype=np.float32))

    def to_rgb_uint8(self, window: tuple[float, float] | None = None) -> npt.NDArray[np.uint8]:
        """``(H, W, 3)`` uint8: the slices ``k - context``, ``k``, ``k + context`` as R, G, B, one window for all."""
        win = window if window is not None else self.window
        planes = [np.asarray(p, dtype=np.float32) for p in (self.below, self.pixels, self.above)]
        if win is None:  # min-max over the three slices: one scale, or a neighbour's contrast would be its own
            finite = [p[np.isfinite(p)] for p in planes]
            values = np.concatenate(finite) if any(f.size for f in finite) else np.zeros(1, dtype=np.float32)
            lo, hi = float(values.min()), float(values.max())
            win = ((lo + hi) / 2.0, hi - lo) if hi > lo else None
        if win is None:
            return np.zeros((*self.shape, 3), dtype=np.uint8)
        return np.stack([MedicalImage(p, window=win).to_uint8() for p in planes], axis=2)



def with_neighbours(image: MedicalImage, stack: npt.ArrayLike, k: int, context: int = 1) -> SliceWithNeighbours:
    """Slice ``k`` of ``stack`` (``(Z, H, W)``, the display slices ``image`` came from: ``image.pixels`` must be
    ``stack[k]``) with its neighbours ``k - context`` and ``k + context`` (clamped to ``0 .. Z - 1``), for a model
    trained with neighbouring-slice context. ``image``'s window, spacing, modality, source and meta are kept."""
    arr = np.asarray(stack)
    if arr.ndim != 3 or not 0 <= int(k) < arr.shape[0]:
        raise input_error("with_neighbours", expected="a (Z, H, W) stack and 0 <= k < Z",
                          received=f"shape {arr.shape}, k={k}", fix="pass the volume's display array and a slice index")
    if int(context) < 1:
        raise input_error("with_neighbours context", expected="an int >= 1 (slices between centre and neighbour)",
                          received=repr(context), fix="use context=1 (the adjacent slices)")
    if arr.shape[1:] != image.shape or not np.array_equal(np.asarray(arr[k], dtype=np.float32), image.pixels,
                                                           equal_nan=True):
        raise input_error("with_neighbours", expected=f"image = stack[{k}]",
                          received=f"image {image.shape}, stack slice {arr.shape[1:]}",
                          fix="pass the stack the image was sliced from")
    last = arr.shape[0] - 1
    return SliceWithNeighbours(image.pixels, spacing_mm=image.spacing_mm, modality=image.modality, source=image.source,
                               window=image.window, meta={**image.meta, "slice_context": int(context)},
                               below=arr[max(0, int(k) - int(context))], above=arr[min(last, int(k) + int(context))],
                               context=int(context))


@dataclass(eq=False)
class Volume:
    """A 3D image as axial display slices, with the way back to its stored voxel order.

    Attributes:
        array: ``(Z, H, W)`` float32 in modality units; ``array[k]`` is an axial slice in radiological display
            (rows anterior -> posterior, columns the patient's right -> left), ``k`` from inferior to superior.
        spacing: voxel size ``(z, y, x)`` of ``array`` in millimetres (slice step, row, column).
        affine: the source's ``(4, 4)`` voxel index -> RAS+ mm matrix of the STORED array (NIfTI header affine;
            for DICOM built from the series geometry).
        modality: "CT", "MR", ... (DICOM Modality; for NIfTI "CT" when the values look like HU, else "unknown").
        source: the file or folder path.
        format: "nifti" or "dicom".
        stored_shape: shape of the stored array (see the module docstring).
        ornt: the nibabel orientation transform from the stored axes to L, P, S (``to_lps``).
        window: ``(center, width)`` display window the slices are shown and segmented with (None: min-max).
        datasets: DICOM only: the instances' headers (pydicom Datasets, no pixel data) in stored slice order.
        sop_instance_uids: DICOM only: SOPInstanceUID of each stored slice, in order.
        meta: non-identifying facts (axis codes, series description, skipped files, ...).
    """

    array: npt.NDArray[np.float32]
    spacing: tuple[float, float, float]
    affine: npt.NDArray[np.float64]
    modality: str
    source: str
    format: str
    stored_shape: tuple[int, int, int]
    ornt: npt.NDArray[np.float64]
    window: tuple[float, float] | None = None
    datasets: list[Any] = field(default_factory=list)
    sop_instance_uids: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_slices(self) -> int:
        return int(self.array.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(Z, H, W)`` of :attr:`array`."""
        z, h, w = self.array.shape
        return int(z), int(h), int(w)

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel in millilitres (mm^3 / 1000)."""
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def slice_axis(self) -> int:
        """The stored array axis that the display slice index ``k`` runs along."""
        return int(next(a for a in range(3) if int(self.ornt[a][0]) == 2))

    def stored_slice(self, k: int) -> int:
        """Index along :attr:`slice_axis` of the stored array of display slice ``k`` (the input's own numbering:
        NIfTI array index, or the position in the DICOM series sorted along the slice normal)."""
        n = self.n_slices
        if not 0 <= k < n:
            raise IndexError(f"slice {k} out of 0..{n - 1}")
        return n - 1 - k if float(self.ornt[self.slice_axis][1]) < 0 else k

    def display_slices_in_stored_order(self) -> list[int]:
        """Display slice indices ordered by their stored slice index (``[display k of stored 0, ...]``)."""
        order = [0] * self.n_slices
        for k in range(self.n_slices):
            order[self.stored_slice(k)] = k
        return order

    def to_stored(self, data: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """An array ``(Z, H, W)`` on the display grid of :attr:`array` -> the stored voxel order (same dtype)."""
        from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

        arr = np.asarray(data)
        if arr.shape != self.array.shape:
            raise input_error("Volume.to_stored", expected=f"an array of the display shape {self.array.shape}",
                              received=f"shape {arr.shape}", fix="pass masks computed on Volume.array")
        back = ornt_transform(axcodes2ornt(_LPS_CODES), self.ornt_source())
        out = apply_orientation(arr.transpose(2, 1, 0), back)
        return np.ascontiguousarray(out)

    def ornt_source(self) -> npt.NDArray[np.float64]:
        """The stored axes' own orientation (nibabel ``io_orientation`` of :attr:`affine`)."""
        from nibabel.orientations import io_orientation

        return np.asarray(io_orientation(self.affine), dtype=np.float64)

    def slice_image(self, k: int, window: tuple[float, float] | None = None, *, context: int = 0) -> MedicalImage:
        """Display slice ``k`` as a :class:`~medvlm.io.MedicalImage` (pixels in modality units, ``window`` or the
        volume's :attr:`window`), what a 2D segmenter reads; with ``context`` >= 1 a :class:`SliceWithNeighbours`
        that also carries slices ``k - context`` and ``k + context`` (for a model trained with them)."""
        image = MedicalImage(self.array[k], spacing_mm=(self.spacing[1], self.spacing[2]), modality=self.modality,
                             source=self.source, window=window if window is not None else self.window,
                             meta={"format": self.format, "volume_slice": k, "stored_slice": self.stored_slice(k),
                                   "orientation": "radiological display: anterior at the top, patient's right "
                                                  "on the image left"})
        return with_neighbours(image, self.array, k, context) if context else image


def volume_ml(mask: npt.ArrayLike, spacing: tuple[float, float, float]) -> float:
    """Volume of a binary mask in millilitres: voxel count x voxel volume (``spacing`` in mm, any axis order)."""
    count = int(np.count_nonzero(np.asarray(mask)))
    return count * float(np.prod([float(s) for s in spacing])) / 1000.0


def default_window(modality: str, array: npt.NDArray[Any]) -> tuple[float, float] | None:
    """The display window a volume is segmented with: CT soft tissue (40/400 HU, what the Med-VLM checkpoint
    saw on CT), otherwise the volume's own 0.5-99.5 percentile range (one window for every slice, so that
    the slices stay comparable); None when the volume is constant."""
    if modality == "CT":
        return CT_SOFT_TISSUE_WINDOW
    finite = np.asarray(array)[np.isfinite(array)]
    if finite.size == 0:
        return None
    lo, hi = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
    if not hi > lo:
        return None
    return ((lo + hi) / 2.0, hi - lo)


# ------------------------------------------------------------------------------------------------- dispatch


def _is_nifti_name(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def is_volume_input(path: str | os.PathLike[str]) -> bool:
    """True for a folder (a DICOM series) or a NIfTI file whose data has more than one slice on each of 3 axes.

    Only the NIfTI header is read. A 2D NIfTI (or one of shape ``(X, Y, 1)``) is a 2D image: False.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        return True
    if not p.is_file():
        return False
    if not _is_nifti_name(p):
        try:
            with open(p, "rb") as fh:
                head = fh.read(352)
        except OSError:
            return False
        if sniff_format(head) != "nifti":
            return False
    try:
        import nibabel as nib

        img: Any = nib.load(str(p))
        shape = _squeezed_shape(tuple(int(s) for s in img.shape))
    except Exception:  # a broken file is load_image's to report, with its own message
        return False
    return len(shape) == 3 and min(shape) > 1


def _squeezed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def read_volume(path: str | os.PathLike[str], *, modality: str | None = None,
                max_voxels: int = MAX_VOXELS_DEFAULT) -> Volume:
    """Read a NIfTI volume (``.nii`` / ``.nii.gz``) or a folder holding one DICOM series into a :class:`Volume`.

    ``modality`` overrides the file's (DICOM) or the guess (NIfTI). Raises :class:`~medvlm.errors.InputError`
    for a 2D image, a folder of several series, missing slices, inconsistent orientation and the other cases
    described in the module docstring.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise input_error(f"volume {p}", expected="an existing NIfTI file or DICOM series folder",
                          received="not found", fix=f"check the path; the current directory is {Path.cwd()}")
    if p.is_dir():
        return read_dicom_series(p, modality=modality, max_voxels=max_voxels)
    return read_nifti_volume(p, modality=modality, max_voxels=max_voxels)


# ---------------------------------------------------------------------------------------------------- NIfTI


def read_nifti_volume(path: str | os.PathLike[str], *, modality: str | None = None,
                      max_voxels: int = MAX_VOXELS_DEFAULT) -> Volume:
    """A 3D NIfTI file -> :class:`Volume` (stored array, header affine, display slices)."""
    import nibabel as nib

    p = Path(path).expanduser()
    stored, spacing, affine = load_volume(p, max_voxels=max_voxels)
    if min(stored.shape) < 2:
        raise input_error(f"volume {p}", expected="a 3D NIfTI volume with more than one slice on each axis",
                          received=f"a 2D image (array shape {tuple(int(s) for s in stored.shape)})",
                          fix="segment it as a 2D image: medvlm segment IMAGE --text ... (no volume needed), "
                              "or pass a 3D volume")
    if not np.all(np.isfinite(affine)) or abs(float(np.linalg.det(affine[:3, :3]))) < 1e-9:
        raise input_error(f"volume {p}", expected="a NIfTI header with an invertible voxel-to-world affine",
                          received=f"affine {np.asarray(affine).round(4).tolist()}",
                          fix="fix the header (qform/sform) of the file, e.g. re-export it with dcm2niix or nibabel")
    codes: dict[str, int] = {}
    try:
        header: Any = nib.load(str(p)).header
        codes = {"qform_code": int(header["qform_code"]), "sform_code": int(header["sform_code"])}
    except Exception:  # only the codes are read here; load_volume already read the file and would have raised
        codes = {}
    guessed = modality is None
    if modality is None:
        modality = _guess_modality(stored)
    meta: dict[str, Any] = {"axcodes": "".join(str(c) for c in nib.aff2axcodes(affine)), **codes,
                            "modality_source": "guessed from the values (air near -1000 HU -> CT)" if guessed
                            else "given"}
    return _build(stored, spacing, affine, _norm_modality(modality), str(p), "nifti", meta)


def _norm_modality(modality: str) -> str:
    text = modality.strip().upper()
    return text if text and text != "UNKNOWN" else "unknown"


def _guess_modality(stored: npt.NDArray[np.float32]) -> str:
    """"CT" when at least 1 % of the voxels lie at or below -500 (air in HU); "unknown" otherwise (MR, PET...)."""
    sample = stored[:: max(1, stored.shape[0] // 64), :: max(1, stored.shape[1] // 64)]
    finite = sample[np.isfinite(sample)]
    return "CT" if finite.size and float(np.percentile(finite, 1)) <= -500.0 else "unknown"


def _build(stored: npt.NDArray[np.float32], spacing: tuple[float, float, float], affine: npt.NDArray[np.float64],
           modality: str, source: str, fmt: str, meta: dict[str, Any], **extra: Any) -> Volume:
    lps, lps_spacing, transform = to_lps(stored, affine, spacing)
    display = np.ascontiguousarray(np.asarray(lps, dtype=np.float32).transpose(2, 1, 0))
    meta = {**meta, "stored_shape": [int(s) for s in stored.shape],
            "display": "axial slices, radiological display: rows anterior -> posterior, columns the patient's "
                       "right -> left, slice 0 the most inferior"}
    shape3 = (int(stored.shape[0]), int(stored.shape[1]), int(stored.shape[2]))
    return Volume(array=display, spacing=(lps_spacing[2], lps_spacing[1], lps_spacing[0]),
                  affine=np.asarray(affine, dtype=np.float64), modality=modality, source=source, format=fmt,
                  stored_shape=shape3, ornt=np.asarray(transform, dtype=np.float64),
                  window=default_window(modality, display), meta=meta, **extra)


# ---------------------------------------------------------------------------------------------------- DICOM


def _floats(value: Any, n: int) -> list[float] | None:
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _series_label(ds: Any) -> str:
    parts = []
    if ds.get("SeriesNumber") not in (None, ""):
        parts.append(f"#{ds.get('SeriesNumber')}")
    if ds.get("Modality"):
        parts.append(str(ds.get("Modality")))
    if ds.get("SeriesDescription"):
        parts.append(repr(str(ds.get("SeriesDescription"))))
    return " ".join(parts) or str(ds.get("SeriesInstanceUID", "?"))


def read_dicom_series(folder: str | os.PathLike[str], *, modality: str | None = None,
                      max_voxels: int = MAX_VOXELS_DEFAULT) -> Volume:
    """A folder holding one DICOM series of single-frame images -> :class:`Volume`.

    The instances are sorted along the slice normal by ImagePositionPatient. Refused, with what to do: no DICOM
    image in the folder, several series, multi-frame instances, missing ImagePositionPatient /
    ImageOrientationPatient / PixelSpacing, mixed orientations, sizes or pixel spacings, duplicate positions, a
    gap (missing slices), irregular spacing, a tilted (sheared) stack.
    """
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as exc:  # pragma: no cover - pydicom is a core dependency
        raise missing_dependency("reading a DICOM series", "pip install pydicom") from exc

    root = Path(folder).expanduser()
    label = f"DICOM series folder {root}"
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    headers: list[tuple[Path, Any]] = []
    skipped_other, skipped_non_image = 0, 0
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True, force=f.suffix.lower() == ".dcm")
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, AttributeError):
            skipped_other += 1
            continue
        modality_f = str(ds.get("Modality") or "").strip().upper()
        if "Rows" not in ds or "Columns" not in ds or modality_f in NON_IMAGE_MODALITIES:
            skipped_non_image += 1
            continue
        headers.append((f, ds))
    if not headers:
        raise input_error(label, expected="a folder holding the DICOM image files of one series",
                          received=f"{len(files)} file(s), none a DICOM image ({skipped_other} not DICOM, "
                                   f"{skipped_non_image} DICOM objects without pixels such as SEG/SR/DICOMDIR)",
                          fix="pass the folder the series' .dcm files are in, or a NIfTI volume")

    series: dict[str, list[tuple[Path, Any]]] = {}
    for f, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    if len(series) > 1:
        listed = "; ".join(f"{_series_label(items[0][1])}: {len(items)} file(s) (e.g. {items[0][0].name})"
                           for items in list(series.values())[:6])
        raise input_error(label, expected="the files of ONE series (one SeriesInstanceUID)",
                          received=f"{len(series)} series: {listed}" + (" ..." if len(series) > 6 else ""),
                          fix="move each series into its own folder and pass one folder per run")
    items = next(iter(series.values()))

    multi = [f.name for f, ds in items if int(ds.get("NumberOfFrames") or 1) > 1]
    if multi:
        raise input_error(label, expected="single-frame images (one file per slice)",
                          received=f"{len(multi)} multi-frame instance(s), e.g. {multi[0]}",
                          fix="convert the enhanced multi-frame object to a NIfTI volume (e.g. dcm2niix) and pass "
                              "that file")

    geometry: list[tuple[Path, Any, npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]] = []
    for f, ds in items:
        ipp_v = _floats(ds.get("ImagePositionPatient"), 3)
        iop_v = _floats(ds.get("ImageOrientationPatient"), 6)
        ps_v = _floats(ds.get("PixelSpacing"), 2)
        if ipp_v is None or iop_v is None or ps_v is None or min(ps_v) <= 0:
            missing = [k for k, v in (("ImagePositionPatient", ipp_v), ("ImageOrientationPatient", iop_v),
                                      ("PixelSpacing", ps_v)) if v is None]
            raise input_error(label, expected="every slice with ImagePositionPatient, ImageOrientationPatient and "
                                              "a positive PixelSpacing (the geometry of a cross-sectional image)",
                              received=f"{f.name} lacks or has invalid {', '.join(missing) or 'PixelSpacing'}",
                              fix="pass a CT/MR series exported with its geometry, or a NIfTI volume")
        geometry.append((f, ds, np.array(ipp_v), np.array(iop_v), np.array(ps_v)))

    _, ds0, _, iop0, ps0 = geometry[0]
    rows, cols = int(ds0.Rows), int(ds0.Columns)
    for f, ds, _ipp, iop, ps in geometry[1:]:
        if not np.allclose(iop, iop0, atol=1e-4):
            raise input_error(label, expected="one ImageOrientationPatient for every slice of the series",
                              received=f"{geometry[0][0].name}: {np.round(iop0, 5).tolist()} but {f.name}: "
                                       f"{np.round(iop, 5).tolist()} (inconsistent orientation)",
                              fix="the folder mixes stacks (e.g. axial and a localizer, or a reformat): keep only "
                                  "the files of one stack in the folder")
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols) or not np.allclose(ps, ps0, rtol=1e-4):
            raise input_error(label, expected=f"one image size ({rows} x {cols}) and PixelSpacing "
                                              f"({ps0.tolist()}) for every slice",
                              received=f"{f.name}: {int(ds.Rows)} x {int(ds.Columns)}, PixelSpacing {ps.tolist()}",
                              fix="keep only the files of one stack in the folder")
    if len(geometry) < 2:
        raise input_error(label, expected="a series of at least 2 slices", received="1 slice",
                          fix=f"segment the single image as 2D: medvlm segment {geometry[0][0]} --text ...")

    col_dir, row_dir = iop0[:3], iop0[3:]  # direction of increasing column index, then of increasing row index
    normal = np.cross(col_dir, row_dir)
    if not 0.99 < float(np.linalg.norm(normal)) < 1.01 or abs(float(np.dot(col_dir, row_dir))) > 1e-3:
        raise input_error(label, expected="ImageOrientationPatient with two orthogonal unit vectors",
                          received=f"{np.round(iop0, 5).tolist()}", fix="re-export the series")
    geometry.sort(key=lambda g: float(np.dot(g[2], normal)))
    positions = np.array([float(np.dot(g[2], normal)) for g in geometry])
    steps = np.diff(positions)
    names = [g[0].name for g in geometry]
    dup = np.flatnonzero(steps < 1e-3)
    if dup.size:
        i = int(dup[0])
        raise input_error(label, expected="one slice per position along the slice normal",
                          received=f"{dup.size} duplicate position(s), e.g. {names[i]} and {names[i + 1]} both at "
                                   f"{positions[i]:.3f} mm",
                          fix="the folder holds two acquisitions or copies of one series: keep one of them")
    step = float(np.median(steps))
    gaps = np.flatnonzero(steps > (1.0 + SPACING_TOLERANCE) * step)
    if gaps.size:
        i = int(gaps[0])
        n_missing = max(1, round(float(steps[i]) / step) - 1)
        kind = "missing slice(s)" if steps[i] >= 1.5 * step else "irregular slice spacing"
        raise input_error(label, expected=f"evenly spaced slices ({step:.3f} mm apart, the median step)",
                          received=f"{kind}: {steps[i]:.3f} mm between {names[i]} ({positions[i]:.3f} mm) and "
                                   f"{names[i + 1]} ({positions[i + 1]:.3f} mm)"
                                   + (f", about {n_missing} slice(s) missing" if kind.startswith("missing") else "")
                                   + (f"; {gaps.size} such gap(s) in all" if gaps.size > 1 else ""),
                          fix="copy the whole series into the folder (check the export for dropped files), or "
                              "convert it with dcm2niix, which interpolates or splits uneven stacks")
    small = np.flatnonzero(steps < (1.0 - SPACING_TOLERANCE) * step)
    if small.size:
        i = int(small[0])
        raise input_error(label, expected=f"evenly spaced slices ({step:.3f} mm apart, the median step)",
                          received=f"irregular slice spacing: {steps[i]:.3f} mm between {names[i]} and "
                                   f"{names[i + 1]}",
                          fix="keep only the files of one evenly spaced stack in the folder")
    first, last = geometry[0][2], geometry[-1][2]
    n = len(geometry)
    slice_vec = (last - first) / (n - 1)
    drift = slice_vec - normal * float(np.dot(slice_vec, normal))
    if float(np.linalg.norm(drift)) > 0.05 * max(step, 1e-6) + 1e-3:
        raise input_error(label, expected="slices stacked along their normal (no gantry tilt or shear)",
                          received=f"each slice shifted by {np.round(drift, 3).tolist()} mm in its plane (a tilted "
                                   "stack)",
                          fix="convert the series with dcm2niix (it corrects gantry tilt) and pass the NIfTI file")
    if rows * cols * n > max_voxels:
        raise input_error(label, expected=f"at most {max_voxels} voxels", received=f"{rows} x {cols} x {n}",
                          fix="crop or downsample the series first")

    stored = np.empty((rows, cols, n), dtype=np.float32)
    for k, (f, _ds, _ipp, _iop, _ps) in enumerate(geometry):
        image = load_image(f, format="dicom")
        if image.shape != (rows, cols):
            raise input_error(label, expected=f"pixel data of {rows} x {cols}", received=f"{f.name}: {image.shape}",
                              fix="re-export the series")
        stored[:, :, k] = image.pixels

    lps = np.eye(4)
    lps[:3, 0] = row_dir * float(ps0[0])
    lps[:3, 1] = col_dir * float(ps0[1])
    lps[:3, 2] = slice_vec
    lps[:3, 3] = first
    affine = _LPS_TO_RAS @ lps
    spacing = (float(ps0[0]), float(ps0[1]), float(np.linalg.norm(slice_vec)))
    mod = _norm_modality(modality or str(ds0.get("Modality") or ""))
    datasets = [g[1] for g in geometry]
    meta: dict[str, Any] = {
        "series_description": str(ds0.get("SeriesDescription", "")),
        "series_number": str(ds0.get("SeriesNumber", "")),
        "n_files": len(files), "skipped_not_dicom": skipped_other, "skipped_non_image": skipped_non_image,
        "slice_step_mm": float(np.linalg.norm(slice_vec)), "image_orientation_patient": iop0.round(6).tolist(),
        "files": names,
    }
    return _build(stored, spacing, affine, mod, str(root), "dicom", meta, datasets=datasets,
                  sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets])
