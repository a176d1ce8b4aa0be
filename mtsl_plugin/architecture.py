"""MTSL as a LibMTL architecture (``LibMTL.architecture.AbsArchitecture`` subclass).

LibMTL composes an architecture with a weighting method (``class MTLmodel(architecture, weighting)``) and calls
``forward(inputs)`` for a dict of predictions. Here the "encoder" LibMTL expects is the whole branched trunk
(encoder and decoder locations), built from a stage factory, and the "decoders" are the task heads:

* ``encoder_class``: a zero-argument callable returning a :class:`~mtsl_plugin.network.stages.StageFactory`;
* ``decoders``: task name -> head module, called ``head(features, size)`` with the outputs of the stages'
  ``head_locations`` (e.g. ``stages.build_head(channels)``);
* ``arch_args``: ``plan`` (a :class:`BranchingPlan`; default: the single-task plan MTSL starts from) and
  ``fused`` (run the nodes of a location as one vmapped call, :meth:`BranchedNetwork.run_fused`; default off).

``forward`` returns the predictions as LibMTL wants and keeps the task-node features of the same forward in
``self.task_node_features`` for the alignment loss (they come from the network's own forward, not from hooks).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from mtsl_plugin.learner.schedule import require
from mtsl_plugin.libmtl_compat import import_libmtl, zero_shared_grads_in_place
from mtsl_plugin.network.branched import BranchedNetwork
from mtsl_plugin.plan import BranchingPlan

AbsArchitecture = import_libmtl().architecture.AbsArchitecture


def check_architecture_args(name: str, task_name, decoders, rep_grad: bool, multi_input: bool, plan=None) -> None:
    """The checks every architecture of this project makes on LibMTL's constructor arguments: one input shared
    by all tasks, no representation gradients, a head per task, and (for an architecture that takes no starting
    plan: the baselines pass theirs here) no ``plan``."""
    if rep_grad:
        raise ValueError(f"{name} does not support rep_grad=True: tasks do not share one representation")
    if multi_input:
        raise ValueError(f"{name} needs one input shared by all tasks (multi_input=False)")
    if plan is not None:
        raise ValueError(f"{name} is not plan-based (it takes no starting plan): pass plan=None")
    missing = [t for t in task_name if t not in decoders]
    if missing:
        raise ValueError(f"no head given for task(s) {missing}")


def check_arch_args(architecture: type, task_count: int, num_locations: int, arch_args: Mapping[str, Any],
                    epochs: int | None = None) -> None:
    """Refuse, in one line and before anything is built, ``arch_args`` that an architecture of this project does
    not take: a name outside its ``known_args``, or a value its ``check_args(task_count, num_locations,
    arch_args)``, where it has one, refuses (with :func:`one_of` and
    :func:`~mtsl_plugin.learner.schedule.require`), or, given the ``epochs`` it will train, its
    ``check_epochs(arch_args, epochs)`` (a searching supernet's warm-up). Its constructor makes the same checks
    but the last, which the trainer makes when it starts; the commands make them all before any training.
    Architectures without ``known_args`` (LibMTL's own, a user's) are not checked here."""
    known = getattr(architecture, "known_args", None)
    if known is None:
        return
    unknown = sorted(set(arch_args) - set(known))
    if unknown:
        raise ValueError(f"{architecture.label} got unknown arch_args {unknown}; known: {sorted(known)}")
    if hasattr(architecture, "check_args"):
        architecture.check_args(task_count, num_locations, arch_args)
    if epochs is not None and hasattr(architecture, "check_epochs"):
        architecture.check_epochs(arch_args, epochs)


def one_of(label: str, name: str, value: Any, options: tuple) -> None:
    """One line naming ``label``'s option ``name`` unless ``value`` is one of ``options``."""
    if value not in options:
        raise ValueError(f"{label} {name} must be one of {options}, got {value!r}")


class MTSL(AbsArchitecture):
    """Multi-Task Structural Learning (Gurulingan et al., ICML 2023) on the branched network of a stage factory
    (a timm ResNet or any other timm CNN that :func:`~mtsl_plugin.network.backbones.create_stages` can cut)."""

    reads_stages = True  # encoder_class() gives a StageFactory, heads are called with the output size (Trainer)
    label = "MTSL"  # for messages (LibMTL subclasses the architecture, so the class name is not ours)
    known_args = frozenset({"plan", "fused"})

    @classmethod
    def check_args(cls, task_count: int, num_locations: int, arch_args: Mapping[str, Any]) -> None:
        """The checks of :func:`check_arch_args`: ``plan`` a :class:`BranchingPlan` (or none: STN), ``fused`` a
        bool (``"no"`` would otherwise fuse)."""
        plan = arch_args.get("plan")
        if plan is not None and not isinstance(plan, BranchingPlan):
            raise ValueError(f"MTSL plan must be a BranchingPlan or None, got {type(plan).__name__}")
        require("MTSL fused", arch_args.get("fused", False), bool)

    def __init__(self, task_name, encoder_class, decoders, rep_grad, multi_input, device, **kwargs):
        decoders = dict(decoders)  # a plain dict: the heads are registered once, inside the branched network
        super().__init__(task_name, encoder_class, decoders, rep_grad, multi_input, device, **kwargs)
        check_architecture_args("MTSL", task_name, decoders, rep_grad, multi_input)
        stages = encoder_class()
        check_arch_args(type(self), len(task_name), stages.num_locations, kwargs)
        plan = kwargs.get("plan") or BranchingPlan.single_task(task_name, stages.num_locations)
        if list(plan.tasks) != list(task_name):
            raise ValueError(f"the plan's tasks {list(plan.tasks)} differ from the trainer's {list(task_name)}")
        self.encoder = BranchedNetwork(plan, stages, decoders)
        self.encoder.fused = bool(kwargs.get("fused", False))
        self.task_node_features: dict[str, torch.Tensor] = {}

    @property
    def network(self) -> BranchedNetwork:
        return self.encoder

    @property
    def plan(self) -> BranchingPlan:
        return self.encoder.plan

    def forward(self, inputs: torch.Tensor, task_name: str | None = None) -> dict[str, torch.Tensor]:
        preds, self.task_node_features = self.encoder(inputs)
        if task_name is not None:
            return {task_name: preds[task_name]}
        return preds

    def get_share_params(self):
        return iter(self.encoder.shared_parameters())

    zero_grad_share_params = zero_shared_grads_in_place
