"""Learning to Branch (Guo, Lee & Ulbricht, ICML 2020) as LibMTL's head implements it
(``LibMTL/architecture/LTB.py``), on the supernet of :mod:`baselines.supernet`.

Every *gated* child (a node, or with the wide search space a head) has a row of logits over the ``T`` nodes one
location shallower and reads its sampled parent's output; ungated children read their own slot's parent.

* search space: by default LibMTL's, the inputs of ``layer1`` .. ``layer4`` (our locations 1-4): deeper
  locations and the heads stay on their own task's chain, so at most locations 0-3 can be shared. On another
  timm CNN the analogue: the inputs of its feature stages after the first (``stages.feature_locations[1:]``,
  locations 1 .. k-1 for k feature stages; 1-3 on a ConvNeXt, so at most 0-2 are shared). Option
  ``search_space="all"``: every location's input and the heads (the derived plan may then share anything);
* gates: logits initialised to ones, trained by the run's optimizer at the weights' learning rate (option
  ``gate_lr_multiplier``: a parameter group of their own at that multiple of it, a departure from LibMTL; measured
  in docs/results.md, "Baselines: LTB, BMTAS and cross-stitch");
* warm-up: while ``epoch < epochs / 100`` (the first epoch only of any run of up to 100 epochs), every gated
  child reads the **sum** of all its candidate parents' outputs (LibMTL's all-ones ``alpha``);
* search: ``F.gumbel_softmax(logits, tau, hard=True)`` per row: a child picks parent ``k`` with probability
  ``softmax(logits)[k]`` at every temperature; the temperature ``tau = (epochs / 20) / sqrt(epoch + 1)`` only
  shapes the gradient (:func:`baselines.gates.sample_parents`). Every node runs once per step on its row's
  straight-through mixture, which passes the chosen parent's output forward exactly while the gradient reaches
  every candidate's logit;
* evaluation: every gate takes its most likely parent (ties: its own slot) and only the derived network runs.
  LibMTL samples in evaluation too, so its test metrics vary from call to call; we evaluate the architecture
  the search derives, which is what LTB reports.

Decoder skips follow the sampled chain (during the warm-up, the child's own slot). The Gumbel noise comes from
torch's global generator (seeded by the run, restored on resume).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from baselines import gates
from baselines.supernet import GatedSupernet
from mtsl_plugin.architecture import one_of
from mtsl_plugin.learner.schedule import require
from mtsl_plugin.methods import MethodSpec, register_method

SEARCH_SPACES = ("reference", "all")


class LTB(GatedSupernet):
    """The LTB supernet as a LibMTL architecture (arguments: :class:`~baselines.supernet.GatedSupernet`).

    ``arch_args``: ``search_space`` (``"reference"``, default, or ``"all"``; see the module docstring),
    ``warmup_epochs`` (fewer than the epochs trained; default: LibMTL's ``epoch < epochs / 100``),
    ``gate_lr_multiplier`` (the gates learn at this multiple of the run's learning rate; default 1, LibMTL's),
    ``candidates`` (:class:`~baselines.supernet.GatedSupernet`), ``plan`` (must be ``None``).
    """

    label = "LTB"
    known_args = GatedSupernet.known_args | {"search_space", "warmup_epochs", "gate_lr_multiplier"}

    def __init__(self, task_name, encoder_class, decoders, rep_grad, multi_input, device, **kwargs):
        super().__init__(task_name, encoder_class, decoders, rep_grad, multi_input, device, **kwargs)
        self.search_space = kwargs.get("search_space", "reference")
        self.warmup_epochs: int | None = kwargs.get("warmup_epochs")
        self.gate_lr_multiplier = float(kwargs.get("gate_lr_multiplier", 1.0))
        if self.search_space == "all":
            self.gated_levels = list(range(1, self.num_locations + 1))  # level L: the heads
        else:
            self.gated_levels = list(self.stages.feature_locations[1:])  # layer1-4 on a ResNet, as LibMTL
        num = len(self.tasks)
        for level in self.gated_levels:
            self.gates[self.gate_key(level)] = nn.Parameter(torch.ones(num, num))

    @classmethod
    def check_args(cls, task_count: int, num_locations: int, arch_args: Mapping[str, Any]) -> None:
        super().check_args(task_count, num_locations, arch_args)
        one_of("LTB", "search_space", arch_args.get("search_space", "reference"), SEARCH_SPACES)
        require("LTB gate_lr_multiplier", arch_args.get("gate_lr_multiplier", 1.0), float, above=0)

    # ------------------------------------------------------------------ gates
    def lr_multipliers(self) -> list[tuple[list[nn.Parameter], float]]:
        """The gates' parameter group and its multiple of the learning rate (read by the trainer); none at 1."""
        return [] if self.gate_lr_multiplier == 1 else [(list(self.gates.parameters()), self.gate_lr_multiplier)]

    def gate_key(self, level: int) -> str:
        """``loc{l}`` for the nodes of location ``l``, ``heads`` for level ``L``."""
        return "heads" if level == self.num_locations else f"loc{level}"

    def gate_keys(self) -> list[str]:
        return [self.gate_key(level) for level in self.gated_levels]

    @classmethod
    def default_warmup_epochs(cls, epochs: int) -> int:
        return sum(gates.ltb_warmup(epoch, epochs) for epoch in range(epochs))  # the first, whatever ``epochs``

    def in_warmup(self) -> bool:
        if self.warmup_epochs is not None:
            return self.epoch < self.warmup_epochs
        return gates.ltb_warmup(self.epoch, self.total_epochs)

    @property
    def temperature(self) -> float | None:
        """This epoch's Gumbel-softmax temperature, ``None`` during the warm-up."""
        return None if self.in_warmup() else gates.ltb_temperature(self.epoch, self.total_epochs)

    @property
    def searching(self) -> bool:
        return self.training and not self.in_warmup()

    def full_parents(self, chosen: dict[int, list[int]]) -> list[list[int]]:
        """Parents at all ``L`` levels: ``chosen[level]`` where gated, the own slot elsewhere."""
        identity = gates.identity_parents(len(self.tasks), self.num_locations)
        return [chosen.get(level, identity[level - 1]) for level in range(1, self.num_locations + 1)]

    def derived_chains(self) -> list[list[int]]:
        chosen = {level: gates.argmax_parents(self.gates[self.gate_key(level)]) for level in self.gated_levels}
        return gates.task_chains(self.full_parents(chosen))

    # ------------------------------------------------------------------ training forward
    def search_forward(self, x: Tensor) -> dict[str, list[Tensor]]:
        num = len(self.tasks)
        if self.in_warmup():  # every gated child reads the sum of its candidate parents
            ones = torch.ones(num, num, device=x.device)
            selections = {level: ones for level in self.gated_levels}
            parents = self.full_parents({})
        else:
            sampled = {level: gates.sample_parents(self.gates[self.gate_key(level)], self.temperature)
                       for level in self.gated_levels}
            selections = {level: s for level, (s, _) in sampled.items()}
            parents = self.full_parents({level: p for level, (_, p) in sampled.items()})
        features = self.run_trunk(x, parents, [selections.get(level) for level in range(1, self.num_locations + 1)])
        # in the warm-up every node below the last gated level feeds every task (the chains say only who is whose)
        self._shared_prefix = max(self.gated_levels) if self.in_warmup() else 0
        return features

    def run_trunk(self, x: Tensor, parents: Sequence[Sequence[int]], selections: Sequence[Tensor | None]
                  ) -> dict[str, list[Tensor]]:
        """Every task's head inputs when all ``T`` nodes of every location run: the child of slot ``j`` at
        level ``i`` reads ``selections[i-1][j] @ (outputs of the T parents)`` where a selection is given (the
        straight-through one-hot row, or all ones in the warm-up), else the output of ``parents[i-1][j]``.
        Skips and the heads' extra locations follow the chains of ``parents``."""
        num = len(self.tasks)
        self._chains = gates.task_chains(parents)
        outputs: list[list[Tensor]] = []
        paths: list[list[tuple[int, ...]]] = []  # slots of a node's ancestors at locations 0..l
        for location, spec in enumerate(self.specs):
            if location == 0:
                inputs = [x] * num
                paths.append([(j,) for j in range(num)])
            else:
                inputs = self._children_inputs(outputs[-1], parents[location - 1], selections[location - 1])
                paths.append([paths[-1][parents[location - 1][j]] + (j,) for j in range(num)])
            outputs.append([self.node(location, j)(inputs[j]) if spec.skip_from is None
                            else self.node(location, j)(inputs[j], outputs[spec.skip_from][paths[location][j][spec.skip_from]])
                            for j in range(num)])
        # a head reads, at each head location, the ancestor there of the last-location node it reads
        last = self.num_locations - 1
        heads = [self._children_inputs([outputs[l][path[l]] for path in paths[last]], parents[-1], selections[-1])
                 for l in self.head_locations]
        return {t: [at_location[i] for at_location in heads] for i, t in enumerate(self.tasks)}

    @staticmethod
    def _children_inputs(parent_outputs: Sequence[Tensor], parents: Sequence[int], selection: Tensor | None
                         ) -> list[Tensor]:
        if selection is None:
            return [parent_outputs[k] for k in parents]
        stacked = torch.stack(list(parent_outputs))  # (T, N, C, h, w)
        mixed = torch.einsum("jk,k...->j...", selection.to(stacked.dtype), stacked)
        return list(mixed)


@register_method("ltb")
def ltb(config, num_locations: int) -> MethodSpec:
    """Learning to Branch: the plan of the trained gates; reported cost is that of the derived network."""
    return MethodSpec(architecture=LTB, arch_args={"search_space": "reference", "candidates": "independent"},
                      final_plan=lambda model: model.derived_plan())


@register_method("ltb_r")
def ltb_r(config, num_locations: int) -> MethodSpec:
    """LTB-R: LTB's derived plan (same seed) retrained from a fresh initialisation."""
    return MethodSpec(retrains="ltb")
