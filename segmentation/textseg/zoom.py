"""A zoomed second look at small structures: re-encode a square window around a found mask.

Med-VLM's image encoder sees every image letterboxed to 256 px, a 64 x 64 feature grid: on a 512 x 512 CT slice
the pancreas (~0.5 % of the slice) covers a few dozen feature cells and a kidney's edge is blurred by the 8x
upsampling. ``zoom`` (a postprocess operation of :mod:`segmentation.textseg.postprocess`, chosen per structure on
the checkpoint's training images like the others) takes a square window around each component of the first mask
(:func:`zoom_windows`: ``factor`` x the component's longer side, at least ``min_fraction`` of the image's shorter
side, so the window keeps the context the structure is recognised by), encodes the crop, decodes the same text on
it and pastes the window's mask back. The result is the union of the windows' masks; nothing outside them is kept
(a speck far from every kept component is dropped, as ``largest_component`` would).

Training shows the model such windows (``zooms`` per image of a data source, :func:`random_zoom_window`), drawn
around a random component of a random present structure with a random factor, minimum and shift that cover the
inference setting, so that the second look is a kind of image the model has learned, not a new one.

Measured (README, session 17): with zoom training the model reads the windows, but on the CURVAS, MSD spleen and
ACDC val splits they added nothing it did not see in the whole image (pancreas 0.247 -> 0.177, kidney 0.652 ->
0.668, myocardium 0.680 -> 0.680), and the recipe's choice on training images overfits (spleen 0.917 -> 0.580
on 2 val slices); no packaged checkpoint uses ``zoom``. Check a recipe's choice of it on val before shipping.

Frames: windows are in pixels of the original image (row ``top``, column ``left``, ``side`` x ``side``), on the
same grid as masks and ``as_rgb_uint8`` pixels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["ZOOM_FACTOR", "ZOOM_MIN_FRACTION", "Window", "random_zoom_window", "square_window", "zoom_windows"]

#: window side over the component's longer side, and the window's least side over the image's shorter side, at
#: inference (training draws around these: :func:`random_zoom_window`)
ZOOM_FACTOR = 2.5
ZOOM_MIN_FRACTION = 0.5
#: training draws: factor, least side and the centre's shift (fraction of the side, each axis)
TRAIN_FACTOR = (2.0, 3.0)
TRAIN_MIN_FRACTION = (0.4, 0.6)
TRAIN_SHIFT = 0.15


@dataclass(frozen=True)
class Window:
    """A square window ``[top, top + side) x [left, left + side)`` of an image's pixel grid."""

    top: int
    left: int
    side: int

    def crop(self, array: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
        """The window of ``array`` ``(H, W, ...)`` (a view)."""
        return array[self.top:self.top + self.side, self.left:self.left + self.side]

    def paste(self, mask: npt.ArrayLike, shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
        """``mask`` (bool ``(side, side)``) placed on an empty bool grid of ``shape`` ``(H, W)``."""
        out = np.zeros(shape, dtype=bool)
        out[self.top:self.top + self.side, self.left:self.left + self.side] = np.asarray(mask, dtype=bool)
        return out

    def contains(self, box: tuple[float, float, float, float]) -> bool:
        """Whether the pixel box ``(x0, y0, x1, y1)`` (right/bottom exclusive) lies inside the window."""
        x0, y0, x1, y1 = box
        return (x0 >= self.left and y0 >= self.top and x1 <= self.left + self.side
                and y1 <= self.top + self.side)

    def to_json(self) -> list[int]:
        return [self.top, self.left, self.side]


def square_window(box: tuple[float, float, float, float], shape: tuple[int, int], *, factor: float = ZOOM_FACTOR,
                  min_fraction: float = ZOOM_MIN_FRACTION, shift: tuple[float, float] = (0.0, 0.0)) -> Window:
    """The square window around the pixel box ``(x0, y0, x1, y1)`` on an image of ``shape`` ``(H, W)``: side
    ``factor`` x the box's longer side, at least ``min_fraction`` x ``min(H, W)`` and at most ``min(H, W)``;
    centred on the box's centre moved by ``shift`` x side (x, y), then slid to lie inside the image."""
    height, width = shape
    x0, y0, x1, y1 = box
    limit = min(height, width)
    side = round(min(max(factor * max(x1 - x0, y1 - y0), min_fraction * limit), limit))
    side = max(1, side)
    cx = (x0 + x1) / 2 + shift[0] * side
    cy = (y0 + y1) / 2 + shift[1] * side
    top = int(np.clip(round(cy - side / 2), 0, height - side))
    left = int(np.clip(round(cx - side / 2), 0, width - side))
    return Window(top, left, side)


def zoom_windows(mask: npt.ArrayLike, *, factor: float = ZOOM_FACTOR,
                 min_fraction: float = ZOOM_MIN_FRACTION) -> list[Window]:
    """The windows of the ``zoom`` operation for ``mask`` (bool ``(H, W)``): one per component (those with >= 10 %
    of the largest one's pixels, at most 4, largest first), skipping a component already inside an earlier window;
    empty for an empty mask."""
    from segmentation.textseg.postprocess import component_boxes

    m = np.asarray(mask, dtype=bool)
    windows: list[Window] = []
    for box in component_boxes(m, pad=0.0):
        xyxy = (box.x0, box.y0, box.x1, box.y1)
        if any(w.contains(xyxy) for w in windows):
            continue
        windows.append(square_window(xyxy, m.shape, factor=factor, min_fraction=min_fraction))
    return windows


def random_zoom_window(masks: Mapping[str, npt.ArrayLike], shape: tuple[int, int],
                       rng: np.random.Generator) -> Window | None:
    """A training window for an image of ``shape`` ``(H, W)`` with ``masks`` (name -> bool ``(H, W)``): around a
    random component of a random non-empty mask, with factor, least side and shift drawn from ``TRAIN_*``; None
    when every mask is empty."""
    from segmentation.textseg.postprocess import component_boxes

    names = sorted(n for n, m in masks.items() if np.asarray(m).any())
    if not names:
        return None
    boxes = component_boxes(np.asarray(masks[names[int(rng.integers(len(names)))]], dtype=bool), pad=0.0)
    box = boxes[int(rng.integers(len(boxes)))]
    return square_window((box.x0, box.y0, box.x1, box.y1), shape, factor=float(rng.uniform(*TRAIN_FACTOR)),
                         min_fraction=float(rng.uniform(*TRAIN_MIN_FRACTION)),
                         shift=(float(rng.uniform(-TRAIN_SHIFT, TRAIN_SHIFT)),
                                float(rng.uniform(-TRAIN_SHIFT, TRAIN_SHIFT))))
