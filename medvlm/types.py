"""Core geometric types shared by every package.

One coordinate convention everywhere: **pixel xyxy in the ORIGINAL image, float**.

- x grows to the right (columns), y grows down (rows); the origin is the top-left corner of the top-left
  pixel, so pixel ``(row r, col c)`` covers ``[c, c + 1) x [r, r + 1)`` and its centre is ``(c + 0.5, r + 0.5)``.
- A box is ``(x0, y0, x1, y1)`` with ``x0 <= x1`` and ``y0 <= y1``; the tight box of a mask whose pixels span
  columns ``c_min..c_max`` and rows ``r_min..r_max`` is ``(c_min, r_min, c_max + 1, r_max + 1)``.
- "Original image" means the pixel grid of the file as read by :mod:`medvlm.io` (after DICOM/NIfTI
  orientation handling), before any resize, pad or crop done for a model. Conversions to normalized,
  0-1000 and resized frames live in :mod:`medvlm.coords` and nowhere else.
- Chest X-rays are in radiographic display: the PATIENT's right is on the IMAGE left.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from medvlm.errors import input_error
from medvlm.measure import measure_structure

__all__ = ["Box", "Mask", "Points", "Region"]


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixel xyxy of the original image (float, pixels)."""

    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self) -> None:
        values = (self.x0, self.y0, self.x1, self.y1)
        if not all(isinstance(v, (int, float, np.floating, np.integer)) for v in values):
            raise input_error("Box", expected="four numbers x0 y0 x1 y1", received=repr(values),
                              fix="pass pixel coordinates as numbers")
        if not all(math.isfinite(float(v)) for v in values):
            raise input_error("Box", expected="finite coordinates", received=repr(values),
                              fix="remove NaN/inf values from the box")
        if self.x1 < self.x0 or self.y1 < self.y0:
            raise input_error("Box", expected="x0 <= x1 and y0 <= y1 (pixel xyxy: left, top, right, bottom)",
                              received=f"({self.x0}, {self.y0}, {self.x1}, {self.y1})",
                              fix="give the top-left corner first, then the bottom-right corner")
        for name in ("x0", "y0", "x1", "y1"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def from_list(cls, values: Sequence[float]) -> Box:
        """Build from ``[x0, y0, x1, y1]`` (pixel xyxy, original image)."""
        if len(values) != 4:
            raise input_error("Box", expected="4 values x0 y0 x1 y1", received=f"{len(values)} values {list(values)!r}",
                              fix="pass exactly four numbers")
        return cls(*(float(v) for v in values))

    @classmethod
    def from_xywh(cls, x: float, y: float, w: float, h: float) -> Box:
        """Build from top-left corner plus width and height (COCO/NIH style), pixels."""
        return cls(x, y, x + w, y + h)

    def to_list(self) -> list[float]:
        return [self.x0, self.y0, self.x1, self.y1]

    def to_array(self) -> npt.NDArray[np.float64]:
        """Shape (4,), float64, xyxy."""
        return np.array(self.to_list(), dtype=np.float64)

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        """Area in square pixels."""
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        """Centre ``(x, y)`` in pixels."""
        return ((self.x0 + self.x1) / 2.0, (self.y0 + self.y1) / 2.0)

    def clip(self, width: int, height: int) -> Box:
        """Clip to the image ``[0, width] x [0, height]``."""
        return Box(min(max(self.x0, 0.0), width), min(max(self.y0, 0.0), height),
                   min(max(self.x1, 0.0), width), min(max(self.y1, 0.0), height))

    def intersection(self, other: Box) -> Box | None:
        """Overlap of two boxes, or None when they do not overlap with positive area."""
        x0, y0 = max(self.x0, other.x0), max(self.y0, other.y0)
        x1, y1 = min(self.x1, other.x1), min(self.y1, other.y1)
        if x1 <= x0 or y1 <= y0:
            return None
        return Box(x0, y0, x1, y1)

    def iou(self, other: Box) -> float:
        """Intersection over union; 0.0 when both boxes have zero area."""
        inter = self.intersection(other)
        inter_area = inter.area if inter is not None else 0.0
        union = self.area + other.area - inter_area
        return inter_area / union if union > 0 else 0.0

    def contains_point(self, x: float, y: float) -> bool:
        return self.x0 <= x <= self.x1 and self.y0 <= y <= self.y1


@dataclass(frozen=True)
class Points:
    """Point prompts in pixel xy of the original image.

    ``coords`` has shape (N, 2) float64 ``(x, y)``; ``labels`` has shape (N,) int64 with 1 = positive
    (inside the target) and 0 = negative (outside), the SAM convention.
    """

    coords: npt.NDArray[np.float64]
    labels: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        coords = np.asarray(self.coords, dtype=np.float64).reshape(-1, 2) if np.size(self.coords) else np.zeros((0, 2))
        labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if coords.shape[0] != labels.shape[0]:
            raise input_error("Points", expected="one label per point", received=f"{coords.shape[0]} points and "
                              f"{labels.shape[0]} labels", fix="pass as many labels (1 positive, 0 negative) as points")
        if not np.all(np.isfinite(coords)):
            raise input_error("Points", expected="finite coordinates", received=repr(coords.tolist()),
                              fix="remove NaN/inf values")
        if labels.size and not np.all(np.isin(labels, (0, 1))):
            raise input_error("Points", expected="labels 1 (positive) or 0 (negative)", received=repr(labels.tolist()),
                              fix="use 1 for points inside the target and 0 for points outside")
        object.__setattr__(self, "coords", coords)
        object.__setattr__(self, "labels", labels)

    @classmethod
    def from_lists(cls, positive: Iterable[Sequence[float]] = (), negative: Iterable[Sequence[float]] = ()) -> Points:
        """Build from lists of ``(x, y)`` pixel positions."""
        pos = [tuple(map(float, p)) for p in positive]
        neg = [tuple(map(float, p)) for p in negative]
        for p in pos + neg:
            if len(p) != 2:
                raise input_error("Points", expected="(x, y) pairs", received=repr(p), fix="pass two numbers per point")
        coords = np.array(pos + neg, dtype=np.float64).reshape(-1, 2)
        labels = np.array([1] * len(pos) + [0] * len(neg), dtype=np.int64)
        return cls(coords, labels)

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def positive(self) -> npt.NDArray[np.float64]:
        return self.coords[self.labels == 1]

    @property
    def negative(self) -> npt.NDArray[np.float64]:
        return self.coords[self.labels == 0]

    def to_json(self) -> list[dict[str, Any]]:
        return [{"x": float(x), "y": float(y), "label": int(lab)} for (x, y), lab in zip(self.coords, self.labels)]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Points):
            return NotImplemented
        return bool(np.array_equal(self.coords, other.coords) and np.array_equal(self.labels, other.labels))

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, eq=False)
class Mask:
    """A binary mask on the original image's pixel grid: ``data`` has shape (H, W), dtype bool."""

    data: npt.NDArray[np.bool_]

    def __post_init__(self) -> None:
        data = np.asarray(self.data)
        if data.ndim != 2:
            raise input_error("Mask", expected="a 2D array (H, W)", received=f"shape {data.shape}",
                              fix="select one slice/channel before building a Mask")
        object.__setattr__(self, "data", data.astype(bool, copy=False))

    @classmethod
    def from_array(cls, array: npt.ArrayLike, threshold: float = 0.5) -> Mask:
        """Binarize: bool arrays as is, anything else ``> threshold``."""
        arr = np.asarray(array)
        return cls(arr if arr.dtype == bool else arr > threshold)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.data.shape[0]), int(self.data.shape[1]))

    @property
    def area_px(self) -> int:
        return int(self.data.sum())

    def area_mm2(self, spacing_mm: tuple[float, float] | None) -> float | None:
        """Area in mm^2 for pixel spacing ``(row_mm, col_mm)``; None when spacing is unknown."""
        if spacing_mm is None:
            return None
        return float(self.area_px * spacing_mm[0] * spacing_mm[1])

    def is_empty(self) -> bool:
        return not bool(self.data.any())

    def to_box(self) -> Box | None:
        """Tight box (pixel xyxy, exclusive right/bottom edge); None for an empty mask."""
        rows = np.flatnonzero(self.data.any(axis=1))
        if rows.size == 0:
            return None
        cols = np.flatnonzero(self.data.any(axis=0))
        return Box(float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mask):
            return NotImplemented
        return bool(np.array_equal(self.data, other.data))

    __hash__ = None  # type: ignore[assignment]


