"""Targets for learned anatomy gating: a finding phrase and the soft prior of where that finding can be.

For one training radiograph with ground-truth anatomy masks (in the cached 256 letterbox frame), draw a finding
phrase from ``prompts.findings`` (the canonical name or a synonym, with "left"/"right" half of the time when the
finding's regions are lateral), parse it as inference does (:func:`agents.text.parse_phrase`: location words,
else the finding's default regions on the stated side), derive those regions from the masks
(:class:`agents.anatomy.ChestAnatomy`) and soften them with the same gate the inference-time anatomy gating uses
(:func:`segmentation.heatmap.gate_weights`). The trainer penalises heatmap mass outside it
(:func:`segmentation.textseg.losses.prior_mass_loss`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["chest_anatomy", "finding_phrase", "prior_for_phrase", "sample_finding_prior"]

#: tries before giving up on an image whose masks cannot place a drawn finding (e.g. no heart mask for
#: cardiomegaly on a lungs-only dataset)
_TRIES = 6


def finding_phrase(rng: random.Random) -> str:
    """A finding phrase: a uniformly drawn finding of the vocabulary, then one of its phrases (name or synonym);
    "left "/"right " is prepended half of the time when every default region of the finding is lateral."""
    from prompts.findings import load_findings

    vocab = load_findings()
    finding = vocab.get(rng.choice(sorted(vocab.findings)))
    phrase = rng.choice(finding.phrases)
    lateral = all(r.startswith(("left ", "right ")) for r in finding.default_regions)
    if lateral and rng.random() < 0.5:
        phrase = f"{rng.choice(('left', 'right'))} {phrase}"
    return phrase


def chest_anatomy(masks: Mapping[str, Any]) -> Any:
    """The :class:`~agents.anatomy.ChestAnatomy` of ``masks`` (structure name -> bool ``(S, S)`` array or tensor),
    or None when they are not a frontal chest radiograph (both lungs of chest-film size)."""
    from agents.anatomy import anatomy_from_masks

    arrays = {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v, dtype=bool) for k, v in masks.items()}
    if not arrays:
        return None
    shape = next(iter(arrays.values())).shape
    anatomy = anatomy_from_masks(arrays, (int(shape[0]), int(shape[1])), "ground truth")
    return anatomy if anatomy.is_chest else None


def prior_for_phrase(anatomy: Any, phrase: str) -> npt.NDArray[np.float32] | None:
    """Soft prior float32 ``(S, S)`` in [0, 1] of ``phrase`` on the grid of ``anatomy`` (from
    :func:`chest_anatomy`), or None when the phrase names no finding or its regions cannot be derived."""
    from agents.text import parse_phrase
    from segmentation.heatmap import gate_weights

    mention = parse_phrase(phrase)
    if mention.finding is None or not mention.regions:
        return None
    region = anatomy.union(mention.regions)
    if region is None or not region.any():
        return None
    return gate_weights(region)


def sample_finding_prior(masks: Mapping[str, Any], rng: random.Random) -> tuple[str, npt.NDArray[np.float32]] | None:
    """``(phrase, prior (S, S))`` for one image's masks (see :func:`prior_for_phrase`), or None when the image is
    not a chest radiograph or no drawn finding could be placed in ``_TRIES`` draws."""
    anatomy = chest_anatomy(masks)
    if anatomy is None:
        return None
    for _ in range(_TRIES):
        phrase = finding_phrase(rng)
        prior = prior_for_phrase(anatomy, phrase)
        if prior is not None:
            return phrase, prior
    return None
