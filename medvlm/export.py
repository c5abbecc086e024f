"""Export masks to the files other tools read: PNG label map, a zip of per-region PNGs, NIfTI and DICOM SEG.

Every writer takes the masks of one image as bool arrays ``(H, W)`` on the ORIGINAL pixel grid of that image
(the grid :func:`medvlm.io.load_image` returns; x = column, y = row), in region order (region ``k`` = the
``k``-th mask, 1-based), and writes one file atomically. Library code: the HTTP server
(:mod:`medvlm.app.server`) serves these files, but nothing here needs it.

Formats, and the choices made:

- **PNG label map** (:func:`write_label_png`): one 8-bit PNG (16-bit when there are more than 255 regions),
  0 = background, ``k`` = region ``k``. Where regions overlap, the higher ``k`` wins, so an overlapped region
  loses pixels there; the zip, DICOM SEG and the API's JSON RLE masks keep every region whole.
- **zip of PNGs** (:func:`write_mask_zip`): ``<k>-<label slug>.png`` (0/255) per region plus ``regions.json``
  (``[{"id", "label", "file"}]``). Labels are reduced to ``[a-z0-9-]`` before they name a file, so a label such
  as ``../../etc/passwd`` never becomes a path.
- **NIfTI** (:func:`write_nifti`): a label map as above (uint8/uint16) with the source geometry
  (:class:`ExportGeometry`): for a NIfTI source, the slice keeps the source's array axes and its affine is
  the source affine moved to that slice, so the mask overlays the source volume in any viewer; for a DICOM
  source, the affine comes from ImagePositionPatient / ImageOrientationPatient / PixelSpacing (LPS turned to
  NIfTI's RAS); otherwise it is a diagonal of the pixel spacing (1 mm when unknown). The array is
  ``(rows, columns, 1)`` for PNG/JPEG/DICOM sources, indexed ``[row, column]`` as :mod:`medvlm.io` reads
  NIfTI, so :func:`medvlm.io.load_image` reads the same grid back.
- **DICOM SEG** (:func:`write_dicom_seg`, highdicom): a BINARY Segmentation with one segment per region
  (overlaps kept), referencing the source image's Study/Series/SOP Instance UIDs, its Frame of Reference and
  plane geometry when it has them. Only a DICOM source can be referenced; other sources raise
  :class:`~medvlm.errors.InputError`.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medvlm.errors import input_error, missing_dependency
from medvlm.io import MedicalImage, atomic_open

__all__ = [
    "ExportGeometry",
    "dicom_affine",
    "geometry_of",
    "label_map",
    "safe_slug",
    "segment_codes",
    "segment_descriptions",
    "write_dicom_seg",
    "write_label_png",
    "write_mask_zip",
    "write_nifti",
]

# LPS (DICOM patient coordinates) -> RAS (NIfTI world coordinates): x and y change sign.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class ExportGeometry:
    """Where the ``(H, W)`` pixel grid of an image lies in the world, for NIfTI export.

    ``shape``: ``(H, W)`` in pixels. ``spacing_mm``: ``(row_mm, col_mm)`` or None. ``affine``: ``(4, 4)``
    voxel index -> RAS millimetres of the array written (see ``slice_axis``). ``slice_axis``: the array axis
    (0, 1 or 2) of length 1 inserted into the ``(H, W)`` mask to make the 3D array written; None writes a 2D
    array. ``source``: "nifti", "dicom" or "none" (where the affine came from).
    """

    shape: tuple[int, int]
    affine: npt.NDArray[np.float64]
    slice_axis: int | None = 2
    spacing_mm: tuple[float, float] | None = None
    source: str = "none"
    notes: list[str] = field(default_factory=list)


def safe_slug(text: str, max_len: int = 40) -> str:
    """``text`` reduced to lowercase ``[a-z0-9-]`` (at most ``max_len`` characters, never empty): safe in a file
    name whatever the client sent (no ``/``, ``..`` or control characters)."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")[:max_len].strip("-")
    return slug or "region"


