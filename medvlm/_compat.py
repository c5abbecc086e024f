"""Import-time fallbacks for the CPU environment.

The registry's torchvision 0.28.0 wheel is CUDA-linked: its compiled ``_C`` ops fail to load against the
CPU build of torch, and ``import torchvision`` then dies in ``_meta_registrations`` because
``register_fake("torchvision::nms")`` needs the op's schema to exist. timm (LiteMedSAM's TinyViT), sam2 and
transformers' image processors all import torchvision, so we define the two ops torchvision registers fakes
for unconditionally (``nms`` and ``qnms``) with a pure-torch CPU kernel before torchvision is imported. When
the compiled ops do load (a GPU install), nothing is changed.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path
from typing import Any

_DONE = False


def _nms_cpu(dets: Any, scores: Any, iou_threshold: float) -> Any:
    """Greedy non-maximum suppression, same contract as ``torchvision.ops.nms`` (boxes xyxy, returns kept indices)."""
    import torch

    order = torch.argsort(scores, descending=True)
    x0, y0, x1, y1 = dets.unbind(1)
    areas = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
    suppressed = torch.zeros(dets.shape[0], dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        xx0 = torch.maximum(x0[i], x0)
        yy0 = torch.maximum(y0[i], y0)
        xx1 = torch.minimum(x1[i], x1)
        yy1 = torch.minimum(y1[i], y1)
        inter = (xx1 - xx0).clamp(min=0) * (yy1 - yy0).clamp(min=0)
        iou = inter / (areas[i] + areas - inter).clamp(min=1e-12)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long)


def _compiled_ops_load() -> bool:
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # not installed: nothing to patch
    for lib in Path(next(iter(spec.submodule_search_locations))).glob("_C*.so"):
        try:
            torch.ops.load_library(str(lib))
            return True
        except (OSError, RuntimeError):
            return False
    return False


def ensure_torchvision_importable() -> None:
    """Make ``import torchvision`` work on CPU torch; idempotent and cheap after the first call."""
    global _DONE
    if _DONE or "torchvision" in sys.modules:
        _DONE = True
        return
    _DONE = True
    if _compiled_ops_load():
        return
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    _LIBS.append(lib)
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", _nms_cpu, "CPU")
    lib.impl("qnms", _nms_cpu, "CPU")


_LIBS: list[Any] = []


class _TorchvisionHook(importlib.abc.MetaPathFinder):
    """Runs :func:`ensure_torchvision_importable` the first time anything imports torchvision."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            ensure_torchvision_importable()
        return None


def install_import_hook() -> None:
    """Install the hook once; costs nothing until torchvision is imported."""
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionHook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionHook())
