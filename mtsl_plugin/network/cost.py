"""Parameters and GMac of a network, counted with ``torch.utils.flop_counter`` (GMac = FLOPs / 2 / 1e9)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mtsl_plugin.network.modes import evaluating
from mtsl_plugin.plan import StageCost


def count_gmac(run: Callable[[], object]) -> float:
    """Multiply-accumulates (in units of 1e9) of everything ``run()`` computes."""
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return counter.get_total_flops() / 2e9


def model_cost(model: nn.Module, height: int, width: int) -> StageCost:
    """Inference cost of ``model`` on one image of ``height`` x ``width``.

    Parameters are those of the model's submodules (parameters registered directly on a LibMTL model, such as
    a weighting method's loss scales, are not part of the inference network).
    """
    params = {id(p): p.numel() for child in model.children() for p in child.parameters()}
    like = next(model.parameters())  # the image in the model's device and dtype
    with evaluating(model), torch.no_grad():
        gmac = count_gmac(lambda: model(torch.zeros(1, 3, height, width, device=like.device, dtype=like.dtype)))
    return StageCost(sum(params.values()), gmac)
