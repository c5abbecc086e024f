"""Text-guided segmentation of a whole volume, slice by slice, with 3D post-processing.

:func:`segment_volume` runs a text-guided segmenter (Med-VLM) on every axial display slice of a
:class:`medvlm.volume.Volume`: the text prompts are built once, each slice is encoded once (the image encoder is
the cost; the segmenter's batched ``encode_batch`` is used when it has one, else ``encode`` slice after slice),
every text is decoded on the cached slice features, and the per-slice masks are stacked into one ``(Z, H, W)``
mask per text. Per slice the segmenter says whether the structure is there (``result.meta["found"]``, with the existence
head's probability in ``meta["existence"]`` when the checkpoint has one; without them, a non-empty mask counts as
found). Then :func:`keep_largest_component` keeps the largest 26-connected 3D component of each text's stack and
drops it when it is smaller than ``min_component_ml``: an organ is one connected body, and the slice-wise false
positives elsewhere are the small, detached pieces.

Neighbouring-slice context: a checkpoint trained with it (``slice_context`` >= 1 in its config, or a specialist of
it; the segmenter's ``volume_context()``) gets every slice as a :class:`medvlm.volume.SliceWithNeighbours`, the
slices ``k - context`` and ``k + context`` as R and B around slice ``k``; a routed checkpoint still reads the grey
slice to decide which model answers, and a specialist trained with neighbours costs one more encoder pass per slice.

Everything here is on the display grid of ``volume.array``; :mod:`medvlm.volume_outputs` writes it back in the
input's own voxel order.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from medvlm.errors import input_error
from medvlm.volume import Volume, volume_ml
from segmentation.base import Prompt

__all__ = [
    "DEFAULT_MIN_COMPONENT_ML",
    "TextVolumeResult",
    "VolumeSegmentation",
    "keep_largest_component",
    "segment_volume",
    "volume_context",
]

#: Components (and a largest component) smaller than this are dropped: 0.5 mL is 19 voxels of 3 mm, 500 of 1 mm.
DEFAULT_MIN_COMPONENT_ML = 0.5

#: Slices handed to one ``encode_batch`` call when the segmenter has one and says no ``encode_batch_size``.
ENCODE_BATCH = 8

_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def keep_largest_component(mask: npt.ArrayLike, spacing: tuple[float, float, float], *,
                           min_ml: float = DEFAULT_MIN_COMPONENT_ML,
                           largest_only: bool = True) -> npt.NDArray[np.bool_]:
    """Post-process a 3D binary mask: keep its largest 26-connected component (``largest_only``, the default) or
    all of them, and drop every kept component under ``min_ml`` millilitres (``spacing`` in mm, the voxel size
    along the mask's axes). Returns a new bool array of the same shape; empty when nothing is large enough."""
    arr = np.asarray(mask).astype(bool)
    if arr.ndim != 3:
        raise input_error("keep_largest_component", expected="a 3D mask (Z, H, W)", received=f"shape {arr.shape}",
                          fix="stack the slice masks first")
    labels, n = ndimage.label(arr, structure=_CONNECTIVITY_26)
    if n == 0:
        return np.zeros(arr.shape, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    voxel_mm3 = float(np.prod([float(s) for s in spacing]))
    min_voxels = max(1, math.ceil(min_ml * 1000.0 / voxel_mm3)) if voxel_mm3 > 0 and min_ml > 0 else 1
    candidates = np.flatnonzero(sizes >= min_voxels) + 1
    if largest_only and candidates.size:
        candidates = np.array([int(np.argmax(sizes)) + 1])
    return np.isin(labels, candidates)


@dataclass(eq=False)
class TextVolumeResult:
    """One text's result on a volume (display grid).

    ``mask``: bool ``(Z, H, W)`` after 3D post-processing. ``slice_found``: the segmenter's per-slice verdict before
    it; ``existence``: per slice, the existence head's probability, or 1.0 / 0.0 (found or not) when the checkpoint
    has no head (``existence_source`` says which). ``scores``: the per-slice confidence (mean foreground
    probability, 0 when empty). ``raw_voxels``: voxels before post-processing.
    """

    text: str
    label: str
    structure: str | None
    mask: npt.NDArray[np.bool_]
    slice_found: list[bool]
    existence: list[float]
    existence_source: str
    scores: list[float]
    raw_voxels: int
    text_read: str | None = None

    @property
    def found(self) -> bool:
        return bool(self.mask.any())

    @property
    def voxels(self) -> int:
        return int(np.count_nonzero(self.mask))


@dataclass(eq=False)
class VolumeSegmentation:
    """Every text's result on one volume, with the settings and timings of the run."""

    volume: Volume
    results: list[TextVolumeResult]
    model: str
    window: tuple[float, float] | None
    encode_mode: str
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def masks(self) -> list[npt.NDArray[np.bool_]]:
        return [r.mask for r in self.results]

    def volume_ml(self, k: int) -> float:
        return volume_ml(self.results[k].mask, self.volume.spacing)


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="slice", file=sys.stderr, disable=not enabled, leave=False)


def volume_context(segmenter: Any) -> int:
    """Slices above and below that each slice of a volume should carry for ``segmenter`` (its
    ``volume_context()``: a Med-VLM checkpoint, or one it routes to, trained with neighbouring slices); 0 for a
    segmenter without the method."""
    wanted = getattr(segmenter, "volume_context", None)
    return int(wanted()) if callable(wanted) else 0


def segment_volume(segmenter: Any, volume: Volume, texts: Sequence[str], labels: Sequence[str] | None = None, *,
                   window: tuple[float, float] | None = None, min_component_ml: float = DEFAULT_MIN_COMPONENT_ML,
                   largest_only: bool = True, progress: bool = False,
                   encode_batch: int | None = None, slice_postprocess: str = "off",
                   on_slice: Callable[[int, int], None] | None = None) -> VolumeSegmentation:
    """Segment every text in every axial slice of ``volume`` and post-process each text's stack in 3D.

    ``segmenter``: a text-guided segmenter (``accepts_text``; e.g. ``MedVLMSegmenter``). ``window``: the display
    window the slices are encoded with (default: ``volume.window``, soft tissue for CT). ``labels``: one per text
    (default: the texts). ``min_component_ml`` / ``largest_only``: see :func:`keep_largest_component`.
    ``progress``: show a per-volume progress bar on stderr. ``encode_batch``: slices per ``encode_batch`` call
    (default: the segmenter's ``encode_batch_size``, else :data:`ENCODE_BATCH`); ignored without batched encoding.
    ``on_slice(done, total)``: called after each slice (a server job's progress). ``slice_postprocess``: the 2D
    per-structure postprocessing a Med-VLM checkpoint would apply to each slice (``off``, ``masks`` or ``full``:
    :class:`~segmentation.textseg.predictor.MedVLMSegmenter`); ``off`` by default because a volume has its own,
    in 3D (a liver seen as two pieces on one slice is one 3D component), and ``full`` encodes every slice twice.
    """
    texts = [str(t) for t in texts]
    if not texts:
        raise input_error("volume segmentation", expected="at least one --text", received="no text",
                          fix="pass e.g. --text liver")
    if not getattr(segmenter, "accepts_text", False):
        raise input_error("volume segmentation", expected="a text-guided segmenter (medvlm)",
                          received=f"segmenter {getattr(segmenter, 'name', type(segmenter).__name__)!r}",
                          fix="drop --segmenter, or use --segmenter medvlm")
    names = list(labels) if labels else list(texts)
    if len(names) != len(texts):
        raise input_error("--label", expected=f"one label per --text ({len(texts)})", received=f"{len(names)} labels",
                          fix="give one --label per --text, in the same order, or none")
    prompts = [Prompt(text=t) for t in texts]  # built once for the whole volume
    win = window if window is not None else volume.window
    z, h, w = volume.shape
    pick = getattr(segmenter, "for_image", None)
    if callable(pick):  # a routed checkpoint chooses its model once per volume, from the middle slice
        segmenter = pick(volume.slice_image(z // 2, win))
    context = volume_context(segmenter)
    stacks = [np.zeros((z, h, w), dtype=bool) for _ in texts]
    found = [[False] * z for _ in texts]
    existence: list[list[float | None]] = [[None] * z for _ in texts]
    scores = [[0.0] * z for _ in texts]
    meta_first: list[dict[str, Any]] = [{} for _ in texts]
    encode_fn = getattr(segmenter, "encode_batch", None)
    if not callable(encode_fn):
        encode_fn = None
    batched = encode_fn is not None
    if encode_batch is None:
        encode_batch = int(getattr(segmenter, "encode_batch_size", 0) or ENCODE_BATCH)
    step = max(1, int(encode_batch)) if batched else 1
    encode_s = decode_s = 0.0
    t_start = time.perf_counter()
    bar = _progress_bar(z, f"medvlm segment {Path(volume.source).name}", progress)
    try:
        for start in range(0, z, step):
            ks = list(range(start, min(z, start + step)))
            images = [volume.slice_image(k, win, context=context) for k in ks]
            t0 = time.perf_counter()
            embeddings = list(encode_fn(images)) if encode_fn is not None else [segmenter.encode(images[0])]
            encode_s += time.perf_counter() - t0
            for k, embedding in zip(ks, embeddings):
                extra = getattr(embedding, "extra", None)
                if isinstance(extra, dict):  # a backend's embedding (a plain test double may have none)
                    extra["postprocess"] = slice_postprocess
                t1 = time.perf_counter()
                results = segmenter.predict_many(embedding, prompts)
                decode_s += time.perf_counter() - t1
                for i, res in enumerate(results):
                    data = np.asarray(res.mask.data, dtype=bool)
                    is_found = bool(res.meta.get("found", bool(data.any())))
                    found[i][k] = is_found
                    if is_found:
                        stacks[i][k] = data
                    ex = res.meta.get("existence")
                    existence[i][k] = float(ex) if ex is not None else None
                    scores[i][k] = float(res.score) if is_found else 0.0
                    if not meta_first[i]:
                        meta_first[i] = dict(res.meta)
                bar.update(1)
                if on_slice is not None:
                    on_slice(k + 1, z)
    finally:
        bar.close()
    out: list[TextVolumeResult] = []
    for i, (text, label) in enumerate(zip(texts, names)):
        has_head = all(e is not None for e in existence[i])
        ex_values = [float(e) if has_head and e is not None else float(f) for e, f in zip(existence[i], found[i])]
        cleaned = keep_largest_component(stacks[i], volume.spacing, min_ml=min_component_ml,
                                         largest_only=largest_only)
        out.append(TextVolumeResult(
            text=text, label=label, structure=meta_first[i].get("structure"), mask=cleaned, slice_found=found[i],
            existence=ex_values,
            existence_source="existence head" if has_head else "non-empty mask (the checkpoint has no existence head)",
            scores=scores[i], raw_voxels=int(np.count_nonzero(stacks[i])), text_read=meta_first[i].get("text_read")))
    total_s = time.perf_counter() - t_start
    timings = {"encode_s": encode_s, "decode_s": decode_s, "total_s": total_s,
               "encode_ms_per_slice": 1000.0 * encode_s / max(1, z), "ms_per_slice": 1000.0 * total_s / max(1, z)}
    settings = {"min_component_ml": min_component_ml, "largest_only": largest_only, "connectivity": 26,
                "encode_batch": step}
    return VolumeSegmentation(volume=volume, results=out, model=str(getattr(segmenter, "name", "?")), window=win,
                              encode_mode=f"batched ({step} slices per encode_batch call)" if batched
                              else "one slice at a time",
                              timings=timings, settings=settings)
