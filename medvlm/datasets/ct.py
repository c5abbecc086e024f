"""CT/MR readers: SAM-Med2D demo slices, the TotalSegmentator example volumes, MedSAM2 lesion npz volumes.

Every slice comes out in standard radiological display (anterior at the top, spine at the bottom, the
patient's right on the image left), image and masks transformed together; ``sample.meta["orientation"]`` says
what was done to the stored array.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from medvlm.datasets.base import (
    BoolArray,
    Dataset,
    Sample,
    canonical_structure,
    lateral_evidence,
    read_mask_png,
)
from medvlm.errors import input_error
from medvlm.io import MedicalImage, load_image, load_volume

__all__ = ["MedSam2Lesions", "SamMed2dDemo", "TotalSegmentatorExample"]

DISPLAY_NOTE = "radiological display: anterior at the top, patient's right on the image left"
CT_SOFT_TISSUE_WINDOW = (40.0, 400.0)
EIGHT_BIT_WINDOW = (127.5, 255.0)
"""Identity window for images already stored as 8-bit display values (to_uint8 returns them unchanged)."""


# -------------------------------------------------------------------------------------------- SAM-Med2D demo


class SamMed2dDemo(Dataset):
    """SAM-Med2D demo: 5 axial slices (AMOS CT 512 x 512, two TotalSegmentator CT crops, one AMOS MR) with
    one 0/255 PNG per structure instance (``masks/<image>_<structure>_<instance>.png``).

    Orientation: the slices are stored with the spine at the TOP. The AMOS CT slices are only flipped
    vertically (liver already on the image left); the TotalSegmentator crops (s0114_111, s0619_32) and the AMOS
    MR slice are rotated 180 degrees, i.e. also mirrored left-right (their patient's-left structures lie on
    the image left, the liver of the MR on the image right). The reader flips vertically, and horizontally too
    for those, so that all come out in radiological display; for slices not in the table the horizontal flip
    is decided from the masks (left/right pairs, liver vs spleen, aorta vs IVC). Instances of one structure
    (``hip_left_000`` and ``_001``) are merged into one mask. Spacing is not stated: None. Pixel values are
    8-bit display values (window already applied).
    """

    name = "ct_sam_med2d_demo"
    licence = ("SAM-Med2D repo Apache-2.0; slices from SA-Med2D-20M: AMOS 2022 (CC BY 4.0) and TotalSegmentator "
               "(CC BY 4.0); cite AMOS, TotalSegmentator and SA-Med2D-20M")
    description = "SAM-Med2D demo CT/MR slices with organ masks"
    # stem -> (stored orientation fix, modality, why)
    ORIENTATION: ClassVar[dict[str, tuple[str, str, str]]] = {
        "amos_0004_75": ("flip_ud", "CT", "spine at top; liver already on the image left"),
        "amos_0006_90": ("flip_ud", "CT", "spine at top; liver already on the image left, spleen on the right"),
        "amos_0507_31": ("rot180", "MR", "spine at top; liver (large, with vessels) on the image right, aorta "
                                         "left of the spine's centre: judged visually, no mask to check"),
        "s0114_111": ("rot180", "CT", "spine at top; left lung lobes, left ventricle and left ribs on the image left"),
        "s0619_32": ("rot180", "CT", "sacrum/glutei at top; left hip bone and left gluteus on the image left"),
    }
    _mask_re = re.compile(r"^(?P<structure>.+)_(?P<instance>\d{3})$")

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self._mask_files: dict[str, list[tuple[str, str, Path]]] | None = None

    def _list_ids(self) -> list[str]:
        folder = self.root / "images"
        if not folder.is_dir():
            raise input_error(f"image folder {folder}", expected="an existing folder", received="folder not found",
                              fix="check that the data folder is complete")
        return sorted(p.stem for p in folder.glob("*.png"))

    def mask_files(self) -> dict[str, list[tuple[str, str, Path]]]:
        """``{image stem: [(raw structure, instance, path), ...]}``; each mask goes to the longest matching stem."""
        if self._mask_files is None:
            stems = sorted(self.ids(), key=len, reverse=True)
            out: dict[str, list[tuple[str, str, Path]]] = {s: [] for s in stems}
            folder = self.root / "masks"
            for p in sorted(folder.glob("*.png")) if folder.is_dir() else []:
                stem = next((s for s in stems if p.stem.startswith(s + "_")), None)
                match = self._mask_re.match(p.stem[len(stem) + 1:]) if stem else None
                if stem is None or match is None:
                    continue
                out[stem].append((match["structure"], match["instance"], p))
            self._mask_files = out
        return self._mask_files

    @property
    def structures(self) -> tuple[str, ...]:  # type: ignore[override]
        names = {canonical_structure(raw) for files in self.mask_files().values() for raw, _, _ in files}
        return tuple(sorted(names))

    def annotated(self, sample: Sample) -> tuple[str, ...]:
        """Only the slice's own masks: SA-Med2D-20M keeps a subset of each slice's labels and AMOS labels no lung,
        so the lungs of an AMOS slice (visible at the liver dome) are unlabelled there, not absent."""
        return tuple(sorted(sample.masks))

    def _load(self, sample_id: str) -> Sample:
        path = self.root / "images" / f"{sample_id}.png"
        fix, modality, why = self.ORIENTATION.get(sample_id, ("", _guess_modality(sample_id), ""))
        stored = load_image(path, modality=modality)
        masks: dict[str, BoolArray] = {}
        raw_names: dict[str, list[str]] = {}
        for raw, instance, mpath in self.mask_files().get(sample_id, []):
            m = read_mask_png(mpath)
            if m.shape != stored.shape:
                raise input_error(f"SAM-Med2D mask {mpath}", expected=f"the image's shape {stored.shape}",
                                  received=f"shape {m.shape}", fix="check that mask and image belong together")
            name = canonical_structure(raw)
            masks[name] = masks[name] | m if name in masks else m
            raw_names.setdefault(name, []).append(f"{raw}_{instance}")
        # Always flip vertically (spine at the top in storage); mirror left-right per the table or the masks.
        masks = {k: np.ascontiguousarray(v[::-1]) for k, v in masks.items()}
        if fix:
            mirror = fix == "rot180"
            decided_by = "table (checked against the masks in tests)"
        else:
            mirror = lateral_evidence(masks) < 0
            decided_by = "masks' left/right evidence"
            why = "not in the table"
        if mirror:
            masks = {k: np.ascontiguousarray(v[:, ::-1]) for k, v in masks.items()}
        pixels = stored.pixels[::-1, ::-1] if mirror else stored.pixels[::-1]
        meta = dict(stored.meta)
        meta.update({
            "display": DISPLAY_NOTE,
            "orientation": ("stored rotated 180 degrees (spine at top, left-right mirrored): flipped vertically "
                            "and horizontally") if mirror else "stored upside down (spine at top): flipped vertically",
            "orientation_fix": "rot180" if mirror else "flip_ud",
            "orientation_decided_by": decided_by,
            "orientation_evidence": why,
        })
        image = MedicalImage(np.ascontiguousarray(pixels), spacing_mm=None, modality=modality, source=str(path),
                             window=EIGHT_BIT_WINDOW, meta=meta)
        sample_meta: dict[str, Any] = {
            "orientation": meta["orientation"],
            "raw_mask_names": raw_names,
            "origin": "AMOS 2022" if sample_id.startswith("amos_") else "TotalSegmentator",
        }
        return Sample(id=sample_id, image=image, masks={k: v for k, v in masks.items() if v.any()}, source=str(path),
                      licence=self.licence, meta=sample_meta)


def _guess_modality(stem: str) -> str:
    match = re.match(r"amos_(\d+)", stem)
    if match:
        return "MR" if int(match.group(1)) >= 500 else "CT"  # AMOS: ids 0001-0500 CT, 0500+ MR
    return "CT"


# ------------------------------------------------------------------------------------- TotalSegmentator


def to_lps(volume: npt.NDArray[Any], affine: npt.NDArray[np.float64],
            spacing: tuple[float, float, float]) -> tuple[npt.NDArray[Any], tuple[float, float, float], list[Any]]:
    """Reorient a stored ``(X, Y, Z)`` array so that its axes point to patient Left, Posterior, Superior."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    transform = ornt_transform(io_orientation(affine), axcodes2ornt(("L", "P", "S")))
    out = apply_orientation(volume, transform)
    out_spacing = [0.0, 0.0, 0.0]
    for axis, (new_axis, _flip) in enumerate(transform):
        out_spacing[int(new_axis)] = float(spacing[axis])
    return out, (out_spacing[0], out_spacing[1], out_spacing[2]), transform.tolist()


