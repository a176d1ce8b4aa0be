"""Which pixels of a target hold a value: the rules the built-in tasks' losses and metrics share.

A ``labels`` target marks a pixel without a class with :data:`IGNORE_INDEX`; a ``dense`` target holds a value where
:func:`holds_value` says so (the rules of :data:`~mtsl_plugin.tasks.VALID_RULES`); a ``normals`` target where
:func:`has_normal` does.
"""
from __future__ import annotations

import torch
from torch import Tensor

#: The class index of a ``labels`` target's pixel that has no class.
IGNORE_INDEX = -1


def holds_value(target: Tensor, rule: str) -> Tensor:
    """Where a dense target holds a value under ``rule`` (:data:`~mtsl_plugin.tasks.VALID_RULES`): finite, and
    ``> 0`` under ``positive`` (D's rule: NaN, inf and 0 are no depth). Same shape as ``target``."""
    valid = torch.isfinite(target)
    return valid & (target > 0) if rule == "positive" else valid


def has_normal(target: Tensor) -> Tensor:
    """Where a normal target ``(N, 3, H, W)`` holds a normal: every component finite and not all zero;
    ``(N, H, W)``."""
    return torch.isfinite(target).all(dim=1) & (target.abs().sum(dim=1) > 0)
