"""The built-in tasks' losses (S D E N A; predictions and targets as :mod:`mtsl_plugin.tasks` describes them).

The ``standard`` set comes first (the usual forms of the multi-task literature: LibMTL's and MTAN's
cross-entropy, L1 depth and cosine normals, HED's balanced edge BCE); ``losses: authors`` trains with the MTSL
authors' forms instead (:data:`AUTHORS_LOSSES`). Losses are means over valid pixels
(:mod:`mtsl_plugin.valid_pixels`); a batch without any valid pixel gives a zero loss that still belongs to the
graph (no NaN).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mtsl_plugin.network.weights import IMAGENET_STD  # the authors' A target: the ImageNet-normalised image
from mtsl_plugin.valid_pixels import IGNORE_INDEX, has_normal, holds_value


def as_float(x: Tensor) -> Tensor:
    """``x`` in at least float32, so sums over many pixels do not lose precision under bf16/fp16 autocast."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is true; zero (with a graph) when nothing is valid. Same shapes."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp_min(1)


# ----------------------------------------------------------------------------------------------- losses
def segmentation_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy over pixels whose class is not ``-1``. pred ``(N, C, H, W)`` logits, target ``(N, H, W)``."""
    summed = F.cross_entropy(as_float(pred), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return summed / (target != IGNORE_INDEX).sum().clamp_min(1)


def depth_loss(pred: Tensor, target: Tensor) -> Tensor:
    """L1 in metres over pixels with a depth (:func:`~mtsl_plugin.valid_pixels.holds_value` ``positive``). Both
    ``(N, 1, H, W)``."""
    valid = holds_value(target, "positive")
    return masked_mean((as_float(pred) - torch.where(valid, target, 0.0)).abs(), valid)


def edge_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Class-balanced BCE with logits (HED): edge pixels are weighted by the batch's fraction of non-edge
    pixels and non-edge pixels by the fraction of edge pixels; mean over all pixels. Both ``(N, 1, H, W)``.

    A batch with no edge (or only edges) therefore gives a zero loss, as in HED.
    """
    pred = as_float(pred)
    target = target.to(pred.dtype)
    positive_fraction = target.mean()
    weight = torch.where(target > 0.5, 1.0 - positive_fraction, positive_fraction).detach()
    return F.binary_cross_entropy_with_logits(pred, target, weight=weight)


def normal_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``1 - cosine similarity`` over pixels with a normal (:func:`~mtsl_plugin.valid_pixels.has_normal`). Both
    ``(N, 3, H, W)``; a non-finite target component gives neither a loss nor a NaN gradient."""
    valid = has_normal(target)
    target = torch.where(valid.unsqueeze(1), as_float(target), 0.0)
    cosine = F.cosine_similarity(as_float(pred), target, dim=1, eps=1e-8)
    return masked_mean(1.0 - cosine, valid)


def reconstruction_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over all pixels and channels. Both ``(N, 3, H, W)``."""
    return F.mse_loss(as_float(pred), as_float(target))


# The authors' losses (NeurAI-Lab/MTSL, ``encoding_custom/losses``), chosen with ``losses: authors``.
#: Their class-balanced cross-entropy's beta (effective number of samples, Cui et al. 2019).
CLASS_BALANCE_BETA = 1 - 1e-3
#: Their edge loss's weight of an edge pixel (a non-edge pixel weighs 1 minus it): ``MISC.SEM_CONT_POS_WEIGHT``.
EDGE_POSITIVE_WEIGHT = 0.95


def class_balanced_segmentation_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy weighted per class by the inverse effective number of the batch's pixels of that class,
    ``(1 - beta) / (1 - beta ** n_c)`` (classes absent from the batch weigh 0), as the authors'
    ``ClassBalancedSegmentationLosses``; a weighted mean over pixels whose class is not ``-1``.
    pred ``(N, C, H, W)`` logits, target ``(N, H, W)``."""
    pred = as_float(pred)
    valid = target != IGNORE_INDEX
    counts = torch.bincount(target[valid], minlength=pred.shape[1]).to(pred.dtype)
    weights = torch.where(counts > 0, (1 - CLASS_BALANCE_BETA) / (1 - CLASS_BALANCE_BETA ** counts), 0.0)
    summed = F.cross_entropy(pred, target, weight=weights, ignore_index=IGNORE_INDEX, reduction="sum")
    return summed / weights[target[valid]].sum().clamp_min(1e-12)


def depth_rmse_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Root mean squared error over pixels with a depth (the authors' ``RMSE``). Both ``(N, 1, H, W)``; a batch
    without depth gives zero (the square root's gradient is kept finite there)."""
    valid = holds_value(target, "positive")
    squared = masked_mean((as_float(pred) - torch.where(valid, target, 0.0)) ** 2, valid)
    return squared.clamp_min(1e-12).sqrt() * valid.any()


def fixed_weight_edge_loss(pred: Tensor, target: Tensor) -> Tensor:
    """BCE with logits, edge pixels weighted :data:`EDGE_POSITIVE_WEIGHT` and the others one minus it, mean over
    all pixels (the authors' ``BalancedBinaryCrossEntropyLoss``). Both ``(N, 1, H, W)``."""
    pred = as_float(pred)
    target = target.to(pred.dtype)
    weight = torch.where(target > 0.5, EDGE_POSITIVE_WEIGHT, 1.0 - EDGE_POSITIVE_WEIGHT)
    return F.binary_cross_entropy_with_logits(pred, target, weight=weight)


def normal_l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """L1 between the unit-length prediction and the target normal, mean over the components of pixels with a
    normal (the authors' ``NormalsL1Loss``). Both ``(N, 3, H, W)``."""
    valid = has_normal(target).unsqueeze(1).expand_as(target)
    unit = F.normalize(as_float(pred), dim=1, eps=1e-12)
    return masked_mean((unit - torch.where(valid, as_float(target), 0.0)).abs(), valid)


def standardised_reconstruction_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error after dividing each channel's error by ImageNet's standard deviation: the authors' MSE
    to the ImageNet-normalised image, with the head predicting the image itself. Both ``(N, 3, H, W)``."""
    error = as_float(pred) - as_float(target)
    std = torch.tensor(IMAGENET_STD, dtype=error.dtype, device=error.device).view(1, -1, 1, 1)
    return ((error / std) ** 2).mean()


#: ``losses: authors``: each built-in task's loss as the authors' code computes it (metrics do not change).
AUTHORS_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "S": class_balanced_segmentation_loss, "D": depth_rmse_loss, "E": fixed_weight_edge_loss,
    "N": normal_l1_loss, "A": standardised_reconstruction_loss,
}