class TotalSegmentatorExample(Dataset):
    """TotalSegmentator's example CT (122 x 101 x 30) and MR (117 x 91 x 20), 3 mm voxels, with its own
    multi-label segmentations; ``labels.json`` maps label ids to names per task ("total", "total_mr").

    One Sample per axial slice that has at least one label (here every slice: 30 CT + 20 MR). Volumes are
    reoriented (from the NIfTI affine: CT stored RAS, MR stored LPS) so that each slice is in radiological
    display: rows run anterior -> posterior, columns the patient's right -> left. Ids are
    ``<image stem>_z<kkk>`` with ``kkk`` the slice index counted from inferior to superior. Masks: one bool
    mask per label present on the slice, named with :func:`canonical_structure` ("kidney_right" -> "right
    kidney"). CT pixels in HU (window 40/400); MR in scanner units (min-max).
    """

    name = "ct_totalsegmentator_example"
    licence = "Apache-2.0 (TotalSegmentator repository; segmentations made by TotalSegmentator)"
    description = "TotalSegmentator example CT and MR volumes with multi-label organ segmentations"
    PAIRS: ClassVar[tuple[tuple[str, str, str, str], ...]] = (
        ("example_ct_sm.nii.gz", "example_seg.nii.gz", "total", "CT"),
        ("example_mr_sm.nii.gz", "example_seg_mr.nii.gz", "total_mr", "MR"),
    )

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self._labels: dict[str, Any] | None = None
        self._cache: dict[str, tuple[npt.NDArray[np.float32], npt.NDArray[np.int32], tuple[float, float, float],
                                     dict[str, Any]]] = {}
        self._slices: dict[str, list[int]] = {}

    def labels(self) -> dict[str, Any]:
        if self._labels is None:
            path = self.root / "labels.json"
            if not path.is_file():
                raise input_error(f"label table {path}", expected="labels.json (label id -> name per task)",
                                  received="file not found", fix="check that the data folder is complete")
            self._labels = json.loads(path.read_text())
        return self._labels

    def _pairs(self) -> list[tuple[str, str, str, str]]:
        return [p for p in self.PAIRS if (self.root / p[0]).is_file() and (self.root / p[1]).is_file()]

    @staticmethod
    def _stem(filename: str) -> str:
        return filename.removesuffix(".gz").removesuffix(".nii")

    def _volume(self, image_file: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32],
                                                tuple[float, float, float], dict[str, Any]]:
        """Image and label volumes in LPS order, spacing, and facts; the last two volumes are cached."""
        if image_file in self._cache:
            return self._cache[image_file]
        pair = next(p for p in self.PAIRS if p[0] == image_file)
        img, spacing, affine = load_volume(self.root / pair[0])
        seg, _seg_spacing, seg_affine = load_volume(self.root / pair[1])
        if img.shape != seg.shape or not np.allclose(affine, seg_affine, atol=1e-3):
            raise input_error(f"TotalSegmentator pair {pair[0]} / {pair[1]}",
                              expected="image and segmentation on the same voxel grid",
                              received=f"shapes {img.shape} / {seg.shape}, affines equal: "
                                       f"{np.allclose(affine, seg_affine, atol=1e-3)}",
                              fix="resample the segmentation onto the image first")
        import nibabel as nib

        lps_img, lps_spacing, transform = to_lps(img, affine, spacing)
        lps_seg, _, _ = to_lps(np.rint(seg).astype(np.int32), affine, spacing)
        facts = {"stored_axcodes": "".join(str(c) for c in nib.aff2axcodes(affine)), "stored_shape": list(img.shape),
                 "ornt_transform_to_LPS": transform, "voxel_spacing_mm": lps_spacing, "task": pair[2],
                 "modality": pair[3], "affine": np.asarray(affine).round(6).tolist()}
        if len(self._cache) >= 2:
            self._cache.pop(next(iter(self._cache)))
        self._cache[image_file] = (lps_img, lps_seg, lps_spacing, facts)
        return self._cache[image_file]

    def _list_ids(self) -> list[str]:
        ids: list[str] = []
        for image_file, seg_file, _task, _mod in self._pairs():
            data, spacing, affine = load_volume(self.root / seg_file)
            lps, _, _ = to_lps(data, affine, spacing)
            keep = [int(k) for k in np.flatnonzero((lps > 0).reshape(-1, lps.shape[2]).any(axis=0))]
            self._slices[image_file] = keep
            ids += [f"{self._stem(image_file)}_z{k:03d}" for k in keep]
        return ids

    def group(self, sample_id: str) -> str:
        return sample_id.rsplit("_z", 1)[0]

    @property
    def structures(self) -> tuple[str, ...]:  # type: ignore[override]
        names: set[str] = set()
        labels = self.labels()
        for _img, _seg, task, _mod in self._pairs():
            entry = labels.get(task, {})
            present = entry.get("labels_present") or entry.get("label_names", {})
            names.update(canonical_structure(n) for n in present.values())
        return tuple(sorted(names))

    def _load(self, sample_id: str) -> Sample:
        stem, k_text = sample_id.rsplit("_z", 1)
        k = int(k_text)
        image_file, seg_file, task, modality = next(p for p in self._pairs() if self._stem(p[0]) == stem)
        volume, labelmap, spacing, facts = self._volume(image_file)
        pixels = np.ascontiguousarray(volume[:, :, k].T)  # rows: posterior axis; columns: patient's left axis
        lab = np.ascontiguousarray(labelmap[:, :, k].T)
        names = self.labels().get(task, {}).get("label_names", {})
        masks: dict[str, BoolArray] = {}
        raw_names: dict[str, str] = {}
        for value in np.unique(lab):
            if value == 0:
                continue
            raw = names.get(str(int(value)))
            if raw is None:
                raise input_error(f"{seg_file} label {int(value)}", expected=f"a label listed in labels.json[{task!r}]",
                                  received="an unknown label id", fix="update labels.json for this segmentation")
            name = canonical_structure(raw)
            m = lab == value
            masks[name] = masks[name] | m if name in masks else m
            raw_names[name] = raw
        meta = {"format": "nifti", "volume": image_file, "slice_index": k, "n_slices": int(volume.shape[2]),
                "slice_thickness_mm": spacing[2], "display": DISPLAY_NOTE,
                "orientation": "reoriented from the NIfTI affine to LPS; slice shown as rows A->P, columns R->L",
                **facts}
        image = MedicalImage(pixels, spacing_mm=(spacing[1], spacing[0]), modality=modality,
                             source=str(self.root / image_file),
                             window=CT_SOFT_TISSUE_WINDOW if modality == "CT" else None, meta=meta)
        sample_meta = {"volume": image_file, "segmentation": seg_file, "task": task, "slice_index": k,
                       "raw_mask_names": raw_names, "orientation": meta["orientation"],
                       "annotation": "made by TotalSegmentator itself (model output, not manual)"}
        return Sample(id=sample_id, image=image, masks=masks, source=str(self.root / image_file),
                      licence=self.licence, meta=sample_meta)


