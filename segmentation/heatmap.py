"""Weak localization: heatmaps of where a phrase is, their anatomy gating, and the box and peak read from them.

Every map here is a float32 array ``(H, W)`` on the ORIGINAL image's pixel grid (row = y, column = x), unless a
function says it works in a model's input frame; boxes are :class:`~medvlm.types.Box` in pixel xyxy of the
original image (right/bottom edge exclusive, as :meth:`Mask.to_box`), points are pixel ``(x, y)`` at pixel
centres. Values: Grad-CAM maps are relative (fraction of the map's maximum, in [0, 1]); Med-VLM maps are mask
probabilities in [0, 1]; gated maps keep the unit of the map they gate.

Sources of a heatmap:

- :func:`gradcam`: Grad-CAM (or HiResCAM) on a named layer of any torch module, for a target logit index or a
  scalar function of the output;
- :func:`medvlm_text_heatmap`: the text-guided segmenter's sigmoid mask probability for a phrase, decoded from a
  cached image encoding (no extra image encoder pass);
- :func:`medvlm_gradcam_heatmap`: Seg-Grad-CAM of Med-VLM for a phrase (the sum of the mask logits over the
  predicted mask, differentiated at a named layer).

:func:`gate_heatmap` multiplies a map by a soft mask of the regions a finding is expected in; :func:`heatmap_box`
and :func:`peak` read the answer. Nothing here prints or writes files.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from medvlm.errors import input_error
from medvlm.types import Box, Mask

if TYPE_CHECKING:
    from segmentation.base import ImageEmbedding

__all__ = [
    "DEFAULT_MEDVLM_CAM_LAYER",
    "CamMethod",
    "GateConfig",
    "colorize_heatmap",
    "gate_heatmap",
    "gate_weights",
    "gradcam",
    "heatmap_box",
    "letterbox_to_original",
    "medvlm_gradcam_heatmap",
    "medvlm_text_heatmap",
    "peak",
]

FloatMap = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]
CamMethod = Literal["gradcam", "hirescam"]

#: Med-VLM layer Grad-CAM differentiates at by default: the 1x1 projection of the image features into the mixer
#: (64 x 64 grid). It is the last purely visual layer before text and image mix (Grad-CAM's "last convolutional
#: layer"), and its input is the cached encoder output, so no second image-encoder pass is needed.
DEFAULT_MEDVLM_CAM_LAYER = "image_proj"


@dataclass(frozen=True)
class GateConfig:
    """How hard the anatomy gate is. Lengths are fractions of the image's longer side (so one setting fits a
    512 px and a 3000 px radiograph).

    ``grow``: the expected regions are grown by this much before gating (weight 1 inside): findings sit at and
    across region borders (an effusion fills the angle, a mass bulges from the hilum) and segmented regions are
    a few pixels off. ``soft``: beyond the grown region the weight falls as a Gaussian of the distance with this
    standard deviation (0 = hard cut to 0), so a map just outside an imperfect region is damped, not deleted.
    """

    grow: float = 0.02
    soft: float = 0.03

    def __post_init__(self) -> None:
        if not (self.grow >= 0 and self.soft >= 0):
            raise input_error("GateConfig", expected="grow >= 0 and soft >= 0 (fractions of the longer image side)",
                              received=f"grow={self.grow}, soft={self.soft}", fix="e.g. GateConfig(0.02, 0.03)")


# ------------------------------------------------------------------------------------------------ helpers


def _as_map(heat: npt.ArrayLike, what: str) -> FloatMap:
    arr = np.asarray(heat, dtype=np.float32)
    if arr.ndim != 2 or arr.size == 0:
        raise input_error(what, expected="a non-empty 2D heatmap (H, W)", received=f"shape {arr.shape}",
                          fix="pass one map on the original image's pixel grid")
    if not np.isfinite(arr).all():
        raise input_error(what, expected="finite values", received="NaN or inf in the map",
                          fix="replace them (np.nan_to_num) before reading a box or a peak")
    return arr


def _resize(arr: Any, size: tuple[int, int]) -> Any:
    """Bilinear resize of a (h, w) torch tensor to ``size`` = (H, W) (half-pixel centres, as the predictor)."""
    import torch.nn.functional as F

    return F.interpolate(arr[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def letterbox_to_original(frame_map: Any, content_shape: tuple[int, int],
                          original_size: tuple[int, int]) -> FloatMap:
    """A map ``(S, S)`` in a letterbox input frame (content at the top-left, padding bottom/right; see
    :func:`medvlm.coords.letterbox_frame`) -> ``(H, W)`` float32 on the original pixel grid.

    ``content_shape``: ``(h, w)`` of the image content inside the ``S x S`` canvas (``embedding.extra
    ["content_shape"]``); ``original_size``: ``(H, W)``. The padding is cropped and the content resized
    bilinearly, the same mapping Med-VLM's predictor applies to its mask logits. Accepts a numpy array or tensor.
    """
    import torch

    t = frame_map.detach().float().cpu() if isinstance(frame_map, torch.Tensor) else torch.as_tensor(
        np.asarray(frame_map, dtype=np.float32))
    ch, cw = int(content_shape[0]), int(content_shape[1])
    if t.ndim != 2 or ch <= 0 or cw <= 0 or ch > t.shape[0] or cw > t.shape[1]:
        raise input_error("letterbox_to_original", expected="a 2D map (S, S) and a content shape (h, w) inside it",
                          received=f"map {tuple(t.shape)}, content {content_shape}",
                          fix="pass embedding.extra['content_shape'] of the same encoding")
    return np.asarray(_resize(t[:ch, :cw], (int(original_size[0]), int(original_size[1]))).numpy(),
                      dtype=np.float32)


# ------------------------------------------------------------------------------------------------ Grad-CAM


def _layer_tensor(output: Any) -> Any:
    """The tensor a hooked layer returned (first element of a tuple/list, as for attention blocks)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _spatial(act: Any, layer: str) -> Any:
    """Activation -> ``(C, h, w)``: conv maps ``(1, C, h, w)`` as they are; token sequences ``(1, N, C)`` with a
    square number of tokens (optionally after one leading class token) reshaped row-major to ``(C, s, s)``."""
    if act.ndim == 4:
        return act[0]
    if act.ndim == 3:
        n = act.shape[1]
        for skip in (0, 1):
            side = round((n - skip) ** 0.5)
            if side * side == n - skip and side > 0:
                return act[0, skip:].transpose(0, 1).reshape(act.shape[2], side, side)
    raise input_error(f"gradcam layer {layer!r}", expected="an output (1, C, h, w) or tokens (1, N, C) with N a "
                      "square (+1 class token)", received=f"shape {tuple(act.shape)}",
                      fix="pick a convolutional layer or a transformer block of the model")


