"""Segmentation loss: cross-entropy + 0.1 · soft Dice (supplement B), with an ignore index."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from napari_muvit.errors import InputError

__all__ = ["segmentation_loss", "soft_dice_loss"]


def soft_dice_loss(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = -1,
    exclude: Sequence[int] = (0,),
    smooth: float = 1.0,
) -> Tensor:
    """``1 − mean_c Dice_c`` of the softmax probabilities over non-ignored pixels.

    Dice per class is pooled over the whole batch (more stable than per image with sparse
    annotations); classes in ``exclude`` (background) are left out. Computed in float32.
    """
    K = logits.shape[1]
    valid = target != ignore_index
    probs = torch.softmax(logits.float(), dim=1) * valid[:, None]
    onehot = F.one_hot(torch.where(valid, target, 0).long(), K).permute(0, 3, 1, 2).float()
    onehot = onehot * valid[:, None]
    excl = {int(c) % K for c in exclude}
    classes = [c for c in range(K) if c not in excl]
    if not classes:
        return logits.float().sum() * 0.0
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)[classes]
    denom = (probs.sum(dims) + onehot.sum(dims))[classes]
    dice = (2 * inter + smooth) / (denom + smooth)
    return 1.0 - dice.mean()


def segmentation_loss(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = -1,
    dice_weight: float = 0.1,
    class_weights: Tensor | Sequence[float] | None = None,
    dice_exclude: Sequence[int] = (0,),
) -> Tensor:
    """``CE(logits, target) + dice_weight · SoftDice`` over non-ignored pixels.

    Args:
        logits: (B, K, H, W) raw scores.
        target: (B, H, W) int class indices in ``[0, K)``, ``ignore_index`` = not annotated.
        ignore_index: label of pixels that contribute nothing (default -1).
        dice_weight: weight of the Dice term (0.1 in the paper).
        class_weights: optional (K,) cross-entropy weights (e.g. 2× foreground on KPIS).
        dice_exclude: class indices left out of the Dice term (background, class 0).

    Returns a scalar; exactly 0 (with gradient graph) when no pixel is annotated.
    """
    if logits.ndim != 4:
        raise InputError(f"logits: expected (B, K, H, W), got shape {tuple(logits.shape)}")
    B, K, H, W = logits.shape
    if target.shape != (B, H, W):
        raise InputError(f"target: expected shape {(B, H, W)}, got {tuple(target.shape)}")
    if target.is_floating_point():
        raise InputError(f"target: expected an integer tensor, got {target.dtype}")
    target = target.long()
    valid = target != ignore_index
    if bool(((target < 0) | (target >= K))[valid].any()):
        bad = target[valid & ((target < 0) | (target >= K))][0].item()
        raise InputError(f"target: expected class indices in [0, {K}) or {ignore_index}, got {bad}")
    if not bool(valid.any()):
        return logits.float().sum() * 0.0
    w = None
    if class_weights is not None:
        w = torch.as_tensor(class_weights, dtype=torch.float32, device=logits.device)
        if w.shape != (K,):
            raise InputError(f"class_weights: expected {K} values, got shape {tuple(w.shape)}")
    ce = F.cross_entropy(logits.float(), target, weight=w, ignore_index=ignore_index)
    if dice_weight:
        return ce + dice_weight * soft_dice_loss(logits, target, ignore_index, dice_exclude)
    return ce