@dataclass(eq=False)
class Region:
    """A located answer: box plus optional mask and points, with score, label and provenance.

    ``provenance`` records how the region was made (model, prompt, frames, refinement), so that a JSON
    result can be traced. All geometry is in the original image's pixel frame.
    """

    box: Box
    label: str = ""
    mask: Mask | None = None
    points: Points | None = None
    score: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mask(cls, mask: Mask, **kwargs: Any) -> Region:
        """Region whose box is the tight box of ``mask``; raises on an empty mask."""
        box = mask.to_box()
        if box is None:
            raise input_error("Region.from_mask", expected="a non-empty mask", received="an empty mask",
                              fix="check the prediction before building a region from it")
        return cls(box=box, mask=mask, **kwargs)

    @property
    def structure(self) -> str | None:
        """The canonical structure a text prompt was read as (provenance), or None."""
        prompt = self.provenance.get("prompt")
        structure = prompt.get("structure") if isinstance(prompt, dict) else None
        return str(structure) if structure else None

    def measurements(self, spacing_mm: tuple[float, float] | None) -> dict[str, float] | None:
        """:func:`medvlm.measure.measure_structure` of this region's mask as its :attr:`structure` (mm with
        ``spacing_mm = (row_mm, col_mm)``, else px); None when the structure has no measurement or no mask."""
        if self.mask is None:
            return None
        return measure_structure(self.structure, self.mask.data, spacing_mm)

    def to_json(self, *, mask_path: str | None = None, spacing_mm: tuple[float, float] | None = None) -> dict[str, Any]:
        """JSON-ready dict; the mask itself is referenced by ``mask_path`` (written by the caller)."""
        out: dict[str, Any] = {
            "label": self.label,
            "box": [round(v, 3) for v in self.box.to_list()],
            "score": None if self.score is None else float(self.score),
        }
        if self.points is not None:
            out["points"] = self.points.to_json()
        if self.mask is not None:
            out["area_px"] = self.mask.area_px
            out["area_mm2"] = self.mask.area_mm2(spacing_mm)
            measured = self.measurements(spacing_mm)
            if measured is not None:
                out["measurements"] = measured
        if mask_path is not None:
            out["mask"] = mask_path
        if self.provenance:
            out["provenance"] = self.provenance
        if self.checks:
            out["checks"] = self.checks
        return out
