"""Losses of Med-VLM: segmentation = the unweighted sum of binary cross-entropy and soft Dice; learned anatomy
gating = the share of a finding heatmap's mass outside the finding's anatomical prior."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["bce_dice_loss", "positive_bce_loss", "prior_mass_loss", "soft_dice_loss"]


def soft_dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """Mean over the batch of ``1 - (2|P*G| + eps) / (|P| + |G| + eps)`` with ``P = sigmoid(logits)``.

    ``logits`` and ``target`` are ``(B, 1, H, W)`` (target in {0, 1}). ``eps`` (in pixels) keeps an empty target
    defined: an empty prediction of an empty target costs ~0, any predicted pixel costs up to 1.
    """
    probs = torch.sigmoid(logits).flatten(1)
    tgt = target.flatten(1).to(probs.dtype)
    inter = (probs * tgt).sum(1)
    return (1.0 - (2.0 * inter + eps) / (probs.sum(1) + tgt.sum(1) + eps)).mean()


def bce_dice_loss(logits: Tensor, target: Tensor) -> Tensor:
    """``BCE(logits, target) + soft Dice`` (both means over the batch); shapes ``(B, 1, H, W)``."""
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype)) + soft_dice_loss(logits, target)


def positive_bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over the rows with a non-empty target of the BCE on that row's target pixels alone, ``mean over G of
    softplus(-logit)``; 0 when no row has one. Shapes ``(B, 1, H, W)``.

    Why: a small structure (the pancreas: ~0.5 % of a CT slice) whose logits have been pushed far below 0 (empty
    targets of negatives, the background term of the BCE) gets almost no gradient back: the BCE's mean spreads
    its few positive pixels over the whole map, and the soft Dice's gradient vanishes through a saturated
    sigmoid. Averaged over the target alone, each positive pixel pulls with weight ``1 / |G|`` per row.
    """
    tgt = target.flatten(1).to(logits.dtype)
    size = tgt.sum(1)
    keep = size > 0
    if not bool(keep.any()):
        return logits.sum() * 0.0
    per_pixel = F.softplus(-logits.flatten(1))
    return ((per_pixel * tgt).sum(1)[keep] / size[keep]).mean()


def prior_mass_loss(logits: Tensor, prior: Tensor) -> Tensor:
    """Mean over the batch of the heatmap mass outside the anatomical prior: ``sum(q * (1 - prior))`` with
    ``q = softmax(logits)`` over the pixels of each map.

    ``logits``: ``(B, 1, H, W)`` mask logits for finding phrases; ``prior``: ``(B, 1, H, W)`` in [0, 1], the soft
    gate of the regions each finding is expected in (1 inside, falling to 0 away from them). In [0, 1]; 0 when all
    mass lies where the prior is 1. The softmax (not the sigmoid) makes the loss blind to the map's overall scale,
    so it cannot be lowered by switching the map off; it moves the map's hot part (peak and box) into the prior.
    """
    q = torch.softmax(logits.flatten(1).float(), dim=1)
    outside = 1.0 - prior.flatten(1).to(q.dtype).clamp(0.0, 1.0)
    return (q * outside).sum(1).mean()