def gradcam(model: Any, layer: str, inputs: Any | Sequence[Any],
            target: int | Callable[[Any], Any], *, size: tuple[int, int] | None = None,
            method: CamMethod = "gradcam") -> FloatMap:
    """Grad-CAM of ``model`` at its sub-module ``layer`` (a name from ``model.named_modules()``), upsampled.

    ``inputs``: one tensor or a sequence of tensors passed as ``model(*inputs)``, batch size 1. ``target``: an
    int = the logit ``output[0, target]`` (summed over any further axes; a tuple output uses its first element)
    or a function ``output -> scalar tensor``. ``method``: ``gradcam`` (Selvaraju et al. 2017: channel weights =
    spatial mean of the gradient, map = ReLU(sum_k w_k A_k)) or ``hirescam`` (Draelos & Carin 2020: map =
    ReLU(sum_k dY/dA_k * A_k), element-wise, so it only marks places the target actually depends on).

    Returns float32 ``(H, W)`` in [0, 1] (divided by its maximum; all zeros when no location raises the target),
    upsampled bilinearly to ``size`` = (H, W), by default the spatial size of the first input when it is an image
    batch ``(1, C, H, W)``, else the layer's own grid. The map lives in the model input's pixel frame; for a
    letterboxed input map it back with :func:`letterbox_to_original`. The model's mode (train/eval) and its
    parameters' gradients are left untouched (``torch.autograd.grad``, not ``backward``).
    """
    import torch

    if method not in ("gradcam", "hirescam"):
        raise input_error("gradcam method", expected="'gradcam' or 'hirescam'", received=repr(method),
                          fix="use method='gradcam'")
    modules = dict(model.named_modules())
    if layer not in modules:
        names = [n for n in modules if n][:12]
        raise input_error("gradcam layer", expected=f"a sub-module name of the model, e.g. {', '.join(names)}",
                          received=repr(layer), fix="list them with [n for n, _ in model.named_modules()]")
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not args or not isinstance(args[0], torch.Tensor) or args[0].shape[0] != 1:
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
        raise input_error("gradcam inputs", expected="tensors with batch size 1", received=str(shapes),
                          fix="explain one image at a time: x[None] or x[:1]")
    captured: list[Any] = []

    def hook(_module: Any, _inp: Any, output: Any) -> Any:
        act = _layer_tensor(output)
        if act is None:
            return None
        if not act.requires_grad:
            # a frozen prefix (no trainable weight before this layer) gives an activation outside the graph: make
            # it a leaf that requires grad and hand it on, so the target can be differentiated with respect to it
            act = act.detach().requires_grad_(True)
            output = act if isinstance(output, torch.Tensor) else (act, *output[1:])
        captured.append(act)
        return output

    handle = modules[layer].register_forward_hook(hook)
    try:
        with torch.enable_grad():
            out = model(*args)
            if callable(target):
                score = target(out)
            else:
                logits = _layer_tensor(out)
                if logits is None or logits.ndim < 2 or not 0 <= int(target) < logits.shape[1]:
                    raise input_error("gradcam target", expected="an index into output[0] (dimension 1 of the "
                                      "output)", received=f"{target} for output "
                                      f"{None if logits is None else tuple(logits.shape)}",
                                      fix="pass a valid class index or a function output -> scalar")
                score = logits[0, int(target)].sum()
            if not captured:
                raise input_error(f"gradcam layer {layer!r}", expected="a layer that runs in model(*inputs)",
                                  received="no output captured", fix="pick a layer on the forward path")
            act = captured[-1]  # a layer run several times: its last call feeds the output
            if not score.requires_grad:
                raise input_error(f"gradcam layer {layer!r}", expected="a target that depends on this layer",
                                  received="a target outside the autograd graph (layer inside torch.no_grad?)",
                                  fix="pick a layer after the model's no-grad part")
            (grad,) = torch.autograd.grad(score, act, allow_unused=True)
    finally:
        handle.remove()
    if grad is None:
        raise input_error(f"gradcam layer {layer!r}", expected="a target that depends on this layer",
                          received="no gradient reaches it", fix="pick a layer on the path to the target")
    a, g = _spatial(act.detach().float(), layer), _spatial(grad.detach().float(), layer)
    if method == "gradcam":
        cam = torch.relu((g.mean(dim=(1, 2), keepdim=True) * a).sum(dim=0))
    else:
        cam = torch.relu((g * a).sum(dim=0))
    grid = args[0].shape[-2:] if args[0].ndim == 4 else cam.shape
    out_size = (int(size[0]), int(size[1])) if size is not None else (int(grid[0]), int(grid[1]))
    # ReLU first, then upsample: bilinear interpolation of a non-negative map stays non-negative
    up = _resize(cam, out_size).clamp_min(0)
    top = float(up.max())
    return np.asarray((up / top).numpy() if top > 0 else torch.zeros_like(up).numpy(), dtype=np.float32)


