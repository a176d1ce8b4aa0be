"""A third-party MTSL plugin, written only against the public API, for the plugin-manager tests."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from mtsl_plugin.plugins import hookimpl


def gram_cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between the (N, N) Gram matrices of x (N, C1) and y (N, C2); 0-d, differentiable."""
    k = x @ x.T
    l = y @ y.T
    return (k * l).sum() / (k.norm() * l.norm()).clamp_min(1e-12)


def singletons(similarity, tasks: Sequence[str], threshold: float) -> list[list[str]]:
    """Put every task in its own group, whatever the similarities."""
    return [[task] for task in tasks]


@hookimpl
def mtsl_similarity_metrics() -> dict:
    return {"test_cosine": gram_cosine}


@hookimpl
def mtsl_grouping_solvers() -> dict:
    return {"test_singletons": singletons}
