"""Results kept on the server for download: ``DATA_DIR/results/<result_id>/``.

Each result folder holds ``result.json`` (the endpoint's JSON answer, masks as RLE), ``image.json`` (the
source image's size, spacing, modality and the geometry facts the NIfTI export needs), ``image.png`` (the
image windowed to 8 bits, for viewers that cannot read DICOM/NIfTI) and, for a DICOM
source, ``source.dcm``: the source header without its pixel data, which the DICOM SEG export must reference
(it carries the patient and study module, so the folder is as sensitive as the upload; it is deleted with
the result). Exports (``masks.png``, ``masks.zip``, ``masks.nii.gz``, ``masks.dcm``) are written on first
request and kept beside them.

At most ``max_results`` results are kept; saving one more deletes the oldest. A result also expires
``ttl_s`` seconds after it was saved (``medvlm serve --ttl``): asking for an expired result deletes it and
answers 404, and a sweep (at start, then at most every ``sweep_every_s`` on access) deletes every expired
folder, so results nobody asks for again do not stay on disk either. ``DELETE /v1/results/{id}``
(:meth:`ResultStore.delete`) removes one at once. Result ids are 32 random hex digits made here; a requested
id is matched against that pattern before it touches the file system.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from medvlm.app.server.errors import ApiError
from medvlm.io import atomic_open
from medvlm.outputs import write_json_atomic

__all__ = ["EXPORTS", "ResultStore", "new_id"]

_ID = re.compile(r"^[0-9a-f]{32}$")

#: export name -> (file name, media type)
EXPORTS: dict[str, tuple[str, str]] = {
    "png": ("masks.png", "image/png"),
    "zip": ("masks.zip", "application/zip"),
    "nii.gz": ("masks.nii.gz", "application/gzip"),
    "dcm": ("masks.dcm", "application/dicom"),
}


def new_id() -> str:
    """A fresh random id: 32 lowercase hex digits."""
    return uuid.uuid4().hex


def check_id(value: str, what: str = "result") -> str:
    """``value`` when it is an id this server could have made, else 404 (never a path)."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ApiError(404, "not_found", f"no {what} with this id", expected=f"a {what} id: 32 hex digits",
                       fix=f"use the {what}_id returned by the request that made it" if what == "result"
                       else f"use the id returned by POST /v1/{what}s")
    return value