# ------------------------------------------------------------------------------------------------ Med-VLM


def _check_text(text: str, what: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise input_error(what, expected="a non-empty finding or phrase, e.g. 'cardiomegaly'", received=repr(text),
                          fix="pass the finding to localize")
    return text.strip()


def medvlm_text_heatmap(segmenter: Any, embedding: ImageEmbedding, text: str) -> FloatMap:
    """Med-VLM's mask probability for ``text``: float32 ``(H, W)`` in [0, 1] on the original pixel grid.

    ``segmenter``: a :class:`~segmentation.textseg.predictor.MedVLMSegmenter`; ``embedding``: its ``encode`` of
    the image (reused: one decoder pass per text, ~80 ms on 2 CPU cores). The mask logits ``(S, S)`` of the
    letterbox frame are cropped to the content, resized bilinearly to ``(H, W)``, then passed through a sigmoid:
    the same steps that give the segmenter's binary mask (``> 0.5``), so the map's 0.5 level set is that mask.
    """
    import torch

    from segmentation.base import Prompt

    result = segmenter.predict(embedding, Prompt(text=_check_text(text, "medvlm_text_heatmap text")))
    logits = letterbox_to_original(result.logits, embedding.extra["content_shape"], embedding.original_size)
    return np.asarray(torch.sigmoid(torch.from_numpy(logits)).numpy(), dtype=np.float32)


def medvlm_gradcam_heatmap(segmenter: Any, embedding: ImageEmbedding, text: str, *,
                           layer: str = DEFAULT_MEDVLM_CAM_LAYER, image: Any = None,
                           method: CamMethod = "gradcam") -> FloatMap:
    """Seg-Grad-CAM (Vinogradova et al. 2020) of Med-VLM for ``text``: float32 ``(H, W)`` in [0, 1] (relative to
    the map's maximum) on the original pixel grid.

    Target = the sum of the mask logits over the pixels Med-VLM predicts for ``text`` (probability > 0.5 in the
    content part of the letterbox frame), or over the whole content when it predicts none. ``layer``: a module
    name of the Med-VLM model. Layers after the image encoder (default ``image_proj``) start from the cached
    ``embedding`` features; a layer inside ``image_encoder`` re-runs the encoder from ``image`` (the
    MedicalImage or uint8 array that was encoded; required then; ~1.2 s on 2 CPU cores). The CAM on the model's
    ``S x S`` letterbox frame is mapped to the original pixels by :func:`letterbox_to_original`.
    """
    import torch

    from segmentation.base import as_rgb_uint8

    text = _check_text(text, "medvlm_gradcam_heatmap text")
    # Grad-CAM differentiates through the torch model: the full one, also for a segmenter started from a bundle
    model = segmenter.torch_model() if hasattr(segmenter, "torch_model") else segmenter.model
    ch, cw = embedding.extra["content_shape"]
    size = int(embedding.extra["input_size"])
    from segmentation.textseg.predictor import expand_text

    read, _ = expand_text(text, segmenter.text_level, embedding.extra.get("modality"))
    ids, attn = model.text_encoder.tokenize([read], segmenter.device)

    def target(logits: Any) -> Any:
        content = logits[0, 0, :ch, :cw]
        chosen = content.detach() > 0.0  # sigmoid > 0.5
        return content[chosen].sum() if bool(chosen.any()) else content.sum()

    if layer.startswith("image_encoder"):
        if image is None:
            raise input_error(f"medvlm gradcam layer {layer!r}", expected="the image (a layer inside the image "
                              "encoder needs the encoder re-run)", received="image=None",
                              fix=f"pass image=..., or use layer={DEFAULT_MEDVLM_CAM_LAYER!r}")
        chw, _ = model.image_encoder.preprocess(as_rgb_uint8(image))
        inputs: tuple[Any, ...] = (torch.from_numpy(chw)[None].to(segmenter.device), ids, attn)
        forward = model
    else:
        # features from encode() are inference-mode tensors, which autograd refuses to save: copy them out
        with torch.inference_mode(False):  # (a bundle-started segmenter's features are numpy)
            feats = torch.as_tensor(embedding.features).to(segmenter.device).clone()
        inputs = (feats, ids, attn)
        forward = _encoded_wrapper(model)
        layer = f"model.{layer}"
    # the segmenter's lock: its decoder may be serving other requests on the same model in another thread
    with getattr(segmenter, "_lock", contextlib.nullcontext()):
        cam = gradcam(forward, layer, inputs, target, size=(size, size), method=method)
    return letterbox_to_original(cam, (ch, cw), embedding.original_size)


def _encoded_wrapper(model: Any) -> Any:
    """``model`` wrapped so that ``wrapper(features, ids, mask) = model.forward_encoded(...)`` and its modules are
    named ``model.<name>`` (Grad-CAM calls the wrapper like any module)."""
    from torch import nn

    class Encoded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, features: Any, ids: Any, mask: Any) -> Any:
            return self.model.forward_encoded(features, ids, mask)

    return Encoded()


