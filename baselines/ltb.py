"""Learning to Branch (Guo, Lee & Ulbricht, ICML 2020) on the branched network's stages.

LTB searches the branching with a gated *supernet* over the same ``L`` merge locations and stage modules as
:class:`~mtsl_plugin.network.branched.BranchedNetwork`:

* every location holds one candidate node per task slot (``stages.build(location)``, so all start identical);
* every node at locations ``1 .. L-1`` and every task head has a gate, a row of logits over the ``T`` nodes one
  location shallower, that picks the parent it reads (gate levels as in :mod:`baselines.gates`); location-0
  nodes read the image;
* training: a warm-up of the first ``warmup_epochs`` epochs with every child reading its own slot's parent (the
  single-task networks; gates untouched), then straight-through Gumbel-softmax samples of every gate at a
  temperature ``tau`` decaying exponentially from ``tau_start`` in the first search epoch to ``tau_end`` in the
  last (the trainer sets ``model.epoch`` and ``model.total_epochs``). A gate picks parent ``k`` with
  probability ``softmax(logits / tau)[k]`` (:func:`baselines.gates.sample_parents`): the temperature sharpens
  the sampled architectures towards the most likely one, so the last search epochs mostly train the nodes the
  derived plan keeps. Every node runs once per step on its sampled
  parent's output, which the straight-through selection matrix passes forward exactly while its gradient
  reaches every candidate's logit; a step costs about what the single-task networks cost. Nodes on no task's
  chain still run (their outputs enter the gates' gradients) but receive zero gradients. The Gumbel noise
  comes from torch's global generator (seeded by the run, restored on resume);
* evaluation (``model.eval()``): every gate takes its most likely parent (ties: its own slot), and only the
  nodes on the tasks' chains run.

Skips: a decoder node at ``l`` concatenates the output of its *own ancestor* at ``spec.skip_from``, the node its
chain of chosen parents passes through there. That is exactly what the derived branched network does (a group
reads the skip of the group holding its tasks at ``skip_from``). The skip is picked, not mixed, so the gates
learn through the main input only.

The derived plan (:meth:`LTB.derived_plan`) follows each task's argmax chain from its head back to the input;
two tasks share location ``l`` iff their chains pass through the same node there, and unused nodes are dropped.

Gate logits are the ``gates`` parameters (a ``ParameterDict``: ``loc1`` .. ``loc{L-1}``, ``heads``; each
``(T, T)``, zero at the start) times ``gate_scale``; they are trained by the run's optimizer with everything
else. Under Adam a step moves a parameter by about the learning rate whatever its gradient's scale, so
``gate_scale`` multiplies the gates' effective learning rate (default 10: the logits of a 10-epoch run can move
by about one, enough for the argmax to mean something).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from baselines import gates
from mtsl_plugin.architecture import check_architecture_args
from mtsl_plugin.libmtl_compat import import_libmtl
from mtsl_plugin.methods import MethodSpec, register_method
from mtsl_plugin.network.cost import count_gmac
from mtsl_plugin.plan import BranchingPlan, Group

AbsArchitecture = import_libmtl().architecture.AbsArchitecture

LTB_ARGS = {"plan", "warmup_epochs", "warmup_fraction", "tau_start", "tau_end", "gate_scale"}


class LTB(AbsArchitecture):
    """The LTB supernet as a LibMTL architecture.

    Args (LibMTL's): ``task_name`` (list of tasks), ``encoder_class`` (zero-argument callable returning a
    :class:`~mtsl_plugin.network.stages.ResNetStages`), ``decoders`` (task -> head, ``head(features, size)``),
    ``rep_grad`` (must be False), ``multi_input`` (must be False), ``device``; ``arch_args``:

    * ``warmup_epochs``: epochs with fixed single-task parents (default ``round(warmup_fraction * total)``);
    * ``warmup_fraction``: 0.2; ``tau_start``: 1.0; ``tau_end``: 0.1; ``gate_scale``: 10.0 (see the module);
    * ``plan``: must be ``None`` (LTB searches its plan; the harness passes ``None``).

    ``forward(x (N, 3, H, W))`` returns task -> prediction ``(N, C_t, H, W)``.
    """

    label = "LTB"  # for messages (LibMTL subclasses the architecture, so the class name is not ours)
    extra_args: frozenset[str] = frozenset()

    def __init__(self, task_name, encoder_class, decoders, rep_grad, multi_input, device, **kwargs):
        decoders = dict(decoders)  # a plain dict: the heads are registered once, as ``self.heads``
        super().__init__(task_name, encoder_class, decoders, rep_grad, multi_input, device, **kwargs)
        unknown = sorted(set(kwargs) - LTB_ARGS - self.extra_args)
        if unknown:
            known = sorted(LTB_ARGS | self.extra_args)
            raise ValueError(f"{self.label} got unknown arch_args {unknown}; known: {known}")
        check_architecture_args(self.label, task_name, decoders, rep_grad, multi_input, plan=kwargs.get("plan"))
        stages = encoder_class()
        self.specs = stages.specs
        self.head_locations = stages.head_locations
        self.tasks: tuple[str, ...] = tuple(task_name)
        self.num_locations = stages.num_locations
        self.nodes = nn.ModuleDict({f"{l}-{t}": stages.build(l) for l in range(self.num_locations)
                                    for t in self.tasks})
        self.heads = nn.ModuleDict({t: decoders[t] for t in self.tasks})
        num = len(self.tasks)
        self.gates = nn.ParameterDict({key: nn.Parameter(torch.zeros(num, num)) for key in self.gate_keys()})
        self.warmup_epochs: int | None = kwargs.get("warmup_epochs")
        self.warmup_fraction = float(kwargs.get("warmup_fraction", 0.2))
        self.tau_start = float(kwargs.get("tau_start", 1.0))
        self.tau_end = float(kwargs.get("tau_end", 0.1))
        self.gate_scale = float(kwargs.get("gate_scale", 10.0))
        if not 0 < self.tau_end <= self.tau_start:
            raise ValueError(f"need 0 < tau_end <= tau_start, got tau_start={self.tau_start}, tau_end={self.tau_end}")
        self.epoch, self.total_epochs = 0, 1  # set by the trainer before every epoch
        self.input_size: tuple[int, int] | None = None
        self._chains: list[list[int]] = []

    # ------------------------------------------------------------------ gates
    def gate_keys(self) -> list[str]:
        """Gate levels in order: ``loc1`` .. ``loc{L-1}`` (nodes choosing parents), ``heads``."""
        return [f"loc{l}" for l in range(1, self.num_locations)] + ["heads"]

    def gate_logits(self) -> list[Tensor]:
        """The ``L`` logit matrices ``(T, T)`` (row: child slot, column: parent slot), in level order."""
        return [self.gate_scale * self.gates[key] for key in self.gate_keys()]

    def parent_probabilities(self, temperature: float = 1.0) -> list[Tensor]:
        """The ``L`` row-stochastic ``(T, T)`` matrices ``softmax(logits / temperature)``: the law of the
        parents sampled at ``temperature``."""
        return [(logits / temperature).softmax(dim=-1) for logits in self.gate_logits()]

    @property
    def warmup(self) -> int:
        """Epochs with fixed single-task parents."""
        if self.warmup_epochs is not None:
            return int(self.warmup_epochs)
        return gates.warmup_epochs(self.total_epochs, self.warmup_fraction)

    @property
    def temperature(self) -> float | None:
        """This epoch's Gumbel-softmax temperature, ``None`` during the warm-up."""
        return gates.temperature(self.epoch, self.total_epochs, self.warmup, self.tau_start, self.tau_end)

    @property
    def searching(self) -> bool:
        """Training with sampled parents (after the warm-up)."""
        return self.training and self.temperature is not None

    def node(self, location: int, slot: int) -> nn.Module:
        return self.nodes[f"{location}-{self.tasks[slot]}"]

    # ------------------------------------------------------------------ forward
    def forward(self, inputs: Tensor, task_name: str | None = None) -> dict[str, Tensor]:
        size = (inputs.shape[-2], inputs.shape[-1])
        self.input_size = size
        selections = None
        if self.searching:
            sampled = [gates.sample_parents(logits, self.temperature) for logits in self.gate_logits()]
            selections = [s for s, _ in sampled]
            parents = [p for _, p in sampled]
        elif self.training:
            parents = gates.identity_parents(len(self.tasks), self.num_locations)
        else:
            parents = [gates.argmax_parents(logits) for logits in self.gate_logits()]
        features = self.run_trunk(inputs, parents, selections)
        return {t: self.heads[t](features[t], size) for t in self.tasks if task_name in (None, t)}

    def run_trunk(self, x: Tensor, parents: Sequence[Sequence[int]], selections: Sequence[Tensor] | None = None
                  ) -> dict[str, list[Tensor]]:
        """The head inputs of every task (the outputs of the stages' head locations on its chain,
        ``[(N, C_l, h_l, w_l)]``), for the parent slots ``parents`` (one list per gate
        level). With ``selections`` (the straight-through ``(T, T)`` matrices ``parents`` were read from) every
        node runs on its row's mixture of the parents' outputs, which equals the chosen parent's output;
        without, only the nodes on the tasks' chains run."""
        num = len(self.tasks)
        chains = gates.task_chains(parents)
        self._chains = chains
        if selections is None:
            needed = [sorted({chain[l] for chain in chains}) for l in range(self.num_locations)]
        else:
            needed = [list(range(num))] * self.num_locations
        outputs: list[dict[int, Tensor]] = []
        paths: list[dict[int, tuple[int, ...]]] = []  # slots of a node's ancestors at locations 0..l
        for location, spec in enumerate(self.specs):
            if location == 0:
                inputs = {j: x for j in needed[0]}
                paths.append({j: (j,) for j in needed[0]})
            else:
                inputs = self._children_inputs(outputs[-1], parents[location - 1], needed[location],
                                               None if selections is None else selections[location - 1])
                paths.append({j: paths[-1][parents[location - 1][j]] + (j,) for j in needed[location]})
            out = {}
            for j in needed[location]:
                if spec.skip_from is None:
                    out[j] = self.node(location, j)(inputs[j])
                else:
                    skip = outputs[spec.skip_from][paths[location][j][spec.skip_from]]
                    out[j] = self.node(location, j)(inputs[j], skip)
            outputs.append(out)
        # a head reads, at each head location, the ancestor there of the last-location node it chose as parent
        last = self.num_locations - 1
        heads = [self._children_inputs({k: outputs[l][path[l]] for k, path in paths[last].items()}, parents[-1],
                                       range(num), None if selections is None else selections[-1])
                 for l in self.head_locations]
        return {t: [at_location[i] for at_location in heads] for i, t in enumerate(self.tasks)}

    @staticmethod
    def _children_inputs(parent_outputs: dict[int, Tensor], parents: Sequence[int], children: Sequence[int],
                         selection: Tensor | None) -> dict[int, Tensor]:
        if selection is None:
            return {j: parent_outputs[parents[j]] for j in children}
        stacked = torch.stack([parent_outputs[k] for k in range(len(parent_outputs))])  # (T, N, C, h, w)
        mixed = torch.einsum("jk,k...->j...", selection.to(stacked.dtype), stacked)
        return {j: mixed[j] for j in children}

    # ------------------------------------------------------------------ LibMTL's shared parameters
    def shared_nodes(self) -> list[nn.Module]:
        """Nodes on more than one task's chain in the last forward (LibMTL's "shared parameters" live there:
        a task's loss reaches only the nodes on its own chain)."""
        slots = {(l, chain[l]) for chain in self._chains for l in range(self.num_locations)}
        return [self.node(l, j) for l, j in sorted(slots)
                if sum(chain[l] == j for chain in self._chains) > 1]

    def get_share_params(self):
        return iter([p for node in self.shared_nodes() for p in node.parameters()])

    def zero_grad_share_params(self) -> None:
        # zeroed in place, not set to None: LibMTL's gradient-surgery methods write into ``param.grad.data``
        for p in self.get_share_params():
            if p.grad is not None:
                p.grad.zero_()

    # ------------------------------------------------------------------ the searched plan
    def derived_nodes(self) -> dict[tuple[int, Group], int]:
        """(location, group) of the derived plan -> slot of the supernet node behind it."""
        return gates.plan_from_parents(self.tasks, [gates.argmax_parents(g) for g in self.gate_logits()])[1]

    def derived_plan(self) -> BranchingPlan:
        """The plan of the most likely parents (see the module docstring)."""
        return gates.plan_from_parents(self.tasks, [gates.argmax_parents(g) for g in self.gate_logits()])[0]

    # ------------------------------------------------------------------ cost
    def stage_gmac(self, height: int, width: int) -> list[float]:
        """GMac of one node per location on one ``height`` x ``width`` image (all slots cost the same)."""
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        costs, outputs = [], []
        with torch.no_grad():
            x = torch.zeros(1, 3, height, width, device=device)
            for location, spec in enumerate(self.specs):
                node = self.node(location, 0)
                args = (x if location == 0 else outputs[-1],)
                if spec.skip_from is not None:
                    args += (outputs[spec.skip_from],)
                costs.append(count_gmac(lambda: outputs.append(node(*args))))
        self.train(was_training)
        return costs


def search_args(config) -> dict:
    """Arch args shared by LTB and BMTAS: the warm-up is 20% of the run's epochs."""
    return {"warmup_epochs": gates.warmup_epochs(config.epochs, 0.2), "tau_start": 1.0, "tau_end": 0.1,
            "gate_scale": 10.0}


@register_method("ltb")
def ltb(config, num_locations: int) -> MethodSpec:
    """Learning to Branch: the plan of the trained gates; reported cost is that of the derived network."""
    return MethodSpec(architecture=LTB, arch_args=search_args(config), final_plan=lambda model: model.derived_plan())


@register_method("ltb_r")
def ltb_r(config, num_locations: int) -> MethodSpec:
    """LTB-R: LTB's derived plan (same seed) retrained from a fresh initialisation."""
    return MethodSpec(retrains="ltb")
