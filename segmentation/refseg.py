"""Reference-guided segmentation, training-free: segment in new images what an annotated reference image shows.

Method (label transfer on the promptable segmenter's own image features, then the segmenter itself):

1. Each reference is encoded once (LiteMedSAM's TinyViT: a 256-channel 64x64 grid over the 256x256 letterbox).
   Its mask is averaged into the grid cells (fraction of each cell inside the structure).
2. A target is encoded once. For every cell of its content area, the ``knn`` most similar reference cells (over
   all references) vote with their mask fractions, weighted by ``softmax(similarity / temperature)``.
   Similarity = cosine of the L2-normalised features minus ``position_weight`` x the squared distance of the two
   cells' positions, each normalised to [0, 1] across its own image's content. Features say what a cell looks
   like, positions keep mirror-image structures apart (left vs right lung look alike; on aligned radiographs they
   sit on opposite sides).
3. ``mask_source="vote"`` (default): the vote map (64x64, [0, 1]) is upsampled (bilinear) to the target's
   original pixels and thresholded; its largest component is the mask. ``mask_source="segmenter"``: the largest
   component of the thresholded grid gives a box that the segmenter decodes (``refine_iters`` more times from
   the tight box of its own mask). On chest radiographs the vote is the better mask: LiteMedSAM keeps only part
   of the cardiac silhouette even from a perfect box (``medvlm eval refseg`` reports both).

A reference given by a box only is first turned into a mask by the same segmenter. Several targets share the
reference encodings; several references (k-shot) pool their cells. Every output is in pixels of the ORIGINAL
target image. :class:`~segmentation.base.PromptableSegmenter` backends with a ``(1, C, h, w)`` feature grid in
a letterbox frame work (LiteMedSAM, SAM2's image embedding).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from medvlm.errors import input_error
from medvlm.types import Box, Mask

__all__ = ["RefSegConfig", "RefSegResult", "ReferenceSegmenter"]


@dataclass
class RefSegConfig:
    """Numbers of the label transfer (see the module docstring)."""

    knn: int = 16
    temperature: float = 0.05
    position_weight: float = 2.0
    threshold: float = 0.5
    mask_source: str = "vote"
    refine_iters: int = 1

    def validate(self) -> None:
        if self.knn < 1 or not self.temperature > 0 or self.position_weight < 0 or not 0 < self.threshold < 1:
            raise input_error("RefSegConfig", expected="knn >= 1, temperature > 0, position_weight >= 0, "
                              "0 < threshold < 1", received=repr(self), fix="use the defaults")
        if self.mask_source not in ("vote", "segmenter"):
            raise input_error("RefSegConfig.mask_source", expected="'vote' or 'segmenter'",
                              received=repr(self.mask_source), fix="use 'vote' (default) or 'segmenter'")
        if self.refine_iters < 0:
            raise input_error("RefSegConfig.refine_iters", expected=">= 0", received=str(self.refine_iters),
                              fix="use 0 (one decode) or 1")


@dataclass(eq=False)
class RefSegResult:
    """One structure in one target: ``mask`` bool ``(H, W)`` and ``box`` (pixel xyxy) of the original target,
    ``score`` the segmenter's predicted IoU, ``vote`` the 64x64 label-transfer map over the letterbox grid (0..1,
    cells outside the content are 0), ``prompt_box`` the box given to the segmenter first. ``mask``/``box`` are
    None when no cell passed the threshold."""

    name: str
    mask: Mask | None
    box: Box | None
    score: float | None
    vote: npt.NDArray[np.float32]
    prompt_box: Box | None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Cells:
    feats: npt.NDArray[np.float32]  # (n, C) L2-normalised
    pos: npt.NDArray[np.float32]  # (n, 2) in [0, 1] of the content
    grid: tuple[int, int]  # content cells (rows, cols)


def _grid_of(embedding: Any) -> tuple[int, int, int]:
    """(content rows, content cols, stride in input pixels) of an embedding's feature grid."""
    feats = embedding.features
    if getattr(feats, "ndim", 0) != 4 or feats.shape[0] != 1:
        raise input_error("reference segmentation", expected="a segmenter whose embedding is a (1, C, h, w) grid",
                          received=f"{type(feats).__name__} {getattr(feats, 'shape', '')}",
                          fix="use the litemedsam segmenter")
    size = int(embedding.extra.get("input_size", feats.shape[-1]))
    stride = size // feats.shape[-1]
    ch, cw = embedding.extra.get("content_shape", (size, size))
    return max(1, -(-int(ch) // stride)), max(1, -(-int(cw) // stride)), stride


def _cells(embedding: Any) -> _Cells:
    rows, cols, _ = _grid_of(embedding)
    feats = embedding.features[0, :, :rows, :cols]  # (C, rows, cols): a torch tensor, or numpy from a bundle
    feats = np.asarray(feats.float().cpu().numpy() if hasattr(feats, "cpu") else feats, dtype=np.float32)
    flat = feats.reshape(feats.shape[0], -1).T.astype(np.float32)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True) + 1e-6
    ys, xs = np.mgrid[0:rows, 0:cols].astype(np.float32)
    pos = np.stack([(xs + 0.5) / cols, (ys + 0.5) / rows], axis=-1).reshape(-1, 2)
    return _Cells(flat, pos, (rows, cols))


def _mask_to_cells(mask: npt.NDArray[np.bool_], grid: tuple[int, int]) -> npt.NDArray[np.float32]:
    """Fraction of each content cell inside ``mask`` (original pixels -> content grid, area average)."""
    import cv2

    rows, cols = grid
    out = cv2.resize(mask.astype(np.float32), (cols, rows), interpolation=cv2.INTER_AREA)
    return np.asarray(out, np.float32).reshape(-1)


class ReferenceSegmenter:
    """k-shot reference-guided segmentation over a promptable segmenter (default: LiteMedSAM).

    >>> rs = ReferenceSegmenter()                          # doctest: +SKIP
    >>> rs.add_reference(ref_image, {"heart": ref_mask})   # doctest: +SKIP
    >>> rs.segment(target_image)["heart"].mask             # doctest: +SKIP
    """

    def __init__(self, segmenter: Any = None, config: RefSegConfig | None = None) -> None:
        if segmenter is None:
            from segmentation.registry import build_segmenter

            segmenter = build_segmenter("litemedsam")
        self.segmenter = segmenter
        self.config = config or RefSegConfig()
        self.config.validate()
        self._feats: list[npt.NDArray[np.float32]] = []
        self._pos: list[npt.NDArray[np.float32]] = []
        self._labels: dict[str, list[npt.NDArray[np.float32]]] = {}
        self.n_references = 0

    @property
    def structures(self) -> list[str]:
        """Names given by at least one reference."""
        return sorted(self._labels)

    def add_reference(self, image: Any, masks: Mapping[str, Any] | None = None, *,
                      boxes: Mapping[str, Box] | None = None,
                      embedding: Any = None) -> dict[str, npt.NDArray[np.bool_]]:
        """Encode ``image`` once (unless its ``embedding`` is given) and keep its cells with their labels.
        ``masks``: name -> bool ``(H, W)`` on the image grid; ``boxes``: name -> Box (pixel xyxy), segmented here
        first. Returns the masks used."""
        from segmentation.base import Prompt

        embedding = embedding if embedding is not None else self.segmenter.encode(image)
        height, width = embedding.original_size
        used: dict[str, npt.NDArray[np.bool_]] = {}
        for name, mask in (masks or {}).items():
            arr = np.asarray(mask.data if isinstance(mask, Mask) else mask).astype(bool)
            if arr.shape != (height, width):
                raise input_error(f"reference mask {name!r}", expected=f"a mask of the reference's size {height}x"
                                  f"{width}", received=f"shape {arr.shape}", fix="pass the mask of this image")
            used[name] = arr
        for name, box in (boxes or {}).items():
            used[name] = self.segmenter.predict(embedding, Prompt(box=box)).mask.data
        if not used:
            raise input_error("reference", expected="at least one mask or box", received="none",
                              fix="pass --reference-mask MASK or --reference-box X0 Y0 X1 Y1")
        empty = [n for n, m in used.items() if not m.any()]
        if empty:
            raise input_error("reference mask", expected="a non-empty structure", received=f"empty: {empty}",
                              fix="check the mask file (white = structure)")
        cells = _cells(embedding)
        n = len(cells.feats)
        for name in used:
            self._labels.setdefault(name, [np.zeros(len(f), np.float32) for f in self._feats])
        for name, labels in self._labels.items():
            labels.append(_mask_to_cells(used[name], cells.grid) if name in used else np.zeros(n, np.float32))
        self._feats.append(cells.feats)
        self._pos.append(cells.pos)
        self.n_references += 1
        return used

    def segment(self, image: Any, structures: Sequence[str] | None = None,
                embedding: Any = None) -> dict[str, RefSegResult]:
        """Segment each structure (default: all) in ``image``; ``embedding``: its encoding, if already made."""
        import cv2

        if not self._feats:
            raise input_error("reference segmentation", expected="a reference first", received="none",
                              fix="call add_reference(image, masks)")
        names = list(structures) if structures is not None else self.structures
        unknown = [n for n in names if n not in self._labels]
        if unknown:
            raise input_error("structures", expected=f"names among the references' {self.structures}",
                              received=str(unknown), fix="segment a structure the references show")
        embedding = embedding if embedding is not None else self.segmenter.encode(image)
        target = _cells(embedding)
        cfg = self.config
        ref_feats = np.concatenate(self._feats)
        ref_pos = np.concatenate(self._pos)
        sim = target.feats @ ref_feats.T  # (n_target, n_ref) cosine
        # squared position distance as |p|^2 + |q|^2 - 2 p.q: no (n_target, n_ref, 2) temporary
        d2 = (target.pos ** 2).sum(1)[:, None] + (ref_pos ** 2).sum(1)[None, :] - 2.0 * target.pos @ ref_pos.T
        sim -= cfg.position_weight * d2
        k = min(cfg.knn, sim.shape[1])
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        top_sim = np.take_along_axis(sim, top, axis=1)
        weights = np.exp((top_sim - top_sim.max(axis=1, keepdims=True)) / cfg.temperature)
        weights /= weights.sum(axis=1, keepdims=True)
        rows, cols, stride = _grid_of(embedding)
        side = embedding.features.shape[-1]
        results = {}
        for name in names:
            labels = np.concatenate(self._labels[name])
            vote = (weights * labels[top]).sum(axis=1).reshape(rows, cols).astype(np.float32)
            full = np.zeros((side, side), np.float32)
            full[:rows, :cols] = vote
            binary = (vote >= cfg.threshold).astype(np.uint8)
            count, comp, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=4)
            if count <= 1:
                results[name] = RefSegResult(name, None, None, None, full, None, {"reason": "no cell passed the "
                                             f"threshold {cfg.threshold}; max vote {float(vote.max()):.2f}"})
                continue
            best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
            x, y, w, h = (int(v) for v in stats[best, :4])
            box = embedding.frame.inverse_box([x * stride, y * stride, (x + w) * stride, (y + h) * stride])
            prompt_box = _clip(box, embedding.original_size)
            meta = {"references": self.n_references, "backend": self.segmenter.name, "mask_source": cfg.mask_source,
                    "max_vote": round(float(vote.max()), 4)}
            if cfg.mask_source == "segmenter":
                results[name] = self._decode(name, embedding, prompt_box, full, meta)
            else:
                mask = _vote_mask(full, embedding, cfg.threshold)
                results[name] = RefSegResult(name, mask, mask.to_box() if mask is not None else None,
                                             float(vote[comp == best].mean()), full, prompt_box, meta)
        return results

    def _decode(self, name: str, embedding: Any, box: Box, vote: npt.NDArray[np.float32],
                meta: dict[str, Any]) -> RefSegResult:
        from segmentation.base import Prompt

        result = self.segmenter.predict(embedding, Prompt(box=box))
        for _ in range(self.config.refine_iters):
            tight = result.mask.to_box()
            if tight is None:
                break
            result = self.segmenter.predict(embedding, Prompt(box=tight))
        mask = None if result.mask.is_empty() else result.mask
        return RefSegResult(name, mask, mask.to_box() if mask is not None else None, result.score, vote, box, meta)


def _vote_mask(vote: npt.NDArray[np.float32], embedding: Any, threshold: float) -> Mask | None:
    """The vote map (model grid) upsampled to the original pixels, thresholded, largest component kept."""
    import cv2

    size = int(embedding.extra.get("input_size", vote.shape[0]))
    ch, cw = (int(v) for v in embedding.extra.get("content_shape", (size, size)))
    height, width = embedding.original_size
    up = cv2.resize(vote, (size, size), interpolation=cv2.INTER_LINEAR)[:ch, :cw]
    binary = (cv2.resize(up, (width, height), interpolation=cv2.INTER_LINEAR) >= threshold).astype(np.uint8)
    count, comp, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=4)
    if count <= 1:
        return None
    return Mask(comp == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])))


def _clip(box: Box, size: tuple[int, int]) -> Box:
    height, width = size
    x0, y0, x1, y1 = box.to_list()
    return Box(max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1))
