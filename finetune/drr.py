"""Synthetic radiographs (digitally reconstructed radiographs, DRR) with anatomy masks, from a CT volume and its
label volume: the CheXanatomy way to get frontal images whose every structure is annotated.

Physics (parallel-beam AP projection, no scatter): HU -> linear attenuation ``mu = mu_water * (1 + HU / 1000)``
(air 0, water ``mu_water``, bone about twice water), clipped at 0; the line integral along the anterior-posterior
axis times the voxel depth gives the optical depth ``tau``; transmitted intensity ``exp(-tau)`` (Beer-Lambert).
The image shown is ``1 - exp(-tau)`` rescaled to [0, 1], so dense tissue is bright as on a radiograph.

Geometry: the volume is in LPS order ``(X: patient left, Y: posterior, Z: superior)``. The DRR's rows run from
superior (top) to inferior and its columns from the patient's right (image left) to the patient's left, the
standard display of a frontal chest radiograph. A structure's mask is every ray that crosses it (maximum
projection of its labels). ``isotropic=True`` resamples rows and columns to the finer of the two spacings.

``python -m finetune.drr ../shared/data/ct_totalsegmentator_example/example_ct_sm.nii.gz out/drr`` writes
``drr.png`` and one mask PNG per structure.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from medvlm.errors import input_error

__all__ = ["DRR", "drr_from_nifti", "drr_from_volume"]

#: linear attenuation of water at ~70 keV, 1/mm (diagnostic X-ray effective energy)
MU_WATER_PER_MM = 0.0193


@dataclass
class DRR:
    """``image``: float32 ``(H, W)`` in [0, 1] (bright = dense); ``masks``: name -> bool ``(H, W)``;
    ``spacing_mm``: ``(row, col)`` pixel size; ``tau``: the optical depth per pixel before display scaling."""

    image: npt.NDArray[np.float32]
    spacing_mm: tuple[float, float]
    masks: dict[str, npt.NDArray[np.bool_]] = field(default_factory=dict)
    tau: npt.NDArray[np.float32] | None = None


def drr_from_volume(hu: npt.ArrayLike, spacing_mm: tuple[float, float, float],
                    labels: npt.ArrayLike | None = None, names: Mapping[int, str] | None = None, *,
                    mu_water: float = MU_WATER_PER_MM, isotropic: bool = True) -> DRR:
    """Project a CT volume ``hu`` ``(X, Y, Z)`` in LPS order (HU; ``spacing_mm`` per axis) along Y (AP).

    ``labels``: int volume of the same shape (0 = background); ``names``: label value -> structure name (values
    without a name are called ``"label <v>"``). Returns a :class:`DRR` (see the module docstring)."""
    from scipy import ndimage

    vol = np.asarray(hu, dtype=np.float32)
    if vol.ndim != 3 or min(vol.shape) < 1:
        raise input_error("drr_from_volume", expected="a 3D CT volume (X, Y, Z) in HU", received=f"shape {vol.shape}",
                          fix="load it with medvlm.io.load_volume and reorient to LPS")
    sx, sy, sz = (float(s) for s in spacing_mm)
    if min(sx, sy, sz) <= 0:
        raise input_error("spacing_mm", expected="three positive voxel sizes in mm", received=repr(spacing_mm),
                          fix="pass the NIfTI header zooms in LPS order")
    mu = np.clip(mu_water * (1.0 + vol / 1000.0), 0.0, None)
    tau = mu.sum(axis=1) * sy  # (X, Z): line integral along posterior
    # rows = superior -> inferior (Z reversed), columns = X (patient right ... left): transpose and flip
    tau_img = np.ascontiguousarray(tau.T[::-1])
    projected: dict[str, npt.NDArray[np.bool_]] = {}
    if labels is not None:
        lab = np.asarray(labels)
        if lab.shape != vol.shape:
            raise input_error("labels", expected=f"the CT's shape {vol.shape}", received=f"shape {lab.shape}",
                              fix="resample the label volume onto the CT grid")
        for value in (int(v) for v in np.unique(lab) if v != 0):
            hit = (lab == value).any(axis=1)
            name = (names or {}).get(value, f"label {value}")
            projected[name] = np.ascontiguousarray(hit.T[::-1])
    row_mm, col_mm = sz, sx
    if isotropic and not np.isclose(row_mm, col_mm):
        target = min(row_mm, col_mm)
        zoom = (row_mm / target, col_mm / target)
        tau_img = ndimage.zoom(tau_img, zoom, order=1)
        projected = {k: ndimage.zoom(m.astype(np.uint8), zoom, order=0).astype(bool) for k, m in projected.items()}
        row_mm = col_mm = target
    shown = 1.0 - np.exp(-tau_img)
    lo, hi = float(shown.min()), float(shown.max())
    image = ((shown - lo) / (hi - lo) if hi > lo else np.zeros_like(shown)).astype(np.float32)
    return DRR(image=image, spacing_mm=(row_mm, col_mm), masks=projected, tau=tau_img.astype(np.float32))


def drr_from_nifti(ct_path: str | Path, seg_path: str | Path | None = None,
                   names: Mapping[int, str] | None = None, **kwargs: object) -> DRR:
    """:func:`drr_from_volume` on NIfTI files (any stored orientation; reoriented to LPS first)."""
    from medvlm.datasets.ct import to_lps
    from medvlm.io import load_volume

    img, spacing, affine = load_volume(ct_path)
    lps, lps_spacing, _ = to_lps(img, affine, spacing)
    labels = None
    if seg_path is not None:
        seg, _, seg_affine = load_volume(seg_path)
        labels, _, _ = to_lps(np.rint(seg).astype(np.int32), seg_affine, spacing)
    return drr_from_volume(lps, lps_spacing, labels, names, **kwargs)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    """``python -m finetune.drr CT.nii.gz OUT_DIR [SEG.nii.gz]``: write the DRR and its masks as PNG."""
    from medvlm.io import save_mask_png, save_png

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (2, 3):
        raise SystemExit("usage: python -m finetune.drr CT.nii.gz OUT_DIR [SEG.nii.gz]")
    drr = drr_from_nifti(args[0], args[2] if len(args) == 3 else None)
    out = Path(args[1])
    save_png((drr.image * 255).round().astype(np.uint8), out / "drr.png")
    for name, mask in drr.masks.items():
        save_mask_png(mask, out / f"drr.{name.replace(' ', '_')}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