# ---------------------------------------------------------------------------------------------- MedSAM2 npz


def _npz_shape(path: Path, member: str = "imgs") -> tuple[int, ...]:
    """Shape of one array in an .npz, read from its .npy header without decompressing the data."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{member}.npy") as fh:
            version = np.lib.format.read_magic(fh)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _fortran, _dtype = reader(fh)
    except (KeyError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise input_error(f"npz {path}", expected=f"an .npz holding '{member}'", received=f"{exc}",
                          fix="check that the file is a complete MedSAM2 npz") from exc
    return tuple(int(s) for s in shape)


def display_transform(direction: npt.ArrayLike | None) -> tuple[bool, bool, bool, str]:
    """From an ITK direction (9 values, row-major; columns = index axes x, y, z in LPS) find how to show an
    ``[y, x]`` slice in radiological display. Returns ``(transpose, flip_rows, flip_cols, note)``."""
    if direction is None or np.size(direction) != 9:
        return False, False, False, "no direction stored: stored order kept"
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    col_axis = int(np.argmax(np.abs(d[0, :2])))  # index axis (0 = x, 1 = y) running along patient L
    row_axis = 1 - col_axis
    transpose = col_axis == 1
    flip_cols = bool(d[0, col_axis] < 0)
    flip_rows = bool(d[1, row_axis] < 0)
    parts = ["transposed (stored rows run right->left)"] if transpose else []
    if flip_rows:
        parts.append("rows flipped")
    if flip_cols:
        parts.append("columns flipped")
    return transpose, flip_rows, flip_cols, ", ".join(parts) or "stored order is already radiological"


class MedSam2Lesions(Dataset):
    """MedSAM2 RECIST lesion crops: 6 npz volumes (``imgs`` and ``gts`` of shape ``(Z, 512, 512)`` uint8, the
    image already windowed to 8 bit; ``spacing`` = (x, y, z) mm; ``direction``; ``origin``).

    One Sample per slice (all slices, so that lesion-free slices serve as negatives); id
    ``<npz stem>_s<kk>``; mask "lesion" where ``gts > 0`` (absent from ``masks`` on lesion-free slices). The
    stored ``direction`` swaps x and y, so every slice is transposed (image and mask) into radiological display
    (spine at the bottom); spacing ``(row_mm, col_mm)`` follows the transpose. Pixel values are 8-bit display
    values, not HU (window 127.5/255 = identity).
    """

    name = "ct_medsam2_lesions"
    licence = "MedSAM2 repo Apache-2.0; images under DeepLesion / FLARE25 terms"
    structures = ("lesion",)
    description = "DeepLesion CT lesion crops (MedSAM2 RECIST npz) with 3D lesion masks"

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self._cache: tuple[str, dict[str, npt.NDArray[Any]]] | None = None

    def _files(self) -> list[Path]:
        return sorted(self.root.glob("*.npz"))

    def _list_ids(self) -> list[str]:
        ids: list[str] = []
        for path in self._files():
            shape = _npz_shape(path)
            if len(shape) != 3:
                raise input_error(f"npz {path} imgs", expected="a (Z, H, W) array", received=f"shape {shape}",
                                  fix="use MedSAM2 RECIST npz files")
            ids += [f"{path.stem}_s{k:02d}" for k in range(shape[0])]
        return ids

    def group(self, sample_id: str) -> str:
        match = re.match(r"(CT_Lesion_\d+)_", sample_id)
        return match.group(1) if match else sample_id.rsplit("_s", 1)[0]

    def _arrays(self, path: Path) -> dict[str, npt.NDArray[Any]]:
        if self._cache is None or self._cache[0] != str(path):
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: np.asarray(z[k]) for k in z.files}
            for key in ("imgs", "gts"):
                if key not in arrays:
                    raise input_error(f"npz {path}", expected="arrays 'imgs' and 'gts'", received=f"{sorted(arrays)}",
                                      fix="use MedSAM2 RECIST npz files")
            if arrays["imgs"].shape != arrays["gts"].shape:
                raise input_error(f"npz {path}", expected="imgs and gts of the same shape",
                                  received=f"{arrays['imgs'].shape} and {arrays['gts'].shape}",
                                  fix="use MedSAM2 RECIST npz files")
            self._cache = (str(path), arrays)
        return self._cache[1]

    def _load(self, sample_id: str) -> Sample:
        stem, k_text = sample_id.rsplit("_s", 1)
        k = int(k_text)
        path = self.root / f"{stem}.npz"
        arrays = self._arrays(path)
        img = arrays["imgs"][k]
        gt = arrays["gts"][k] > 0
        spacing = arrays.get("spacing")
        direction = arrays.get("direction")
        transpose, flip_rows, flip_cols, note = display_transform(direction)
        row_axis, col_axis = (0, 1) if transpose else (1, 0)  # index axes x = 0, y = 1 along rows / columns
        if transpose:
            img, gt = img.T, gt.T
        if flip_rows:
            img, gt = img[::-1], gt[::-1]
        if flip_cols:
            img, gt = img[:, ::-1], gt[:, ::-1]
        spacing_mm = None
        meta: dict[str, Any] = {"format": "npz", "slice_index": k, "n_slices": int(arrays["imgs"].shape[0]),
                                "display": DISPLAY_NOTE, "orientation": note,
                                "pixel_values": "8-bit display values of a CT window, not HU"}
        if spacing is not None and np.size(spacing) >= 2:
            sp = [float(v) for v in np.ravel(spacing)]
            spacing_mm = (sp[row_axis], sp[col_axis])
            if len(sp) >= 3:
                meta["slice_thickness_mm"] = sp[2]
            meta["spacing_xyz_mm"] = sp
        if direction is not None:
            meta["direction"] = [float(v) for v in np.ravel(direction)]
        image = MedicalImage(np.ascontiguousarray(img, dtype=np.float32), spacing_mm=spacing_mm, modality="CT",
                             source=str(path), window=EIGHT_BIT_WINDOW, meta=meta)
        masks = {"lesion": np.ascontiguousarray(gt)} if gt.any() else {}
        sample_meta = {"volume": path.name, "slice_index": k, "orientation": note,
                       "lesion_on_slice": bool(gt.any())}
        return Sample(id=sample_id, image=image, masks=masks, source=str(path), licence=self.licence,
                      meta=sample_meta)