# ------------------------------------------------------------------------------------------------ gating


def gate_weights(region: npt.ArrayLike, config: GateConfig | None = None) -> FloatMap:
    """Soft gate of a region mask: float32 ``(H, W)`` in [0, 1], 1 inside ``region`` (bool (H, W)) grown by
    ``config.grow`` x the longer side, falling as ``exp(-d^2 / (2 soft^2))`` with the distance ``d`` (pixels)
    beyond that, ``soft = config.soft`` x the longer side (0: exactly 0 outside the grown region).
    An empty region gives all zeros."""
    from scipy import ndimage

    cfg = config or GateConfig()
    mask = np.asarray(region, dtype=bool)
    if mask.ndim != 2 or mask.size == 0:
        raise input_error("gate region", expected="a bool mask (H, W)", received=f"shape {mask.shape}",
                          fix="pass ChestAnatomy.union(keys)")
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.float32)
    side = float(max(mask.shape))
    dist = ndimage.distance_transform_edt(~mask)  # pixels to the nearest region pixel, 0 inside
    beyond = np.maximum(dist - cfg.grow * side, 0.0)
    if cfg.soft <= 0:
        return (beyond <= 0).astype(np.float32)
    sigma = cfg.soft * side
    return np.exp(-0.5 * (beyond / sigma) ** 2).astype(np.float32)


