"""Readers of the CT, MR, ultrasound, dermoscopy and endoscopy folders of ``../shared/data``.

Seven folders share one layout (see ``shared/data/README.md``): ``images/<id>.png``, one 0/255 PNG per structure
present in ``masks/<structure>/<id>.png`` (no file where the structure is absent), ``index.csv`` (id, modality,
site, view_or_sequence, spacing_mm, structures, case_id, source_file, extra columns) and ``SOURCES.md``. They are
read by :class:`IndexedPngDataset` subclasses. The eighth, ``mr_hippocampus_msd``, holds 3D NIfTI volumes with
label volumes and is read slice by slice by :class:`MsdHippocampus`, which also returns whole volumes
(:class:`VolumeSample`) for 3D evaluation.

Conventions (as in :mod:`medvlm.datasets.base`):

- Every mask is bool ``(H, W)`` on the pixel grid of ``sample.image``; ``sample.masks`` holds only the structures
  present on the image; mask names are the canonical names of ``STRUCTURE_VOCABULARY``
  (``masks/left_ventricle`` -> "left ventricle").
- Axial CT/MR slices come out in radiological display (anterior at the top, the patient's right on the image
  left). ``ct_msd_spleen`` is stored mirrored and is flipped horizontally (image and masks); the other axial
  folders are stored in that display already. Ultrasound, dermoscopy, endoscopy and the cardiac short-axis slices
  have no such convention and are kept as stored.
- ``image.spacing_mm`` is ``(row_mm, col_mm)`` from index.csv's ``spacing_mm`` column ("row col"), None when the
  column is empty (pixel size unknown).
- ``group(id)`` is index.csv's ``case_id`` (patient, volume or examination), so that
  ``split_ids(ds.ids(), group=ds.group)`` never puts one case on both sides.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from medvlm.datasets.base import (
    BoolArray,
    Dataset,
    Sample,
    canonical_structure,
    nonempty,
    read_mask_png,
)
from medvlm.datasets.ct import DISPLAY_NOTE, EIGHT_BIT_WINDOW, to_lps
from medvlm.errors import input_error
from medvlm.io import MedicalImage, load_image, load_volume

__all__ = [
    "AcdcCardiac",
    "Brats2015Slices",
    "CurvasAbdomen",
    "Ham10000Lesions",
    "Hc18FetalHead",
    "IndexedPngDataset",
    "KvasirPolyps",
    "MsdHippocampus",
    "MsdSpleen",
    "VolumeSample",
    "display_affine",
]

INDEX_COLUMNS: tuple[str, ...] = ("id", "modality", "site", "view_or_sequence", "spacing_mm", "structures",
                                  "case_id", "source_file")
"""Columns every ``index.csv`` of the shared layout has; further columns go to ``sample.meta`` (parsed)."""

AS_STORED_NOTE = "kept as stored (no anatomical display convention for this kind of image)"


def _read_index(path: Path, required: tuple[str, ...]) -> dict[str, dict[str, str]]:
    if not path.is_file():
        raise input_error(f"annotation table {path}", expected="an existing index.csv", received="file not found",
                          fix="check that the data folder is complete")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise input_error(f"annotation table {path}", expected=f"columns {', '.join(required)}",
                              received=f"missing {missing}", fix="use the index.csv shipped with the data folder")
        rows = list(reader)
    out: dict[str, dict[str, str]] = {}
    for row in rows:
        key = row["id"].strip()
        if not key or key in out:
            raise input_error(f"annotation table {path}", expected="unique, non-empty ids",
                              received=f"id {key!r} empty or repeated", fix="restore the data folder's index.csv")
        out[key] = row
    return out


def _value(text: str) -> Any:
    """A CSV cell as int, float, list of floats (space-separated numbers) or the stripped text; '' -> None."""
    text = text.strip()
    if not text:
        return None
    parts = text.split()
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        return text
    if len(numbers) > 1:
        return numbers
    value = numbers[0]
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def _spacing(text: str, what: str) -> tuple[float, float] | None:
    """index.csv ``spacing_mm`` ("row col" in mm, or one number for both) -> ``(row_mm, col_mm)``; '' -> None."""
    if not text.strip():
        return None
    try:
        values = [float(v) for v in text.split()]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) <= 0:
        raise input_error(f"{what} spacing_mm", expected="'row_mm col_mm' (positive numbers) or empty",
                          received=repr(text), fix="restore the data folder's index.csv")
    return (values[0], values[-1])


# ------------------------------------------------------------------------------------------ shared PNG layout


class IndexedPngDataset(Dataset):
    """A folder of the shared PNG layout: ``images/<id>.png``, ``masks/<folder>/<id>.png``, ``index.csv``.

    Ids are index.csv's ``id`` column, sorted; every listed image must exist. ``load(id)`` gives a :class:`Sample`:

    - ``image``: ``(H, W)`` float32, the stored 8-bit values (RGB images as BT.601 luminance, see
      ``image.meta["color"]`` and :meth:`image_rgb` for the colours), ``window`` = (127.5, 255), the identity
      for 8-bit values; ``spacing_mm`` ``(row_mm, col_mm)`` from index.csv or None; ``modality`` the DICOM code
      of :attr:`modality`.
    - ``masks``: canonical structure name -> bool ``(H, W)`` (``>= 128`` of the 0/255 PNG), for the mask files
      that exist; a structure of ``structures`` missing from ``masks`` is absent from the image.
    - ``meta``: case_id, site, view_or_sequence, source_file, ``structures_listed`` (index.csv, canonical names),
      ``orientation`` and the extra index.csv columns (numbers parsed; "a b" -> ``[a, b]``).

    Subclasses set ``name``, ``licence``, ``description``, ``structures`` (canonical names; the mask folder of a
    name is the name with ``_`` for spaces), :attr:`modality`, :attr:`orientation` and, for a folder stored
    mirrored left-right, ``mirror_lr = True`` (image and masks are then flipped horizontally on reading).
    """

    modality: ClassVar[str] = "unknown"
    """DICOM modality code given to every image (index.csv's modality column names it in words)."""
    orientation: ClassVar[str] = AS_STORED_NOTE
    """What the stored images look like and what the reader does to them (``sample.meta["orientation"]``)."""
    mirror_lr: ClassVar[bool] = False
    """True: the folder is stored mirrored left-right; image and masks are flipped horizontally on reading."""
    pixel_values: ClassVar[str] = "8-bit values as stored"
    """What the pixel values are (``image.meta["pixel_values"]``)."""

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self._index: dict[str, dict[str, str]] | None = None

    @staticmethod
    def mask_folder(structure: str) -> str:
        """Folder under ``masks/`` of a canonical structure name ("left ventricle" -> "left_ventricle")."""
        return structure.replace(" ", "_")

    def index(self) -> dict[str, dict[str, str]]:
        """Rows of ``index.csv`` (column -> raw text) by image id, in file order."""
        if self._index is None:
            self._index = _read_index(self.root / "index.csv", INDEX_COLUMNS)
        return self._index

    def _list_ids(self) -> list[str]:
        folder = self.root / "images"
        if not folder.is_dir():
            raise input_error(f"image folder {folder}", expected="an existing folder", received="folder not found",
                              fix="check that the data folder is complete")
        on_disk = {p.stem for p in folder.glob("*.png")}
        missing = sorted(set(self.index()) - on_disk)
        if missing:
            raise input_error(f"{self.root}/index.csv", expected="every listed image in images/",
                              received=f"{len(missing)} missing, e.g. {missing[:3]}", fix="restore the data folder")
        return sorted(self.index())

    def group(self, sample_id: str) -> str:
        """index.csv's ``case_id`` of the image (patient, volume or examination); the id itself if empty."""
        row = self.index().get(sample_id)
        case = row.get("case_id", "").strip() if row else ""
        return case or sample_id

    def cases(self) -> list[str]:
        """The distinct case ids (``group`` values), sorted."""
        return sorted({self.group(i) for i in self.ids()})

    def _extra_meta(self, sample_id: str, row: dict[str, str]) -> dict[str, Any]:
        """Folder-specific facts for ``sample.meta`` (subclass hook)."""
        return {}

    def _load(self, sample_id: str) -> Sample:
        row = self.index()[sample_id]
        path = self.root / "images" / f"{sample_id}.png"
        stored = load_image(path, modality=self.modality)
        listed = [canonical_structure(s) for s in row["structures"].split(";") if s.strip()]
        unknown = sorted(set(listed) - set(self.structures))
        if unknown:
            raise input_error(f"{self.name} index.csv row {sample_id!r}", expected=f"structures among "
                              f"{list(self.structures)}", received=f"{unknown}", fix="update the reader's structures")
        masks: dict[str, BoolArray] = {}
        for name in self.structures:
            mpath = self.root / "masks" / self.mask_folder(name) / f"{sample_id}.png"
            if not mpath.is_file():
                if name in listed:
                    raise input_error(f"mask {mpath}", expected="the mask file index.csv lists",
                                      received="file not found", fix="check that the data folder is complete")
                continue
            mask = read_mask_png(mpath)
            if mask.shape != stored.shape:
                raise input_error(f"mask {mpath}", expected=f"the image's shape {stored.shape}",
                                  received=f"shape {mask.shape}", fix="check that mask and image belong together")
            masks[name] = mask
        pixels, color = stored.pixels, stored.color
        if self.mirror_lr:
            pixels = pixels[:, ::-1]
            color = None if color is None else np.ascontiguousarray(color[:, ::-1])
            masks = {k: np.ascontiguousarray(v[:, ::-1]) for k, v in masks.items()}
        meta = dict(stored.meta)
        meta.update({"display": DISPLAY_NOTE if self.modality in ("CT", "MR") and "axial" in
                     row["view_or_sequence"] else AS_STORED_NOTE, "orientation": self.orientation,
                     "pixel_values": self.pixel_values})
        image = MedicalImage(np.ascontiguousarray(pixels), spacing_mm=_spacing(row["spacing_mm"], sample_id),
                             modality=self.modality, source=str(path), window=EIGHT_BIT_WINDOW, meta=meta,
                             color=color)
        sample_meta: dict[str, Any] = {
            "case_id": self.group(sample_id),
            "site": row["site"],
            "view_or_sequence": row["view_or_sequence"],
            "source_file": row["source_file"],
            "structures_listed": listed,
            "orientation": self.orientation,
        }
        for column, text in row.items():
            if column not in INDEX_COLUMNS and column is not None:
                value = _value(text or "")
                if value is not None:
                    sample_meta[column] = value
        sample_meta.update(self._extra_meta(sample_id, row))
        return Sample(id=sample_id, image=image, masks=nonempty(masks), source=str(path), licence=self.licence,
                      meta=sample_meta)

    def image_rgb(self, sample_id: str) -> npt.NDArray[np.uint8]:
        """The stored image as ``(H, W, 3)`` uint8 RGB (gray images repeated), on the grid and in the orientation
        of ``load(sample_id).image`` (flipped too where the reader flips); for colour folders (dermoscopy,
        endoscopy) whose :class:`MedicalImage` keeps only the luminance."""
        from PIL import Image

        if sample_id not in self:
            raise input_error(f"{self.name} sample", expected="an id of this dataset", received=repr(sample_id),
                              fix="take ids from dataset.ids()")
        path = self.root / "images" / f"{sample_id}.png"
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
        return np.ascontiguousarray(rgb[:, ::-1] if self.mirror_lr else rgb)


# ------------------------------------------------------------------------------------------------------ CT


class CurvasAbdomen(IndexedPngDataset):
    """CURVAS abdominal CT: 77 axial slices (512 x 512) of 10 CT volumes with liver, kidney and pancreas masks.

    Each slice was drawn by ONE of three radiologists (index.csv ``annotation_set`` 1-3, in ``sample.meta``); the
    raters differ systematically, so the masks are not a consensus. "kidney" is BOTH kidneys in one mask (the
    source has one kidney class). Stored in radiological display (liver on the image left): kept as stored.
    Pixels are 8-bit values of an undocumented CT window (not HU); spacing unknown (None). ``group`` = the CT
    volume (file-name prefix, ``10004_375`` -> ``10004``).
    """

    name = "ct_curvas_abdomen"
    licence = ("CC BY-NC 4.0 (CURVAS data, non-commercial use only, as stated by the source repository); cite "
               "Riera-Marin et al., CURVAS (arXiv:2505.08685; Zenodo 11147560)")
    description = "CURVAS abdominal CT slices with liver, kidney (both) and pancreas masks from three raters"
    structures = ("liver", "kidney", "pancreas")
    modality = "CT"
    orientation = "stored in radiological display (liver on the image left): kept as stored"
    pixel_values = "8-bit display values of an undocumented CT window, not HU"


class MsdSpleen(IndexedPngDataset):
    """MSD Task09 spleen CT: 12 axial slices (512 x 512) from 7 volumes with a spleen mask.

    Orientation: the source slices are MIRRORED left-right (patient's left, the spleen, on the image LEFT; spine
    at the bottom). The reader flips image and mask horizontally, so that every axial CT here follows
    radiological display (patient's right on the image left, spleen on the image right); the PNG on disk is the
    horizontal mirror of ``sample.masks["spleen"]``. Pixels are 8-bit values of an undocumented CT window (not
    HU); spacing unknown (None). ``group`` = the MSD volume (``10003_spleen_26`` -> ``spleen_26``).
    """

    name = "ct_msd_spleen"
    licence = ("CC BY-SA 4.0 (MSD Task09, Memorial Sloan Kettering Cancer Center); cite Antonelli et al., Nat "
               "Commun 2022, and Simpson et al., arXiv:1902.09063")
    description = "MSD Task09 spleen CT slices with spleen masks (un-mirrored to radiological display)"
    structures = ("spleen",)
    modality = "CT"
    mirror_lr = True
    orientation = ("stored left-right mirrored (patient's left on the image left): image and masks flipped "
                   "horizontally to radiological display")
    pixel_values = "8-bit display values of an undocumented CT window, not HU"


# ------------------------------------------------------------------------------------------------------ MR


class Brats2015Slices(IndexedPngDataset):
    """BraTS 2015 (2013 cases) brain MR: 64 axial slices (240 x 240, 1 mm) of 4 glioma patients, each slice as
    a FLAIR (``<case>_<zzz>_flair``) and a T1c (``<case>_<zzz>_t1c``) image with identical masks.

    Masks: "whole tumor" (labels 1-4), "tumor core" (1, 3, 4), "enhancing tumor" (4), "brain" (thresholded
    air). Stored in radiological display (rows anterior -> posterior, columns the patient's right -> left, from
    the NIfTI header): kept as stored. Pixels: 8-bit, per case and sequence the 0.5-99.5th brain percentiles of
    the normalised volume mapped to 0-255 (``meta["intensity_window"]`` in normalised units). ``meta`` also
    gives ``sequence`` ("FLAIR" / "T1c"), ``slice_z`` and ``slice_id`` (the id without the sequence).
    ``group`` = the patient.
    """

    name = "mr_brats2015_slices"
    licence = ("CC BY-NC-SA 3.0 CH (BraTS 2015, as distributed in the DeepMedic examples); cite Menze et al., "
               "IEEE TMI 2015, and Kamnitsas et al., MedIA 2017")
    description = "BraTS 2015 brain MR FLAIR and T1c slices with tumour-region and brain masks"
    structures = ("whole tumor", "tumor core", "enhancing tumor", "brain")
    modality = "MR"
    orientation = ("stored in radiological display (rows anterior->posterior, columns patient's right->left, "
                   "from the NIfTI header): kept as stored")
    pixel_values = "8-bit: per case and sequence, brain 0.5-99.5th percentiles of the normalised volume -> 0-255"

    def _extra_meta(self, sample_id: str, row: dict[str, str]) -> dict[str, Any]:
        slice_id, _, suffix = sample_id.rpartition("_")
        return {"sequence": {"flair": "FLAIR", "t1c": "T1c"}.get(suffix, suffix), "slice_id": slice_id}


class AcdcCardiac(IndexedPngDataset):
    """ACDC cardiac cine MR: 27 short-axis slices (resized to 512 x 512 by the source, aspect probably changed)
    with "left ventricle" (LV blood pool / cavity), "myocardium" (LV myocardium) and "right ventricle" (RV
    cavity) masks. Slice 10020 has no structure drawn: a legitimate sample with ``masks == {}``.

    Short-axis slices have no radiological left/right convention: kept as stored. Spacing unknown (None).
    ``group`` = the file stem (the source does not reveal the patient, so slices of one patient may fall on
    both sides of a split).
    """

    name = "mr_acdc_cardiac"
    licence = ("research only: the source states MIT for its Kaggle copy, but the ACDC (Creatis, Universite de "
               "Lyon) terms of use apply and are not stated; cite Bernard et al., IEEE TMI 2018")
    description = "ACDC cardiac cine MR short-axis slices with LV cavity, myocardium and RV masks"
    structures = ("left ventricle", "myocardium", "right ventricle")
    modality = "MR"
    orientation = "short-axis cine slice as stored (resized to 512 x 512 by the source; no display convention)"


# ------------------------------------------------------------------------------------------ ultrasound, optical


class Hc18FetalHead(IndexedPngDataset):
    """HC18 fetal head ultrasound: 240 B-mode images (mostly 800 x 540, W x H) of 194 examinations with a "fetal head"
    mask (the expert's ellipse outline, filled; outline pixels included).

    ``image.spacing_mm`` = (pixel size, pixel size) in mm from index.csv (isotropic, 0.054-0.327 mm);
    ``meta["head_circumference_mm"]`` is HC18's reference circumference. Kept as stored. ``group`` = the
    examination (numeric prefix, ``010_HC`` and ``010_2HC`` -> ``010``); the same mother may recur under another
    prefix.
    """

    name = "us_hc18_fetal_head"
    licence = ("CC BY 4.0 (HC18, Zenodo doi:10.5281/zenodo.1322001); cite van den Heuvel et al., PLoS ONE 2018")
    description = "HC18 fetal head ultrasound images with filled head-circumference ellipse masks"
    structures = ("fetal head",)
    modality = "US"
    orientation = "B-mode ultrasound frame as stored (no anatomical display convention)"


class Ham10000Lesions(IndexedPngDataset):
    """HAM10000 dermoscopy: 27 RGB photographs (600 x 450) with a "skin lesion" mask.

    ``image.pixels`` is the BT.601 luminance of the RGB image (``image.meta["color"]``); :meth:`image_rgb`
    gives the colours. Modality code "DMS" (DICOM dermoscopy). Spacing unknown (None); kept as stored.
    ``group`` = the image id (HAM10000 lesion ids are not available, so two images of one lesion may be split).
    The diagnosis is not recorded.
    """

    name = "derm_ham10000"
    licence = "CC BY-NC 4.0 (as stated by the source repository); cite Tschandl et al., Sci Data 2018 (HAM10000)"
    description = "HAM10000 dermoscopic images with skin lesion masks"
    structures = ("skin lesion",)
    modality = "DMS"
    orientation = "dermoscopic photograph as stored (no anatomical orientation)"
    pixel_values = "BT.601 luminance (0-255) of the stored RGB image; image_rgb() gives the colours"


class KvasirPolyps(IndexedPngDataset):
    """Kvasir-SEG colonoscopy: 16 RGB frames (562-626 x 449-547) with a "polyp" mask (several regions allowed).

    ``image.pixels`` is the BT.601 luminance of the RGB frame; :meth:`image_rgb` gives the colours. Modality
    code "ES" (DICOM endoscopy). Spacing: none (None); kept as stored. ``group`` = the frame id (Kvasir reveals
    no patient; near-duplicate frames may be split).
    """

    name = "endo_kvasir_polyp"
    licence = ("research and education only (Kvasir-SEG terms not stated by the source); cite Jha et al., MMM 2020 "
               "(Kvasir-SEG)")
    description = "Kvasir-SEG colonoscopy frames with polyp masks"
    structures = ("polyp",)
    modality = "ES"
    orientation = "colonoscopy frame as stored (no anatomical orientation)"
    pixel_values = "BT.601 luminance (0-255) of the stored RGB image; image_rgb() gives the colours"


# ------------------------------------------------------------------------------------------ MSD hippocampus 3D


_INDEX_TO_LPS = np.array([[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
"""``(k, row, col, 1)`` of a display-ordered volume -> ``(x_L, y_P, z_S, 1)`` of the LPS-ordered array."""


def display_affine(affine: npt.ArrayLike, transform: npt.ArrayLike,
                   stored_shape: tuple[int, ...]) -> npt.NDArray[np.float64]:
    """The ``(4, 4)`` voxel -> world (RAS+, mm) affine of a volume shown as axial slices.

    ``affine`` is the stored NIfTI affine (index ``(i, j, k)`` of the stored array -> world), ``transform`` the
    nibabel orientation transform that :func:`medvlm.datasets.ct.to_lps` returned for it and ``stored_shape``
    the stored ``(X, Y, Z)`` shape. The display volume is ``to_lps(volume)[0].transpose(2, 1, 0)``, shape
    ``(Z, H, W)``: axis 0 = slice index from inferior to superior, rows anterior -> posterior, columns the
    patient's right -> left; the returned matrix maps its ``(k, row, col, 1)`` to world millimetres.
    """
    from nibabel.orientations import inv_ornt_aff

    lps_affine = np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(np.asarray(transform), stored_shape[:3])
    return np.asarray(lps_affine @ _INDEX_TO_LPS, dtype=np.float64)


@dataclass(eq=False)
class VolumeSample:
    """One annotated 3D volume in the frame of its axial slice samples (for 3D evaluation).

    Attributes:
        id: the volume id (= ``group`` of its slices).
        image: ``(Z, H, W)`` float32 in scanner units: ``image[k]`` is the ``pixels`` of slice sample ``k``
            (axis 0 from inferior to superior; rows anterior -> posterior; columns the patient's right -> left).
        labels: canonical structure name -> bool ``(Z, H, W)``; only structures present in the volume.
        spacing_mm: voxel size ``(slice_mm, row_mm, col_mm)`` in millimetres.
        affine: ``(4, 4)`` float64 mapping ``(k, row, col, 1)`` of ``image`` to world RAS+ millimetres (see
            :func:`display_affine`); save predictions stacked like ``image`` with it.
        stored_affine: the NIfTI header's ``(4, 4)`` affine for the stored ``(i, j, k)`` array order.
        stored_shape: the stored ``(X, Y, Z)`` array shape.
        source: path of the image volume; ``label_source`` that of the label volume.
        licence: the licence terms of the volume and its labels.
        meta: facts (stored axis codes, orientation transform, label ids, window).
    """

    id: str
    image: npt.NDArray[np.float32]
    labels: dict[str, BoolArray]
    spacing_mm: tuple[float, float, float]
    affine: npt.NDArray[np.float64]
    stored_affine: npt.NDArray[np.float64]
    stored_shape: tuple[int, int, int]
    source: str = ""
    label_source: str = ""
    licence: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(Z, H, W)`` of :attr:`image` in voxels."""
        z, h, w = self.image.shape
        return (int(z), int(h), int(w))


class MsdHippocampus(Dataset):
    """MSD Task04 hippocampus MR: 100 cropped 3D volumes (about 35 x 50 x 35, 1 mm) with label volumes
    (``labels/<id>.nii.gz``; ``labels.json``: 1 = "anterior hippocampus" (head), 2 = "posterior hippocampus"
    (body and tail)).

    Samples: one per axial slice of each volume that has at least one label (as
    :class:`~medvlm.datasets.ct.TotalSegmentatorExample`; 2562 of the 3591 slices here), or every slice with
    ``all_slices=True``; listing reads the label volumes (all small; about half a second). Ids are
    ``<volume id>_z<kkk>`` with ``kkk`` the slice index from inferior to superior;
    ``group`` = the volume id (one volume per case). Volumes are reoriented from the NIfTI affine with
    :func:`~medvlm.datasets.ct.to_lps`, so that each slice shows rows anterior -> posterior and columns the
    patient's right -> left. The header affine is a plain translation (axis codes R, A, S) that SOURCES.md calls
    probably not the scanner orientation: the display's left/right rests on that header alone (do not read a
    hemisphere from it). Pixels in scanner units (float32); ``window`` = the volume's min-max, so that all
    slices of a volume display alike; ``spacing_mm`` ``(row_mm, col_mm)`` = (1, 1).

    ``sample.meta`` carries ``slice_index``, ``n_slices``, ``affine`` (stored NIfTI affine, 4 x 4 list),
    ``volume_shape`` (stored ``(X, Y, Z)``), ``display_affine`` and ``display_shape`` (see :class:`VolumeSample`).
    :meth:`volume` returns the whole volume stacked like the slices.
    """

    name = "mr_hippocampus_msd"
    licence = ("CC BY-SA 4.0 (MSD terms; Task04's own dataset.json is not in the source); cite Antonelli et al., "
               "Nat Commun 2022, and Simpson et al., arXiv:1902.09063")
    description = "MSD Task04 hippocampus MR volumes with anterior / posterior hippocampus labels"
    structures = ("anterior hippocampus", "posterior hippocampus")
    modality = "MR"
    orientation = ("reoriented from the NIfTI affine (stored R, A, S; a plain translation, probably not the "
                   "scanner orientation) to LPS; slice shown as rows A->P, columns R->L")

    def __init__(self, root: str | Path, *, all_slices: bool = False) -> None:
        super().__init__(root)
        self.all_slices = bool(all_slices)
        self._index: dict[str, dict[str, str]] | None = None
        self._label_names: dict[int, str] | None = None
        self._slices: dict[str, list[int]] = {}
        self._cache: dict[str, VolumeSample] = {}

    def index(self) -> dict[str, dict[str, str]]:
        """Rows of ``index.csv`` (id, shape, spacing_mm, dtypes, voxel counts, case_id, ...) by volume id."""
        if self._index is None:
            self._index = _read_index(self.root / "index.csv", ("id", "case_id"))
        return self._index

    def label_names(self) -> dict[int, str]:
        """``labels.json`` as label value -> raw name (``{1: "anterior_hippocampus", 2: "posterior_hippocampus"}``)."""
        if self._label_names is None:
            path = self.root / "labels.json"
            if not path.is_file():
                raise input_error(f"label table {path}", expected="labels.json (label value -> name)",
                                  received="file not found", fix="check that the data folder is complete")
            self._label_names = {int(k): str(v) for k, v in json.loads(path.read_text()).items()}
        return self._label_names

    def volume_ids(self) -> list[str]:
        """Volume ids (index.csv ids, sorted), each with ``images/<id>.nii.gz`` and ``labels/<id>.nii.gz``."""
        ids = sorted(self.index())
        missing = [i for i in ids if not (self._image_path(i).is_file() and self._label_path(i).is_file())]
        if missing:
            raise input_error(f"{self.root}/index.csv", expected="images/<id>.nii.gz and labels/<id>.nii.gz for "
                              "every listed volume", received=f"{len(missing)} incomplete, e.g. {missing[:3]}",
                              fix="restore the data folder")
        return ids

    def _image_path(self, volume_id: str) -> Path:
        return self.root / "images" / f"{volume_id}.nii.gz"

    def _label_path(self, volume_id: str) -> Path:
        return self.root / "labels" / f"{volume_id}.nii.gz"

    def _list_ids(self) -> list[str]:
        ids: list[str] = []
        for volume_id in self.volume_ids():
            data, spacing, affine = load_volume(self._label_path(volume_id))
            lps, _, _ = to_lps(data, affine, spacing)
            if self.all_slices:
                keep = list(range(lps.shape[2]))
            else:
                keep = [int(k) for k in np.flatnonzero((lps > 0).reshape(-1, lps.shape[2]).any(axis=0))]
            self._slices[volume_id] = keep
            ids += [f"{volume_id}_z{k:03d}" for k in keep]
        return ids

    def group(self, sample_id: str) -> str:
        """The volume id (``hippocampus_003_z012`` -> ``hippocampus_003``)."""
        return sample_id.rsplit("_z", 1)[0]

    def slices(self, volume_id: str) -> list[int]:
        """Slice indices (axis 0 of :meth:`volume`'s arrays) listed as samples for one volume."""
        self.ids()
        if volume_id not in self._slices:
            raise input_error(f"{self.name} volume", expected=f"one of {len(self._slices)} volume ids",
                              received=repr(volume_id), fix="take ids from dataset.volume_ids()")
        return list(self._slices[volume_id])

    def volume(self, volume_id: str) -> VolumeSample:
        """The whole volume and its labels, stacked like the slice samples (``image[k]`` = slice ``k``'s pixels,
        ``labels[name][k]`` = its mask); the last two volumes read are cached."""
        if volume_id in self._cache:
            return self._cache[volume_id]
        if volume_id not in self.index():
            raise input_error(f"{self.name} volume", expected=f"one of {len(self.index())} volume ids",
                              received=repr(volume_id), fix="take ids from dataset.volume_ids()")
        img_path, lab_path = self._image_path(volume_id), self._label_path(volume_id)
        img, spacing, affine = load_volume(img_path)
        lab, _lab_spacing, lab_affine = load_volume(lab_path)
        if img.shape != lab.shape or not np.allclose(affine, lab_affine, atol=1e-3):
            raise input_error(f"hippocampus pair {volume_id}", expected="image and labels on the same voxel grid",
                              received=f"shapes {img.shape} / {lab.shape}, affines equal: "
                                       f"{np.allclose(affine, lab_affine, atol=1e-3)}",
                              fix="restore the data folder")
        import nibabel as nib

        lps_img, lps_spacing, transform = to_lps(img, affine, spacing)
        lps_lab, _, _ = to_lps(np.rint(lab).astype(np.int32), affine, spacing)
        image = np.ascontiguousarray(lps_img.transpose(2, 1, 0), dtype=np.float32)
        labelmap = np.ascontiguousarray(lps_lab.transpose(2, 1, 0))
        names = self.label_names()
        labels: dict[str, BoolArray] = {}
        raw_names: dict[str, str] = {}
        for value in np.unique(labelmap):
            if value == 0:
                continue
            raw = names.get(int(value))
            if raw is None:
                raise input_error(f"{lab_path} label {int(value)}", expected=f"a label of labels.json {names}",
                                  received="an unknown label value", fix="update labels.json")
            name = canonical_structure(raw)
            labels[name] = labelmap == value
            raw_names[name] = raw
        lo, hi = float(image.min()), float(image.max())
        stored_shape = (int(img.shape[0]), int(img.shape[1]), int(img.shape[2]))
        vol = VolumeSample(
            id=volume_id, image=image, labels=labels,
            spacing_mm=(lps_spacing[2], lps_spacing[1], lps_spacing[0]),
            affine=display_affine(affine, transform, stored_shape),
            stored_affine=np.asarray(affine, dtype=np.float64), stored_shape=stored_shape,
            source=str(img_path), label_source=str(lab_path), licence=self.licence,
            meta={"stored_axcodes": "".join(str(c) for c in nib.aff2axcodes(affine)),
                  "ornt_transform_to_LPS": transform, "raw_label_names": raw_names,
                  "window": ((lo + hi) / 2.0, hi - lo) if hi > lo else None, "orientation": self.orientation},
        )
        if len(self._cache) >= 2:
            self._cache.pop(next(iter(self._cache)))
        self._cache[volume_id] = vol
        return vol

    def _load(self, sample_id: str) -> Sample:
        volume_id, k_text = sample_id.rsplit("_z", 1)
        k = int(k_text)
        vol = self.volume(volume_id)
        pixels = np.ascontiguousarray(vol.image[k])
        masks = {name: np.ascontiguousarray(m[k]) for name, m in vol.labels.items() if m[k].any()}
        stored_affine = vol.stored_affine.round(6).tolist()
        meta: dict[str, Any] = {"format": "nifti", "volume": vol.source, "slice_index": k, "n_slices": vol.shape[0],
                                "slice_thickness_mm": vol.spacing_mm[0], "display": DISPLAY_NOTE,
                                "orientation": self.orientation, "stored_axcodes": vol.meta["stored_axcodes"],
                                "affine": stored_affine}
        image = MedicalImage(pixels, spacing_mm=(vol.spacing_mm[1], vol.spacing_mm[2]), modality=self.modality,
                             source=vol.source, window=vol.meta["window"], meta=meta)
        sample_meta: dict[str, Any] = {
            "volume": volume_id, "label_file": vol.label_source, "slice_index": k, "n_slices": vol.shape[0],
            "affine": stored_affine, "volume_shape": list(vol.stored_shape),
            "display_affine": vol.affine.round(6).tolist(), "display_shape": list(vol.shape),
            "orientation": self.orientation,
            "raw_mask_names": {n: vol.meta["raw_label_names"][n] for n in masks},
        }
        return Sample(id=sample_id, image=image, masks=masks, source=vol.source, licence=self.licence,
                      meta=sample_meta)
