"""Synthetic DICOM objects for tests: a CT series written from a NIfTI volume, and a digital radiograph written
from a PNG. Made-up patients only (no real identifiers); shared by tests/test_volume.py and tests/test_pacs.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LPS_TO_RAS", "ct_dataset", "radiograph_dataset", "write_series"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def ct_dataset(pixels: np.ndarray, ipp: np.ndarray, iop: list[float], spacing: tuple[float, float],
               thickness: float, uids: dict[str, Any], number: int) -> Any:
    """One synthetic single-frame CT Image Storage instance (made-up patient, int16 HU, slope 1).

    ``uids``: ``study``, ``series``, ``frame`` (required), ``number`` (SeriesNumber), ``description``
    (SeriesDescription), ``modality`` (default CT), ``patient`` (PatientID), ``date`` (StudyDate), optional.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Synthetic^Volume", \
        uids.get("patient", "SYN0001"), "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = uids["frame"], ""
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = \
        uids.get("date", "20240101"), "120000", "1", "", ""
    ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = uids.get("modality", "CT"), "synthetic", \
        uids.get("number", 1), number
    ds.SeriesDescription = uids.get("description", "synthetic CT")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [round(float(v), 6) for v in ipp]
    ds.ImageOrientationPatient = [round(float(v), 6) for v in iop]
    ds.PixelSpacing = [round(float(spacing[0]), 6), round(float(spacing[1]), 6)]
    ds.SliceThickness = round(float(thickness), 6)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
    ds.PixelData = np.ascontiguousarray(pixels.astype("<i2")).tobytes()
    return ds


def write_series(folder: Path, data: np.ndarray, affine: np.ndarray, slices: list[int] | None = None, *,
                 uids: dict[str, Any] | None = None, seed: int = 0) -> list[str]:
    """Write stored NIfTI slices ``data[:, :, k]`` (RAS ``affine``) as one CT series, one file per slice.

    Pixel ``[row j, column i]`` is voxel ``(i, j, k)``; position, orientation and spacing come from the affine, so
    the series lies where the NIfTI does. Files get shuffled names (the reader must sort by position). Returns
    the SOP instance UIDs in slice order. ``uids``: see :func:`ct_dataset` (new UIDs when None).
    """
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    ids = uids or {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    ks = list(range(data.shape[2])) if slices is None else list(slices)
    a = np.asarray(affine, dtype=np.float64)
    col_dir = LPS_TO_RAS @ a[:3, 0] / np.linalg.norm(a[:3, 0])  # increasing column = stored axis 0
    row_dir = LPS_TO_RAS @ a[:3, 1] / np.linalg.norm(a[:3, 1])  # increasing row = stored axis 1
    spacing = (float(np.linalg.norm(a[:3, 1])), float(np.linalg.norm(a[:3, 0])))
    order = np.random.default_rng(seed).permutation(len(ks))
    sop_uids = []
    for n, k in enumerate(ks):
        ipp = LPS_TO_RAS @ (a @ np.array([0.0, 0.0, float(k), 1.0]))[:3]
        ds = ct_dataset(np.asarray(data[:, :, k]).T, ipp, [*col_dir, *row_dir], spacing,
                        float(np.linalg.norm(a[:3, 2])), ids, n + 1)
        ds.save_as(folder / f"IM{order[n]:04d}.dcm", enforce_file_format=True)
        sop_uids.append(str(ds.SOPInstanceUID))
    return sop_uids


def radiograph_dataset(pixels: np.ndarray, *, study: str | None = None, modality: str = "DX",
                       patient: str = "SYN0002", date: str = "20240102", spacing_mm: float = 0.2) -> Any:
    """One synthetic Digital X-Ray Image Storage (For Presentation) instance of ``pixels`` (``(H, W)`` uint8 or
    uint16, MONOCHROME2), a made-up patient, PA chest; ``modality`` "DX" or "CR" (the SOP class follows)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    arr = np.asarray(pixels)
    sop_class = ComputedRadiographyImageStorage if modality == "CR" else DigitalXRayImageStorageForPresentation
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Synthetic^Radiograph", patient, "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), generate_uid()
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = date, "090000", "2", \
        "", ""
    ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = modality, "synthetic", 1, 1
    ds.SeriesDescription, ds.BodyPartExamined, ds.ViewPosition = "chest PA", "CHEST", "PA"
    ds.PatientOrientation = ["L", "F"]  # rows toward the patient's left, columns toward the feet (a PA view)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if modality != "CR":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImagerPixelSpacing = [spacing_mm, spacing_mm]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    bits = 8 if arr.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = np.ascontiguousarray(arr.astype(np.uint8 if bits == 8 else "<u2")).tobytes()
    return ds
