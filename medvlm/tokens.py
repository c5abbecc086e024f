"""Anatomy tokens: a mask as a short sequence of location tokens that a language model can emit, and back.

A mask becomes ``<poly>`` + ``<locXXXX><locYYYY>`` pairs + ``</poly>``, one group per connected component
(largest first, outer contour only: holes are filled). Bins follow PaliGemma's 1024 location tokens: pixel
coordinate ``x`` of an image ``W`` wide maps to ``round((x + 0.5) / W * 1024 - 0.5)``, clipped to [0, 1023], so
a 1024-pixel side round-trips exactly. Each contour is simplified (Douglas-Peucker) until the whole mask fits in
``max_points`` vertices, shared among components by perimeter; components under ``min_area_fraction`` of the
image are dropped (the largest is always kept). Tokens per mask: ``2 * points + 2 * components``.

Decoding fills each polygon at the original resolution (sub-pixel vertices, OpenCV ``fillPoly``). The default
budget is the one whose round trip is measured by ``medvlm eval mask-codec``.
"""

from __future__ import annotations

import re

import numpy as np
import numpy.typing as npt

from medvlm.errors import input_error
from medvlm.types import Box

__all__ = ["LOC_BINS", "POLY_CLOSE", "POLY_OPEN", "decode_box", "decode_mask", "encode_box", "encode_mask",
           "mask_tokens"]

LOC_BINS = 1024
POLY_OPEN, POLY_CLOSE = "<poly>", "</poly>"
BOX_OPEN, BOX_CLOSE = "<box>", "</box>"
_SHIFT = 4  # fillPoly sub-pixel bits: vertices are placed to 1/16 pixel

_GROUP = re.compile(re.escape(POLY_OPEN) + r"(.*?)" + re.escape(POLY_CLOSE), re.S)
_LOC = re.compile(r"<loc(\d{4})>")


def mask_tokens() -> list[str]:
    """Every token the codecs emit: the 1024 ``<locNNNN>`` tokens and the polygon and box delimiters."""
    return [f"<loc{b:04d}>" for b in range(LOC_BINS)] + [POLY_OPEN, POLY_CLOSE, BOX_OPEN, BOX_CLOSE]


def _to_bin(v: npt.NDArray[np.float64], size: int) -> npt.NDArray[np.int64]:
    return np.clip(np.round((v + 0.5) / size * LOC_BINS - 0.5), 0, LOC_BINS - 1).astype(np.int64)


def _from_bin(b: npt.NDArray[np.float64], size: int) -> npt.NDArray[np.float64]:
    return (b + 0.5) * size / LOC_BINS - 0.5


def _simplify(contour: npt.NDArray[np.integer], budget: int) -> npt.NDArray[np.integer]:
    """Fewest-change Douglas-Peucker simplification with at most ``budget`` (>= 3) vertices."""
    import cv2

    if len(contour) <= budget:
        return contour
    lo, hi = 0.0, float(cv2.arcLength(contour, True))
    best = cv2.approxPolyDP(contour, hi, True)
    for _ in range(30):  # bisection on the tolerance (pixels): more tolerance, fewer vertices
        mid = (lo + hi) / 2.0
        approx = cv2.approxPolyDP(contour, mid, True)
        if len(approx) <= budget:
            best, hi = approx, mid
        else:
            lo = mid
    if len(best) < 3:  # a sliver collapses to a line: keep three spread vertices of the contour instead
        best = contour[np.linspace(0, len(contour) - 1, 3).astype(int)]
    return np.asarray(best, dtype=np.int32)


def encode_box(box: Box, height: int, width: int) -> str:
    """Box (pixel xyxy of an image ``height`` x ``width``) -> ``<box>`` + 4 location tokens (x0 y0 x1 y1, the
    corners' pixel coordinates binned like polygon vertices; x1/y1 exclusive edges map to their last pixel) +
    ``</box>``."""
    xs = _to_bin(np.array([box.x0, box.x1 - 1.0]), width)
    ys = _to_bin(np.array([box.y0, box.y1 - 1.0]), height)
    return BOX_OPEN + "".join(f"<loc{int(b):04d}>" for b in (xs[0], ys[0], xs[1], ys[1])) + BOX_CLOSE


