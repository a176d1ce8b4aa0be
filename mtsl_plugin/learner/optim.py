"""Optimizer surgery for structural edits: average state into new nodes, drop the state of removed ones.

PyTorch optimizers key their state by parameter object, so edits are done in place: the parameter list of the
first param group is replaced by the model's current parameters (in model order), surviving parameters keep
their state untouched, new parameters get the state they are given, and removed parameters leave nothing
behind. The LR scheduler stays bound to the same optimizer, so its position is kept.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn


def average_module_state(modules: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """The element-wise mean of several modules' state dicts (same architecture).

    Floating tensors (weights, biases, BN running statistics) are averaged, in float32 at least (in their own
    dtype when it is wider, e.g. float64) and returned in their own dtype; integer buffers such as BN's
    ``num_batches_tracked`` take the maximum.
    """
    states = [m.state_dict() for m in modules]
    names = list(states[0])
    for other in states[1:]:
        if list(other) != names:
            raise ValueError("cannot average modules with different state dict keys")
    averaged = {}
    for name in names:
        stack = torch.stack([s[name] for s in states])
        averaged[name] = _mean(stack) if stack.is_floating_point() else stack.max(0).values
    return averaged


def _mean(stack: torch.Tensor) -> torch.Tensor:
    """The mean over the first dimension of ``stack``, in its own dtype. A floating stack is accumulated in
    float32 or its own dtype if wider (so float64 state is not rounded to float32, and bf16 state is summed in
    float32); an integer one (an optimizer's integer step count, say) in float32, truncated back to its dtype."""
    if not stack.is_floating_point():
        return stack.float().mean(0).to(stack.dtype)  # e.g. an integer step count
    return stack.to(torch.promote_types(stack.dtype, torch.float32)).mean(0).to(stack.dtype)


def average_parameter_state(optimizer: torch.optim.Optimizer, modules: Sequence[nn.Module]
                            ) -> list[dict[str, object]]:
    """Per parameter (in ``modules[0].parameters()`` order), the mean of the optimizer state the corresponding
    parameters of ``modules`` carry (e.g. Adam's ``step``, ``exp_avg``, ``exp_avg_sq``), over the modules whose
    parameter has state: one without state yet (a parameter that never had a gradient) is left out, not counted
    as zeros.

    Tensor entries are averaged element-wise over those modules; other entries are taken from the first module
    with optimizer state for that parameter. A parameter for which no module has state yet gets an empty state.
    """
    per_module = [list(m.parameters()) for m in modules]
    result = []
    for params in zip(*per_module):
        states = [optimizer.state[p] for p in params if p in optimizer.state and optimizer.state[p]]
        if not states:
            result.append({})
            continue
        merged: dict[str, object] = {}
        for key, value in states[0].items():
            if torch.is_tensor(value):
                merged[key] = _mean(torch.stack([s[key] for s in states]))
            else:
                merged[key] = value
        result.append(merged)
    return result


def sync_parameters(optimizer: torch.optim.Optimizer, parameters: Iterable[nn.Parameter],
                    new_state: dict[nn.Parameter, dict[str, object]] | None = None) -> None:
    """Make ``optimizer``'s first param group hold exactly ``parameters`` (in that order).

    Parameters already in the optimizer keep their state; parameters in ``new_state`` get that state;
    parameters no longer listed are dropped together with their state.
    """
    if len(optimizer.param_groups) != 1:
        raise ValueError("structural edits support optimizers with a single param group "
                         f"(this one has {len(optimizer.param_groups)})")
    params = list(parameters)
    keep = set(params)
    for p in list(optimizer.state):
        if p not in keep:
            del optimizer.state[p]
    for p, state in (new_state or {}).items():
        if p not in keep:
            raise ValueError("new optimizer state was given for a parameter that is not in the model")
        if state:
            optimizer.state[p] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
    optimizer.param_groups[0]["params"] = params
