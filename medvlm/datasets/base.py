"""One sample schema for every annotated data source, the reader interface, the structure vocabulary and splits.

Conventions (see :mod:`medvlm.types`):

- Every mask and box is on the pixel grid of :attr:`Sample.image` (``(H, W)``), in pixel xyxy for boxes.
- Images are in standard radiological display: chest X-rays as radiographs (patient's right on the IMAGE
  left), axial CT/MR slices with anterior at the top, the spine at the bottom and the patient's right on the
  image left. Readers whose files are stored otherwise flip or transpose image AND masks together and say so
  in ``sample.meta["orientation"]``.
- Structure names are the PATIENT's left/right ("left lung" lies on the image right) and come from
  :data:`STRUCTURE_VOCABULARY`.
- ``Sample.masks`` holds only non-empty masks: a structure the dataset annotates (``Dataset.structures``) that
  is missing from ``masks`` is absent from that image (or that slice).
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medvlm.errors import input_error
from medvlm.io import MedicalImage
from medvlm.types import Box, Mask

__all__ = [
    "CXR_STRUCTURES",
    "MODALITY_STRUCTURES",
    "STRUCTURE_VOCABULARY",
    "BoxAnnotation",
    "Dataset",
    "Sample",
    "canonical_structure",
    "split_ids",
]

BoolArray = npt.NDArray[np.bool_]

CXR_STRUCTURES: tuple[str, ...] = ("heart", "right lung", "left lung", "right clavicle", "left clavicle")
"""Chest X-ray anatomy annotated by SCR (JSRT); V7, Shenzhen and the torchxrayvision COVID mask give the lungs."""

# TotalSegmentator v2 "total" (117) and "total_mr" (50) class names, plus the v1 heart classes used by the
# SA-Med2D/SAM-Med2D slices and the AMOS names: the raw names every CT/MR reader may meet.
_TOTALSEG_RAW_NAMES = """
spleen kidney_right kidney_left gallbladder liver stomach pancreas adrenal_gland_right adrenal_gland_left
lung_upper_lobe_left lung_lower_lobe_left lung_upper_lobe_right lung_middle_lobe_right lung_lower_lobe_right
esophagus trachea thyroid_gland small_bowel duodenum colon urinary_bladder prostate kidney_cyst_left
kidney_cyst_right sacrum vertebrae_S1 vertebrae_L5 vertebrae_L4 vertebrae_L3 vertebrae_L2 vertebrae_L1
vertebrae_T12 vertebrae_T11 vertebrae_T10 vertebrae_T9 vertebrae_T8 vertebrae_T7 vertebrae_T6 vertebrae_T5
vertebrae_T4 vertebrae_T3 vertebrae_T2 vertebrae_T1 vertebrae_C7 vertebrae_C6 vertebrae_C5 vertebrae_C4
vertebrae_C3 vertebrae_C2 vertebrae_C1 heart aorta pulmonary_vein brachiocephalic_trunk subclavian_artery_right
subclavian_artery_left common_carotid_artery_right common_carotid_artery_left brachiocephalic_vein_left
brachiocephalic_vein_right atrial_appendage_left superior_vena_cava inferior_vena_cava
portal_vein_and_splenic_vein iliac_artery_left iliac_artery_right iliac_vena_left iliac_vena_right humerus_left
humerus_right scapula_left scapula_right clavicula_left clavicula_right femur_left femur_right hip_left hip_right
spinal_cord gluteus_maximus_left gluteus_maximus_right gluteus_medius_left gluteus_medius_right
gluteus_minimus_left gluteus_minimus_right autochthon_left autochthon_right iliopsoas_left iliopsoas_right brain
skull rib_left_1 rib_left_2 rib_left_3 rib_left_4 rib_left_5 rib_left_6 rib_left_7 rib_left_8 rib_left_9
rib_left_10 rib_left_11 rib_left_12 rib_right_1 rib_right_2 rib_right_3 rib_right_4 rib_right_5 rib_right_6
rib_right_7 rib_right_8 rib_right_9 rib_right_10 rib_right_11 rib_right_12 sternum costal_cartilages
lung_left lung_right vertebrae intervertebral_discs
heart_myocardium heart_atrium_left heart_ventricle_left heart_atrium_right heart_ventricle_right pulmonary_artery
postcava bladder uterus
""".split()  # noqa: SIM905

_WORD_MAP = {
    "clavicula": "clavicle",
    "vena": "vein",
    "autochthon": "autochthonous back muscle",
    "hip": "hip bone",
    "postcava": "inferior vena cava",
    "bladder": "urinary bladder",
}
_ORDINAL = {1: "1st", 2: "2nd", 3: "3rd"}


def canonical_structure(raw: str) -> str:
    """Map a raw class name (TotalSegmentator/AMOS style, e.g. ``"kidney_right"``) to a vocabulary name.

    Rules: the side moves to the front ("right kidney"); ``vertebrae_T9`` -> "T9 vertebra"; ``rib_left_9`` ->
    "left 9th rib"; ``lung_upper_lobe_left`` -> "left upper lobe"; ``lung_left`` -> "left lung";
    ``heart_atrium_left`` -> "left atrium"; ``clavicula`` -> "clavicle", ``vena`` -> "vein", ``hip`` ->
    "hip bone", ``autochthon`` -> "autochthonous back muscle"; underscores become spaces. Already canonical
    names (e.g. "right lung") come back unchanged.
    """
    text = raw.strip()
    if not text:
        raise input_error("canonical_structure", expected="a non-empty structure name", received=repr(raw),
                          fix="pass a class name such as 'kidney_right' or 'left lung'")
    vertebra = re.fullmatch(r"vertebrae?[_ ]([CTLS]\d{1,2})", text, flags=re.IGNORECASE)
    if vertebra:
        return f"{vertebra.group(1).upper()} vertebra"
    tokens = [t for t in re.split(r"[_\s]+", text.lower()) if t]
    side = ""
    for s in ("left", "right"):
        if s in tokens:
            side = s
            tokens.remove(s)
            break
    if tokens[:1] == ["rib"] and len(tokens) == 2 and tokens[1].isdigit():
        n = int(tokens[1])
        return f"{side} {_ORDINAL.get(n, f'{n}th')} rib".strip()
    if tokens[:1] == ["lung"] and len(tokens) > 1:
        tokens = tokens[1:]  # lung_upper_lobe_left -> "left upper lobe"
    elif tokens[:1] == ["heart"] and len(tokens) == 2 and tokens[1] in ("atrium", "ventricle", "myocardium"):
        tokens = tokens[1:]  # heart_atrium_left -> "left atrium"
    if tokens == ["portal", "vein", "and", "splenic", "vein"]:
        tokens = ["portal", "and", "splenic", "vein"]
    words = " ".join(t if (t == "vena" and tokens[i + 1:i + 2] == ["cava"])
                     or (t == "bladder" and tokens[i - 1:i] == ["urinary"]) else _WORD_MAP.get(t, t)
                     for i, t in enumerate(tokens))
    return f"{side} {words}".strip()


MODALITY_STRUCTURES: tuple[str, ...] = (
    "kidney", "anterior hippocampus", "posterior hippocampus", "whole tumor", "tumor core", "enhancing tumor",
    "fetal head", "skin lesion", "polyp",
)
"""Mask names of the CT/MR/ultrasound/dermoscopy/endoscopy folders (:mod:`medvlm.datasets.modalities`) that are
not TotalSegmentator names: "kidney" is BOTH kidneys in one mask (CURVAS has no left/right); the BraTS regions
("whole tumor" = labels 1-4, "tumor core" = 1, 3, 4, "enhancing tumor" = 4); the MSD hippocampus head
("anterior") and body + tail ("posterior"). Their other names (liver, pancreas, spleen, brain, myocardium,
left/right ventricle) are already in the vocabulary."""

STRUCTURE_VOCABULARY: frozenset[str] = frozenset(
    {*CXR_STRUCTURES, *MODALITY_STRUCTURES, "lesion", "lung", *(canonical_structure(n) for n in _TOTALSEG_RAW_NAMES)}
)
"""Every structure name a reader may put in :attr:`Sample.masks` (patient's left/right)."""


@dataclass
class BoxAnnotation:
    """A box-level finding: ``box`` in pixel xyxy of the sample's image, ``label`` the canonical finding name
    (lower case, e.g. "nodule", "cardiomegaly"), ``phrase`` natural text for grounding
    (e.g. "15 mm malignant lung nodule in the left upper lobe"); ``meta`` holds source columns."""

    box: Box
    phrase: str
    label: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class Sample:
    """One annotated 2D image.

    Attributes:
        id: unique and stable within its dataset (file stem, or stem + slice index).
        image: the image; ``spacing_mm`` is set when the source states it.
        masks: canonical structure name -> bool ``(H, W)`` on the image grid; only non-empty masks.
        boxes: box-level findings.
        source: path of the image file (or volume) it was read from.
        licence: the licence terms of this sample (image and annotation).
        meta: facts about the sample (view, age, sex, orientation fix, raw names, ...).
        ignore: optional bool ``(H, W)``: pixels to leave out of scoring (e.g. V7 "Ignore" polygons over
            devices); never a structure.
    """

    id: str
    image: MedicalImage
    masks: dict[str, BoolArray] = field(default_factory=dict)
    boxes: list[BoxAnnotation] = field(default_factory=list)
    source: str = ""
    licence: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    ignore: BoolArray | None = None

    def __post_init__(self) -> None:
        shape = self.image.shape
        for name, mask in list(self.masks.items()):
            self.masks[name] = _check_mask(mask, shape, f"Sample {self.id!r} mask {name!r}")
        if self.ignore is not None:
            self.ignore = _check_mask(self.ignore, shape, f"Sample {self.id!r} ignore mask")
        for ann in self.boxes:
            if not isinstance(ann, BoxAnnotation):
                raise input_error(f"Sample {self.id!r} boxes", expected="BoxAnnotation items",
                                  received=type(ann).__name__, fix="wrap each box in BoxAnnotation(box, phrase, label)")

    @property
    def structures(self) -> tuple[str, ...]:
        """Names of the structures present (non-empty masks) on this image."""
        return tuple(self.masks)

    def mask(self, name: str) -> Mask:
        """The mask of one structure as a :class:`~medvlm.types.Mask`."""
        if name not in self.masks:
            raise input_error(f"Sample {self.id!r} mask", expected=f"one of {sorted(self.masks)}",
                              received=repr(name), fix="use a structure name present on this sample")
        return Mask(self.masks[name])


def _check_mask(mask: Any, shape: tuple[int, int], what: str) -> BoolArray:
    arr = np.asarray(mask)
    if arr.shape != shape:
        raise input_error(what, expected=f"a mask of the image's shape {shape} (H, W)", received=f"shape {arr.shape}",
                          fix="resample or flip the mask onto the image grid before building the Sample")
    if arr.dtype != bool:
        raise input_error(what, expected="a bool mask", received=f"dtype {arr.dtype}",
                          fix="binarize it first (e.g. png >= 128)")
    return np.ascontiguousarray(arr)


class Dataset(ABC):
    """A lazy reader of one data folder: ``ids()`` lists samples, ``load(id)`` reads one, iteration reads one at
    a time (no image is kept in memory by the reader beyond a small per-volume cache).

    Class attributes: ``name`` (the folder name), ``licence`` (terms of the whole folder), ``structures`` (the
    mask names it annotates), ``findings`` (the box labels it annotates).
    """

    name: str = ""
    licence: str = ""
    structures: tuple[str, ...] = ()
    findings: tuple[str, ...] = ()
    description: str = ""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise input_error(f"{type(self).__name__}", expected=f"the data folder {self.name or 'of the dataset'}",
                              received=f"{self.root} (not a directory)",
                              fix="pass the folder's path, or set MEDVLM_DATA to the folder holding it")
        self._ids: list[str] | None = None

    @abstractmethod
    def _list_ids(self) -> list[str]:
        """All sample ids, in a stable order."""

    @abstractmethod
    def _load(self, sample_id: str) -> Sample:
        """Read one sample (the id is known to exist)."""

    def ids(self) -> list[str]:
        """Sample ids in a stable order (a new list each call)."""
        if self._ids is None:
            self._ids = self._list_ids()
        return list(self._ids)

    def group(self, sample_id: str) -> str:
        """The unit that must not straddle a train/val split (patient or volume); the id itself by default."""
        return sample_id

    def annotated(self, sample: Sample) -> tuple[str, ...]:
        """The structures ``sample``'s labels cover: one of them missing from ``sample.masks`` is absent from the
        image, so training may ask for it with an empty target ("not in this image"). Every structure of the
        folder by default; a folder that keeps only some of each image's labels answers the image's own masks,
        so an unlabelled organ is never taught as absent."""
        return self.structures

    def load(self, sample_id: str) -> Sample:
        """Read one sample by id; unknown ids raise :class:`~medvlm.errors.InputError`."""
        if self._ids is None:
            self._ids = self._list_ids()
        if sample_id not in self._id_set():
            shown = ", ".join(self._ids[:5]) + (", ..." if len(self._ids) > 5 else "")
            raise input_error(f"{self.name} sample", expected=f"an id of this dataset ({len(self._ids)} ids: {shown})",
                              received=repr(sample_id), fix="take ids from dataset.ids()")
        return self._load(sample_id)

    def _id_set(self) -> set[str]:
        cached: set[str] | None = getattr(self, "_id_set_cache", None)
        if cached is None:
            cached = set(self.ids())
            self._id_set_cache = cached
        return cached

    def __len__(self) -> int:
        return len(self.ids())

    def __iter__(self) -> Iterator[Sample]:
        for sample_id in self.ids():
            yield self.load(sample_id)

    def __contains__(self, sample_id: object) -> bool:
        return isinstance(sample_id, str) and sample_id in self._id_set()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r})"