def gate_heatmap(heat: npt.ArrayLike, region: npt.ArrayLike, config: GateConfig | None = None) -> FloatMap:
    """``heat`` (H, W) multiplied by :func:`gate_weights` of ``region`` (bool (H, W), the expected regions of the
    finding, on the same grid): unchanged inside the (grown) region, damped to ~0 farther out. Same unit as
    ``heat``; float32 (H, W)."""
    h = _as_map(heat, "gate_heatmap heat")
    mask = np.asarray(region, dtype=bool)
    if mask.shape != h.shape:
        raise input_error("gate_heatmap", expected=f"a region mask of the heatmap's shape {h.shape}",
                          received=f"shape {mask.shape}", fix="build both on the original image's pixel grid")
    return (h * gate_weights(mask, config)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ reading


def peak(heat: npt.ArrayLike) -> tuple[float, float]:
    """The hottest pixel of ``heat`` (H, W) as pixel ``(x, y)`` of its centre (column + 0.5, row + 0.5); the
    first in row-major order on ties (a constant map gives the top-left pixel)."""
    h = _as_map(heat, "peak heat")
    r, c = np.unravel_index(int(np.argmax(h)), h.shape)
    return float(c) + 0.5, float(r) + 0.5


def heatmap_box(heat: npt.ArrayLike, fraction: float = 0.5) -> Box | None:
    """Box (pixel xyxy, right/bottom exclusive) of the largest 8-connected component of ``heat >= fraction x
    max(heat)``; on equal areas, the component with more heat. None when the map has no positive value.

    ``fraction`` in (0, 1]: 0.5 keeps what is at least half as hot as the peak (the full width at half maximum
    of a blob)."""
    from scipy import ndimage

    h = _as_map(heat, "heatmap_box heat")
    if not 0 < fraction <= 1:
        raise input_error("heatmap_box fraction", expected="a fraction of the maximum in (0, 1]",
                          received=str(fraction), fix="use e.g. 0.5")
    top = float(h.max())
    if top <= 0:
        return None
    labels, n = ndimage.label(h >= fraction * top, structure=np.ones((3, 3), dtype=bool))
    index = np.arange(1, n + 1)
    areas = ndimage.sum_labels(np.ones_like(h), labels, index)
    masses = ndimage.sum_labels(h, labels, index)
    best = int(index[np.lexsort((masses, areas))[-1]])
    return Mask(labels == best).to_box()


def colorize_heatmap(rgb: npt.NDArray[np.uint8], heat: npt.ArrayLike, *, colormap: str = "inferno",
                     max_alpha: float = 0.6) -> npt.NDArray[np.uint8]:
    """``heat`` (H, W) drawn over ``rgb`` (H, W, 3) uint8 with a matplotlib colormap; returns a new uint8 RGB image.

    The map is scaled by its maximum; each pixel's opacity is ``max_alpha`` x its scaled value, so cold areas
    leave the radiograph readable and only the hot ones are coloured."""
    import matplotlib

    h = _as_map(heat, "colorize_heatmap heat")
    if rgb.shape[:2] != h.shape or rgb.ndim != 3:
        raise input_error("colorize_heatmap", expected=f"an RGB image (H, W, 3) matching the map {h.shape}",
                          received=f"shape {rgb.shape}", fix="pass image.to_rgb_uint8() of the same image")
    top = float(h.max())
    scaled = h / top if top > 0 else np.zeros_like(h)
    colours = matplotlib.colormaps[colormap](scaled)[..., :3] * 255.0
    alpha = (max_alpha * scaled)[..., None]
    out = rgb.astype(np.float32) * (1 - alpha) + colours * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
