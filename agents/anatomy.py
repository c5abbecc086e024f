"""Chest anatomy on one frontal radiograph: Chest ImaGenome-style regions derived from lung/heart/clavicle masks,
and the consistency check of a grounded region against the phrase it answers.

Geometry (all in pixels of the original image; the patient's right is on the IMAGE left):

- lung zones: each lung's vertical extent (top row to bottom row of its mask) cut in thirds; a zone is the lung
  mask inside its band;
- apical zone: the lung above the lower edge of the clavicle on that side (median over the clavicle's columns
  of its lowest row), never lower than the upper third; without a clavicle mask, the top 15 % of the lung;
- costophrenic angle: the lung in the bottom 20 % of its extent and in the lateral half of its full width;
- hilar structures: a rectangle at the lung's medial border over the middle third of its extent, 35 % of the
  lung's width inward and 5 % outward (the hilum straddles the lung edge, so it is not clipped to the lung);
- hemidiaphragm: a band of +-4 % of the lung height around the lowest lung pixel of every column whose lowest
  pixel lies in the lower third (higher ones end on the heart border, not on the diaphragm);
- cardiac silhouette: the heart mask; mediastinum: per row, the gap between the two lungs' medial edges from
  the apices to the heart's lower edge, plus the heart; upper mediastinum: its part above the heart.

The masks come from the embedded Med-VLM (:func:`segment_chest_anatomy`) or, in evaluations, from ground truth,
so the same rules turn both into regions and the two can be compared.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from medvlm.types import Box, Mask, Region

__all__ = [
    "BASE_STRUCTURES",
    "ChestAnatomy",
    "anatomy_from_masks",
    "check_region",
    "dilate_disc",
    "interior_point",
    "segment_chest_anatomy",
]

BoolArray = npt.NDArray[np.bool_]

#: the masks every derived region comes from (anatomy_v1 structure names, patient's sides)
BASE_STRUCTURES: tuple[str, ...] = ("right lung", "left lung", "heart", "right clavicle", "left clavicle")

_ZONES = ("upper", "mid", "lower")


def _rows(mask: BoolArray) -> tuple[int, int] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    return (int(rows[0]), int(rows[-1]) + 1) if rows.size else None


def _cols(mask: BoolArray) -> tuple[int, int] | None:
    cols = np.flatnonzero(mask.any(axis=0))
    return (int(cols[0]), int(cols[-1]) + 1) if cols.size else None


def _band(mask: BoolArray, r0: float, r1: float) -> BoolArray:
    out = np.zeros_like(mask)
    a, b = max(0, round(r0)), min(mask.shape[0], round(r1))
    out[a:b] = mask[a:b]
    return out


def _nearest_background_d2(ys: npt.NDArray[np.intp], xs: npt.NDArray[np.intp], by: npt.NDArray[np.intp],
                           bx: npt.NDArray[np.intp]) -> npt.NDArray[np.int64]:
    """Squared distance of each pixel (ys, xs) to the nearest of the pixels (by, bx), in chunks of ~4 M pairs."""
    out = np.empty(ys.size, dtype=np.int64)
    step = max(1, 4_000_000 // max(1, by.size))
    for k in range(0, ys.size, step):
        dy = ys[k:k + step, None] - by[None, :]
        dx = xs[k:k + step, None] - bx[None, :]
        out[k:k + step] = (dy * dy + dx * dx).min(axis=1)
    return out


def _dilate_rows(mask: BoolArray, half: int) -> BoolArray:
    """Each row of ``mask`` dilated by ``half`` pixels to both sides (a running sum over a 2*half+1 window)."""
    if half == 0:
        return mask.copy()
    c = np.cumsum(np.pad(mask, ((0, 0), (half + 1, half))).astype(np.int32), axis=1)
    return (c[:, 2 * half + 1:] - c[:, : -(2 * half + 1)]) > 0


def dilate_disc(mask: BoolArray, radius: float) -> BoolArray:
    """``mask`` (H, W) grown by every pixel within Euclidean distance ``radius`` (pixels) of it: scipy's
    ``distance_transform_edt(~mask) <= radius`` exactly (tests check it), without importing scipy. The disc is
    cut into rows: offset dy keeps every dx with dy^2 + dx^2 <= radius^2, one 1-D dilation per distinct width."""
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros_like(mask)
    if not mask.any():
        return out
    r = math.floor(radius)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    y0, y1 = max(0, int(rows[0]) - r), min(mask.shape[0], int(rows[-1]) + r + 1)
    x0, x1 = max(0, int(cols[0]) - r), min(mask.shape[1], int(cols[-1]) + r + 1)
    crop = np.pad(mask[y0:y1, x0:x1], r)  # room for every shift; the crop holds all that can be reached
    grown = np.zeros_like(crop)
    widths: dict[int, BoolArray] = {}
    h = crop.shape[0]
    for dy in range(-r, r + 1):
        half = math.floor(math.sqrt(max(0.0, radius * radius - dy * dy)))
        while (half + 1) ** 2 + dy * dy <= radius * radius:  # guard the float square root at exact squares
            half += 1
        while half > 0 and half * half + dy * dy > radius * radius:
            half -= 1
        if half not in widths:
            widths[half] = _dilate_rows(crop, half)
        row = widths[half]
        if dy >= 0:
            grown[dy:] |= row[: h - dy]
        else:
            grown[: h + dy] |= row[-dy:]
    out[y0:y1, x0:x1] = grown[r: r + (y1 - y0), r: r + (x1 - x0)]
    return out


def interior_point(mask: BoolArray) -> tuple[float, float] | None:
    """The most interior pixel of ``mask`` (H, W) as pixel ``(x, y)`` (centre of the pixel farthest from the
    background, outside the image counting as background; the first in row-major order among ties), or None for
    an empty mask. A point prompt there lies inside even a concave mask.

    The argmax of scipy's ``distance_transform_edt`` (tests check it pixel for pixel), in numpy: importing
    scipy.ndimage costs 0.25-0.3 s of a cold ``medvlm ask``. Exact: a mask pixel's nearest background pixel is
    4-adjacent to the mask, and the distance is 1-Lipschitz, so a coarse grid of exact distances bounds where the
    maximum can be and only the pixels of those grid cells are measured exactly (integer squared distances)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    m = np.pad(mask, 1)
    near = np.zeros_like(m)
    near[1:] |= m[:-1]
    near[:-1] |= m[1:]
    near[:, 1:] |= m[:, :-1]
    near[:, :-1] |= m[:, 1:]
    by, bx = np.nonzero(near & ~m)
    py, px = np.nonzero(m)  # row-major
    s = max(1, int(math.sqrt(py.size / 1500)))
    if s > 1:
        on_grid = (py % s == 0) & (px % s == 0)
        gy, gx = py[on_grid], px[on_grid]
        gd = np.sqrt(_nearest_background_d2(gy, gx, by, bx))
        # every pixel of the cell [g, g + s)^2 lies within s*sqrt(2) of its grid pixel g
        keep = gd + s * math.sqrt(2.0) >= gd.max() - 1e-9
        cols = m.shape[1] // s + 2
        inside = np.isin((py // s) * cols + px // s, (gy[keep] // s) * cols + gx[keep] // s)
        py, px = py[inside], px[inside]
    d2 = _nearest_background_d2(py, px, by, bx)
    i = int(np.flatnonzero(d2 == d2.max())[0])
    return float(px[i] - 1) + 0.5, float(py[i] - 1) + 0.5


@dataclass
class ChestAnatomy:
    """Base masks of one frontal chest radiograph and the regions derived from them.

    ``masks``: structure name (``BASE_STRUCTURES``; missing ones allowed) -> bool (H, W) on the original grid.
    ``scores``: the segmenter's confidence per structure in [0, 1] (1.0 for ground truth).
    ``source``: where the masks came from (e.g. "medvlm", "ground truth").
    Both mappings may be lazy (:func:`segment_chest_anatomy`): a structure is segmented when first looked up.
    """

    masks: Mapping[str, BoolArray]
    shape: tuple[int, int]
    scores: Mapping[str, float] = field(default_factory=dict)
    source: str = ""
    #: pixels the image itself covers (None: the whole grid); an augmented copy zoomed out by s covers s^2 of it
    image_area: float | None = None
    _cache: dict[str, BoolArray | None] = field(default_factory=dict, repr=False)
    _points: dict[str, tuple[float, float] | None] = field(default_factory=dict, repr=False)

    @property
    def is_chest(self) -> bool:
        """The masks look like a frontal chest radiograph, so the region rules apply: both lungs found, each
        covering >= 6 % of the image and together >= 18 %. Lungs on axial CT/MR slices (and what a text-guided
        model calls lungs on an abdominal slice) stayed under 10 % each and 18 % together on every slice of
        ../shared/data; frontal radiographs cover 20-35 % (JSRT, V7, Shenzhen, NIH ground truth)."""
        area = self.image_area or self.shape[0] * self.shape[1]
        fractions = [float(self.masks[s].sum()) / area if s in self.masks else 0.0 for s in ("right lung", "left lung")]
        return min(fractions) >= 0.06 and sum(fractions) >= 0.18

    def midline_x(self) -> float:
        """Column (pixels) of the patient's midline: halfway between the lungs' medial edges (their facing
        sides), else the image centre. Patient's right lies at smaller x."""
        right, left = self.masks.get("right lung"), self.masks.get("left lung")
        if right is not None and left is not None and right.any() and left.any():
            rc, lc = _cols(right), _cols(left)
            assert rc is not None and lc is not None
            return (rc[1] + lc[0]) / 2.0
        return self.shape[1] / 2.0

    # ---------------------------------------------------------------------------------------------- regions

    def region(self, key: str) -> BoolArray | None:
        """Bool (H, W) mask of a chest region key (see prompts.regions.REGION_KEYS), or None when the masks it
        derives from are missing or the key is not a chest region."""
        if key not in self._cache:
            self._cache[key] = self._derive(key)
        return self._cache[key]

    def region_box(self, key: str) -> Box | None:
        mask = self.region(key)
        return None if mask is None else Mask(mask).to_box()

    def union(self, keys: Iterable[str]) -> BoolArray | None:
        """Union of several regions (None when none of them can be derived). Cached per key set: do not modify."""
        name = "|".join(keys)
        if name not in self._cache:
            out: BoolArray | None = None
            for key in name.split("|"):
                m = self.region(key)
                if m is not None:
                    out = m.copy() if out is None else out | m
            self._cache[name] = out
        return self._cache[name]

    def grown(self, keys: Sequence[str]) -> BoolArray | None:
        """:meth:`union` grown by 2 % of the longer image side (the zone check's tolerance), cached."""
        name = "grown:" + "|".join(keys)
        if name not in self._cache:
            zone = self.union(keys)
            grow = max(1.0, 0.02 * max(self.shape))
            self._cache[name] = None if zone is None else dilate_disc(zone, grow)
        return self._cache[name]

    def interior(self, keys: Sequence[str]) -> tuple[float, float] | None:
        """:func:`interior_point` of :meth:`union` (cached: synonyms of one region share it)."""
        name = "|".join(keys)
        if name not in self._points:
            zone = self.union(keys)
            self._points[name] = None if zone is None else interior_point(zone)
        return self._points[name]

    def score_of(self, key: str) -> float | None:
        """Confidence of the structure a region derives from (its lung or clavicle, the heart; for the
        mediastinum the least confident of lungs and heart), or None when that structure has no score."""
        if key == "cardiac silhouette":
            return self.scores.get("heart")
        if "mediastinum" in key:
            vals = [self.scores[s] for s in ("right lung", "left lung", "heart") if s in self.scores]
            return min(vals) if vals else None
        side = key.split()[0]
        return self.scores.get(f"{side} clavicle" if key.endswith("clavicle") else f"{side} lung")

    def _lung(self, side: str) -> BoolArray | None:
        m = self.masks.get(f"{side} lung")
        return m if m is not None and m.any() else None

    def _derive(self, key: str) -> BoolArray | None:
        if key in ("right lung", "left lung", "right clavicle", "left clavicle"):
            m = self.masks.get(key)
            return m if m is not None and m.any() else None
        if key == "cardiac silhouette":
            m = self.masks.get("heart")
            return m if m is not None and m.any() else None
        if key in ("mediastinum", "upper mediastinum"):
            return self._mediastinum(upper=key == "upper mediastinum")
        side, _, rest = key.partition(" ")
        if side not in ("right", "left"):
            return None
        lung = self._lung(side)
        if lung is None:
            return None
        rows = _rows(lung)
        assert rows is not None
        top, bottom = rows
        height = bottom - top
        for i, zone in enumerate(_ZONES):
            if rest == f"{zone} lung zone":
                return _band(lung, top + i * height / 3.0, top + (i + 1) * height / 3.0)
        if rest == "apical zone":
            return _band(lung, top, self._apical_limit(side, top, height))
        if rest == "costophrenic angle":
            band = _band(lung, bottom - 0.2 * height, bottom)
            cols = _cols(lung)
            assert cols is not None
            # the lateral half of the WHOLE lung's width: the base's own width swings with how far the
            # segmentation reaches under the heart, the lung's width does not
            half = (cols[1] - cols[0]) / 2.0
            if side == "right":  # lateral = away from the midline: image left for the patient's right lung
                band[:, round(cols[0] + half):] = False
            else:
                band[:, : round(cols[1] - half)] = False
            return band
        if rest == "hilar structures":
            mid = _band(lung, top + height / 3.0, top + 2 * height / 3.0)
            cols = _cols(mid)
            assert cols is not None
            width = cols[1] - cols[0]
            if side == "right":
                c0, c1 = cols[1] - 0.35 * width, cols[1] + 0.05 * width
            else:
                c0, c1 = cols[0] - 0.05 * width, cols[0] + 0.35 * width
            out = np.zeros_like(lung)
            out[round(top + height / 3.0): round(top + 2 * height / 3.0),
                max(0, round(c0)): min(lung.shape[1], round(c1))] = True
            return out
        if rest == "hemidiaphragm":
            has: BoolArray = np.asarray(lung.any(axis=0), dtype=bool)
            lowest = np.where(has, lung.shape[0] - 1 - np.argmax(lung[::-1], axis=0), -1)
            r = np.arange(lung.shape[0])[:, None]
            near = np.abs(r - lowest[None, :]) <= 0.04 * height
            # only columns whose lowest lung pixel is in the lower third: higher ones end on the heart border
            base = has & (lowest >= top + 2 * height / 3.0)
            return np.asarray(near & base[None, :], dtype=bool)
        return None

    def _apical_limit(self, side: str, top: int, height: int) -> float:
        upper_third = top + height / 3.0
        clav = self.masks.get(f"{side} clavicle")
        if clav is None or not clav.any():
            return top + 0.15 * height
        has = clav.any(axis=0)
        lowest = clav.shape[0] - 1 - np.argmax(clav[::-1][:, has], axis=0)
        line = float(np.median(lowest)) + 1.0
        return min(max(line, top + 0.05 * height), upper_third)

    def _mediastinum(self, *, upper: bool) -> BoolArray | None:
        right, left = self._lung("right"), self._lung("left")
        if right is None or left is None:
            return None
        heart = self.masks.get("heart")
        heart = heart if heart is not None and heart.any() else None
        h, w = self.shape
        r_rows, l_rows = _rows(right), _rows(left)
        assert r_rows is not None and l_rows is not None
        top = min(r_rows[0], l_rows[0])
        heart_rows = _rows(heart) if heart is not None else None
        bottom = heart_rows[1] if heart_rows is not None else max(r_rows[1], l_rows[1])
        if upper:
            bottom = heart_rows[0] if heart_rows is not None else top + (bottom - top) // 3
        cols = np.arange(w)
        # medial edge per row: rightmost column of the patient's right lung, leftmost of the left lung;
        # rows where a lung is absent take the nearest row's edge (the apices and bases are uneven)
        r_edge = np.where(right.any(axis=1), w - 1 - np.argmax(right[:, ::-1], axis=1), -1).astype(float)
        l_edge = np.where(left.any(axis=1), np.argmax(left, axis=1), -1).astype(float)
        out = np.zeros((h, w), dtype=bool)
        for r in range(top, bottom):
            a, b = _nearest(r_edge, r), _nearest(l_edge, r)
            if a is not None and b is not None and b > a:
                out[r] = (cols > a) & (cols < b)
        if heart is not None and not upper:
            out |= heart
        if upper and heart is not None:
            out[heart_rows[0]:] = False  # type: ignore[index]
        return out if out.any() else None


def _nearest(edge: npt.NDArray[np.float64], r: int) -> float | None:
    valid = np.flatnonzero(edge >= 0)
    if valid.size == 0:
        return None
    return float(edge[valid[np.argmin(np.abs(valid - r))]])


_PAIRS = {f"{side} {part}": (f"right {part}", f"left {part}") for part in ("lung", "clavicle")
          for side in ("right", "left")}


class _OnDemand:
    """Structures segmented when first needed: ``decode(names) -> [(mask (H, W) bool, score)]`` runs once per
    batch of names not seen yet (one at a time across threads)."""

    def __init__(self, decode: Callable[[list[str]], list[tuple[BoolArray, float]]], names: Sequence[str]) -> None:
        self.decode = decode
        self.names = tuple(names)
        self.masks: dict[str, BoolArray] = {}
        self.scores: dict[str, float] = {}
        self._done: set[str] = set()
        self._lock = threading.Lock()

    def need(self, names: Iterable[str]) -> None:
        # a side asked for brings its pair along (one decoder call): the region rules read both lungs together
        wanted = [m for n in names for m in _PAIRS.get(n, (n,))]
        with self._lock:
            todo = [n for n in dict.fromkeys(wanted) if n in self.names and n not in self._done]
            if not todo:
                return
            for name, (mask, score) in zip(todo, self.decode(todo)):
                self._done.add(name)
                self.scores[name] = float(score)
                if mask.any():
                    self.masks[name] = mask


class _LazyMap(Mapping[str, Any]):
    """A read-only view of ``_OnDemand.masks`` or ``.scores`` that segments a structure on its first lookup
    (iterating or ``len`` segments them all)."""

    def __init__(self, source: _OnDemand, part: str) -> None:
        self._source = source
        self._part = part

    def _data(self) -> dict[str, Any]:
        data: dict[str, Any] = getattr(self._source, self._part)
        return data

    def __getitem__(self, key: str) -> Any:
        self._source.need([key])
        return self._data()[key]

    def __iter__(self) -> Iterator[str]:
        self._source.need(self._source.names)
        return iter(dict(self._data()))

    def __len__(self) -> int:
        self._source.need(self._source.names)
        return len(self._data())


def segment_chest_anatomy(segmenter: Any, image: Any, embedding: Any = None) -> ChestAnatomy:
    """:data:`BASE_STRUCTURES` of ``image`` from a text-guided segmenter (Med-VLM), wrapped as a
    :class:`ChestAnatomy` whose masks and scores are segmented on first use: a question about the heart decodes
    the lungs (is this a chest radiograph?) and the heart, not the clavicles (~0.13 s per structure on 2 cores).

    ``embedding``: an existing ``segmenter.encode(image)`` to reuse (the image is encoded once per request).
    """
    from segmentation.base import Prompt

    emb = embedding if embedding is not None else segmenter.encode(image)

    def decode(names: list[str]) -> list[tuple[BoolArray, float]]:
        results = segmenter.predict_many(emb, [Prompt(text=s) for s in names])
        return [(r.mask.data, float(r.score)) for r in results]

    source = _OnDemand(decode, BASE_STRUCTURES)
    height, width = emb.original_size
    return ChestAnatomy(masks=_LazyMap(source, "masks"), shape=(int(height), int(width)),
                        scores=_LazyMap(source, "scores"), source=getattr(segmenter, "name", "segmenter"))


# ---------------------------------------------------------------------------------------------- checks

CheckMode = Literal["flag", "repair", "off"]


def _region_pixels(region: Region, shape: tuple[int, int]) -> BoolArray:
    if region.mask is not None and region.mask.data.any():
        return region.mask.data
    out = np.zeros(shape, dtype=bool)
    b = region.box.clip(shape[1], shape[0])
    out[int(b.y0): int(np.ceil(b.y1)), int(b.x0): int(np.ceil(b.x1))] = True
    return out


def check_region(region: Region, expected: Sequence[str], anatomy: ChestAnatomy, *,
                 side: str | None = None, mode: CheckMode = "repair") -> Region:
    """Check ``region`` against the regions its phrase names (``expected``: chest region keys) and the phrase's
    ``side`` ("left"/"right"; None: taken from the expected keys; "bilateral": no laterality check).

    Laterality: the fraction of the region's pixels (mask, else box) on the patient's side named (patient's
    right = image columns left of :meth:`ChestAnatomy.midline_x`) must be >= 0.5. Zone: the fraction inside the
    union of the expected regions (dilated by 2 % of the image size, so a tight box at a zone edge passes) must
    be >= 0.5. ``mode="flag"`` keeps the region and records the failure; ``"repair"`` replaces it by its
    intersection with the expected regions, or by the expected regions themselves when they do not overlap.
    Returns a new Region whose ``checks`` hold ``{"laterality": {...}, "zone": {...}, "action": ...}``.
    """
    if mode == "off" or not anatomy.is_chest:
        skipped = {"action": "none", "skipped": "checks off" if mode == "off" else
                   "not a frontal chest radiograph (both lungs not found): anatomy checks apply to chest X-rays"}
        return Region(box=region.box, label=region.label, mask=region.mask, points=region.points,
                      score=region.score, provenance=region.provenance, checks={**region.checks, **skipped})
    shape = anatomy.shape
    pixels = _region_pixels(region, shape)
    n = max(int(pixels.sum()), 1)
    checks: dict[str, Any] = {}
    if side is None:
        sides = {k.split()[0] for k in expected if k.split()[0] in ("left", "right")}
        side = sides.pop() if len(sides) == 1 else None
    failed = False
    if side in ("left", "right"):
        mid = anatomy.midline_x()
        cols = np.arange(shape[1])
        on_right_of_patient = pixels[:, cols < mid].sum() / n
        frac = on_right_of_patient if side == "right" else 1.0 - on_right_of_patient
        observed = "right" if on_right_of_patient >= 0.5 else "left"
        ok = bool(frac >= 0.5)
        checks["laterality"] = {"expected": side, "observed": observed, "fraction_on_side": round(float(frac), 3),
                                "midline_x": round(mid, 1), "ok": ok}
        failed |= not ok
    zone = anatomy.union(expected) if expected else None
    zone_grown = anatomy.grown(expected) if expected else None
    if zone is not None and zone_grown is not None:
        frac_in = float((pixels & zone_grown).sum() / n)
        ok = frac_in >= 0.5
        checks["zone"] = {"expected": list(expected), "fraction_inside": round(frac_in, 3), "ok": ok}
        failed |= not ok
    action = "none"
    new = region
    if failed and mode == "flag":
        action = "flagged"
    elif failed and zone is not None:
        inter = pixels & zone
        repaired = inter if inter.any() else zone
        action = "repaired: intersected with " if inter.any() else "repaired: replaced by "
        action += " + ".join(expected)
        box = Mask(repaired).to_box()
        assert box is not None
        pt = interior_point(repaired)
        from medvlm.types import Points

        new = Region(box=box, label=region.label, mask=Mask(repaired),
                     points=Points.from_lists(positive=[pt]) if pt else region.points, score=region.score,
                     provenance={**region.provenance, "repaired_from_box": region.box.to_list()})
    elif failed:
        action = "flagged (no anatomy region to repair with)"
    checks["action"] = action
    return Region(box=new.box, label=new.label, mask=new.mask, points=new.points, score=new.score,
                  provenance=new.provenance, checks={**region.checks, **checks})


def anatomy_from_masks(masks: Mapping[str, BoolArray], shape: tuple[int, int], source: str,
                       image_area: float | None = None) -> ChestAnatomy:
    """Wrap ground-truth (or any) masks of :data:`BASE_STRUCTURES` as a :class:`ChestAnatomy` with score 1
    (``image_area``: see :attr:`ChestAnatomy.image_area`)."""
    kept = {k: np.asarray(v, dtype=bool) for k, v in masks.items() if k in BASE_STRUCTURES and np.any(v)}
    return ChestAnatomy(masks=kept, shape=shape, scores=dict.fromkeys(kept, 1.0), source=source,
                        image_area=image_area)
