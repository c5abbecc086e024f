"""Every conversion between the project's pixel frame and other coordinate frames.

The project frame is pixel xyxy in the ORIGINAL image (see :mod:`medvlm.types`). Models and LLMs use other
frames; each is an axis-aligned affine map ``frame = original * scale + offset`` per axis, described by a
:class:`Frame`. Known frames:

- ``normalized``: ``[0, 1]`` per axis (x / W, y / H).
- ``per_mille``: ``[0, 1000]`` per axis, the Qwen2-VL "(x1,y1),(x2,y2)" convention; LLMs emit integers, so
  :func:`to_per_mille` rounds and a round trip is exact to within half a unit (W / 2000 pixels).
- ``resized``: the image stretched to ``(new_h, new_w)`` (independent x and y scales), e.g. the absolute
  pixels of the resized image that Qwen2.5-VL emits.
- ``letterbox``: longest side resized to ``target`` with the aspect ratio kept, padded at the bottom/right
  (the SAM / LiteMedSAM input frame); both axes share one scale.
- ``loc1024``: PaliGemma ``<locYYYY>`` tokens, 1024 bins per axis, emitted as y0 x0 y1 x1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from medvlm.errors import input_error
from medvlm.types import Box, Points

__all__ = [
    "Frame",
    "from_loc_tokens",
    "from_normalized",
    "from_per_mille",
    "letterbox_frame",
    "normalized_frame",
    "per_mille_frame",
    "resized_frame",
    "to_loc_tokens",
    "to_normalized",
    "to_per_mille",
]


def _check_size(height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise input_error("image size", expected="positive height and width", received=f"({height}, {width})",
                          fix="pass the original image's (height, width) in pixels")


@dataclass(frozen=True)
class Frame:
    """Affine per-axis map from original pixels to a model frame: ``u = x * sx + tx``, ``v = y * sy + ty``.

    ``size`` is ``(height, width)`` of the frame's canvas in its own units (for clipping), or None.
    """

    sx: float
    sy: float
    tx: float = 0.0
    ty: float = 0.0
    name: str = "custom"

    def __post_init__(self) -> None:
        if not (self.sx > 0 and self.sy > 0):
            raise input_error("Frame", expected="positive scales", received=f"sx={self.sx}, sy={self.sy}",
                              fix="build frames with the helpers in medvlm.coords")

    # -- points (N, 2) xy ------------------------------------------------------------------------
    def forward_xy(self, xy: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Original pixels -> frame. ``xy`` shape (N, 2) or (2,), returns the same shape, float64."""
        arr = np.asarray(xy, dtype=np.float64)
        return arr * np.array([self.sx, self.sy]) + np.array([self.tx, self.ty])

    def inverse_xy(self, uv: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Frame -> original pixels. ``uv`` shape (N, 2) or (2,), float64."""
        arr = np.asarray(uv, dtype=np.float64)
        return (arr - np.array([self.tx, self.ty])) / np.array([self.sx, self.sy])

    # -- boxes ---------------------------------------------------------------------------------
    def forward_box(self, box: Box) -> npt.NDArray[np.float64]:
        """Box (original pixels) -> ``[u0, v0, u1, v1]`` in the frame, shape (4,)."""
        return self.forward_xy(np.array([[box.x0, box.y0], [box.x1, box.y1]])).reshape(4)

    def inverse_box(self, values: npt.ArrayLike) -> Box:
        """``[u0, v0, u1, v1]`` in the frame -> Box in original pixels (corners re-ordered if swapped)."""
        arr = np.asarray(values, dtype=np.float64).reshape(2, 2)
        xy = self.inverse_xy(arr)
        return Box(float(xy[:, 0].min()), float(xy[:, 1].min()), float(xy[:, 0].max()), float(xy[:, 1].max()))

    def forward_points(self, points: Points) -> npt.NDArray[np.float64]:
        """Points -> frame coordinates, shape (N, 2); labels are unchanged."""
        return self.forward_xy(points.coords).reshape(-1, 2)

    def inverse_points(self, uv: npt.ArrayLike, labels: npt.ArrayLike) -> Points:
        return Points(self.inverse_xy(np.asarray(uv, dtype=np.float64).reshape(-1, 2)), np.asarray(labels))


def normalized_frame(height: int, width: int) -> Frame:
    """Original pixels -> ``[0, 1]`` per axis."""
    _check_size(height, width)
    return Frame(1.0 / width, 1.0 / height, name="normalized")


def per_mille_frame(height: int, width: int) -> Frame:
    """Original pixels -> ``[0, 1000]`` per axis (Qwen2-VL grounding)."""
    _check_size(height, width)
    return Frame(1000.0 / width, 1000.0 / height, name="per_mille")


def resized_frame(height: int, width: int, new_height: int, new_width: int) -> Frame:
    """Original pixels -> pixels of the image stretched to ``(new_height, new_width)``."""
    _check_size(height, width)
    _check_size(new_height, new_width)
    return Frame(new_width / width, new_height / height, name=f"resized_{new_height}x{new_width}")


def letterbox_frame(height: int, width: int, target: int) -> Frame:
    """Longest side -> ``target`` pixels, aspect kept, padding at bottom/right (SAM input frame).

    The resized content occupies ``(round(h * s), round(w * s))`` at the top-left of a ``target`` square.
    """
    _check_size(height, width)
    if target <= 0:
        raise input_error("letterbox target", expected="a positive size", received=str(target),
                          fix="pass the model's input side in pixels, e.g. 256 or 1024")
    scale = target / max(height, width)
    return Frame(scale, scale, name=f"letterbox_{target}")


def letterbox_content_shape(height: int, width: int, target: int) -> tuple[int, int]:
    """``(h, w)`` of the resized content inside the ``target`` square, as used when resizing pixels."""
    scale = target / max(height, width)
    return (max(1, round(height * scale)), max(1, round(width * scale)))


def to_normalized(box: Box, height: int, width: int) -> npt.NDArray[np.float64]:
    """Box in pixels -> ``[x0, y0, x1, y1]`` in ``[0, 1]``."""
    return normalized_frame(height, width).forward_box(box)


def from_normalized(values: npt.ArrayLike, height: int, width: int) -> Box:
    """``[x0, y0, x1, y1]`` in ``[0, 1]`` -> Box in pixels."""
    return normalized_frame(height, width).inverse_box(values)


def to_per_mille(box: Box, height: int, width: int) -> list[int]:
    """Box in pixels -> integer ``[x0, y0, x1, y1]`` in ``[0, 1000]`` (rounded, clipped)."""
    vals = np.clip(np.rint(per_mille_frame(height, width).forward_box(box)), 0, 1000)
    return [int(v) for v in vals]


def from_per_mille(values: npt.ArrayLike, height: int, width: int) -> Box:
    """``[x0, y0, x1, y1]`` in ``[0, 1000]`` -> Box in pixels."""
    return per_mille_frame(height, width).inverse_box(values)


_LOC_BINS = 1024


def to_loc_tokens(box: Box, height: int, width: int) -> str:
    """Box -> PaliGemma ``<locYYYY>`` string (y0 x0 y1 x1, 1024 bins, each bin index = floor(v * 1024))."""
    y0, x0, y1, x1 = box.y0 / height, box.x0 / width, box.y1 / height, box.x1 / width
    bins = [min(_LOC_BINS - 1, max(0, int(np.floor(v * _LOC_BINS)))) for v in (y0, x0, y1, x1)]
    return "".join(f"<loc{b:04d}>" for b in bins)


def from_loc_tokens(bins: npt.ArrayLike, height: int, width: int) -> Box:
    """Four PaliGemma bins ``(y0, x0, y1, x1)`` in ``[0, 1023]`` -> Box in pixels.

    Bin ``b`` maps to ``b / 1024`` for the start corner and ``(b + 1) / 1024`` for the end corner, so a box
    encoded by :func:`to_loc_tokens` is recovered to within one bin (H/1024 or W/1024 pixels).
    """
    arr = np.asarray(bins, dtype=np.float64).reshape(4)
    if np.any(arr < 0) or np.any(arr > _LOC_BINS - 1):
        raise input_error("loc tokens", expected="4 bins in [0, 1023]", received=repr(arr.tolist()),
                          fix="parse exactly four <locYYYY> tokens")
    y0, x0, y1, x1 = arr
    return Box(min(x0, x1) / _LOC_BINS * width, min(y0, y1) / _LOC_BINS * height,
               (max(x0, x1) + 1) / _LOC_BINS * width, (max(y0, y1) + 1) / _LOC_BINS * height)