def strip_pixels(dicom_bytes: bytes) -> bytes:
    """The DICOM file ``dicom_bytes`` without its pixel data (the header is all an export needs)."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes), stop_before_pixels=True)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def _not_found(result_id: str = "", expired: bool = False) -> ApiError:
    return ApiError(404, "not_found", "no result with this id (it expired: results are kept --ttl seconds)" if expired
                    else "no result with this id (unknown, deleted, expired, or evicted as one of the oldest)",
                    expected="the result_id of a recent request", fix="repeat the request to get a new result_id")


class ResultStore:
    """Saves, finds, exports, expires and evicts results under ``root`` (thread-safe).

    ``ttl_s``: seconds a result is kept after it was saved (0 = until evicted); ``sweep_every_s``: least time
    between two sweeps of expired folders triggered by requests (default: a tenth of ``ttl_s``, at most 60 s).
    """

    def __init__(self, root: Path, max_results: int, ttl_s: float = 0.0, sweep_every_s: float | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_results = int(max_results)
        self.ttl_s = float(ttl_s)
        self.sweep_every_s = float(sweep_every_s if sweep_every_s is not None else min(60.0, self.ttl_s / 10.0))
        self._lock = threading.Lock()
        self._last_sweep = float("-inf")

    def _dir(self, result_id: str) -> Path:
        return self.root / check_id(result_id)

    # ------------------------------------------------------------------------------------------------ expiry

    def _age_s(self, folder: Path, now: float) -> float | None:
        """Seconds since ``folder`` was saved (its result.json, else the folder itself: a save cut short), or
        None when it is gone."""
        for path in (folder / "result.json", folder):
            try:
                return now - path.stat().st_mtime
            except FileNotFoundError:
                continue
        return None

    def _expired(self, folder: Path, now: float | None = None) -> bool:
        if self.ttl_s <= 0:
            return False
        age = self._age_s(folder, time.time() if now is None else now)
        return age is not None and age > self.ttl_s

    def sweep(self) -> int:
        """Delete every expired result folder (and folders of saves cut short, once as old); returns how many."""
        self._last_sweep = time.monotonic()
        if self.ttl_s <= 0:
            return 0
        now = time.time()
        removed = 0
        with self._lock:
            for folder in list(self.root.iterdir()):
                if folder.is_dir() and _ID.match(folder.name) and self._expired(folder, now):
                    shutil.rmtree(folder, ignore_errors=True)
                    removed += 1
        return removed

    def maybe_sweep(self) -> None:
        """:meth:`sweep` when the last one is more than ``sweep_every_s`` old."""
        if self.ttl_s > 0 and time.monotonic() - self._last_sweep >= self.sweep_every_s:
            self.sweep()

    def delete(self, result_id: str) -> None:
        """Delete a result and every file of it (exports and the DICOM header included); 404 when unknown."""
        folder = self._dir(result_id)
        with self._lock:
            if not folder.is_dir():
                raise _not_found(result_id)
            shutil.rmtree(folder, ignore_errors=True)

    def save(self, result_id: str, payload: dict[str, Any], image: Any, dicom_header: bytes | None = None) -> None:
        """Keep ``payload`` (the JSON answer; regions with RLE masks) of ``image`` (a MedicalImage) under
        ``result_id``; ``dicom_header``: the source DICOM without pixels, for DICOM SEG."""
        folder = self._dir(result_id)
        folder.mkdir(parents=True, exist_ok=True)
        meta = image.meta or {}
        info = {"height": image.height, "width": image.width,
                "spacing_mm": list(image.spacing_mm) if image.spacing_mm else None, "modality": image.modality,
                "meta": {k: meta.get(k) for k in ("format", "affine", "slice_axis", "slice_index", "volume_shape",
                                                  "frame_index", "number_of_frames") if k in meta},
                "created": time.time()}
        if dicom_header is not None:
            (folder / "source.dcm").write_bytes(dicom_header)
        # the display rendering behind image.png; fast compression: it is written for every result (30 ms, not
        # the 130 ms of the default level on a 1024 x 1024 radiograph)
        from PIL import Image

        with atomic_open(folder / "image.png", "wb") as fh:
            Image.fromarray(image.to_uint8()).save(fh, format="PNG", compress_level=1)
        write_json_atomic(info, folder / "image.json")
        write_json_atomic(payload, folder / "result.json")  # last: a folder without it is incomplete
        self._evict()
        self.maybe_sweep()

    def _evict(self) -> None:
        with self._lock:
            now = time.time()
            ages = [(age, p) for p in self.root.iterdir() if p.is_dir() and (p / "result.json").exists()
                    and (age := self._age_s(p, now)) is not None]
            if len(ages) <= self.max_results:
                return
            ages.sort(key=lambda item: -item[0])  # oldest first
            for _, old in ages[: len(ages) - self.max_results]:
                shutil.rmtree(old, ignore_errors=True)

    def payload(self, result_id: str) -> dict[str, Any]:
        """The saved JSON answer; 404 when unknown, deleted, evicted or expired (an expired one is deleted now)."""
        folder = self._dir(result_id)
        self.maybe_sweep()
        if self._expired(folder):
            with self._lock:
                shutil.rmtree(folder, ignore_errors=True)
            raise _not_found(result_id, expired=True)
        try:
            return dict(json.loads((folder / "result.json").read_text()))
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            raise _not_found(result_id) from None

    def file(self, result_id: str, name: str) -> Path:
        """Path of a file kept with a live result (``image.png``); 404 when the result or the file is gone."""
        self.payload(result_id)
        path = self._dir(result_id) / name
        if not path.is_file():
            raise _not_found(result_id)
        return path

    def export(self, result_id: str, kind: str) -> tuple[Path, str]:
        """Path and media type of export ``kind`` (a key of :data:`EXPORTS`), written on first request."""
        if kind not in EXPORTS:
            raise ApiError(404, "not_found", f"no export 'masks.{kind}'",
                           expected="masks.png, masks.zip, masks.nii.gz or masks.dcm", fix="use one of those names")
        payload = self.payload(result_id)
        try:
            return self._export(result_id, kind, payload), EXPORTS[kind][1]
        except FileNotFoundError:  # deleted (DELETE, expiry, eviction) while it was being written
            raise _not_found(result_id) from None

    def _export(self, result_id: str, kind: str, payload: dict[str, Any]) -> Path:
        from medvlm import __version__
        from medvlm.app.server.rle import rle_decode
        from medvlm.export import (
            ExportGeometry,
            geometry_of,
            write_dicom_seg,
            write_label_png,
            write_mask_zip,
            write_nifti,
        )
        from medvlm.io import MedicalImage

        folder = self._dir(result_id)
        name = EXPORTS[kind][0]
        target = folder / name
        if target.exists():
            return target
        info = json.loads((folder / "image.json").read_text())
        shape = (int(info["height"]), int(info["width"]))
        regions = payload.get("regions") or []
        masks = [rle_decode(r["mask"]) if r.get("mask") else np.zeros(shape, bool) for r in regions]
        labels = [str(r.get("label", "")) for r in regions]
        if kind == "dcm":
            source = folder / "source.dcm"
            if not source.exists():
                raise ApiError(409, "not_dicom", "DICOM SEG needs a DICOM source image, and this result's image was "
                               f"{info['meta'].get('format', 'not DICOM')}",
                               expected="a result computed on a DICOM upload",
                               fix="download masks.nii.gz or masks.png instead, or send the DICOM file")
            if not masks:
                raise ApiError(409, "no_regions", "this result has no regions to put in a DICOM SEG",
                               expected="a result with at least one region", fix="nothing to export")
            import pydicom

            ds = pydicom.dcmread(source)
            write_dicom_seg(masks, labels, ds, target, frame_index=info["meta"].get("frame_index"),
                            software_version=__version__)
        elif kind == "png":
            write_label_png(masks, shape, target)
        elif kind == "zip":
            write_mask_zip(masks, labels, target)
        else:
            image = MedicalImage(np.zeros(shape, np.float32), spacing_mm=tuple(info["spacing_mm"])
                                 if info.get("spacing_mm") else None, meta=dict(info["meta"]))
            dicom = None
            if (folder / "source.dcm").exists():
                import pydicom

                dicom = pydicom.dcmread(folder / "source.dcm")
            geometry: ExportGeometry = geometry_of(image, dicom)
            write_nifti(masks, geometry, target)
        return target
