"""Kinds of image and the structures each kind can show: what makes a phrase *mismatched* for an image.

Training draws negatives from here ("the liver" on a brain MR, "polyp" on a chest X-ray: targets with an empty
mask and existence 0), and ``medvlm eval text-seg --all`` asks the same mismatched phrases to measure false
positives. Kinds that image the same body parts (chest radiographs, body CT and cardiac MR all show the heart;
a CT slice may show the lung bases) are *compatible*: none of them gives negatives to another, because such a
structure may well be in the image without a mask. Every structure name is canonical (medvlm.datasets).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["COMPATIBLE", "DATASET_KIND", "KIND_STRUCTURES", "kind_of", "mismatched_for_kind", "mismatched_structures"]

KIND_STRUCTURES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "chest_xray": ("heart", "left lung", "right lung", "lung", "left clavicle", "right clavicle"),
    "body_ct": ("liver", "kidney", "pancreas", "spleen"),
    "brain_mr": ("brain", "whole tumor", "tumor core", "enhancing tumor", "anterior hippocampus",
                 "posterior hippocampus", "hippocampus"),
    "cardiac_mr": ("left ventricle", "myocardium", "right ventricle"),
    "fetal_us": ("fetal head",),
    "skin": ("skin lesion",),
    "endoscopy": ("polyp",),
})
"""Kind of image -> the main structures annotated on it in ../shared/data (the candidates for negatives)."""

DATASET_KIND: Mapping[str, str] = MappingProxyType({
    "cxr_jsrt_scr": "chest_xray", "cxr_covid_v7_lungs": "chest_xray", "cxr_shenzhen_lungs": "chest_xray",
    "cxr_txv_tests": "chest_xray", "cxr_nih_bbox": "chest_xray",
    "ct_sam_med2d_demo": "body_ct", "ct_totalsegmentator_example": "body_ct", "ct_medsam2_lesions": "body_ct",
    "ct_curvas_abdomen": "body_ct", "ct_msd_spleen": "body_ct",
    "mr_hippocampus_msd": "brain_mr", "mr_brats2015_slices": "brain_mr",
    "mr_acdc_cardiac": "cardiac_mr",
    "us_hc18_fetal_head": "fetal_us",
    "derm_ham10000": "skin",
    "endo_kvasir_polyp": "endoscopy",
})
"""Dataset folder name -> kind of image."""

COMPATIBLE: tuple[frozenset[str], ...] = (frozenset({"chest_xray", "body_ct", "cardiac_mr"}),)
"""Groups of kinds that image overlapping anatomy: no negatives between members of one group."""

# a fetal head holds a brain: "brain" is no negative for fetal ultrasound
_NOT_NEGATIVE: Mapping[str, frozenset[str]] = MappingProxyType({"fetal_us": frozenset({"brain"})})


def kind_of(dataset: str) -> str | None:
    """The kind of image of dataset folder ``dataset`` (its name, or a path ending in it), or ``None``."""
    name = dataset.rstrip("/").rsplit("/", 1)[-1]
    return DATASET_KIND.get(name)


def mismatched_for_kind(kind: str) -> tuple[str, ...]:
    """Structures that cannot be in an image of kind ``kind`` (a key of :data:`KIND_STRUCTURES`): those of every
    kind neither equal nor compatible with it, minus its own, sorted; empty for an unknown kind."""
    if kind not in KIND_STRUCTURES:
        return ()
    near = {kind}.union(*(group for group in COMPATIBLE if kind in group))
    own = set(KIND_STRUCTURES[kind])
    out = {s for k, names in KIND_STRUCTURES.items() if k not in near for s in names}
    return tuple(sorted(out - own - _NOT_NEGATIVE.get(kind, frozenset())))


def mismatched_structures(dataset: str) -> tuple[str, ...]:
    """Structures that cannot be in an image of ``dataset`` (name or path): :func:`mismatched_for_kind` of its
    kind; empty for an unknown dataset."""
    kind = kind_of(dataset)
    return () if kind is None else mismatched_for_kind(kind)
