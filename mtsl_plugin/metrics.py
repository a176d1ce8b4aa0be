"""The built-in tasks' own metrics (D, E, N, A and the declared kinds' errors; S uses torchmetrics' as it is).

Each is a :class:`torchmetrics.Metric` that accumulates sums across batches, so a dataset score is exact
(pixel-weighted), never a mean of batch scores.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from mtsl_plugin.valid_pixels import has_normal, holds_value


class RatioMetric(Metric):
    """Accumulates a float64 ``total`` and a pixel ``count``; subclasses say what one batch adds.

    ``compute()`` returns NaN when no valid pixel was ever seen.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _batch(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.shape != target.shape:  # every ratio metric compares them value by value: never broadcast
            raise ValueError(
                f"{type(self).__name__} got prediction {tuple(pred.shape)} and target {tuple(target.shape)} "
                "of different shapes (batch, channel or spatial sizes)"
            )
        total, count = self._batch(pred.detach().double(), target.detach().double())
        self.total += total
        self.count += count

    def _ratio(self) -> Tensor:
        if self.count == 0:
            return torch.tensor(math.nan, dtype=torch.float64, device=self.total.device)
        return self.total / self.count


class RegressionError(RatioMetric):
    """Mean of ``|pred - target| ** power`` over every valid target value of the data set
    (:func:`~mtsl_plugin.valid_pixels.holds_value` under rule ``valid``), its square root when ``root``
    (``power=2, root=True``: RMSE; ``power=1``: MAE; ``power=2``: MSE, the A task's). ``(N, C, H, W)`` each."""

    higher_is_better = False

    def __init__(self, power: int = 2, root: bool = True, valid: str = "finite", **kwargs: Any):
        super().__init__(**kwargs)
        self.power, self.root, self.valid = power, root, valid

    def _batch(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        mask = holds_value(target, self.valid)
        return ((pred - target)[mask].abs() ** self.power).sum(), mask.sum()

    def compute(self) -> Tensor:
        return self._ratio().sqrt() if self.root else self._ratio()


class MaskedRMSE(RegressionError):
    """Root mean squared error over all valid pixels of the dataset: finite and ``> 0`` (the ``positive`` rule of
    :data:`~mtsl_plugin.tasks.VALID_RULES`, the D task's own; NaN, inf and 0 are no depth). ``(N, 1, H, W)`` each."""

    def __init__(self, **kwargs: Any):
        super().__init__(2, True, "positive", **kwargs)


class ImageMSE(RegressionError):
    """Mean squared error over every finite target value of the dataset: the A task's and the ``reconstruction``
    kind's metric (the image in [0, 1] as target). ``(N, C, H, W)`` each."""

    def __init__(self, **kwargs: Any):
        super().__init__(2, False, "finite", **kwargs)


class MeanCosine(RatioMetric):
    """Mean cosine similarity over all pixels with a finite, non-zero target normal. ``(N, 3, H, W)`` each."""

    higher_is_better = True

    def _batch(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        valid = has_normal(target)
        cosine = F.cosine_similarity(pred, target, dim=1, eps=1e-12)
        return cosine[valid].sum(), valid.sum()

    def compute(self) -> Tensor:
        return self._ratio()


class MeanBCE(RatioMetric):
    """Unbalanced binary cross-entropy with logits, averaged over every pixel. ``(N, 1, H, W)`` each."""

    higher_is_better = False

    def _batch(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return F.binary_cross_entropy_with_logits(pred, target, reduction="sum"), torch.tensor(target.numel(), device=target.device)

    def compute(self) -> Tensor:
        return self._ratio()
