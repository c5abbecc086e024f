"""Promptable segmentation API shared by every backend (SAM style: encode once, prompt many times).

Every prompt and every mask is in the ORIGINAL image's pixel frame (see :mod:`medvlm.types`): a backend maps
prompts into its model input frame with the :class:`medvlm.coords.Frame` stored in the
:class:`ImageEmbedding`, and maps masks back to ``(H, W)`` of the original image before returning them.

This module does not import torch, so ``import segmentation`` stays cheap.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Union, runtime_checkable

import numpy as np
import numpy.typing as npt

from medvlm.coords import Frame
from medvlm.errors import input_error
from medvlm.types import Box, Mask, Points

if TYPE_CHECKING:
    from medvlm.io import MedicalImage

__all__ = [
    "BOX_TOLERANCE_PX",
    "ImageEmbedding",
    "ImageInput",
    "Prompt",
    "PromptableSegmenter",
    "SegmentationResult",
    "SegmenterBase",
    "as_rgb_uint8",
    "group_prompts",
]

ImageInput = Union["MedicalImage", npt.NDArray[Any]]

#: A box edge may lie this many pixels outside the image; it is then clipped to the image. Farther -> error.
BOX_TOLERANCE_PX = 1.0


@dataclass(frozen=True)
class Prompt:
    """What to segment: a box and/or points, in pixels of the ORIGINAL image (xyxy / xy, float), or a text.

    At least one of ``box``, ``points`` and ``text`` must be given. Point labels follow SAM: 1 positive,
    0 negative. ``text`` (a phrase or a description of the target) is for text-guided segmenters (Med-VLM);
    promptable segmenters (LiteMedSAM, SAM2) reject it.
    """

    box: Box | None = None
    points: Points | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if self.box is not None and not isinstance(self.box, Box):
            raise input_error("Prompt.box", expected="a medvlm.types.Box (pixel xyxy of the original image)",
                              received=type(self.box).__name__, fix="wrap the coordinates: Box(x0, y0, x1, y1)")
        if self.points is not None and not isinstance(self.points, Points):
            raise input_error("Prompt.points", expected="a medvlm.types.Points", received=type(self.points).__name__,
                              fix="build them with Points.from_lists(positive=[(x, y)], negative=[...])")
        if self.text is not None and (not isinstance(self.text, str) or not self.text.strip()):
            raise input_error("text prompt", expected="a non-empty phrase or description, e.g. 'heart' or 'the "
                              "left lung'", received=repr(self.text), fix="pass the structure or finding to segment")
        if self.box is None and (self.points is None or len(self.points) == 0) and self.text is None:
            raise input_error("Prompt", expected="a box, at least one point, or a text", received="none of them",
                              fix="pass box=Box(x0, y0, x1, y1), points=Points.from_lists(positive=[(x, y)]) or "
                              "text='heart'")

    __hash__ = None  # type: ignore[assignment]  # Points are unhashable arrays

    @classmethod
    def from_box(cls, x0: float, y0: float, x1: float, y1: float) -> Prompt:
        return cls(box=Box(x0, y0, x1, y1))

    def signature(self) -> tuple[bool, int, bool]:
        """``(has_box, n_points, has_text)``: prompts with equal signatures can share one batched decoder call."""
        return (self.box is not None, 0 if self.points is None else len(self.points), self.text is not None)

    def validated(self, height: int, width: int) -> Prompt:
        """Check the prompt against an image of ``(height, width)``; return it with boxes clipped.

        A box may stick out of the image by at most :data:`BOX_TOLERANCE_PX` (it is then clipped); a box
        farther out, or one with zero width or height after clipping, raises :class:`InputError`. Points
        must lie inside ``[0, width] x [0, height]``.
        """
        size = f"{width}x{height} (W x H)"
        box = self.box
        if box is not None:
            tol = BOX_TOLERANCE_PX
            if box.x0 < -tol or box.y0 < -tol or box.x1 > width + tol or box.y1 > height + tol:
                raise input_error("box prompt", expected=f"a box inside the image of {size} pixels, "
                                  f"i.e. 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}",
                                  received=f"box {_fmt_box(box)}",
                                  fix="give the box in pixels of the original image (not normalized, 0-1000 or "
                                  "resized coordinates); convert with medvlm.coords")
            box = box.clip(width, height)
            if box.width <= 0 or box.height <= 0:
                raise input_error("box prompt", expected=f"a box with positive width and height inside the image "
                                  f"of {size} pixels", received=f"box {_fmt_box(self.box)} (zero area"
                                  + (f" after clipping to {_fmt_box(box)})" if box != self.box else ")"),
                                  fix="pass x1 > x0 and y1 > y0, e.g. the tight box (c_min, r_min, c_max + 1, "
                                  "r_max + 1) of a mask")
        if self.points is not None and len(self.points):
            xy = self.points.coords
            outside = (xy[:, 0] < 0) | (xy[:, 0] > width) | (xy[:, 1] < 0) | (xy[:, 1] > height)
            if outside.any():
                bad = [(round(float(x), 2), round(float(y), 2)) for x, y in xy[outside]]
                raise input_error("point prompt", expected=f"points (x, y) inside the image of {size} pixels, "
                                  f"0 <= x <= {width} and 0 <= y <= {height}", received=f"points {bad}",
                                  fix="give points in pixels of the original image (x = column, y = row)")
        return self if box is self.box else Prompt(box=box, points=self.points, text=self.text)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.box is not None:
            out["box"] = [round(v, 3) for v in self.box.to_list()]
        if self.points is not None:
            out["points"] = self.points.to_json()
        if self.text is not None:
            out["text"] = self.text
        return out


def _fmt_box(box: Box | None) -> str:
    if box is None:
        return "None"
    return "(" + ", ".join(f"{v:g}" for v in box.to_list()) + ")"


@dataclass(eq=False)
class ImageEmbedding:
    """The cached output of a backend's image encoder for one image.

    ``original_size`` is ``(H, W)`` of the original image; ``frame`` maps original pixels to the model's input
    frame (e.g. ``letterbox_256`` for LiteMedSAM); ``features`` holds the backend's tensors; ``extra`` holds
    backend facts (input size, content shape, preprocessing, timings).
    """

    backend: str
    original_size: tuple[int, int]
    features: Any
    frame: Frame
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return self.original_size[0]

    @property
    def width(self) -> int:
        return self.original_size[1]


@dataclass(eq=False)
class SegmentationResult:
    """One predicted mask at the original resolution.

    ``score`` is the model's predicted IoU of the returned mask; ``logits`` are the low-resolution mask logits
    in the model's input frame (``ImageEmbedding.frame``), or None; ``meta`` records backend details (which of
    the multimask outputs was kept, all predicted IoUs, ...).
    """

    mask: Mask
    score: float
    logits: npt.NDArray[np.float32] | None
    prompt: Prompt
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class PromptableSegmenter(Protocol):
    """A segmenter that encodes an image once and then answers many prompts on the cached embedding."""

    name: str

    def encode(self, image: ImageInput) -> ImageEmbedding: ...

    def predict(self, embedding: ImageEmbedding, prompt: Prompt, *, multimask: bool = False) -> SegmentationResult:
        ...

    def predict_many(self, embedding: ImageEmbedding, prompts: Sequence[Prompt], *,
                     multimask: bool = False) -> list[SegmentationResult]: ...

    def segment(self, image: ImageInput, prompts: Sequence[Prompt] | Prompt, *,
                multimask: bool = False) -> list[SegmentationResult]: ...


class SegmenterBase(ABC):
    """Shared plumbing: input checks, ``predict`` via ``predict_many``, ``segment`` = one encode + batched decode.

    Subclasses implement :meth:`encode` and :meth:`_decode` (a batch of prompts with one signature).
    """

    name: str = "base"
    #: Largest number of prompts sent through the mask decoder in one call (bounds memory).
    max_batch: int = 16
    #: Which prompt kinds the backend understands (a promptable SAM takes geometry, Med-VLM takes text).
    accepts_geometry: bool = True
    accepts_text: bool = False

    @abstractmethod
    def encode(self, image: ImageInput) -> ImageEmbedding:
        """Run the image encoder once; the result can be reused for any number of prompts."""

    @abstractmethod
    def _decode(self, embedding: ImageEmbedding, prompts: Sequence[Prompt],
                multimask: bool) -> list[SegmentationResult]:
        """Decode validated prompts that all share one :meth:`Prompt.signature` (len <= ``max_batch``)."""

    def predict(self, embedding: ImageEmbedding, prompt: Prompt, *, multimask: bool = False) -> SegmentationResult:
        """Mask for one prompt on a cached embedding. ``multimask`` keeps the best of 3 masks by predicted IoU."""
        return self.predict_many(embedding, [prompt], multimask=multimask)[0]

    def predict_many(self, embedding: ImageEmbedding, prompts: Sequence[Prompt], *,
                     multimask: bool = False) -> list[SegmentationResult]:
        """Masks for several prompts, in order; prompts of the same kind share batched decoder calls."""
        self._check_embedding(embedding)
        prompts = _as_prompt_list(prompts)
        checked = [self._check_kind(p).validated(embedding.height, embedding.width) for p in prompts]
        results: list[SegmentationResult | None] = [None] * len(checked)
        for indices in group_prompts(checked, self.max_batch):
            for idx, res in zip(indices, self._decode(embedding, [checked[i] for i in indices], multimask)):
                results[idx] = res
        return [r for r in results if r is not None]

    def segment(self, image: ImageInput, prompts: Sequence[Prompt] | Prompt, *,
                multimask: bool = False) -> list[SegmentationResult]:
        """Convenience: encode the image once, then decode every prompt on the cached embedding."""
        prompt_list = _as_prompt_list(prompts)
        # Validate before paying for the encoder.
        height, width = image_size_of(image)
        for p in prompt_list:
            self._check_kind(p).validated(height, width)
        return self.predict_many(self.encode(image), prompt_list, multimask=multimask)

    def _check_kind(self, prompt: Prompt) -> Prompt:
        geometry = prompt.box is not None or (prompt.points is not None and len(prompt.points) > 0)
        if prompt.text is not None and not self.accepts_text:
            raise input_error(f"{self.name} prompt", expected="a box and/or points (this segmenter is promptable, "
                              "not text-guided)", received=f"text {prompt.text!r}",
                              fix="use the text-guided segmenter (--segmenter medvlm / --text), or give a box")
        if geometry and not self.accepts_geometry:
            raise input_error(f"{self.name} prompt", expected="a text (this segmenter is text-guided)",
                              received=f"geometry {prompt.to_json()}",
                              fix="pass text='...' here, or use --refine litemedsam to turn its mask into a box "
                              "prompt for a promptable segmenter")
        return prompt

    def _check_embedding(self, embedding: ImageEmbedding) -> None:
        if not isinstance(embedding, ImageEmbedding) or embedding.backend != self.name:
            got = embedding.backend if isinstance(embedding, ImageEmbedding) else type(embedding).__name__
            raise input_error(f"{self.name} predict", expected=f"an ImageEmbedding made by {self.name}.encode()",
                              received=f"an embedding from {got!r}",
                              fix="encode the image with the same segmenter that decodes the prompts")


def _as_prompt_list(prompts: Sequence[Prompt] | Prompt) -> list[Prompt]:
    if isinstance(prompts, Prompt):
        return [prompts]
    out = list(prompts)
    for p in out:
        if not isinstance(p, Prompt):
            raise input_error("prompts", expected="segmentation.Prompt objects", received=type(p).__name__,
                              fix="wrap boxes/points: Prompt(box=Box(...)) or Prompt(points=Points(...))")
    return out


def group_prompts(prompts: Sequence[Prompt], max_batch: int) -> list[list[int]]:
    """Indices of ``prompts`` grouped by signature (box or not, number of points, text or not), chunks of
    ``max_batch``."""
    groups: dict[tuple[bool, int, bool], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p.signature(), []).append(i)
    step = max(1, int(max_batch))
    return [idx[k:k + step] for idx in groups.values() for k in range(0, len(idx), step)]


def image_size_of(image: ImageInput) -> tuple[int, int]:
    """``(H, W)`` of a MedicalImage or an array, without converting it."""
    pixels = getattr(image, "pixels", None)
    shape = np.shape(pixels) if pixels is not None and not isinstance(image, np.ndarray) else np.shape(image)
    if len(shape) < 2:
        raise input_error("image", expected="a 2D image (H, W) or (H, W, 3)", received=f"shape {tuple(shape)}",
                          fix="pass a MedicalImage from medvlm.io.load_image or a uint8 array")
    return int(shape[0]), int(shape[1])


def as_rgb_uint8(image: ImageInput) -> npt.NDArray[np.uint8]:
    """``(H, W, 3)`` uint8 RGB from a MedicalImage (its windowed display) or an array.

    Arrays: ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` (alpha dropped). uint8 is used as is;
    any other numeric dtype is min-max scaled to 0-255 (NaN -> 0), as :meth:`MedicalImage.to_uint8` does.
    """
    to_rgb = getattr(image, "to_rgb_uint8", None)
    if callable(to_rgb) and not isinstance(image, np.ndarray):
        arr = np.asarray(to_rgb())
    elif isinstance(image, np.ndarray):
        arr = image
    else:
        raise input_error("image", expected="a medvlm.io.MedicalImage or a numpy array (H, W) / (H, W, 3)",
                          received=type(image).__name__, fix="load the file with medvlm.io.load_image(path)")
    if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
        arr = np.repeat(arr[:, :, :1], 3, axis=2) if arr.shape[2] == 1 else arr[:, :, :3]
    elif arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    else:
        raise input_error("image", expected="shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)",
                          received=f"shape {arr.shape}", fix="select one slice; channels go last")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise input_error("image", expected="a non-empty image", received=f"shape {arr.shape}",
                          fix="check the file that was loaded")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise input_error("image", expected="a numeric image (uint8 preferred)", received=f"dtype {arr.dtype}",
                          fix="convert masks/labels to an image first, or pass a MedicalImage")
    data = arr.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.uint8)
    lo, hi = float(data[finite].min()), float(data[finite].max())
    scale = 255.0 / (hi - lo) if hi > lo and math.isfinite(hi - lo) else 0.0
    out = np.where(finite, (data - lo) * scale, 0.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
