"""The supernet LTB and BMTAS search in, as a LibMTL architecture: ``T`` candidate nodes per merge location.

Every location ``l`` holds one node per task slot. By default (``arch_args`` ``candidates="independent"``) slot
``j``'s nodes come from its own draw of the network's random initialisation
(:func:`~mtsl_plugin.network.stages.candidate_factories`), as both references start theirs: LibMTL's LTB calls
``encoder_class()`` once per task, and brdav's supernet initialises every candidate operation on its own (its
encoder's then all load one set of ImageNet weights); pretrained or file weights are the same in every slot.
``candidates="identical"`` starts every slot as one network, like MTSL's single-task networks.

A subclass decides how tasks pick nodes while searching (:meth:`search_forward`) and which node each task keeps
(:meth:`derived_chains`: for every task its *chain*, the slot it uses at every location; see
:mod:`baselines.gates`). In evaluation every task runs on its derived chain, one node per group of the derived
plan, which is exactly the derived branched network (tested).

Skips: a decoder node at ``l`` of a chain concatenates the output of the same chain at ``spec.skip_from``, as
the derived branched network does (a group reads the skip of the group holding its tasks there).

The trainer sets ``model.epoch`` (0-based) and ``model.total_epochs`` before every epoch (LibMTL's convention).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from baselines import gates
from mtsl_plugin.architecture import check_arch_args, check_architecture_args, one_of
from mtsl_plugin.learner.schedule import require
from mtsl_plugin.libmtl_compat import import_libmtl, zero_shared_grads_in_place
from mtsl_plugin.network.branched import BranchedNetwork
from mtsl_plugin.network.cost import count_gmac
from mtsl_plugin.network.modes import evaluating
from mtsl_plugin.network.stages import CANDIDATES, candidate_factories
from mtsl_plugin.plan import BranchingPlan, Group

AbsArchitecture = import_libmtl().architecture.AbsArchitecture


class GatedSupernet(AbsArchitecture):
    """Candidate nodes, heads and gate logits; the search itself is the subclass's.

    LibMTL's arguments: ``task_name``, ``encoder_class`` (zero-argument callable returning the
    :class:`~mtsl_plugin.network.stages.StageFactory`), ``decoders`` (task -> head, ``head(features, size)``),
    ``rep_grad`` and ``multi_input`` (both False), ``device``, and ``arch_args`` from :attr:`known_args`.
    ``forward(x (N, 3, H, W))`` returns task -> prediction ``(N, C_t, H, W)``.
    """

    reads_stages = True  # encoder_class() gives a StageFactory, heads are called with the output size (Trainer)

    label = "supernet"  # for messages (LibMTL subclasses the architecture, so the class name is not ours)
    known_args: frozenset[str] = frozenset({"plan", "candidates"})

    def __init__(self, task_name, encoder_class, decoders, rep_grad, multi_input, device, **kwargs):
        decoders = dict(decoders)  # a plain dict: the heads are registered once, as ``self.heads``
        super().__init__(task_name, encoder_class, decoders, rep_grad, multi_input, device, **kwargs)
        check_architecture_args(self.label, task_name, decoders, rep_grad, multi_input, plan=kwargs.get("plan"))
        stages = encoder_class()
        check_arch_args(type(self), len(task_name), stages.num_locations, kwargs)
        self.stages = stages  # a plain attribute: the derived network is built from the same stages
        self.specs = stages.specs
        self.head_locations = stages.head_locations
        self.tasks: tuple[str, ...] = tuple(task_name)
        self.num_locations = stages.num_locations
        slots = candidate_factories(stages, len(self.tasks), kwargs.get("candidates", "independent"))
        self.nodes = nn.ModuleDict({f"{l}-{t}": slots[j].build(l) for l in range(self.num_locations)
                                    for j, t in enumerate(self.tasks)})
        self.heads = nn.ModuleDict({t: decoders[t] for t in self.tasks})
        self.gates = nn.ParameterDict()  # the subclass's logits, one ``(T, T)`` matrix per key
        self.epoch, self.total_epochs = 0, 1
        self.input_size: tuple[int, int] | None = None
        self._chains: list[list[int]] | None = []  # the last forward's chains; None: every node reached every task
        self._shared_prefix = 0  # locations below it reached every task in the last forward, whatever the chains
        self._stage_gmac_cache: dict[tuple[int, int], list[float]] = {}

    @classmethod
    def check_args(cls, task_count: int, num_locations: int, arch_args: Mapping[str, Any]) -> None:
        """The checks of :func:`~mtsl_plugin.architecture.check_arch_args` (the subclasses add theirs)."""
        one_of(cls.label, "candidates", arch_args.get("candidates", "independent"), CANDIDATES)
        require(f"{cls.label} warmup_epochs", arch_args.get("warmup_epochs"), int, least=0, optional=True)

    @classmethod
    def default_warmup_epochs(cls, epochs: int) -> int:
        """How many of ``epochs`` the reference's warm-up takes when ``warmup_epochs`` is not given."""
        raise NotImplementedError

    @classmethod
    def check_epochs(cls, arch_args: Mapping[str, Any], epochs: int) -> None:
        """Refuse a warm-up (``warmup_epochs``, or the reference's when not given) that leaves none of the
        ``epochs`` trained to search: the plan would be read off gates that never trained (a silent One-Net-or-STN
        tie break, not a search)."""
        warmup = arch_args.get("warmup_epochs")
        if warmup is None and cls.default_warmup_epochs(epochs) >= epochs:
            raise ValueError(f"{cls.label}'s warm-up takes all {epochs} epoch(s), leaving none to search; train "
                             f"more epochs or give a shorter warmup_epochs")
        if warmup is not None and warmup >= epochs:
            raise ValueError(f"{cls.label} warmup_epochs {warmup} leaves no search epoch of the {epochs} trained; "
                             f"give fewer than {epochs}")

    def node(self, location: int, slot: int) -> nn.Module:
        return self.nodes[f"{location}-{self.tasks[slot]}"]

    # ------------------------------------------------------------------ subclass interface
    @property
    def searching(self) -> bool:
        """Training with the gates in play (after the warm-up)."""
        raise NotImplementedError

    def search_forward(self, x: Tensor) -> dict[str, list[Tensor]]:
        """Training forward: every task's head inputs (the outputs at the stages' head locations)."""
        raise NotImplementedError

    def derived_chains(self) -> list[list[int]]:
        """The chain every task keeps (the most likely choices)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ forward
    def forward(self, inputs: Tensor, task_name: str | None = None) -> dict[str, Tensor]:
        size = (inputs.shape[-2], inputs.shape[-1])
        self.input_size = size
        features = self.search_forward(inputs) if self.training else self.run_chains(inputs, self.derived_chains())
        return {t: self.heads[t](features[t], size) for t in self.tasks if task_name in (None, t)}

    def run_chains(self, x: Tensor, chains: Sequence[Sequence[int]]) -> dict[str, list[Tensor]]:
        """Every task's head inputs when it runs on its chain; tasks whose chains agree up to a location share
        the computation there (one node call per group of the plan the chains describe)."""
        self._chains = [list(c) for c in chains]
        self._shared_prefix = 0
        outputs: dict[tuple[int, ...], Tensor] = {}  # chain prefix -> output of its last node
        for chain in chains:
            for location, spec in enumerate(self.specs):
                prefix = tuple(chain[:location + 1])
                if prefix in outputs:
                    continue
                inputs = x if location == 0 else outputs[prefix[:-1]]
                node = self.node(location, chain[location])
                outputs[prefix] = (node(inputs) if spec.skip_from is None
                                   else node(inputs, outputs[prefix[:spec.skip_from + 1]]))
        return {t: [outputs[tuple(chain[:l + 1])] for l in self.head_locations] for t, chain in zip(self.tasks, chains)}

    # ------------------------------------------------------------------ LibMTL's shared parameters
    def shared_nodes(self) -> list[nn.Module]:
        """Nodes that every task's loss reached in the last forward (LibMTL's "shared parameters"; a node of
        some tasks only gets the plain sum of their gradients, see
        :meth:`~mtsl_plugin.network.branched.BranchedNetwork.shared_parameters`)."""
        if self._chains is None:
            return list(self.nodes.values())
        slots = {(l, chain[l]) for chain in self._chains for l in range(self.num_locations)}
        prefix = [self.node(l, j) for l in range(self._shared_prefix) for j in range(len(self.tasks))]
        every = len(self._chains)
        return prefix + [self.node(l, j) for l, j in sorted(slots) if l >= self._shared_prefix
                         and every > 1 and sum(chain[l] == j for chain in self._chains) == every]

    def get_share_params(self):
        return iter([p for node in self.shared_nodes() for p in node.parameters()])

    zero_grad_share_params = zero_shared_grads_in_place

    # ------------------------------------------------------------------ the searched plan
    def derived_nodes(self) -> dict[tuple[int, Group], int]:
        """(location, group) of the derived plan -> slot of the supernet node behind it."""
        return gates.plan_from_chains(self.tasks, self.derived_chains())[1]

    def derived_plan(self) -> BranchingPlan:
        """The plan of the most likely choices."""
        return gates.plan_from_chains(self.tasks, self.derived_chains())[0]

    def derived_network(self) -> BranchedNetwork:
        """The derived plan as a branched network on this supernet's stages, each node with the weights of the
        supernet node behind it (the heads are this supernet's); computes what evaluation mode computes."""
        plan, slots = gates.plan_from_chains(self.tasks, self.derived_chains())
        network = BranchedNetwork(plan, self.stages, dict(self.heads))
        for (location, group), slot in slots.items():
            network.node(location, group).load_state_dict(self.node(location, slot).state_dict())
        return network.to(next(self.parameters()).device)

    def gate_entropy(self) -> float:
        """Mean entropy (nats) of the gate rows' distributions ``softmax(logits)``: ``log T`` when uniform."""
        rows = torch.cat([g.detach().float().reshape(-1, g.shape[-1]) for g in self.gates.values()])
        return float(-(rows.softmax(-1) * rows.log_softmax(-1)).sum(-1).mean())

    def search_record(self) -> dict[str, float]:
        """What the trainer logs after every epoch: gate entropy and the derived network's trunk GMac per image
        (at the last input size)."""
        record = {"gate_entropy": self.gate_entropy(), "max_entropy": math.log(len(self.tasks))}
        if self.input_size is not None:
            costs = self.stage_gmac(*self.input_size)
            record["derived_gmac"] = sum(len(p) * c for p, c in zip(self.derived_plan().partitions, costs))
        return record

    # ------------------------------------------------------------------ cost
    def stage_gmac(self, height: int, width: int) -> list[float]:
        """GMac of one node per location on one ``height`` x ``width`` image (all slots cost the same);
        counted once per size."""
        cache = self._stage_gmac_cache
        if (height, width) in cache:
            return cache[(height, width)]
        device = next(self.parameters()).device
        costs, outputs = [], []
        with evaluating(self), torch.no_grad():
            x = torch.zeros(1, 3, height, width, device=device)
            for location, spec in enumerate(self.specs):
                node = self.node(location, 0)
                args = (x if location == 0 else outputs[-1],)
                if spec.skip_from is not None:
                    args += (outputs[spec.skip_from],)
                costs.append(count_gmac(lambda: outputs.append(node(*args))))
        cache[(height, width)] = costs
        return costs
