"""Per-structure postprocessing of Med-VLM masks, chosen on the checkpoint's training images (``postprocess.json``).

As nnU-Net decides on its training folds whether keeping the largest component helps each class, a Med-VLM
checkpoint carries, per structure, the mask operations that raised the Dice of its own masks on images it was
trained on (never on its val split), written by ``python -m finetune.postprocess --checkpoint DIR``:

- ``refine_box``: each connected component of the mask (those with >= 10 % of the largest one's pixels, at most
  4) becomes a box prompt, padded by 5 % of its size on each side, for a promptable segmenter (LiteMedSAM); the
  mask is the union of its masks. Compact solid structures gain (left ventricle, polyp, fetal head), rings and
  whole-field structures lose (myocardium, brain), which is why it is chosen per structure.
- ``largest_component``: keep the largest 8-connected component.
- ``fill_holes``: fill holes enclosed by the mask.
- ``fit_ellipse``: the filled ellipse with the centroid and second moments of the largest component (the shape of
  a fetal head in its standard plane, of a short-axis ventricle cavity).
- ``convex_hull``: the mask's convex hull (pixels whose centres lie in the hull of the mask's pixel squares).

- ``zoom``: a second Med-VLM look at a square window around each component, re-encoded at the model's full input
  size (:mod:`segmentation.textseg.zoom`), for checkpoints trained on such windows. Meant for small structures;
  on the CT and cardiac MR val splits it gained nothing over the whole image (README), so no packaged checkpoint
  uses it.

``zoom`` runs first, then ``refine_box``, then the pixel operations in the order listed for the structure. Both
first ones encode pixels again (:data:`ENCODING_OPS`: skipped by the predictor's ``postprocess="masks"``). Masks
are bool ``(H, W)`` on the original pixel grid.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medvlm.errors import input_error
from medvlm.measure import ellipse_mask, fit_ellipse_moments, largest_component_2d
from medvlm.types import Box

__all__ = ["CANDIDATES", "ENCODING_OPS", "OPS", "POSTPROCESS_FILE", "PostprocessPolicy", "apply_mask_ops",
           "choose_candidate", "component_boxes", "convex_hull", "fill_holes", "fit_ellipse", "largest_component",
           "postprocess_mask", "refine_by_boxes"]

POSTPROCESS_FILE = "postprocess.json"
OPS: tuple[str, ...] = ("zoom", "refine_box", "largest_component", "fill_holes", "fit_ellipse", "convex_hull")
#: operations that encode the image again (a promptable segmenter's encoder, Med-VLM's on a crop)
ENCODING_OPS: tuple[str, ...] = ("zoom", "refine_box")
#: what the recipe compares, by name; "none" keeps the mask as the decoder drew it
CANDIDATES: dict[str, tuple[str, ...]] = {
    "none": (),
    "largest_component": ("largest_component",),
    "fill_holes": ("fill_holes",),
    "largest_component+fill_holes": ("largest_component", "fill_holes"),
    "refine_box": ("refine_box",),
    "refine_box+largest_component": ("refine_box", "largest_component"),
    "fit_ellipse": ("fit_ellipse",),
    "convex_hull": ("convex_hull",),
    "refine_box+fit_ellipse": ("refine_box", "fit_ellipse"),
    "refine_box+convex_hull": ("refine_box", "convex_hull"),
    "zoom": ("zoom",),
    "zoom+largest_component": ("zoom", "largest_component"),
    "zoom+refine_box": ("zoom", "refine_box"),
    "zoom+refine_box+largest_component": ("zoom", "refine_box", "largest_component"),
}
#: components below this share of the largest one's pixels are not prompted (specks of a faint map)
MIN_COMPONENT_FRACTION = 0.1
MAX_COMPONENTS = 4
BOX_PAD = 0.05


def _components(mask: npt.NDArray[np.bool_]) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float64]]:
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.asarray(ndimage.sum(mask, labels, range(1, n + 1)), dtype=np.float64) if n else np.zeros(0)
    return labels, sizes


def largest_component(mask: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """The largest 8-connected component of ``mask`` (bool ``(H, W)``); an empty mask stays empty."""
    return largest_component_2d(mask)


def fill_holes(mask: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """``mask`` (bool ``(H, W)``) with every hole it encloses filled."""
    from scipy import ndimage

    return np.asarray(ndimage.binary_fill_holes(np.asarray(mask, dtype=bool)), dtype=bool)


def fit_ellipse(mask: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """The filled ellipse (bool ``(H, W)``, clipped to the grid) with the centroid and the covariance of the pixel
    centres of ``mask``'s largest component (:func:`medvlm.measure.fit_ellipse_moments`: a filled ellipse with
    semi-axes ``a, b`` has variances ``a^2/4, b^2/4`` along its axes, plus 1/12 px^2 from the pixel grid, so the
    fit returns a drawn ellipse as it was). Fewer than 5 pixels, or all on one line: the component unchanged."""
    m = largest_component(mask)
    fit = fit_ellipse_moments(m)
    return m if fit is None else ellipse_mask(fit, m.shape)


def convex_hull(mask: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """``mask`` (bool ``(H, W)``) with its convex hull filled: every pixel whose centre lies inside the hull of the
    mask's pixel squares. Fewer than 3 pixels or a degenerate hull: ``mask`` unchanged."""
    from scipy.spatial import ConvexHull, QhullError

    m = np.asarray(mask, dtype=bool)
    ys, xs = np.nonzero(m)
    if xs.size < 3:
        return m.copy()
    squares = np.array([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])
    corners = (np.stack([xs, ys], axis=1)[:, None, :] + squares[None]).reshape(-1, 2)
    try:
        hull = ConvexHull(corners)
    except QhullError:
        return m.copy()
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    yy, xx = np.mgrid[y0:y1, x0:x1]
    pts = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float64)
    inside = np.all(pts @ hull.equations[:, :2].T + hull.equations[:, 2] <= 1e-9, axis=1)
    out = m.copy()
    out[y0:y1, x0:x1] |= inside.reshape(yy.shape)
    return out