def _check_masks(masks: Sequence[npt.ArrayLike], shape: tuple[int, int] | None = None) -> list[npt.NDArray[np.bool_]]:
    out = [np.asarray(m).astype(bool) for m in masks]
    for k, m in enumerate(out, start=1):
        if m.ndim != 2 or m.size == 0:
            raise input_error(f"mask {k}", expected="a non-empty 2D mask (H, W)", received=f"shape {m.shape}",
                              fix="pass one (H, W) mask per region on the original pixel grid")
        want = shape if shape is not None else out[0].shape
        if m.shape != tuple(want):
            raise input_error(f"mask {k}", expected=f"shape {tuple(want)} (the image's H, W)",
                              received=f"shape {m.shape}", fix="pass masks on the original pixel grid of one image")
    return out


def label_map(masks: Sequence[npt.ArrayLike], shape: tuple[int, int]) -> npt.NDArray[np.integer[Any]]:
    """``(H, W)`` label map of ``masks`` (each bool ``(H, W)``): 0 background, ``k`` = mask ``k`` (1-based);
    the higher ``k`` wins where masks overlap. uint8 up to 255 masks, else uint16."""
    checked = _check_masks(masks, shape)
    if len(checked) > 65535:
        raise input_error("label map", expected="at most 65535 regions", received=f"{len(checked)}",
                          fix="export fewer regions per file")
    out = np.zeros(shape, dtype=np.uint8 if len(checked) <= 255 else np.uint16)
    for k, m in enumerate(checked, start=1):
        out[m] = k
    return out


def write_label_png(masks: Sequence[npt.ArrayLike], shape: tuple[int, int], path: str | os.PathLike[str]) -> Path:
    """Write the :func:`label_map` of ``masks`` as a PNG (8-bit, 16-bit beyond 255 regions). Returns the path."""
    from PIL import Image

    labels = label_map(masks, shape)
    with atomic_open(path, "wb") as fh:
        Image.fromarray(labels).save(fh, format="PNG")
    return Path(path)


def write_mask_zip(masks: Sequence[npt.ArrayLike], labels: Sequence[str], path: str | os.PathLike[str]) -> Path:
    """Write a zip with one 0/255 PNG per mask (``<k>-<slug of label>.png``) and ``regions.json``. Returns the path."""
    from PIL import Image

    checked = _check_masks(masks)
    if len(labels) != len(checked):
        raise input_error("mask zip labels", expected=f"one label per mask ({len(checked)})",
                          received=f"{len(labels)} labels", fix="pass the regions' labels in mask order")
    index = []
    with atomic_open(path, "wb") as fh, zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for k, (m, label) in enumerate(zip(checked, labels), start=1):
            name = f"{k}-{safe_slug(label)}.png"
            buf = io.BytesIO()
            Image.fromarray(np.where(m, 255, 0).astype(np.uint8)).save(buf, format="PNG")
            zf.writestr(name, buf.getvalue())
            index.append({"id": k, "label": str(label), "file": name})
        zf.writestr("regions.json", json.dumps(index, indent=2) + "\n")
    return Path(path)


# ---------------------------------------------------------------------------------------------------- NIfTI


def dicom_affine(ds: Any, shape: tuple[int, int]) -> npt.NDArray[np.float64] | None:
    """``(4, 4)`` RAS affine of a DICOM image's array indexed ``[row, column, 0]``; None without plane geometry.

    From ImagePositionPatient (centre of the first pixel, LPS mm), ImageOrientationPatient (direction of
    increasing column index, then of increasing row index) and PixelSpacing (row spacing, column spacing, mm);
    the third axis is the plane normal times SpacingBetweenSlices or SliceThickness (1 mm when absent).
    """
    try:
        ipp = [float(v) for v in ds.ImagePositionPatient]
        iop = [float(v) for v in ds.ImageOrientationPatient]
        spacing = [float(v) for v in ds.PixelSpacing]
    except (AttributeError, TypeError, ValueError):
        return None
    if len(ipp) != 3 or len(iop) != 6 or len(spacing) != 2 or not all(math.isfinite(v) for v in ipp + iop + spacing):
        return None
    along_col = np.array(iop[:3])  # moving one column to the right
    along_row = np.array(iop[3:])  # moving one row down
    normal = np.cross(along_col, along_row)
    thickness = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0) or 1.0
    lps = np.eye(4)
    lps[:3, 0] = along_row * spacing[0]
    lps[:3, 1] = along_col * spacing[1]
    lps[:3, 2] = normal * thickness
    lps[:3, 3] = ipp
    del shape  # the geometry does not depend on the size; kept in the signature for symmetry with geometry_of
    return _LPS_TO_RAS @ lps


