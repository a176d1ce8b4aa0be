"""BMTAS (Bruggemann, Kanakis, Georgoulis & Van Gool, BMVC 2020) as ``brdav/bmtas`` searches, on the supernet
of :mod:`baselines.supernet`.

* choices: at every location ``l`` each task ``t`` has a row of logits ``alpha_l[t]`` (zeros at the start) over
  the ``T`` candidate operations (nodes) of ``l``; tasks share ``l`` in the derived network iff they pick the
  same operation at every location up to ``l`` (``SuperMobileNetV2``, ``_get_branch_mappings``);
* search forward: each task runs its own path; at every location its features are the **soft** Gumbel-softmax
  mixture ``sum_k w_k op_k(features)`` with ``w = gumbel_softmax(alpha_l[t], tau, hard=False)`` (every step runs
  all ``T`` operations for every task, ``T^2`` node calls); decoder skips come from the task's own path;
* warm-up: the first ``epochs // 20`` epochs, every task runs its own operations only (one-hot weights);
* temperature: linear from 5.0 in the first search epoch to 0.1 in the last (``tools.train_search``);
* resource loss: ``sum_l GFLOPs_l * E[#nodes at l]`` under ``softmax(alpha)`` (no temperature), in GFLOPs
  (two per multiply-add) of one node on one image of ``cost_size`` (default 512x512, the size of the
  reference's look-up table ``get_flops``), **not normalised**, weighted by λ = 0.05, the reference's value, tuned
  for its MobileNetV2 (4.76 GFLOPs a chain) and its fixed task weights, so it pulls differently on other
  networks (docs/fidelity.md, "Baselines"); the expectation is exact by default
  (:func:`baselines.gates.expected_group_counts`, which also says how the reference's approximation differs);
  ``resource="brdav"`` takes the reference's approximation instead (:func:`baselines.gates.brdav_group_counts`);
* bilevel search (:meth:`BMTAS.search_split`, :meth:`BMTAS.architecture_epoch`, called by the trainer): 20 %
  of the training data is held for the architecture. Every search epoch first runs an architecture pass over it
  (Adam lr 0.01, weight decay 5e-5, state reset every epoch; loss = task losses + T·λ·resource, the resource
  term counted once per task as the reference's per-task backward passes count it; batch-norm
  running statistics frozen) and then resets the weights optimizer's state, as the reference does, before the
  weights pass over the other 80 % with the task losses only. Departures: one weights step per batch with
  all tasks' losses through the run's weighting (the reference steps once per task), and the batch-norm running
  statistics are not reset after the architecture pass (the reference resets them; with the ~10 weight steps
  per epoch of our CPU presets, momentum-0.1 statistics would not recover before evaluation);
* evaluation: every task takes its most likely operations; only the derived network runs.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from baselines import gates
from baselines.supernet import GatedSupernet
from mtsl_plugin.architecture import one_of
from mtsl_plugin.learner.schedule import require
from mtsl_plugin.methods import MethodSpec, register_method
from mtsl_plugin.progress import each_batch

DEFAULT_RESOURCE_WEIGHT = 0.05
REFERENCE_COST_SIZE = (512, 512)
ARCH_OPTIMIZER = {"lr": 0.01, "weight_decay": 5e-5}  # brdav's main_search.py
ARCH_FRACTION = 0.2  # of the training data, for the architecture steps


class BMTAS(GatedSupernet):
    """The BMTAS supernet as a LibMTL architecture (arguments: :class:`~baselines.supernet.GatedSupernet`).

    ``arch_args``: ``resource_weight`` (λ, default 0.05), ``resource`` (``"exact"``, default, or ``"brdav"``: the
    expected number of nodes the resource loss uses, see the module docstring; up to 12 and 7 tasks, more are
    refused when the supernet is built), ``candidates``
    (:class:`~baselines.supernet.GatedSupernet`), ``cost_size`` (``(H, W)`` the node costs are counted
    at, default 512x512), ``stage_gflops`` (``L`` per-node GFLOPs, instead of counting), ``warmup_epochs``
    (fewer than the epochs trained; default ``epochs // 20``), ``plan`` (must be ``None``).
    The trainer's interface for the bilevel search: :meth:`architecture_parameters` and :attr:`arch_optimizer`
    (the keyword arguments of the architecture's own Adam, which the trainer builds as its ``arch_optimizer``),
    :meth:`search_split` (and its sizes, :meth:`search_sizes`, which preflight checks), :meth:`architecture_epoch`.
    """

    label = "BMTAS"
    known_args = GatedSupernet.known_args | {"resource_weight", "resource", "cost_size", "stage_gflops",
                                             "warmup_epochs"}
    arch_optimizer = ARCH_OPTIMIZER
    arch_fraction = ARCH_FRACTION

    def __init__(self, task_name, encoder_class, decoders, rep_grad, multi_input, device, **kwargs):
        super().__init__(task_name, encoder_class, decoders, rep_grad, multi_input, device, **kwargs)
        self.resource_weight = float(kwargs.get("resource_weight", DEFAULT_RESOURCE_WEIGHT))
        self.resource = kwargs.get("resource", "exact")
        self.cost_size = tuple(kwargs.get("cost_size", REFERENCE_COST_SIZE))
        self.warmup_epochs: int | None = kwargs.get("warmup_epochs")
        costs = kwargs.get("stage_gflops")
        self._stage_gflops = None if costs is None else [float(c) for c in costs]
        num = len(self.tasks)
        for location in range(self.num_locations):
            self.gates[f"loc{location}"] = nn.Parameter(torch.zeros(num, num))

    @classmethod
    def check_args(cls, task_count: int, num_locations: int, arch_args: Mapping[str, Any]) -> None:
        super().check_args(task_count, num_locations, arch_args)
        require("BMTAS resource_weight", arch_args.get("resource_weight", DEFAULT_RESOURCE_WEIGHT), float, least=0)
        resource = arch_args.get("resource", "exact")
        one_of("BMTAS", "resource", resource, gates.RESOURCE_FORMS)
        limit = gates.MAX_BRDAV_TASKS if resource == "brdav" else gates.MAX_EXACT_TASKS
        if task_count > limit:  # refused now: the resource loss is first computed after the first epoch
            raise ValueError(f"BMTAS resource {resource!r} serves at most {limit} tasks, got {task_count}"
                             + (f" (resource 'exact' serves up to {gates.MAX_EXACT_TASKS})"
                                if resource == "brdav" else ""))
        size = arch_args.get("cost_size", REFERENCE_COST_SIZE)
        require("BMTAS cost_size (height, width)", size, list, least=1)
        if len(size) != 2:
            raise ValueError(f"BMTAS cost_size must be (height, width) in pixels, got {size!r}")
        costs = arch_args.get("stage_gflops")
        if costs is not None:
            if not isinstance(costs, (tuple, list)) or len(costs) != num_locations:
                raise ValueError(f"BMTAS stage_gflops must give one cost per location ({num_locations}), got {costs!r}")
            for cost in costs:
                require("BMTAS stage_gflops", cost, float, least=0)

    # ------------------------------------------------------------------ schedule
    @classmethod
    def default_warmup_epochs(cls, epochs: int) -> int:
        return gates.bmtas_warmup_epochs(epochs)

    @property
    def warmup(self) -> int:
        return gates.bmtas_warmup_epochs(self.total_epochs) if self.warmup_epochs is None else int(self.warmup_epochs)

    @property
    def temperature(self) -> float | None:
        """This epoch's Gumbel-softmax temperature, ``None`` during the warm-up."""
        return gates.bmtas_temperature(self.epoch, self.total_epochs, self.warmup)

    @property
    def searching(self) -> bool:
        return self.training and self.temperature is not None

    def choice_logits(self) -> list[Tensor]:
        """The ``L`` matrices ``alpha_l`` ``(T tasks, T operations)``, in location order."""
        return [self.gates[f"loc{l}"] for l in range(self.num_locations)]

    def derived_chains(self) -> list[list[int]]:
        picks = [gates.argmax_parents(logits) for logits in self.choice_logits()]  # per location, per task
        return [[picks[l][t] for l in range(self.num_locations)] for t in range(len(self.tasks))]

    # ------------------------------------------------------------------ training forward
    def search_forward(self, x: Tensor) -> dict[str, list[Tensor]]:
        if not self.searching:  # warm-up: the single-task networks
            return self.run_chains(x, [[t] * self.num_locations for t in range(len(self.tasks))])
        self._chains = None  # every operation reaches every task
        weights = [F.gumbel_softmax(logits, tau=self.temperature, hard=False, dim=-1) for logits in self.choice_logits()]
        features = {}
        for t, task in enumerate(self.tasks):
            path: list[Tensor] = []
            for location, spec in enumerate(self.specs):
                inputs = x if location == 0 else path[-1]
                args = (inputs,) if spec.skip_from is None else (inputs, path[spec.skip_from])
                path.append(sum(weights[location][t, k] * self.node(location, k)(*args)
                                for k in range(len(self.tasks))))
            features[task] = [path[l] for l in self.head_locations]
        return features

    # ------------------------------------------------------------------ the resource loss
    def stage_gflops(self) -> Tensor:
        """``(L,)`` GFLOPs (2 per multiply-add) of one node per location on one image of ``cost_size``."""
        if self._stage_gflops is None:
            self._stage_gflops = [2 * c for c in self.stage_gmac(*self.cost_size)]
        return torch.tensor(self._stage_gflops, device=self.gates["loc0"].device)

    def expected_gflops(self) -> Tensor:
        """Expected trunk GFLOPs per image of the derived network under ``softmax(alpha)`` (0-d tensor), exactly or
        as brdav approximates it (:attr:`resource`)."""
        expected = gates.brdav_group_counts if self.resource == "brdav" else gates.expected_group_counts
        counts = expected([logits.softmax(dim=-1) for logits in self.choice_logits()])
        return (counts * self.stage_gflops().to(counts.dtype)).sum()

    def architecture_parameters(self) -> list[nn.Parameter]:
        """The parameters of the architecture step (the choice logits), kept out of the weights optimizer."""
        return list(self.gates.values())

    def architecture_loss(self) -> Tensor:
        """λ · :meth:`expected_gflops`: what the architecture step adds to the task losses."""
        return self.resource_weight * self.expected_gflops()

    def search_record(self) -> dict[str, float]:
        record = super().search_record()
        record["expected_gflops"] = float(self.expected_gflops().detach())
        return record

    # ------------------------------------------------------------------ the bilevel search (called by the trainer)
    @classmethod
    def search_sizes(cls, samples: int) -> tuple[int, int]:
        """How many of ``samples`` training samples :meth:`search_split` gives the weights and the architecture
        (each trains on its part in batches of its own, so preflight checks the batches of each part, not of the
        whole set); a split that leaves either part empty raises ``ValueError``."""
        cut = int(round(samples * (1 - cls.arch_fraction)))
        if cut == 0 or cut == samples:
            raise ValueError(f"{samples} training samples cannot be split {1 - cls.arch_fraction:.0%}/"
                             f"{cls.arch_fraction:.0%} between weights and architecture")
        return cut, samples - cut

    def search_split(self, train: Dataset, seed: int) -> tuple[Dataset, Dataset]:
        """The weights' and the architecture's training data: a fixed random :attr:`arch_fraction` of ``train``
        (drawn from ``seed``) for the architecture, the rest for the weights (sizes: :meth:`search_sizes`)."""
        cut, _ = self.search_sizes(len(train))
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        return Subset(train, sorted(order[:cut])), Subset(train, sorted(order[cut:]))

    def architecture_epoch(self, trainer, loader: Iterable, progress: bool = True) -> None:
        """One pass of architecture steps before a search epoch: per batch, the sum of the task losses (brdav sums
        its fixed-weighted task losses) plus ``T`` times :meth:`architecture_loss` (brdav backpropagates, for each
        of the ``T`` tasks, that task's loss *with* the resource term before one step, so the resource gradient
        counts once per task), backpropagated to the architecture parameters only (the weights' gradients, which
        brdav's ``loss.backward()`` also computes and then leaves unused, are not computed: 21 % less CPU time per
        architecture epoch on the quick preset, same weights) and a step of ``trainer.arch_optimizer``;
        batch norm normalises with the batch and leaves its running statistics, every batch norm's (brdav's
        ``freeze_encoder_bn_running_stats`` freezes the searched encoder's only; its decoders keep updating). The
        architecture optimizer's state starts afresh every epoch and the weights optimizer's state is cleared
        afterwards (the architecture changed), as ``train_search`` does."""
        trainer.arch_optimizer.state.clear()
        arch_params = [p for group in trainer.arch_optimizer.param_groups for p in group["params"]]
        norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.track_running_stats = False
        try:
            for images, gts in each_batch(loader, "architecture", progress):
                images = trainer.images_to_device(images)
                gts = {t: gts[t].to(trainer.device, non_blocking=True) for t in trainer.task_name}
                with trainer.autocast():
                    preds = self(images)
                task_losses = trainer.task_losses(preds, gts)
                loss = task_losses.sum() + len(task_losses) * self.architecture_loss()
                trainer.arch_optimizer.zero_grad(set_to_none=True)
                loss.backward(inputs=arch_params)
                trainer.arch_optimizer.step()
        finally:
            for m in norms:
                m.track_running_stats = True
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.optimizer.state.clear()


@register_method("bmtas")
def bmtas(config, num_locations: int) -> MethodSpec:
    """BMTAS: brdav's bilevel search with the resource loss; reported cost is that of the derived network."""
    return MethodSpec(architecture=BMTAS, arch_args={"resource_weight": DEFAULT_RESOURCE_WEIGHT, "resource": "exact",
                                                     "candidates": "independent"},
                      final_plan=lambda model: model.derived_plan())


@register_method("bmtas_r")
def bmtas_r(config, num_locations: int) -> MethodSpec:
    """BMTAS-R: BMTAS's derived plan (same seed) retrained from a fresh initialisation."""
    return MethodSpec(retrains="bmtas")
