"""SAM 2 backend: ``sam2.build_sam.build_sam2`` + ``SAM2ImagePredictor`` (``set_image`` is our ``encode``).

Weights come from (first match):

1. ``checkpoint=`` a local ``.pt`` file (``config=`` names its Hydra config, else it is inferred from the file
   name, e.g. ``sam2.1_hiera_tiny.pt`` -> ``configs/sam2.1/sam2.1_hiera_t.yaml``);
2. ``checkpoint=`` / ``model_id=`` a Hugging Face hub id such as ``facebook/sam2.1-hiera-tiny`` (the local hub
   cache is tried first; a download is attempted only when ``HF_HUB_OFFLINE`` is not set);
3. the environment variable ``MEDVLM_SAM2_CHECKPOINT`` (path or hub id);
4. the default hub id :data:`DEFAULT_MODEL_ID`.

``random_init=True`` builds the model from its config without weights (plumbing tests only: the masks are
meaningless). ``image_size=`` overrides the model's input side (``++model.image_size=N``; default 1024) to make
random-init tests fast on CPU.

CPU notes: sam2 is installed without its CUDA extension (``sam2._C``); only the optional hole/sprinkle
filling of ``SAM2Transforms.postprocess_masks`` needs it, so the predictor is built with
``max_hole_area=0`` and ``max_sprinkle_area=0`` (sam2's defaults; the filling would otherwise warn and be
skipped). SAM 2 stretches the image to a square (no letterbox): the model frame is
:func:`medvlm.coords.resized_frame`, and prompts are passed in original pixels to the predictor, which
normalises them by the original width/height itself.
"""

from __future__ import annotations

import functools
import os
import re
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medvlm.coords import resized_frame
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

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_MODEL_ID",
    "ENV_CHECKPOINT",
    "INSTALL_HINT",
    "SAM2Segmenter",
    "resolve_sam2_weights",
    "sam2_available",
]

DEFAULT_MODEL_ID = "facebook/sam2.1-hiera-tiny"
DEFAULT_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
ENV_CHECKPOINT = "MEDVLM_SAM2_CHECKPOINT"
INSTALL_HINT = "SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0"