def component_boxes(mask: npt.ArrayLike, *, min_fraction: float = MIN_COMPONENT_FRACTION,
                    max_components: int = MAX_COMPONENTS, pad: float = BOX_PAD) -> list[Box]:
    """Pixel xyxy boxes (right/bottom exclusive, original grid, clipped to it) of the largest components of
    ``mask``, largest first: those with at least ``min_fraction`` of the largest one's pixels, at most
    ``max_components``, each padded by ``pad`` x its width/height on every side (a decoder's mask is often a
    little tight, and promptable segmenters were trained on loose boxes)."""
    m = np.asarray(mask, dtype=bool)
    labels, sizes = _components(m)
    if sizes.size == 0:
        return []
    height, width = m.shape
    boxes = []
    for k in np.argsort(sizes)[::-1][:max_components]:
        if sizes[k] < min_fraction * sizes.max():
            break
        ys, xs = np.nonzero(labels == k + 1)
        x0, x1, y0, y1 = float(xs.min()), float(xs.max() + 1), float(ys.min()), float(ys.max() + 1)
        dx, dy = pad * (x1 - x0), pad * (y1 - y0)
        boxes.append(Box(x0 - dx, y0 - dy, x1 + dx, y1 + dy).clip(width, height))
    return boxes


def refine_by_boxes(refiner: Any, embedding: Any, mask: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """``refine_box``: the union of the masks the promptable ``refiner`` (LiteMedSAM, SAM2) returns on
    ``embedding`` (its encoding of the same image) for the :func:`component_boxes` of ``mask`` (bool ``(H, W)``,
    original grid); empty when ``mask`` is."""
    from segmentation.base import Prompt

    m = np.asarray(mask, dtype=bool)
    union = np.zeros(m.shape, dtype=bool)
    boxes = component_boxes(m)
    if boxes:
        for result in refiner.predict_many(embedding, [Prompt(box=b) for b in boxes]):
            union |= np.asarray(result.mask.data, dtype=bool)
    return union


def apply_mask_ops(mask: npt.ArrayLike, ops: Sequence[str]) -> npt.NDArray[np.bool_]:
    """``mask`` after the pixel operations of ``ops`` in order (``zoom`` and ``refine_box`` need an encoder and are
    skipped here: :func:`postprocess_mask` runs them first)."""
    m = np.asarray(mask, dtype=bool)
    for op in ops:
        if op == "largest_component":
            m = largest_component(m)
        elif op == "fill_holes":
            m = fill_holes(m)
        elif op == "fit_ellipse":
            m = fit_ellipse(m)
        elif op == "convex_hull":
            m = convex_hull(m)
    return m


MaskStep = Callable[[npt.NDArray[np.bool_]], "npt.NDArray[np.bool_] | None"]


def postprocess_mask(mask: npt.ArrayLike, ops: Sequence[str], refine: MaskStep | None = None,
                     zoom: MaskStep | None = None) -> tuple[npt.NDArray[np.bool_], list[str]]:
    """``mask`` (bool ``(H, W)``) after ``ops``, and the operations applied: ``zoom`` first, as ``zoom(mask)``, then
    ``refine_box``, as ``refine(mask)`` (for either, no callable, or a result that is None or empty, keeps the mask
    and is not counted), then the pixel operations in their order (:func:`apply_mask_ops`)."""
    m = np.asarray(mask, dtype=bool)
    applied: list[str] = []
    for op, step in (("zoom", zoom), ("refine_box", refine)):
        if op in ops and step is not None:
            out = step(m)
            if out is not None and out.any():
                m = np.asarray(out, dtype=bool)
                applied.append(op)
    rest = [op for op in ops if op not in ENCODING_OPS]
    return apply_mask_ops(m, rest), applied + rest


def choose_candidate(mean_dice: Mapping[str, float], n: int, *, min_gain: float = 0.005, min_cases: int = 5) -> str:
    """The candidate (a :data:`CANDIDATES` name) with the highest ``mean_dice`` (candidate -> mean Dice over the
    same ``n`` cases, ``"none"`` included), kept only when it beats ``"none"`` by more than ``min_gain`` and ``n``
    is at least ``min_cases`` (one image decides nothing); else ``"none"``. Ties go to the candidate listed first
    in :data:`CANDIDATES` (cheaper)."""
    if "none" not in mean_dice:
        raise ValueError("choose_candidate needs the mean Dice of 'none'")
    if n < min_cases:
        return "none"
    means = {name: float(mean_dice[name]) for name in CANDIDATES if name in mean_dice}
    best = max(means, key=lambda name: (means[name], -list(CANDIDATES).index(name)))
    return best if means[best] > means["none"] + min_gain else "none"


@dataclass(frozen=True)
class PostprocessPolicy:
    """Structure name (canonical, as :func:`prompts.anatomy.resolve_structure` gives it) -> operations.

    ``evidence``: what the recipe measured (per structure: ``n`` cases and the mean Dice of every candidate on
    the training images), kept for the model card; ``source``: how it was made."""

    ops: Mapping[str, tuple[str, ...]]
    evidence: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        for structure, ops in self.ops.items():
            unknown = [op for op in ops if op not in OPS]
            if unknown:
                raise input_error(f"{POSTPROCESS_FILE} ops of {structure!r}", expected=f"operations among {OPS}",
                                  received=repr(unknown), fix="write it with python -m finetune.postprocess")

    def ops_for(self, structure: str | None) -> tuple[str, ...]:
        return tuple(self.ops.get(structure, ())) if structure is not None else ()

    @property
    def refines(self) -> bool:
        return any("refine_box" in ops for ops in self.ops.values())

    @property
    def zooms(self) -> bool:
        return any("zoom" in ops for ops in self.ops.values())

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, "ops": {k: list(v) for k, v in sorted(self.ops.items())},
                "evidence": dict(self.evidence), "source": self.source}

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / POSTPROCESS_FILE
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> PostprocessPolicy | None:
        """The policy of the checkpoint folder ``directory``, or None when it has no :data:`POSTPROCESS_FILE`."""
        path = Path(directory) / POSTPROCESS_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            ops = {str(k): tuple(str(op) for op in v) for k, v in dict(data["ops"]).items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise input_error(str(path), expected='JSON {"version": 1, "ops": {structure: [operation, ...]}}',
                              received=f"{type(exc).__name__}: {exc}",
                              fix="write it again with python -m finetune.postprocess, or delete it") from exc
        return cls(ops=ops, evidence=dict(data.get("evidence", {})), source=str(data.get("source", "")))
