"""What kind of image is this, and can the named structure be in it? The knowledge half of "not in this image".

A Med-VLM checkpoint may carry a *kind classifier* beside its weights: a linear softmax over pooled image-encoder
features that tells a chest radiograph from body CT, brain MR, cardiac MR, fetal ultrasound, dermoscopy and
endoscopy (the kinds of :mod:`medvlm.datasets.kinds`). With it the segmenter answers "not found" for a structure
that kind of image cannot show ("polyp" on a fetal ultrasound, "liver" on a brain MR) whatever its existence
head says; the head keeps deciding everything else (the missing side, a CT slice below the liver, a phrase the
anatomy tables do not list). The rule fires only when the kinds that could show the structure have less than
``1 - min_confidence`` probability together, so an image the classifier is unsure of (a kind it never saw: a knee
radiograph, a PET slice) falls back to the head alone.

Files in the checkpoint folder (written by ``finetune.kind_classifier``, read strictly here):
``kind_classifier.safetensors`` with ``weight (K, 2C)``, ``bias (K,)``, ``mean (2C,)``, ``std (2C,)``, and
``kind_classifier.json`` with ``{"kinds": [K names], "pooling": "mean+std", "channels": C, ...}``.

numpy only (no torch), so a segmenter started from an inference bundle can use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medvlm.datasets.kinds import KIND_STRUCTURES, mismatched_for_kind
from medvlm.errors import input_error

__all__ = ["KIND_CLASSIFIER_JSON", "KIND_CLASSIFIER_WEIGHTS", "KindClassifier", "KindVerdict", "pool_features"]

KIND_CLASSIFIER_WEIGHTS = "kind_classifier.safetensors"
KIND_CLASSIFIER_JSON = "kind_classifier.json"
_TENSORS = ("weight", "bias", "mean", "std")


def pool_features(features: Any) -> npt.NDArray[np.float32]:
    """Image-encoder features ``(1, C, g, g)`` or ``(C, g, g)`` (torch tensor or numpy, any float dtype) ->
    ``(2C,)`` float32: the per-channel mean over the grid, then the per-channel standard deviation."""
    if hasattr(features, "detach"):
        features = features.detach().float().cpu().numpy()
    arr = np.asarray(features, dtype=np.float32)
    if arr.ndim == 4:
        if arr.shape[0] != 1:
            raise input_error("image features", expected="one image: (1, C, g, g) or (C, g, g)",
                              received=f"shape {arr.shape}", fix="pool each image's features separately")
        arr = arr[0]
    if arr.ndim != 3:
        raise input_error("image features", expected="(1, C, g, g) or (C, g, g)", received=f"shape {arr.shape}",
                          fix="pass an ImageEmbedding's features")
    flat = arr.reshape(arr.shape[0], -1)
    return np.concatenate([flat.mean(axis=1), flat.std(axis=1)]).astype(np.float32)


@dataclass(frozen=True)
class KindVerdict:
    """The classifier's answer for one image: the most likely ``kind``, its probability, and every kind's."""

    kind: str
    probability: float
    probabilities: dict[str, float]

    def possible(self, structure: str | None) -> float:
        """The probability that an image like this one can show ``structure`` (a canonical name): the summed
        probability of the kinds that can (every kind for a structure the tables do not list)."""
        if structure is None:
            return 1.0
        # a sided name ("left kidney") goes with its structure ("kidney")
        whole = structure.removeprefix("left ").removeprefix("right ")
        return float(sum(p for kind, p in self.probabilities.items()
                         if structure not in mismatched_for_kind(kind) and whole not in mismatched_for_kind(kind)))

    def rules_out(self, structure: str | None, min_confidence: float) -> bool:
        """True when the classifier is at least ``min_confidence`` sure that the image is of a kind that cannot
        show ``structure``: :meth:`possible` below ``1 - min_confidence``. Summing over kinds (not only the top
        one) keeps a structure that the second most likely kind could show."""
        return self.possible(structure) < 1.0 - min_confidence

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "probability": round(self.probability, 4)}


class KindClassifier:
    """Linear softmax over :func:`pool_features` (standardised by the training ``mean``/``std``)."""

    def __init__(self, kinds: list[str], weight: npt.NDArray[np.float32], bias: npt.NDArray[np.float32],
                 mean: npt.NDArray[np.float32], std: npt.NDArray[np.float32], info: dict[str, Any] | None = None):
        unknown = [k for k in kinds if k not in KIND_STRUCTURES]
        if unknown:
            raise input_error("kind classifier kinds", expected=f"names among {sorted(KIND_STRUCTURES)}",
                              received=str(unknown), fix="refit it with finetune.kind_classifier")
        k, d = weight.shape
        if k != len(kinds) or bias.shape != (k,) or mean.shape != (d,) or std.shape != (d,):
            raise input_error("kind classifier tensors", expected=f"weight (K, D), bias (K,), mean (D,), std (D,) "
                              f"with K = {len(kinds)} kinds",
                              received=f"weight {weight.shape}, bias {bias.shape}, mean {mean.shape}, "
                              f"std {std.shape}", fix="refit it with finetune.kind_classifier")
        self.kinds = list(kinds)
        self.weight, self.bias = weight.astype(np.float32), bias.astype(np.float32)
        self.mean, self.std = mean.astype(np.float32), np.maximum(std.astype(np.float32), 1e-6)
        self.info = dict(info or {})

    def logits(self, pooled: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``(N, D)`` or ``(D,)`` pooled features -> ``(N, K)`` or ``(K,)`` logits."""
        z = (np.asarray(pooled, dtype=np.float32) - self.mean) / self.std
        return np.asarray(z @ self.weight.T + self.bias, dtype=np.float32)

    def predict(self, features: Any) -> KindVerdict:
        """One image's encoder features (:func:`pool_features` shapes) -> its :class:`KindVerdict`."""
        logits = self.logits(pool_features(features)).astype(np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        best = int(p.argmax())
        return KindVerdict(self.kinds[best], float(p[best]), {k: float(v) for k, v in zip(self.kinds, p)})

    def save(self, directory: str | Path) -> Path:
        """Write the two files into ``directory`` (module docstring); returns the weights path."""
        from safetensors.numpy import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / KIND_CLASSIFIER_WEIGHTS
        save_file({"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std}, str(path))
        (directory / KIND_CLASSIFIER_JSON).write_text(json.dumps(
            {**self.info, "kinds": self.kinds, "pooling": "mean+std", "channels": int(self.weight.shape[1] // 2)},
            indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> KindClassifier | None:
        """The classifier saved in checkpoint folder ``directory``, or None when it has none. Strict: a file
        without the other, or a missing tensor, is an error naming it."""
        from safetensors.numpy import load_file

        directory = Path(directory)
        weights, meta = directory / KIND_CLASSIFIER_WEIGHTS, directory / KIND_CLASSIFIER_JSON
        if not weights.is_file() and not meta.is_file():
            return None
        if not (weights.is_file() and meta.is_file()):
            missing = meta if weights.is_file() else weights
            raise input_error("kind classifier", expected=f"both {KIND_CLASSIFIER_WEIGHTS} and {KIND_CLASSIFIER_JSON}"
                              f" in {directory}", received=f"{missing.name} missing",
                              fix="refit it with finetune.kind_classifier, or delete the other file")
        tensors = load_file(str(weights))
        missing_keys = [k for k in _TENSORS if k not in tensors]
        if missing_keys:
            raise input_error("kind classifier weights", expected=f"tensors {list(_TENSORS)}",
                              received=f"missing {missing_keys} in {weights}",
                              fix="refit it with finetune.kind_classifier")
        info = json.loads(meta.read_text())
        kinds = info.pop("kinds", None)
        if not isinstance(kinds, list):
            raise input_error("kind classifier json", expected='a "kinds" list', received=str(meta),
                              fix="refit it with finetune.kind_classifier")
        return cls(kinds, tensors["weight"], tensors["bias"], tensors["mean"], tensors["std"], info)
