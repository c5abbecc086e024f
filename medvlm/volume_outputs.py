"""Writing the result of a whole-volume segmentation: label volume, DICOM SEG, JSON, overlay and montage.

Files for a volume ``<stem>`` in ``out_dir`` (each written atomically):

- ``<stem>.seg.nii.gz``: a label volume (uint8; uint16 beyond 255 texts), ``k`` = the ``k``-th text (the higher
  ``k`` wins where two overlap), in the input's STORED voxel order with its affine: for a NIfTI input the same
  shape and affine as the input file (its qform/sform codes kept), so it overlays the input in any viewer; for a
  DICOM series ``(rows, columns, slices)`` with the series' affine (see :mod:`medvlm.volume`).
- ``<stem>.seg.dcm`` (DICOM series input only): a BINARY DICOM Segmentation (highdicom) with one segment per
  text, referencing the source instances; frames only where a segment is non-empty on a slice. Not written when
  no text was found anywhere (there would be no frame).
- ``<stem>.json``: the input, geometry and, per text, ``label``, ``structure``, ``found``, ``voxels``,
  ``volume_ml`` (voxel count x voxel volume), ``slice_range`` (``[first, last]`` slice index in the stored order,
  None when not found) and ``existence`` (one value per stored slice).
- ``<stem>.overlay.png``: the middle slice of the found extent (all texts together) with the masks drawn by
  :func:`medvlm.viz.draw_overlay`; ``<stem>.montage.png``: about 12 evenly spaced slices with the masks.

Slice numbers everywhere are those of the stored order (NIfTI array index along the slice axis; position in the
DICOM series sorted along the slice normal), so they point to the input's own slices.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from medvlm.errors import input_error, missing_dependency
from medvlm.export import segment_descriptions
from medvlm.io import atomic_open, save_png
from medvlm.outputs import write_json_atomic
from medvlm.types import Mask, Region
from medvlm.viz import PALETTE, draw_overlay, font_height, mask_contour
from medvlm.volume import Volume, volume_ml

__all__ = ["MONTAGE_SLICES", "WrittenVolume", "montage_slices", "write_volume_outputs"]

#: Number of evenly spaced slices in the montage (fewer when the volume has fewer slices).
MONTAGE_SLICES = 12


@dataclass
class WrittenVolume:
    json_path: Path
    label_path: Path
    overlay_path: Path
    montage_path: Path
    dicom_seg_path: Path | None
    payload: dict[str, Any]


def _check(volume: Volume, masks: Sequence[npt.ArrayLike], labels: Sequence[str]) -> list[npt.NDArray[np.bool_]]:
    out = [np.asarray(m).astype(bool) for m in masks]
    if not out:
        raise input_error("volume outputs", expected="at least one mask", received="none",
                          fix="segment at least one --text")
    if len(labels) != len(out):
        raise input_error("volume outputs labels", expected=f"one label per mask ({len(out)})",
                          received=f"{len(labels)} labels", fix="pass the texts' labels in mask order")
    for k, m in enumerate(out, start=1):
        if m.shape != volume.shape:
            raise input_error(f"volume mask {k}", expected=f"the display shape of the volume {volume.shape}",
                              received=f"shape {m.shape}", fix="pass masks computed on Volume.array")
    return out


def label_volume(masks: Sequence[npt.NDArray[np.bool_]]) -> npt.NDArray[np.integer[Any]]:
    """Label map of ``masks`` (same shape each): 0 background, ``k`` = mask ``k``; the higher ``k`` wins."""
    dtype = np.uint8 if len(masks) <= 255 else np.uint16
    out = np.zeros(masks[0].shape, dtype=dtype)
    for k, m in enumerate(masks, start=1):
        out[m] = k
    return out


def montage_slices(n_slices: int, count: int = MONTAGE_SLICES) -> list[int]:
    """``count`` (at most ``n_slices``) evenly spaced display slice indices from the first to the last."""
    if n_slices <= 0:
        return []
    return [int(v) for v in np.unique(np.rint(np.linspace(0, n_slices - 1, min(count, n_slices))).astype(int))]


def write_volume_outputs(out_dir: str | Path, stem: str, volume: Volume, masks: Sequence[npt.ArrayLike],
                         labels: Sequence[str], *, existence: Sequence[Sequence[float]] | None = None,
                         per_text: Sequence[dict[str, Any]] | None = None, extra: dict[str, Any] | None = None,
                         window: tuple[float, float] | None = None, dicom_seg: bool | None = None,
                         software_version: str = "") -> WrittenVolume:
    """Write the files listed in the module docstring for ``masks`` (bool ``(Z, H, W)`` on ``volume.array``'s
    display grid, one per text, in text order) and return their paths and the JSON payload.

    ``existence``: per text, one value per DISPLAY slice (reordered to the stored order here). ``per_text``: extra
    JSON fields per text (text, structure, existence source, ...). ``extra``: merged into the JSON's top level.
    ``window``: display window of the PNGs (default ``volume.window``). ``dicom_seg``: write ``.seg.dcm``
    (default: when the input is a DICOM series).
    """
    checked = _check(volume, masks, labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    win = window if window is not None else volume.window
    order = volume.display_slices_in_stored_order()  # stored slice s -> display slice order[s]

    label_path = out / f"{stem}.seg.nii.gz"
    stored_labels = volume.to_stored(label_volume(checked))
    _write_label_nifti(stored_labels, volume, label_path)

    entries = []
    for k, (m, label) in enumerate(zip(checked, labels), start=1):
        per_slice = np.asarray(m.reshape(m.shape[0], -1).any(axis=1), dtype=bool)
        stored_found = [s for s in range(volume.n_slices) if per_slice[order[s]]]
        entry: dict[str, Any] = {"id": k, "label_value": k, "label": str(label)}
        if per_text is not None and k - 1 < len(per_text):
            entry.update(per_text[k - 1])
        entry.update({
            "found": bool(stored_found),
            "voxels": int(np.count_nonzero(m)),
            "volume_ml": round(volume_ml(m, volume.spacing), 3),
            "slice_range": [stored_found[0], stored_found[-1]] if stored_found else None,
            "n_slices_with_mask": len(stored_found),
        })
        if existence is not None and k - 1 < len(existence):
            ex = list(existence[k - 1])
            entry["existence"] = [round(float(ex[order[s]]), 4) for s in range(volume.n_slices)]
        entries.append(entry)

    seg_path: Path | None = None
    seg_note = None
    want_seg = volume.format == "dicom" if dicom_seg is None else dicom_seg
    if want_seg:
        if not any(m.any() for m in checked):
            seg_note = "not written: no text was found on any slice (a DICOM SEG needs at least one frame)"
        else:
            seg_path = out / f"{stem}.seg.dcm"
            write_series_seg(checked, labels, volume, seg_path, software_version=software_version)

    overlay_k = _overlay_slice(checked)
    overlay_path = out / f"{stem}.overlay.png"
    save_png(_overlay(volume, checked, labels, overlay_k, win, stem), overlay_path)
    montage_path = out / f"{stem}.montage.png"
    montage = montage_slices(volume.n_slices)
    save_png(_montage(volume, checked, montage, win), montage_path)

    stored_spacing = _stored_spacing(volume)
    payload: dict[str, Any] = {
        "input": volume.source,
        "format": volume.format,
        "modality": volume.modality,
        "stored_shape": list(volume.stored_shape),
        "stored_spacing_mm": [round(s, 6) for s in stored_spacing],
        "slice_axis": volume.slice_axis,
        "n_slices": volume.n_slices,
        "voxel_ml": volume.voxel_ml,
        "affine": np.asarray(volume.affine).round(6).tolist(),
        "window": list(win) if win is not None else None,
        "label_volume": label_path.name,
        "labels": {str(e["id"]): e["label"] for e in entries},
        "dicom_seg": seg_path.name if seg_path is not None else None,
        "overlay": overlay_path.name,
        "overlay_slice": volume.stored_slice(overlay_k),
        "montage": montage_path.name,
        "montage_slices": [volume.stored_slice(k) for k in montage],
        "slice_order": "stored order: NIfTI array index along slice_axis, or the DICOM series sorted along the "
                       "slice normal (see sop_instance_uids)",
        "texts": entries,
    }
    if seg_note:
        payload["dicom_seg_note"] = seg_note
    if volume.format == "dicom":
        payload["series_description"] = volume.meta.get("series_description", "")
        payload["sop_instance_uids"] = list(volume.sop_instance_uids)
    if extra:
        payload.update(extra)
    json_path = out / f"{stem}.json"
    write_json_atomic(payload, json_path)
    return WrittenVolume(json_path=json_path, label_path=label_path, overlay_path=overlay_path,
                         montage_path=montage_path, dicom_seg_path=seg_path, payload=payload)


def _stored_spacing(volume: Volume) -> tuple[float, float, float]:
    norms = np.linalg.norm(np.asarray(volume.affine)[:3, :3], axis=0)
    return (float(norms[0]), float(norms[1]), float(norms[2]))


# ----------------------------------------------------------------------------------------------------- NIfTI


def _write_label_nifti(data: npt.NDArray[Any], volume: Volume, path: Path) -> None:
    import nibabel as nib

    affine = np.asarray(volume.affine, dtype=np.float64)
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    # A NIfTI input keeps its codes (so the output reads exactly like it); a DICOM affine is scanner-based (1).
    qcode = int(volume.meta.get("qform_code", 1)) if volume.format == "nifti" else 1
    scode = int(volume.meta.get("sform_code", 1)) if volume.format == "nifti" else 1
    if qcode == 0 and scode == 0:
        qcode = scode = 1
    img.set_qform(affine, code=qcode)
    img.set_sform(affine, code=scode)
    img.header.set_xyzt_units("mm")
    payload = gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)
    with atomic_open(path, "wb") as fh:
        fh.write(payload)


# ------------------------------------------------------------------------------------------------- DICOM SEG

def write_series_seg(masks: Sequence[npt.NDArray[np.bool_]], labels: Sequence[str], volume: Volume,
                     path: str | Path, *, series_description: str = "medvlm segmentation",
                     software_version: str = "") -> Path:
    """Write a BINARY DICOM Segmentation of a DICOM series ``volume`` with one segment per mask (display grid).

    The SEG references every source instance (``volume.datasets``, stored order) and holds a frame for each
    (segment, slice) pair where the segment is non-empty. Returns the path.
    """
    if volume.format != "dicom" or len(volume.datasets) != volume.n_slices:
        raise input_error("DICOM SEG export", expected="a volume read from a DICOM series",
                          received=f"a {volume.format} volume", fix="use the NIfTI label volume for NIfTI inputs")
    try:
        import highdicom as hd
    except ImportError as exc:
        raise missing_dependency("DICOM SEG export", "pip install highdicom") from exc
    # stored order is (rows, columns, slices); highdicom wants (frames = source images, rows, columns, segments)
    stored = np.stack([volume.to_stored(m) for m in masks], axis=-1).transpose(2, 0, 1, 3)
    descriptions = segment_descriptions(labels, software_version)
    seg = hd.seg.Segmentation(
        source_images=list(volume.datasets), pixel_array=np.ascontiguousarray(stored),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=9001, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="medvlm", manufacturer_model_name="medvlm", software_versions=software_version or "0",
        device_serial_number="0", series_description=series_description[:64], omit_empty_frames=True)
    with atomic_open(path, "wb") as fh:
        seg.save_as(fh)
    return Path(path)


# ----------------------------------------------------------------------------------------------------- images


def _overlay_slice(masks: Sequence[npt.NDArray[np.bool_]]) -> int:
    """Middle display slice of the found extent of all masks together (the volume's middle when none)."""
    union = np.zeros(masks[0].shape[0], dtype=bool)
    for m in masks:
        union |= m.reshape(m.shape[0], -1).any(axis=1)
    found = np.flatnonzero(union)
    if found.size == 0:
        return masks[0].shape[0] // 2
    return int((found[0] + found[-1]) // 2)


def _upscale(arr: npt.NDArray[Any], factor: int) -> npt.NDArray[Any]:
    return arr if factor == 1 else np.repeat(np.repeat(arr, factor, axis=0), factor, axis=1)


def _overlay(volume: Volume, masks: Sequence[npt.NDArray[np.bool_]], labels: Sequence[str], k: int,
             window: tuple[float, float] | None, stem: str) -> npt.NDArray[np.uint8]:
    factor = max(1, math.ceil(512 / max(volume.shape[1:])))  # small CT slices: drawn large enough to read
    rgb = _upscale(volume.slice_image(k, window).to_rgb_uint8(), factor)
    regions, numbers = [], []
    for i, (m, label) in enumerate(zip(masks, labels), start=1):
        data = _upscale(m[k], factor)
        if data.any():
            mask = Mask(data)
            box = mask.to_box()
            assert box is not None
            regions.append(Region(box=box, label=str(label), mask=mask))
            numbers.append(i)
    title = f"{stem}: slice {volume.stored_slice(k)} of {volume.n_slices}"
    return draw_overlay(rgb, regions, numbers=numbers, title=title)


def _paint(rgb: npt.NDArray[np.uint8], masks: Sequence[npt.NDArray[np.bool_]], alpha: float = 0.35) -> npt.NDArray[Any]:
    canvas = rgb.astype(np.float32)
    for i, m in enumerate(masks):
        if not m.any():
            continue
        colour = np.array(PALETTE[i % len(PALETTE)], dtype=np.float32)
        canvas[m] = canvas[m] * (1 - alpha) + colour * alpha
        canvas[mask_contour(m)] = colour
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _montage(volume: Volume, masks: Sequence[npt.NDArray[np.bool_]], slices: Sequence[int],
             window: tuple[float, float] | None) -> npt.NDArray[np.uint8]:
    _, h, w = volume.shape
    factor = max(1, math.ceil(192 / max(h, w)))
    th, tw = h * factor, w * factor
    cols = min(4, len(slices))
    rows = math.ceil(len(slices) / cols)
    gap = 4
    sheet = np.zeros((rows * th + (rows + 1) * gap, cols * tw + (cols + 1) * gap, 3), dtype=np.uint8)
    for n, k in enumerate(slices):
        r, c = divmod(n, cols)
        rgb = _upscale(volume.slice_image(k, window).to_rgb_uint8(), factor)
        tile = _paint(rgb, [_upscale(m[k], factor) for m in masks])
        y0, x0 = gap + r * (th + gap), gap + c * (tw + gap)
        sheet[y0:y0 + th, x0:x0 + tw] = tile
    image = Image.fromarray(sheet)
    draw = ImageDraw.Draw(image)
    try:
        font: Any = ImageFont.load_default(size=max(10, min(th, tw) // 12))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    for n, k in enumerate(slices):
        r, c = divmod(n, cols)
        y0, x0 = gap + r * (th + gap), gap + c * (tw + gap)
        text = f"{volume.stored_slice(k)}"
        bbox = draw.textbbox((x0 + 2, y0 + 2), text, font=font)
        draw.rectangle((bbox[0] - 1, bbox[1] - 1, bbox[2] + 1, bbox[1] + font_height(font) + 3), fill=(0, 0, 0))
        draw.text((x0 + 2, y0 + 2), text, fill=(255, 255, 255), font=font)
    return np.asarray(image, dtype=np.uint8)
