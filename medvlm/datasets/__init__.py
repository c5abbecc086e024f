"""Readers for the annotated data folders of ``../shared/data``, all giving one :class:`Sample` schema.

>>> ds = open_dataset("cxr_jsrt_scr")            # by folder name (root: MEDVLM_DATA or ../shared/data)
>>> ds = open_dataset("/data/cxr_jsrt_scr")       # or by path
>>> sample = ds.load(ds.ids()[0])                 # image + masks (patient's left/right) + boxes
>>> train, val = split_ids(ds.ids(), 0.2, group=ds.group)

Readers are lazy: ``ids()`` lists samples without reading images, iteration loads one sample at a time.
See :mod:`medvlm.datasets.base` for the conventions (display orientation, vocabulary, non-empty masks).
CT/MR/ultrasound/dermoscopy/endoscopy folders (and whole 3D volumes for the MSD hippocampus) are read by
:mod:`medvlm.datasets.modalities`.
"""

from __future__ import annotations

import os
from pathlib import Path

from medvlm.datasets.base import (
    CXR_STRUCTURES,
    MODALITY_STRUCTURES,
    STRUCTURE_VOCABULARY,
    BoxAnnotation,
    Dataset,
    Sample,
    canonical_structure,
    split_ids,
)
from medvlm.datasets.ct import MedSam2Lesions, SamMed2dDemo, TotalSegmentatorExample
from medvlm.datasets.cxr import JsrtScr, NihBbox, ShenzhenLungs, TxvTests, V7CovidLungs
from medvlm.datasets.modalities import (
    AcdcCardiac,
    Brats2015Slices,
    CurvasAbdomen,
    Ham10000Lesions,
    Hc18FetalHead,
    KvasirPolyps,
    MsdHippocampus,
    MsdSpleen,
    VolumeSample,
)
from medvlm.errors import input_error

__all__ = [
    "CXR_STRUCTURES",
    "DATASETS",
    "MODALITY_STRUCTURES",
    "STRUCTURE_VOCABULARY",
    "AcdcCardiac",
    "BoxAnnotation",
    "Brats2015Slices",
    "CurvasAbdomen",
    "Dataset",
    "Ham10000Lesions",
    "Hc18FetalHead",
    "JsrtScr",
    "KvasirPolyps",
    "MedSam2Lesions",
    "MsdHippocampus",
    "MsdSpleen",
    "NihBbox",
    "SamMed2dDemo",
    "Sample",
    "ShenzhenLungs",
    "TotalSegmentatorExample",
    "TxvTests",
    "V7CovidLungs",
    "VolumeSample",
    "canonical_structure",
    "default_data_root",
    "open_dataset",
    "split_ids",
]

DATASETS: dict[str, type[Dataset]] = {
    cls.name: cls
    for cls in (JsrtScr, V7CovidLungs, NihBbox, ShenzhenLungs, TxvTests, SamMed2dDemo, TotalSegmentatorExample,
                MedSam2Lesions, CurvasAbdomen, MsdSpleen, MsdHippocampus, Brats2015Slices, AcdcCardiac, Hc18FetalHead,
                Ham10000Lesions, KvasirPolyps)
}
"""Folder name -> reader class."""

# Files that identify a folder whose name was changed (first match wins).
_SIGNATURES: tuple[tuple[str, str], ...] = (
    ("masks/right_clavicle", "cxr_jsrt_scr"),
    ("v7_json", "cxr_covid_v7_lungs"),
    ("BBox_List_2017.csv", "cxr_nih_bbox"),
    ("lungmasks", "cxr_shenzhen_lungs"),
    ("tbx11k", "cxr_txv_tests"),
    ("image2label_train.json", "ct_sam_med2d_demo"),
    ("labels", "mr_hippocampus_msd"),  # images/ + labels/ volumes and labels.json: before the TotalSegmentator marker
    ("labels.json", "ct_totalsegmentator_example"),
    ("masks/kidney", "ct_curvas_abdomen"),
    ("masks/spleen", "ct_msd_spleen"),
    ("masks/enhancing_tumor", "mr_brats2015_slices"),
    ("masks/myocardium", "mr_acdc_cardiac"),
    ("masks/fetal_head", "us_hc18_fetal_head"),
    ("masks/skin_lesion", "derm_ham10000"),
    ("masks/polyp", "endo_kvasir_polyp"),
)


def default_data_root() -> Path:
    """Where named data folders are looked up: ``$MEDVLM_DATA``, else ``../shared/data`` from the current
    directory, else ``shared/data`` beside the project checkout."""
    env = os.environ.get("MEDVLM_DATA")
    if env:
        return Path(env).expanduser()
    candidates = [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[3] / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def _detect(path: Path) -> str | None:
    if path.name in DATASETS:
        return path.name
    for marker, name in _SIGNATURES:
        if (path / marker).exists():
            return name
    if any(path.glob("CT_Lesion_*.npz")):
        return "ct_medsam2_lesions"
    return None


def open_dataset(name_or_path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Dataset:
    """Open a data folder by its name (looked up under ``root``, default :func:`default_data_root`) or by path.

    A path whose folder name is not a known one is recognised from its files (renamed copies). Unknown names
    raise :class:`~medvlm.errors.InputError` listing the known ones.
    """
    known = ", ".join(sorted(DATASETS))
    text = os.fspath(name_or_path)
    if not text.strip():
        raise input_error("open_dataset", expected=f"a dataset name ({known}) or a folder path", received="''",
                          fix="pass e.g. 'cxr_jsrt_scr'")
    candidate = Path(text).expanduser()
    if text in DATASETS:
        base = Path(root).expanduser() if root is not None else default_data_root()
        folder = base / text
        if not folder.is_dir() and root is None and candidate.is_dir():
            folder = candidate  # a folder of that name in the current directory
        if not folder.is_dir():
            raise input_error(f"open_dataset({text!r})", expected=f"the folder {folder}",
                              received="folder not found",
                              fix="set MEDVLM_DATA to the folder holding the data sets, or pass root=")
        return DATASETS[text](folder)
    if root is not None and not candidate.is_absolute() and (Path(root) / candidate).is_dir():
        candidate = Path(root).expanduser() / candidate
    if candidate.is_dir():
        name = _detect(candidate)
        if name is not None:
            return DATASETS[name](candidate)
        raise input_error(f"open_dataset({text!r})", expected=f"one of the known data folders: {known}",
                          received=f"a folder whose name and files match none of them ({candidate})",
                          fix="pass one of the known folder names or the path of such a folder")
    raise input_error(f"open_dataset({text!r})", expected=f"a known dataset name ({known}) or an existing folder",
                      received="an unknown name" if os.sep not in text else "a path that does not exist",
                      fix="pick one of the names listed, or pass the folder's path")
