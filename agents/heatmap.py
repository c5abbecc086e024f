"""``medvlm heatmap``: weak localization of a finding as a heatmap, gated by where the finding is expected.

A finding phrase ("cardiomegaly", "left pleural effusion", "nodule") gets a heatmap from one of two sources
(:mod:`segmentation.heatmap`): Med-VLM's mask probability for the phrase, or Seg-Grad-CAM of Med-VLM for it.
The phrase is parsed against the findings and chest-region vocabularies (:func:`agents.text.parse_phrase`:
location words first, else the finding's default regions on the stated side: cardiomegaly -> cardiac
silhouette, effusion -> costophrenic angles and lower zones, pneumothorax -> apices and upper zones, nodule ->
lung fields) and, with ``gate="anatomy"``, the map is multiplied by a soft mask of those regions, segmented by
Med-VLM on the same image encoding (:func:`agents.anatomy.segment_chest_anatomy`). A phrase that names no known
finding, or an image that is not a frontal chest radiograph, is not gated, and the result says why.

The answer is the box of the largest connected part of the map above a fraction of its maximum, and the map's
peak; all in pixels of the original image (xyxy, x = column, y = row).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from medvlm.errors import input_error
from medvlm.types import Box
from segmentation.heatmap import DEFAULT_MEDVLM_CAM_LAYER, CamMethod, GateConfig

__all__ = ["GatePlan", "HeatmapConfig", "WeakLocalization", "check_options", "finding_heatmap", "heatmap_overlay",
           "localize", "plan_gate", "read_heatmap"]

Source = Literal["medvlm", "gradcam"]
Gate = Literal["anatomy", "none"]
SOURCES: tuple[str, ...] = ("medvlm", "gradcam")
GATES: tuple[str, ...] = ("anatomy", "none")


@dataclass(frozen=True)
class HeatmapConfig:
    """Settings of one weak localization.

    ``box_fraction``: the box is read at this fraction of the map's maximum (0.5: the half-maximum extent).
    ``gate``: softness of the anatomy gate (:class:`~segmentation.heatmap.GateConfig`). ``cam_layer`` /
    ``cam_method``: where and how Grad-CAM differentiates Med-VLM (source ``gradcam`` only).
    """

    box_fraction: float = 0.5
    gate: GateConfig = field(default_factory=GateConfig)
    cam_layer: str = DEFAULT_MEDVLM_CAM_LAYER
    cam_method: CamMethod = "gradcam"

    def __post_init__(self) -> None:
        # checked here so that a bad option fails before the model loads, not after the image is encoded
        if not 0 < self.box_fraction <= 1:
            raise input_error("--box-fraction", expected="a fraction of the map's maximum in (0, 1]",
                              received=str(self.box_fraction), fix="use e.g. 0.5")
        if self.cam_method not in ("gradcam", "hirescam"):
            raise input_error("cam method", expected="'gradcam' or 'hirescam'", received=repr(self.cam_method),
                              fix="use 'gradcam'")


@dataclass(frozen=True)
class GatePlan:
    """What gating a phrase allows: its canonical ``finding`` (None: none named), the chest region keys it is
    expected in (location words of the phrase, else the finding's default regions on the stated side), and
    ``reason`` when it cannot be gated (None otherwise)."""

    phrase: str
    finding: str | None
    regions: tuple[str, ...]
    reason: str | None


def _check_phrase(phrase: Any) -> str:
    if not isinstance(phrase, str) or not phrase.strip():
        raise input_error("finding", expected="a non-empty finding phrase, e.g. 'cardiomegaly' or 'left pleural "
                          "effusion'", received=repr(phrase), fix="pass the finding to localize")
    return " ".join(phrase.split())


def plan_gate(phrase: str) -> GatePlan:
    """Parse ``phrase`` into the finding it names and the regions it is expected in; see :class:`GatePlan`.
    Only findings are gated: a phrase without one (an anatomy name, an unknown word) gets ``reason``."""
    from agents.text import parse_phrase
    from prompts.findings import load_findings

    text = _check_phrase(phrase)
    mention = parse_phrase(text)
    if mention.finding is None:
        vocab = load_findings()
        return GatePlan(text, None, (), f"{text!r} names no finding of the findings vocabulary v{vocab.version} "
                        f"({', '.join(vocab.findings)}): not gated")
    if not mention.regions:
        return GatePlan(text, mention.finding, (), f"no expected region for {mention.finding!r}: not gated")
    return GatePlan(text, mention.finding, tuple(mention.regions), None)


@dataclass
class WeakLocalization:
    """One phrase localized on one image. Maps are float32 ``(H, W)`` on the original pixel grid; ``heat`` is the
    source's map (Med-VLM: probability; Grad-CAM: fraction of its maximum), ``final`` the map the answer is read
    from (``heat`` x the gate weights when gated, else ``heat``); ``box`` pixel xyxy (None: the map is all zero),
    ``peak`` pixel (x, y) and ``peak_value`` the final map there. ``gate_used`` is "anatomy" or "none";
    ``gate_reason`` says why a requested gate was not applied; ``gate_mask`` is the union of ``regions``."""

    phrase: str
    finding: str | None
    source: str
    gate_requested: str
    gate_used: str
    regions: tuple[str, ...]
    gate_reason: str | None
    heat: npt.NDArray[np.float32] = field(repr=False)
    final: npt.NDArray[np.float32] = field(repr=False)
    box: Box | None
    peak: tuple[float, float]
    peak_value: float
    is_chest: bool | None = None
    gate_mask: npt.NDArray[np.bool_] | None = field(default=None, repr=False)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary (no maps): box and peak in pixel xyxy / xy of the original image."""
        return {
            "phrase": self.phrase, "finding": self.finding, "source": self.source,
            "gate": {"requested": self.gate_requested, "used": self.gate_used, "regions": list(self.regions),
                     "reason": self.gate_reason, "is_chest": self.is_chest},
            "box": None if self.box is None else [round(v, 2) for v in self.box.to_list()],
            "peak": [round(v, 2) for v in self.peak], "peak_value": round(float(self.peak_value), 4),
            "frame": "pixels of the original image: box x0 y0 x1 y1 (x1, y1 exclusive), peak x y (pixel centre)",
            "seconds": round(self.seconds, 3),
        }


def finding_heatmap(segmenter: Any, embedding: Any, phrase: str, *, source: str = "medvlm", image: Any = None,
                    config: HeatmapConfig | None = None) -> npt.NDArray[np.float32]:
    """The raw (ungated) heatmap of ``phrase``: float32 ``(H, W)`` on the original pixel grid, from ``source``
    ``medvlm`` (mask probability in [0, 1]) or ``gradcam`` (Seg-Grad-CAM, fraction of its maximum).
    ``embedding``: ``segmenter.encode(image)``; ``image`` is only needed for a Grad-CAM layer inside the encoder."""
    from segmentation.heatmap import medvlm_gradcam_heatmap, medvlm_text_heatmap

    cfg = config or HeatmapConfig()
    text = _check_phrase(phrase)
    if source == "medvlm":
        return medvlm_text_heatmap(segmenter, embedding, text)
    _check_source(source)
    return medvlm_gradcam_heatmap(segmenter, embedding, text, layer=cfg.cam_layer, image=image,
                                  method=cfg.cam_method)


def _check_source(source: Any) -> str:
    if source not in SOURCES:
        raise input_error("heatmap source", expected=f"one of {', '.join(SOURCES)}", received=repr(source),
                          fix="use --source medvlm (Med-VLM mask probability) or --source gradcam")
    return str(source)


def _check_gate(gate: Any) -> str:
    if gate not in GATES:
        raise input_error("gate", expected=f"one of {', '.join(GATES)}", received=repr(gate),
                          fix="use --gate anatomy (multiply by the expected regions) or --gate none")
    return str(gate)


def read_heatmap(heat: npt.NDArray[np.float32], plan: GatePlan, anatomy: Any, *, gate: str = "anatomy",
                 source: str = "medvlm", config: HeatmapConfig | None = None) -> WeakLocalization:
    """Gate ``heat`` (float32 (H, W), original pixel grid) by ``plan``'s regions of ``anatomy`` (a
    :class:`~agents.anatomy.ChestAnatomy` of the same image, or None when ``gate="none"``) and read box and peak.

    Not gated, with ``gate_reason``: gate "none"; a phrase without a finding; an image that is not a chest
    radiograph; regions that cannot be derived from the masks; a gate that leaves no positive value."""
    from segmentation.heatmap import gate_heatmap, heatmap_box, peak

    cfg = config or HeatmapConfig()
    gate = _check_gate(gate)
    final, used, reason, mask = heat, "none", None, None
    is_chest = None if anatomy is None else bool(anatomy.is_chest)
    if gate == "none":
        reason = "gating off (--gate none)"
    elif plan.reason is not None:
        reason = plan.reason
    elif anatomy is None or not anatomy.is_chest:
        reason = ("not a frontal chest radiograph (Med-VLM did not find two lungs of chest-film size): anatomy "
                  "gating applies to chest X-rays; not gated")
    else:
        mask = anatomy.union(plan.regions)
        if mask is None:
            reason = f"the expected regions ({', '.join(plan.regions)}) could not be derived from the segmented " \
                     "anatomy: not gated"
        else:
            gated = gate_heatmap(heat, mask, cfg.gate)
            if float(gated.max()) > 0:
                final, used = gated, "anatomy"
            else:
                reason = "the heatmap is zero inside the expected regions: not gated"
    px, py = peak(final)
    return WeakLocalization(
        phrase=plan.phrase, finding=plan.finding, source=source, gate_requested=gate, gate_used=used,
        regions=plan.regions, gate_reason=reason, heat=heat, final=final, box=heatmap_box(final, cfg.box_fraction),
        peak=(px, py), peak_value=float(final[min(int(py), final.shape[0] - 1), min(int(px), final.shape[1] - 1)]),
        is_chest=is_chest, gate_mask=mask)


def check_options(finding: Any, gate: Any, source: Any) -> tuple[str, str, str]:
    """Validate a heatmap request before any model loads: ``(finding, gate, source)`` stripped and checked
    (non-empty phrase, a gate of ``GATES``, a source of ``SOURCES``); an input error names what was expected."""
    return _check_phrase(finding), _check_gate(gate), _check_source(source)


def localize(segmenter: Any, image: Any, phrase: str, *, source: str = "medvlm", gate: str = "anatomy",
             embedding: Any = None, config: HeatmapConfig | None = None) -> WeakLocalization:
    """Localize ``phrase`` on ``image`` (a MedicalImage or uint8 array) with the Med-VLM ``segmenter``: one image
    encoding (``embedding`` when given) serves the heatmap and, when gated, the anatomy. See the module docstring.
    """
    from agents.anatomy import segment_chest_anatomy

    t0 = time.perf_counter()
    gate = _check_gate(gate)
    plan = plan_gate(phrase)
    _check_source(source)
    emb = embedding if embedding is not None else segmenter.encode(image)
    heat = finding_heatmap(segmenter, emb, plan.phrase, source=source, image=image, config=config)
    # anatomy costs five decoder passes: only when a gate could use it
    anatomy = segment_chest_anatomy(segmenter, image, emb) if gate == "anatomy" and plan.reason is None else None
    result = read_heatmap(heat, plan, anatomy, gate=gate, source=source, config=config)
    result.seconds = time.perf_counter() - t0
    return result


# ------------------------------------------------------------------------------------------------ command


def heatmap_overlay(image: Any, result: WeakLocalization) -> npt.NDArray[np.uint8]:
    """The final map in colour over the radiograph (``image``: MedicalImage, H x W), the gate regions' outline
    (white), box and peak: an RGB uint8 array of shape (H, W, 3) in the image's pixel frame."""
    from medvlm.types import Points, Region
    from medvlm.viz import draw_overlay, mask_contour
    from segmentation.heatmap import colorize_heatmap

    rgb = colorize_heatmap(image.to_rgb_uint8(), result.final)
    if result.gate_used == "anatomy" and result.gate_mask is not None:
        rgb[mask_contour(result.gate_mask, thickness=max(1, round(max(rgb.shape[:2]) / 500)))] = 255
    regions = []
    if result.box is not None:
        regions.append(Region(box=result.box, label=result.finding or result.phrase,
                              points=Points.from_lists(positive=[result.peak]), score=result.peak_value))
    title = f"{result.phrase} | {result.source} | gate {result.gate_used}"
    return draw_overlay(rgb, regions, title=title)
