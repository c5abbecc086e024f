"""Segmentation loss of Med-VLM: the unweighted sum of binary cross-entropy and soft Dice."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["bce_dice_loss", "soft_dice_loss"]


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
