"""Masks in the HTTP API's JSON: uncompressed run-length encoding on the original pixel grid.

``{"size": [H, W], "counts": [c0, c1, c2, ...], "order": "row-major"}``: the mask ``(H, W)`` is read row by
row (row 0 from column 0 to W - 1, then row 1, ...: C order, x = column, y = row); ``counts`` are the lengths
of the alternating runs of 0 and 1 in that sequence, STARTING WITH ZEROS (``c0`` may be 0 when the first pixel
is inside), and they sum to ``H * W``. Decoding in any language: fill runs alternately with 0 and 1 and
reshape to ``(H, W)``. (COCO's RLE is column-major; ``order`` says which one this is.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from medvlm.errors import input_error

__all__ = ["ORDER", "rle_area", "rle_decode", "rle_encode"]

ORDER = "row-major"


def rle_encode(mask: npt.ArrayLike) -> dict[str, Any]:
    """``mask``: bool ``(H, W)`` (anything non-zero = inside) -> ``{"size": [H, W], "counts": [...], "order"}``."""
    arr = np.asarray(getattr(mask, "data", mask))
    if arr.ndim != 2:
        raise input_error("rle_encode", expected="a 2D mask (H, W)", received=f"shape {arr.shape}",
                          fix="encode one mask at a time")
    flat = arr.astype(bool).ravel(order="C")
    if flat.size == 0:
        return {"size": [int(arr.shape[0]), int(arr.shape[1])], "counts": [], "order": ORDER}
    # run boundaries are where a pixel differs from its predecessor
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate(([0], changes, [flat.size]))
    runs = np.diff(edges).tolist()
    if flat[0]:
        runs.insert(0, 0)
    return {"size": [int(arr.shape[0]), int(arr.shape[1])], "counts": [int(r) for r in runs], "order": ORDER}


def rle_decode(rle: Mapping[str, Any]) -> npt.NDArray[np.bool_]:
    """Inverse of :func:`rle_encode`: bool ``(H, W)``. Raises InputError when the counts do not describe the size."""
    try:
        height, width = (int(v) for v in rle["size"])
        counts = np.asarray(rle["counts"], dtype=np.int64).reshape(-1)
    except (KeyError, TypeError, ValueError) as exc:
        raise input_error("RLE mask", expected='{"size": [H, W], "counts": [int, ...]}', received=repr(rle)[:120],
                          fix="pass the mask object exactly as the API returned it") from exc
    order = rle.get("order", ORDER)
    if order != ORDER:
        raise input_error("RLE mask order", expected=f"{ORDER!r}", received=repr(order),
                          fix="transpose a column-major (COCO) mask first")
    if height < 0 or width < 0 or (counts < 0).any() or int(counts.sum()) != height * width:
        raise input_error("RLE mask", expected=f"non-negative counts summing to H*W = {height * width}",
                          received=f"size {[height, width]}, counts summing to {int(counts.sum())}",
                          fix="pass the mask object exactly as the API returned it")
    values = np.arange(counts.size) % 2 == 1  # runs alternate 0, 1, 0, ... starting with zeros
    return np.repeat(values, counts).reshape(height, width)


def rle_area(rle: Mapping[str, Any]) -> int:
    """Number of mask pixels (the sum of the odd runs), without decoding."""
    return int(sum(int(c) for c in list(rle["counts"])[1::2]))