def split_ids(
    ids: Iterable[str],
    val_fraction: float = 0.2,
    seed: int = 0,
    *,
    group: Callable[[str], str] | Mapping[str, str] | None = None,
) -> tuple[list[str], list[str]]:
    """Deterministic train/val split by hashing: an id goes to val when ``sha1(f"{seed}:{key}")`` read as a
    fraction in [0, 1) is below ``val_fraction``, where ``key`` is the id, or its group (``group(id)`` or
    ``group[id]``, e.g. ``dataset.group`` so that the slices of one volume or the images of one patient stay
    together).

    Each id's side depends only on its own key and the seed, so adding ids never moves existing ones. The
    realized fraction is close to ``val_fraction`` only for many ids (it may be 0 for tiny sets). Returns
    ``(train, val)``, each in input order.
    """
    if isinstance(ids, (str, bytes)):
        raise input_error("split_ids", expected="a list of ids", received="a single string",
                          fix="pass a list, e.g. dataset.ids()")
    items = list(ids)
    try:
        fraction = float(val_fraction)
    except (TypeError, ValueError) as exc:
        raise input_error("split_ids val_fraction", expected="a number in [0, 1]", received=repr(val_fraction),
                          fix="pass e.g. 0.2") from exc
    if not 0.0 <= fraction <= 1.0:
        raise input_error("split_ids val_fraction", expected="a number in [0, 1]", received=repr(val_fraction),
                          fix="pass e.g. 0.2")
    for sample_id in items:
        if not isinstance(sample_id, str):
            raise input_error("split_ids", expected="string ids", received=repr(sample_id),
                              fix="convert ids to str")
    seen: set[str] = set()
    dupes: set[str] = set()
    for sample_id in items:
        (dupes if sample_id in seen else seen).add(sample_id)
    if dupes:
        raise input_error("split_ids", expected="unique ids", received=f"duplicates {sorted(dupes)[:5]}",
                          fix="remove repeated ids before splitting")
    train: list[str] = []
    val: list[str] = []
    for sample_id in items:
        if group is None:
            key = sample_id
        elif callable(group):
            key = str(group(sample_id))
        else:
            key = str(group.get(sample_id, sample_id))
        digest = hashlib.sha1(f"{seed}:{key}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0**64
        (val if u < fraction else train).append(sample_id)
    return train, val


# ------------------------------------------------------------------------------------------------ helpers


def read_mask_png(path: Path, threshold: int = 128) -> BoolArray:
    """Read an 8-bit mask image (PNG or JPEG) as bool: ``value >= threshold`` (gray; RGB via its luminance)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L") if im.mode not in ("L", "1") else im)
    except (OSError, ValueError) as exc:
        raise input_error(f"mask {path}", expected="a readable PNG/JPEG mask", received=f"{exc}",
                          fix="check that the data folder is complete") from exc
    return np.asarray(arr >= threshold if arr.dtype != bool else arr, dtype=bool)


def split_left_right(mask: BoolArray) -> tuple[dict[str, BoolArray], str]:
    """Split a two-lung mask of a chest radiograph into ``{"right lung", "left lung"}`` (patient's sides).

    Radiographic display puts the patient's right lung on the IMAGE left. Each connected component goes to
    the side of the image its centroid lies on; a component spanning both sides (lungs touching) is cut at
    the column of least mask between 30% and 70% of the width. Returns the masks (non-empty only) and a note.
    """
    from scipy import ndimage

    w = mask.shape[1]
    labels, n = ndimage.label(mask)
    right = np.zeros_like(mask)
    left = np.zeros_like(mask)
    note = f"{n} connected component(s) assigned by centroid side (image left = patient's right)"
    mid = w / 2.0
    for k in range(1, n + 1):
        comp = labels == k
        cols = np.flatnonzero(comp.any(axis=0))
        cx = float(np.nonzero(comp)[1].mean()) + 0.5
        if n == 1 and cols[0] < 0.4 * w and cols[-1] >= 0.6 * w:
            lo, hi = int(0.3 * w), int(0.7 * w)
            cut = lo + int(np.argmin(comp[:, lo:hi].sum(axis=0)))
            right[:, :cut] |= comp[:, :cut]
            left[:, cut:] |= comp[:, cut:]
            note = f"one component spanning the midline, cut at column {cut}"
            continue
        (right if cx < mid else left)[comp] = True
    out = {name: m for name, m in (("right lung", right), ("left lung", left)) if m.any()}
    return out, note


def nonempty(masks: Mapping[str, BoolArray]) -> dict[str, BoolArray]:
    """Drop empty masks (the schema keeps only structures present on the image)."""
    return {k: v for k, v in masks.items() if v.any()}


def centroid_x(mask: BoolArray) -> float:
    """Mean column + 0.5 (pixel centre) of a non-empty mask."""
    return float(np.nonzero(mask)[1].mean()) + 0.5


def centroid_y(mask: BoolArray) -> float:
    """Mean row + 0.5 (pixel centre) of a non-empty mask."""
    return float(np.nonzero(mask)[0].mean()) + 0.5


def lateral_evidence(masks: Mapping[str, BoolArray]) -> int:
    """Votes on whether masks sit in radiological display (patient's right on the image left).

    Each left/right pair ("left X" vs "right X"), liver vs spleen, aorta vs inferior vena cava, and a lone liver
    or spleen on its expected side votes +1 (radiological) or -1 (mirrored). Returns the sign of the sum; 0 when
    there is no evidence.
    """
    votes = 0
    present = {k: v for k, v in masks.items() if v.any()}
    for name, m in present.items():
        if name.startswith("left "):
            partner = "right " + name[len("left "):]
            if partner in present:
                votes += 1 if centroid_x(m) > centroid_x(present[partner]) else -1
    for right_side, left_side in (("liver", "spleen"), ("inferior vena cava", "aorta")):
        if right_side in present and left_side in present:
            votes += 1 if centroid_x(present[right_side]) < centroid_x(present[left_side]) else -1
    for name, expected_left_half in (("liver", True), ("spleen", False)):
        if name in present:
            w = present[name].shape[1]
            votes += 1 if (centroid_x(present[name]) < w / 2) == expected_left_half else -1
    return int(np.sign(votes))