def geometry_of(image: MedicalImage, dicom: Any = None) -> ExportGeometry:
    """The :class:`ExportGeometry` of ``image`` (read by :func:`medvlm.io.load_image`).

    ``dicom``: the source's pydicom Dataset (the header is enough) when the image came from DICOM, since
    :class:`~medvlm.io.MedicalImage` keeps no patient-coordinate geometry. A NIfTI source's geometry comes from
    ``image.meta`` (``affine``, ``slice_axis``, ``slice_index``, ``volume_shape``).
    """
    shape = image.shape
    spacing = image.spacing_mm
    meta = image.meta or {}
    if meta.get("format") == "nifti" and meta.get("affine") is not None:
        affine = np.asarray(meta["affine"], dtype=np.float64)
        axis, index = meta.get("slice_axis"), meta.get("slice_index")
        if axis is None:
            return ExportGeometry(shape, affine, None, spacing, "nifti")
        shift = np.eye(4)
        shift[int(axis), 3] = float(index or 0)
        return ExportGeometry(shape, affine @ shift, int(axis), spacing, "nifti")
    if dicom is not None:
        affine_d = dicom_affine(dicom, shape)
        if affine_d is not None:
            return ExportGeometry(shape, affine_d, 2, spacing, "dicom")
    row_mm, col_mm = spacing if spacing is not None else (1.0, 1.0)
    notes = [] if spacing is not None else ["pixel spacing unknown: 1 mm assumed"]
    return ExportGeometry(shape, np.diag([row_mm, col_mm, 1.0, 1.0]), 2, spacing, "none", notes)


def write_nifti(masks: Sequence[npt.ArrayLike], geometry: ExportGeometry, path: str | os.PathLike[str]) -> Path:
    """Write the :func:`label_map` of ``masks`` (bool ``(H, W)`` each) as NIfTI-1 with ``geometry``'s affine.

    ``path`` should end in ``.nii.gz`` (compressed) or ``.nii``. The array is the ``(H, W)`` map with a length-1
    axis inserted at ``geometry.slice_axis`` (none when it is None); qform and sform both hold the affine
    (code 1, scanner; 2 "aligned" for a NIfTI source, whose own codes are not kept). Returns the path.
    """
    import nibabel as nib

    labels = label_map(masks, geometry.shape)
    data = labels if geometry.slice_axis is None else np.expand_dims(labels, geometry.slice_axis)
    img = nib.Nifti1Image(data, geometry.affine)
    code = 2 if geometry.source == "nifti" else 1
    img.set_qform(geometry.affine, code=code)
    img.set_sform(geometry.affine, code=code)
    img.header.set_xyzt_units("mm")
    payload = img.to_bytes()
    if str(path).endswith(".gz"):
        import gzip

        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    with atomic_open(path, "wb") as fh:
        fh.write(payload)
    return Path(path)


# ----------------------------------------------------------------------------------------------- DICOM SEG

# Labels whose last words name a structure pydicom's SNOMED CT dictionary knows; anything else is coded as
# the generic "Anatomical Structure" and keeps its text in SegmentLabel.
_SCT_KEYWORDS = ("Heart", "Lung", "Clavicle", "Liver", "Spleen", "Kidney", "Stomach", "Pancreas", "Aorta",
                 "Trachea", "Esophagus", "Bladder", "Brain", "Rib", "Diaphragm", "Mediastinum", "Gallbladder",
                 "Duodenum", "Colon", "Nodule", "Mass")