def decode_box(text: str, height: int, width: int) -> Box | None:
    """The first ``<box>`` group of ``text`` -> Box in pixels, or None when there is none with 4 tokens."""
    match = re.search(re.escape(BOX_OPEN) + r"(.*?)" + re.escape(BOX_CLOSE), text, re.S)
    bins = [int(b) for b in _LOC.findall(match.group(1))] if match else []
    if len(bins) != 4:
        return None
    x0, x1 = sorted(_from_bin(np.array([bins[0], bins[2]], dtype=np.float64), width))
    y0, y1 = sorted(_from_bin(np.array([bins[1], bins[3]], dtype=np.float64), height))
    return Box(max(0.0, x0), max(0.0, y0), min(float(width), x1 + 1.0), min(float(height), y1 + 1.0))


def encode_mask(mask: npt.ArrayLike, *, max_points: int = 32, min_area_fraction: float = 0.0005) -> str:
    """Bool mask ``(H, W)`` -> token string (see the module docstring); ``""`` for an empty mask."""
    import cv2

    m = np.asarray(mask).astype(bool)
    if m.ndim != 2:
        raise input_error("encode_mask", expected="a 2D mask (H, W)", received=f"shape {m.shape}",
                          fix="encode one mask at a time")
    if max_points < 3:
        raise input_error("max_points", expected="at least 3 (a triangle)", received=str(max_points),
                          fix="use e.g. 64")
    if not m.any():
        return ""
    height, width = m.shape
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contours = sorted(contours, key=cv2.contourArea, reverse=True)
    keep = [c for c in contours if cv2.contourArea(c) >= min_area_fraction * height * width] or contours[:1]
    keep = keep[: max(1, max_points // 3)]
    perimeters = np.array([max(cv2.arcLength(c, True), 1.0) for c in keep])
    budgets = np.maximum(3, np.floor(max_points * perimeters / perimeters.sum())).astype(int)
    while budgets.sum() > max_points and budgets.max() > 3:
        budgets[int(np.argmax(budgets))] -= 1
    out = []
    for contour, budget in zip(keep, budgets):
        pts = _simplify(np.asarray(contour, dtype=np.int32), int(budget)).reshape(-1, 2).astype(np.float64)
        bx, by = _to_bin(pts[:, 0], width), _to_bin(pts[:, 1], height)
        out.append(POLY_OPEN + "".join(f"<loc{x:04d}><loc{y:04d}>" for x, y in zip(bx, by)) + POLY_CLOSE)
    return "".join(out)


def decode_mask(text: str, height: int, width: int) -> npt.NDArray[np.bool_]:
    """Token string -> bool mask ``(height, width)``. Tolerant: text outside ``<poly>`` groups is ignored, an
    odd trailing location token is dropped, and groups with fewer than 3 vertices draw nothing."""
    import cv2

    if height <= 0 or width <= 0:
        raise input_error("decode_mask", expected="a positive image size", received=f"{height} x {width}",
                          fix="pass the original image's height and width")
    canvas = np.zeros((height, width), dtype=np.uint8)
    for group in _GROUP.findall(text):
        bins = np.array([int(b) for b in _LOC.findall(group)], dtype=np.float64)
        bins = bins[: len(bins) // 2 * 2].reshape(-1, 2)
        if len(bins) < 3:
            continue
        xy = np.stack([_from_bin(bins[:, 0], width), _from_bin(bins[:, 1], height)], axis=1)
        cv2.fillPoly(canvas, [np.round(xy * (1 << _SHIFT)).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=_SHIFT)
    return canvas.astype(bool)
