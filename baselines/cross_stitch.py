"""Cross-stitch networks (Misra et al., CVPR 2016) on the timm stages, as a LibMTL architecture.

One network per task, each from its own draw of the network's random initialisation (``candidates="independent"``,
:func:`~mtsl_plugin.network.stages.candidate_factories`), as LibMTL's ``Cross_stitch`` calls ``encoder_class()``
once per task and the reference starts from separately trained single-task networks; pretrained or file weights
are the same in every task's network; ``candidates="identical"`` starts them all as one network, like STN's. A
channel-wise cross-stitch unit after **every** location: after each of the 6 encoder
locations and, in the encoder-decoder setting, after each of the 4 decoder locations too (10 units), the last
one mixing the features the task heads read. A unit mixes the tasks' outputs at its location, per channel c::

    x̃_i[:, c] = Σ_j α_ij^c · x_j[:, c]          α of shape (T, T, C)

initialised as the reference implementation (``SimonVandenhende/Multi-Task-Learning-PyTorch``) configures it:
α_ii = 0.9 and α_ij = 0.1 for two tasks (its NYUD setting), α_ii = 0.8 and α_ij = 0.05 for five (its PASCAL
setting); in general α_ii = 0.9 for two tasks and 0.8 for more, the rest of each row spread evenly over the other
tasks so that rows sum to one (:func:`default_self_weight`; the identity when T = 1). A decoder location's
skip is the task's own stitched output of the skip location. With every unit at the identity the task networks
are independent STNs.

Registered as ``cross_stitch``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mtsl_plugin.architecture import check_arch_args, check_architecture_args, one_of
from mtsl_plugin.learner.schedule import require
from mtsl_plugin.libmtl_compat import import_libmtl, zero_shared_grads_in_place
from mtsl_plugin.methods import MethodSpec, register_method
from mtsl_plugin.network.stages import CANDIDATES, StageFactory, candidate_factories

AbsArchitecture = import_libmtl().architecture.AbsArchitecture


UNIT_LR_MULTIPLIER = 100.0
"""The units' learning rate as a multiple of the run's: the group the reference's ``get_optimizer`` builds (with
SGD; Misra et al. train the units faster than the weights). The reference's ``main.py`` then calls
``adjust_learning_rate`` before its first epoch, which sets every group to the base rate, so its units in fact
learn at 1×: a bug we do not copy. Measured on the quick preset, seed 0, under the run's Adam: Δ_MTL −2.84 % at
100× and −5.05 % at 1× (``arch_args={"unit_lr_multiplier": 1.0}``; docs/fidelity.md, "Baselines")."""


def default_self_weight(num_tasks: int) -> float:
    """The initial α_ii for ``num_tasks`` tasks: 0.9 for two (or one), 0.8 for more (see the module docstring)."""
    return 0.9 if num_tasks <= 2 else 0.8


class CrossStitchUnit(nn.Module):
    """Channel-wise linear mixing of the tasks' activations at one location.

    ``forward(xs)``: ``xs`` is a list of T tensors ``(N, C, H, W)`` in task order; returns T tensors of the same
    shape, the i-th being ``Σ_j α[i, j, c] · xs[j][:, c]`` per channel c.

    Args:
        num_tasks: T.
        channels: C, the channels of the location's output.
        self_weight: the initial α_ii (default :func:`default_self_weight`); the rest of each row,
            1 − self_weight, is spread evenly over the other tasks, so every row starts summing to one.
    """

    def __init__(self, num_tasks: int, channels: int, self_weight: float | None = None):
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"a cross-stitch unit needs at least one task, got {num_tasks}")
        self_weight = default_self_weight(num_tasks) if self_weight is None else self_weight
        if num_tasks == 1:
            alpha = torch.ones(1, 1, channels)
        else:
            alpha = torch.full((num_tasks, num_tasks, channels), (1.0 - self_weight) / (num_tasks - 1))
            alpha[range(num_tasks), range(num_tasks)] = self_weight
        self.alpha = nn.Parameter(alpha)

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(xs) != self.alpha.shape[0]:
            raise ValueError(f"cross-stitch unit for {self.alpha.shape[0]} tasks got {len(xs)} inputs")
        stacked = torch.stack(list(xs))  # (T, N, C, H, W)
        mixed = torch.einsum("ijc,jnchw->inchw", self.alpha.to(stacked.dtype), stacked)
        return list(mixed.unbind(0))


class CrossStitchNetwork(nn.Module):
    """The T task networks of ``stages`` with a :class:`CrossStitchUnit` after every location.

    ``forward(x (N, 3, H, W))`` returns, per task, the stitched outputs of the stages' head locations (what the
    task's head reads: ``[(N, C_l, h_l, w_l)]``).
    Attributes: ``nodes[location][task]`` (the task networks' nodes), ``units[location]``.
    """

    def __init__(self, stages: StageFactory, tasks: Sequence[str], self_weight: float | None = None,
                 candidates: str = "independent"):
        super().__init__()
        self.tasks = tuple(tasks)
        self.specs = stages.specs
        self.head_locations = stages.head_locations
        networks = candidate_factories(stages, len(self.tasks), candidates)
        self.nodes = nn.ModuleList(nn.ModuleDict({t: net.build(location) for t, net in zip(self.tasks, networks)})
                                   for location in range(stages.num_locations))
        self.units = nn.ModuleList(CrossStitchUnit(len(self.tasks), spec.out_channels, self_weight)
                                   for spec in self.specs)

    def forward(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        outputs: list[list[torch.Tensor]] = []  # per location, per task (task order)
        for location, spec in enumerate(self.specs):
            inputs = [x] * len(self.tasks) if location == 0 else outputs[-1]
            nodes = self.nodes[location]
            if spec.skip_from is None:
                ys = [nodes[t](inp) for t, inp in zip(self.tasks, inputs)]
            else:
                ys = [nodes[t](inp, skip) for t, inp, skip in zip(self.tasks, inputs, outputs[spec.skip_from])]
            outputs.append(self.units[location](ys))
        return {t: [outputs[l][i] for l in self.head_locations] for i, t in enumerate(self.tasks)}


class CrossStitch(AbsArchitecture):
    """Cross-stitch networks on the timm stages, as a LibMTL architecture.

    Subclasses ``AbsArchitecture`` rather than ``LibMTL.architecture.Cross_stitch``: that class's only own code
    is its ``__init__``, which calls ``encoder_class()`` once per task expecting a torchvision ResNet (``relu``,
    ``layer1``..``layer4``) and wraps it in a module with one scalar per (layer, source task) that is shared by
    all target tasks; none of it applies to a stage table with decoder skips and channel-wise units.

    LibMTL interface: ``encoder_class()`` returns the stages (a :class:`StageFactory`); ``decoders`` maps task -> head
    (``head(features, size)``, e.g. ``stages.build_head``); ``forward(inputs)`` returns task -> prediction
    ``(N, K_t, H, W)``; the shared parameters (``get_share_params``) are the cross-stitch units, the only
    parameters that belong to no single task. ``arch_args``: ``self_weight`` (initial α_ii, default by the number of
    tasks, :func:`default_self_weight`); ``candidates`` (``"independent"``, default, or ``"identical"``: see the
    module docstring); ``unit_lr_multiplier`` (the units learn at this multiple of the run's learning rate, in a
    parameter group of their own: default 100, the rate the reference implementation,
    ``SimonVandenhende/Multi-Task-Learning-PyTorch`` ``get_optimizer``, gives them, see :data:`UNIT_LR_MULTIPLIER`;
    1 = the weights' rate);
    ``plan`` must be ``None`` (the harness passes it to every architecture; cross-stitch is not plan-based).
    ``rep_grad`` and ``multi_input`` are not supported.
    """

    reads_stages = True  # encoder_class() gives a StageFactory, heads are called with the output size (Trainer)
    label = "cross-stitch"  # for messages (LibMTL subclasses the architecture, so the class name is not ours)
    known_args = frozenset({"plan", "self_weight", "candidates", "unit_lr_multiplier"})

    @classmethod
    def check_args(cls, task_count: int, num_locations: int, arch_args: Mapping[str, Any]) -> None:
        """The checks of :func:`~mtsl_plugin.architecture.check_arch_args`."""
        one_of("cross-stitch", "candidates", arch_args.get("candidates", "independent"), CANDIDATES)
        require("cross-stitch unit_lr_multiplier", arch_args.get("unit_lr_multiplier", UNIT_LR_MULTIPLIER), float,
                above=0)
        require("cross-stitch self_weight", arch_args.get("self_weight"), float, optional=True)

    def __init__(self, task_name, encoder_class, decoders, rep_grad, multi_input, device, **kwargs):
        super().__init__(task_name, encoder_class, decoders, rep_grad, multi_input, device, **kwargs)
        check_architecture_args("cross-stitch", task_name, decoders, rep_grad, multi_input, plan=kwargs.get("plan"))
        stages = encoder_class()
        check_arch_args(type(self), len(task_name), stages.num_locations, kwargs)
        self.encoder = CrossStitchNetwork(stages, task_name, kwargs.get("self_weight"),
                                          kwargs.get("candidates", "independent"))
        self.decoders = nn.ModuleDict({t: decoders[t] for t in task_name})
        self.unit_lr_multiplier = float(kwargs.get("unit_lr_multiplier", UNIT_LR_MULTIPLIER))

    def lr_multipliers(self) -> list[tuple[list[nn.Parameter], float]]:
        """The cross-stitch units' parameter group and its learning-rate multiple (read by the trainer)."""
        return [(list(self.encoder.units.parameters()), self.unit_lr_multiplier)]

    def forward(self, inputs: torch.Tensor, task_name: str | None = None) -> dict[str, torch.Tensor]:
        features = self.encoder(inputs)
        size = (inputs.shape[-2], inputs.shape[-1])
        tasks = self.task_name if task_name is None else [task_name]
        return {t: self.decoders[t](features[t], size) for t in tasks}

    def get_share_params(self):
        return self.encoder.units.parameters()

    zero_grad_share_params = zero_shared_grads_in_place


@register_method("cross_stitch")
def cross_stitch(config, num_locations: int) -> MethodSpec:
    """Cross-stitch networks: one network per task, channel-wise units after every location."""
    return MethodSpec(architecture=CrossStitch, arch_args={"unit_lr_multiplier": UNIT_LR_MULTIPLIER,
                                                           "candidates": "independent"})