def segment_codes(label: str) -> tuple[Any, Any]:
    """``(category, type)`` SNOMED CT codes (pydicom ``Code``) of a DICOM SEG segment named ``label``: the last
    word of the label that pydicom's SNOMED CT dictionary knows ("left lung" -> Lung), else the generic
    Anatomical Structure (the label text is kept in SegmentLabel); nodules and masses are morphologically
    abnormal structures. Shared by the 2D and the series DICOM SEG writers."""
    from pydicom.sr.codedict import codes

    category = codes.SCT.AnatomicalStructure
    words = re.findall(r"[a-z]+", label.lower())
    for word in reversed(words):
        key = word.capitalize()
        if key.endswith("s") and key[:-1] in _SCT_KEYWORDS:
            key = key[:-1]
        if key in _SCT_KEYWORDS:
            try:
                code = getattr(codes.SCT, key)
            except AttributeError:
                continue
            if key in ("Nodule", "Mass"):
                category = codes.SCT.MorphologicallyAbnormalStructure
            return category, code
    return category, codes.SCT.AnatomicalStructure


def segment_descriptions(labels: Sequence[str], software_version: str = "") -> list[Any]:
    """highdicom ``SegmentDescription``s, numbered 1.. in the order of ``labels`` (label text cut to 64
    characters, SNOMED CT codes from :func:`segment_codes`, algorithm "medvlm", automatic). Shared by the 2D and
    the series DICOM SEG writers."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name="medvlm", version=software_version or "0",
                                                   family=codes.cid7162.ArtificialIntelligence)
    out = []
    for k, label in enumerate(labels, start=1):
        category, kind = segment_codes(str(label))
        out.append(hd.seg.SegmentDescription(
            segment_number=k, segment_label=str(label)[:64] or f"segment {k}",
            segmented_property_category=category, segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm))
    return out


def write_dicom_seg(masks: Sequence[npt.ArrayLike], labels: Sequence[str], source: Any,
                    path: str | os.PathLike[str], *, frame_index: int | None = None,
                    series_description: str = "medvlm segmentation", software_version: str = "") -> Path:
    """Write a DICOM Segmentation (BINARY, one segment per mask) of ``source`` with highdicom. Returns the path.

    ``masks``: bool ``(H, W)`` on the source's pixel grid (``H`` = Rows, ``W`` = Columns), one per region;
    ``labels``: the SegmentLabel of each. ``source``: the pydicom Dataset of the image the masks were drawn on
    (PixelData may be absent: only the header is read). ``frame_index``: for a multi-frame source, the 0-based
    frame the masks belong to (the other frames get no segment pixels). The SEG references the source's
    Study/Series/SOP Instance UIDs and copies its patient and study module, as the standard requires.
    """
    if source is None:
        raise input_error("DICOM SEG export", expected="a DICOM source image", received="no DICOM source",
                          fix="segment a DICOM image to export DICOM SEG; use NIfTI or PNG otherwise")
    try:
        import highdicom as hd
    except ImportError as exc:
        raise missing_dependency("DICOM SEG export", "pip install highdicom") from exc
    rows, cols = int(source.Rows), int(source.Columns)
    checked = _check_masks(masks, (rows, cols))
    if not checked:
        raise input_error("DICOM SEG export", expected="at least one region with a mask", received="no masks",
                          fix="export a result that has regions")
    if len(labels) != len(checked):
        raise input_error("DICOM SEG labels", expected=f"one label per mask ({len(checked)})",
                          received=f"{len(labels)} labels", fix="pass the regions' labels in mask order")
    frames = int(source.get("NumberOfFrames") or 1)
    stack = np.stack(checked, axis=-1)  # (H, W, S)
    if frames > 1:
        if frame_index is None or not 0 <= frame_index < frames:
            raise input_error("DICOM SEG export", expected=f"frame_index in 0..{frames - 1} for a multi-frame source",
                              received=repr(frame_index), fix="pass the frame the masks were drawn on")
        pixels = np.zeros((frames, rows, cols, len(checked)), dtype=bool)
        pixels[frame_index] = stack
    else:
        pixels = stack[None]
    descriptions = segment_descriptions(labels, software_version)
    seg = hd.seg.Segmentation(
        source_images=[source], pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=9001,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medvlm", manufacturer_model_name="medvlm",
        software_versions=software_version or "0", device_serial_number="0",
        series_description=series_description[:64], omit_empty_frames=False)
    with atomic_open(path, "wb") as fh:
        seg.save_as(fh)
    return Path(path)
