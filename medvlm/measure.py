"""Measurements of a segmented structure: the ellipse of a mask and the clinical sizes read from it.

A filled ellipse with semi-axes ``a >= b`` has variances ``a^2/4`` and ``b^2/4`` along its axes, so the centroid
and the second moments of a mask give the ellipse that the mask is (or is closest to, for a near-elliptic
structure). Fetal biometry measures the head exactly so: sonographers fit an ellipse to the skull's outline in
the standard axial plane and read the head circumference (HC), the biparietal diameter (BPD, here the short axis
of the outer ellipse) and the occipitofrontal diameter (OFD, the long axis) from it (HC18: van den Heuvel et al.,
PLoS ONE 2018, whose reference circumferences are of such ellipses).

Coordinates: pixel centres of the image grid, ``x`` = column, ``y`` = row, origin at the top-left pixel's
centre. Sizes in mm use the image's ``spacing_mm = (row_mm, col_mm)``; anisotropic pixels are scaled to mm
before the fit, so the ellipse and its axes are those of the physical shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["MEASUREMENTS", "EllipseFit", "StructureMeasurement", "ellipse_circumference", "ellipse_mask",
           "fetal_head_biometry", "fit_ellipse_moments", "largest_component_2d", "measure_structure"]

#: 1/12 px^2: the variance a pixel square adds along each axis (a drawn ellipse's moments include it)
_PIXEL_VARIANCE = 1.0 / 12.0


@dataclass(frozen=True)
class EllipseFit:
    """An ellipse: centre ``(cx, cy)``, semi-axes ``a >= b`` and ``angle_deg``, the long axis's angle from the
    +x (column) axis towards +y (down the rows), in (-90, 90]. Units: pixels of the fitted grid, or mm when the
    fit was given a spacing (then the centre is in mm from the top-left pixel's centre too)."""

    cx: float
    cy: float
    a: float
    b: float
    angle_deg: float

    @property
    def circumference(self) -> float:
        """Perimeter (Ramanujan's second approximation, relative error < 1e-9 for b/a > 0.5)."""
        return ellipse_circumference(self.a, self.b)

    @property
    def area(self) -> float:
        return math.pi * self.a * self.b


def ellipse_circumference(a: float, b: float) -> float:
    """Perimeter of an ellipse with semi-axes ``a`` and ``b`` (same unit out), Ramanujan's second formula."""
    if a < 0 or b < 0:
        raise ValueError(f"semi-axes must be >= 0, got {a}, {b}")
    if a + b == 0:
        return 0.0
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1.0 + 3.0 * h / (10.0 + math.sqrt(4.0 - 3.0 * h)))


def fit_ellipse_moments(mask: npt.ArrayLike, spacing_mm: tuple[float, float] | None = None) -> EllipseFit | None:
    """The ellipse with the centroid and second moments of ``mask``'s pixels (bool ``(H, W)``; every pixel
    counts, so pass one component). With ``spacing_mm`` the pixel centres are scaled to mm first and the fit is
    in mm. None when it has fewer than 5 pixels or is (nearly) a line: no ellipse describes it."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2D (H, W), got shape {m.shape}")
    ys, xs = np.nonzero(m)
    if xs.size < 5:
        return None
    row_mm, col_mm = spacing_mm if spacing_mm is not None else (1.0, 1.0)
    px, py = xs.astype(np.float64) * col_mm, ys.astype(np.float64) * row_mm
    cx, cy = float(px.mean()), float(py.mean())
    cov = np.cov(np.stack([px - cx, py - cy]))
    evals, evecs = np.linalg.eigh(cov)  # ascending: the long axis is the last
    grid = np.array([_PIXEL_VARIANCE * col_mm ** 2, _PIXEL_VARIANCE * row_mm ** 2])
    # the pixel squares' own variance, projected on each axis, is not the shape's
    semi_sq = 4.0 * (evals - (evecs ** 2).T @ grid)
    if semi_sq.min() <= 0.25 * min(row_mm, col_mm) ** 2:
        return None
    vx, vy = evecs[:, 1]
    angle = math.degrees(math.atan2(vy, vx))
    if angle <= -90.0:
        angle += 180.0
    elif angle > 90.0:
        angle -= 180.0
    return EllipseFit(cx, cy, float(math.sqrt(semi_sq[1])), float(math.sqrt(semi_sq[0])), angle)


def ellipse_mask(fit: EllipseFit, shape: tuple[int, int], spacing_mm: tuple[float, float] | None = None,
                 ) -> npt.NDArray[np.bool_]:
    """The filled ellipse on a ``shape = (H, W)`` grid: the pixels whose centres lie inside ``fit`` (in pixels, or
    in mm when ``spacing_mm`` is given, as :func:`fit_ellipse_moments` returned it)."""
    row_mm, col_mm = spacing_mm if spacing_mm is not None else (1.0, 1.0)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    dx, dy = xx * col_mm - fit.cx, yy * row_mm - fit.cy
    t = math.radians(fit.angle_deg)
    u = dx * math.cos(t) + dy * math.sin(t)
    v = -dx * math.sin(t) + dy * math.cos(t)
    return np.asarray(u ** 2 / fit.a ** 2 + v ** 2 / fit.b ** 2 <= 1.0)


def largest_component_2d(mask: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """The largest 8-connected component of ``mask`` (bool ``(H, W)``); an empty mask stays empty."""
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(m, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return m.copy()
    sizes = np.bincount(labels.ravel())[1:]
    return np.asarray(labels == int(np.argmax(sizes)) + 1)


def fetal_head_biometry(mask: npt.ArrayLike, spacing_mm: tuple[float, float] | None) -> dict[str, float] | None:
    """Head circumference, biparietal and occipitofrontal diameters of a fetal head mask (bool ``(H, W)``: the
    filled outer outline of the skull; its largest component is measured) from its moment ellipse: ``*_mm``
    with a spacing, else ``*_px`` (isotropic pixels assumed). None when no ellipse fits."""
    fit = fit_ellipse_moments(largest_component_2d(mask), spacing_mm)
    if fit is None:
        return None
    unit = "mm" if spacing_mm is not None else "px"
    return {f"head_circumference_{unit}": round(fit.circumference, 2),
            f"biparietal_diameter_{unit}": round(2.0 * fit.b, 2),
            f"occipitofrontal_diameter_{unit}": round(2.0 * fit.a, 2)}


@dataclass(frozen=True)
class StructureMeasurement:
    """What a clinician reads off one structure's mask: ``measure(mask, spacing_mm)`` returns ``{name + "_mm":
    value}`` for each of ``names`` (``_px`` without a spacing), or None when the shape gives none."""

    names: tuple[str, ...]
    measure: Callable[[npt.ArrayLike, tuple[float, float] | None], dict[str, float] | None]


#: canonical structure name -> its measurement
MEASUREMENTS: Mapping[str, StructureMeasurement] = {
    "fetal head": StructureMeasurement(("head_circumference", "biparietal_diameter", "occipitofrontal_diameter"),
                                       fetal_head_biometry),
}


def measure_structure(structure: str | None, mask: npt.ArrayLike,
                      spacing_mm: tuple[float, float] | None) -> dict[str, float] | None:
    """The measurements of ``structure`` (a canonical name; see :data:`MEASUREMENTS`) on ``mask`` (bool
    ``(H, W)``, image grid); None for a structure without one, an empty mask or a shape no measurement fits."""
    entry = MEASUREMENTS.get(structure or "")
    m = np.asarray(mask, dtype=bool)
    if entry is None or not m.any():
        return None
    return entry.measure(m, spacing_mm)