# Hub id -> (config, checkpoint file name), as in sam2.build_sam.HF_MODEL_ID_TO_FILENAMES (copied so that the
# registry can describe weights without importing sam2/torch).
HUB_MODELS: dict[str, tuple[str, str]] = {
    "facebook/sam2-hiera-tiny": ("configs/sam2/sam2_hiera_t.yaml", "sam2_hiera_tiny.pt"),
    "facebook/sam2-hiera-small": ("configs/sam2/sam2_hiera_s.yaml", "sam2_hiera_small.pt"),
    "facebook/sam2-hiera-base-plus": ("configs/sam2/sam2_hiera_b+.yaml", "sam2_hiera_base_plus.pt"),
    "facebook/sam2-hiera-large": ("configs/sam2/sam2_hiera_l.yaml", "sam2_hiera_large.pt"),
    "facebook/sam2.1-hiera-tiny": ("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt"),
    "facebook/sam2.1-hiera-small": ("configs/sam2.1/sam2.1_hiera_s.yaml", "sam2.1_hiera_small.pt"),
    "facebook/sam2.1-hiera-base-plus": ("configs/sam2.1/sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus.pt"),
    "facebook/sam2.1-hiera-large": ("configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.+-]+$")


def sam2_available() -> bool:
    """True when the ``sam2`` package (and hydra) can be imported."""
    import importlib.util

    return importlib.util.find_spec("sam2") is not None and importlib.util.find_spec("hydra") is not None


def _require_sam2() -> None:
    if not sam2_available():
        raise missing_dependency("sam2 backend", INSTALL_HINT)
    import medvlm  # noqa: F401  (torchvision CPU fallback before sam2 imports torchvision)


def _config_for_file(path: Path) -> str | None:
    for config, filename in HUB_MODELS.values():
        if path.name == filename:
            return config
    return None


def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return True


def _missing_weights(what: str, why: str) -> MissingDependencyError:
    return MissingDependencyError(
        f"SAM2 weights {what} are not available ({why}). Pass checkpoint='/path/to/sam2.1_hiera_tiny.pt' "
        f"(plus config='{DEFAULT_CONFIG}' when the file was renamed), or set {ENV_CHECKPOINT} to that path, or "
        f"download them where there is network: `huggingface-cli download {DEFAULT_MODEL_ID} sam2.1_hiera_tiny.pt`. "
        "For plumbing tests without weights use random_init=True.")


def resolve_sam2_weights(checkpoint: str | None = None, config: str | None = None, *,
                         allow_download: bool = True) -> tuple[str, str]:
    """``(config, local checkpoint path)`` for a local path, hub id, ``$MEDVLM_SAM2_CHECKPOINT`` or the default.

    Raises :class:`MissingDependencyError` (naming what to pass) when the weights are not on this machine and
    cannot be downloaded, and :class:`InputError` for an unknown hub id or an unknown config.
    """
    source = checkpoint or os.environ.get(ENV_CHECKPOINT) or DEFAULT_MODEL_ID
    path = Path(source).expanduser()
    if path.is_file():
        cfg = config or _config_for_file(path)
        if cfg is None:
            raise input_error("SAM2 config", expected="config='configs/sam2.1/sam2.1_hiera_<t|s|b+|l>.yaml' for a "
                              "checkpoint with a non-standard file name", received=f"checkpoint {path}",
                              fix=f"pass config=..., e.g. config='{DEFAULT_CONFIG}' for hiera tiny")
        return cfg, str(path)
    looks_like_path = source.endswith((".pt", ".pth", ".ckpt")) or source.startswith((".", "/", "~")) or (
        os.sep in source and not _HUB_ID.match(source))
    if looks_like_path:
        raise _missing_weights(f"at {path}", "no such file")
    if source not in HUB_MODELS:
        raise input_error("SAM2 model id", expected="a local .pt file or one of " + ", ".join(HUB_MODELS),
                          received=repr(source), fix=f"pass checkpoint='{DEFAULT_MODEL_ID}' or a local path")
    hub_config, filename = HUB_MODELS[source]
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise _missing_weights(f"for {source}", "huggingface_hub is not installed") from exc
    try:
        return config or hub_config, hf_hub_download(repo_id=source, filename=filename, local_files_only=True)
    except Exception as exc:  # not in the local cache
        if not allow_download or _offline():
            raise _missing_weights(f"for {source}", "not in the local Hugging Face cache and downloads are off "
                                   "(HF_HUB_OFFLINE)" if allow_download else "not in the local Hugging Face "
                                   "cache") from exc
    try:
        return config or hub_config, hf_hub_download(repo_id=source, filename=filename)
    except Exception as exc:
        raise _missing_weights(f"for {source}", f"download failed: {type(exc).__name__}") from exc


@functools.lru_cache(maxsize=2)
def _load_model(config: str, checkpoint: str | None, device: str, image_size: int | None) -> Any:
    import torch
    from sam2.build_sam import build_sam2

    overrides = [f"++model.image_size={int(image_size)}"] if image_size else []
    try:
        if checkpoint is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # random init: reproducible within and across processes
                return build_sam2(config, None, device=device, hydra_overrides_extra=overrides)
        return build_sam2(config, checkpoint, device=device, hydra_overrides_extra=overrides)
    except Exception as exc:
        if type(exc).__name__ in ("MissingConfigException", "ConfigCompositionException"):
            raise input_error("SAM2 config", expected="a config inside the sam2 package, e.g. " + DEFAULT_CONFIG,
                              received=repr(config), fix="use one of the configs/sam2.1/*.yaml names") from exc
        raise


class SAM2Segmenter(SegmenterBase):
    """SAM 2 promptable segmenter on CPU or GPU; ``encode`` runs ``set_image`` and keeps its features."""

    name = "sam2"

    def __init__(self, checkpoint: str | None = None, *, config: str | None = None, model_id: str | None = None,
                 random_init: bool = False, image_size: int | None = None, device: str = "cpu",
                 max_batch: int = 16) -> None:
        _require_sam2()
        if image_size is not None and (int(image_size) < 64 or int(image_size) % 32):
            raise input_error("SAM2 image_size", expected="a multiple of 32, at least 64 (default 1024)",
                              received=repr(image_size), fix="use e.g. image_size=256 for fast tests, or leave it")
        if random_init:
            self.config, self.checkpoint = config or DEFAULT_CONFIG, None
        else:
            self.config, ckpt = resolve_sam2_weights(checkpoint or model_id, config)
            self.checkpoint = ckpt
        self.random_init = random_init
        self.device = device
        self.max_batch = max_batch
        self._lock = threading.Lock()
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.model = _load_model(self.config, self.checkpoint, device, image_size)
        # max_hole_area / max_sprinkle_area need the sam2._C CUDA extension; keep them off. SAM2Transforms uses
        # torch.jit.script, deprecated in recent torch (a DeprecationWarning per scripted module): silenced here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning)
            self.predictor = SAM2ImagePredictor(self.model, mask_threshold=0.0, max_hole_area=0.0,
                                                max_sprinkle_area=0.0)
        res = int(self.model.image_size)
        # The predictor hard-codes the feature sizes of a 1024 input; derive them from the model's input size.
        self.predictor._bb_feat_sizes = [(res // 4, res // 4), (res // 8, res // 8), (res // 16, res // 16)]
        self.input_size = res

    @property
    def weights(self) -> str:
        return "random init" if self.checkpoint is None else self.checkpoint

    def encode(self, image: ImageInput) -> ImageEmbedding:
        import torch

        rgb = as_rgb_uint8(image)
        height, width = rgb.shape[:2]
        t0 = time.perf_counter()
        with self._lock, torch.inference_mode():
            self.predictor.set_image(rgb)
            features = self.predictor._features
            self.predictor.reset_predictor()
        return ImageEmbedding(backend=self.name, original_size=(height, width), features=features,
                              frame=resized_frame(height, width, self.input_size, self.input_size),
                              extra={"input_size": self.input_size, "preprocess": "stretch+imagenet-norm",
                                     "encode_s": time.perf_counter() - t0})

    def _decode(self, embedding: ImageEmbedding, prompts: Sequence[Prompt],
                multimask: bool) -> list[SegmentationResult]:
        import torch

        n = len(prompts)
        box = None
        coords = labels = None
        if prompts[0].box is not None:
            box = np.stack([p.box.to_array() for p in prompts if p.box is not None])  # (n, 4) original pixels
        if prompts[0].points is not None and len(prompts[0].points):
            coords = np.stack([p.points.coords for p in prompts if p.points is not None])  # (n, k, 2)
            labels = np.stack([p.points.labels for p in prompts if p.points is not None])  # (n, k)
        pred = self.predictor
        with self._lock, torch.inference_mode():
            pred._features = embedding.features
            pred._orig_hw = [embedding.original_size]
            pred._is_image_set, pred._is_batch = True, False
            try:
                masks, ious, low_res = pred.predict(point_coords=coords, point_labels=labels, box=box,
                                                    multimask_output=multimask, return_logits=False)
            finally:
                pred.reset_predictor()
        if n == 1:  # the predictor squeezes the prompt axis of a single prompt
            masks, ious, low_res = masks[None], ious[None], low_res[None]
        results = []
        for i, prompt in enumerate(prompts):
            best = int(np.argmax(ious[i]))
            results.append(SegmentationResult(
                mask=Mask(masks[i, best] > 0),
                score=float(ious[i, best]),
                logits=np.asarray(low_res[i, best], dtype=np.float32),
                prompt=prompt,
                meta={"backend": self.name, "multimask": multimask, "mask_index": best,
                      "ious": [round(float(v), 4) for v in ious[i]], "logits_frame": embedding.frame.name,
                      "weights": self.weights},
            ))
        return results
