"""MTSL's structural learner: align, measure, group, create, amalgamate, remove.

One :class:`StructuralLearner` drives a :class:`BranchedNetwork` through the phases of an :class:`MTSLConfig`:

* during task learning, :meth:`alignment_loss` adds ``λ · Σ_sets mean(1 − CKA)`` over pairs of sibling task nodes
  of **every** sibling set of the plan, each at its own location (features spatially averaged to (N, C));
* at the end of phase k, :meth:`structural_phase` measures, for every sibling set at its own location, the pairwise
  similarity (the ``similarity`` plugin: CKA, or RSA for MTSL-RSA, which is not differentiable and so never
  drives the alignment) of its task nodes on a held-out slice of the *training* data, lets the grouping solver
  choose a partition of each set, and for every group whose value reaches the threshold creates a group node
  (weights and optimizer state averaged over the task nodes), distils the new group nodes with the amalgamator
  against the frozen task nodes, then removes the task nodes so their branches hang off the group nodes.

Sets are processed independently, as in the authors' code (``train_stubs.py``, ``fusion_phase``): a set that does
not merge is measured again at the same location in the next phase, and a new group node's tasks form a new set
one location deeper.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from mtsl_plugin import distributed
from mtsl_plugin.learner.optim import average_module_state, average_parameter_state, sync_parameters
from mtsl_plugin.learner.schedule import MTSLConfig
from mtsl_plugin.network.branched import BranchedNetwork
from mtsl_plugin.network.modes import evaluating
from mtsl_plugin.plan import BranchingPlan, Group
from mtsl_plugin.plugins import amalgamator, grouping_solver, similarity
from mtsl_plugin.plugins.builtin_grouping import group_value, reaches
from mtsl_plugin.progress import each_batch

Batches = Callable[[], Iterable[tuple[torch.Tensor, dict[str, torch.Tensor]]]]


@dataclass
class PhaseRecord:
    """What one structural phase saw and did (written to the results directory as JSON). ``location`` is the
    shallowest location measured (``None`` when no task node had a sibling); each entry of ``similarities`` names
    its own."""

    phase: int
    location: int | None
    similarities: list[dict] = field(default_factory=list)  # per set: location, tasks, matrix, partition, merged
    merged: list[list[str]] = field(default_factory=list)
    amalgamation_losses: list[float] = field(default_factory=list)
    plan: dict | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def pooled(features: torch.Tensor) -> torch.Tensor:
    """Spatially averaged features: (N, C, H, W) -> (N, C); features already (N, C) are returned as they are
    (the trainer pools before gathering them across ranks)."""
    return features.mean(dim=(-2, -1)) if features.dim() == 4 else features


class StructuralLearner:
    """The MTSL algorithm on top of a network; the trainer calls it at batch and phase boundaries."""

    def __init__(self, config: MTSLConfig):
        self.config = config
        self.similarity = similarity(config.similarity)
        self.align_similarity = similarity(config.align_similarity)
        self.solver = grouping_solver(config.grouping)
        self.amalgamator = amalgamator(config.amalgamator)
        self.phases_done = 0
        self.records: list[PhaseRecord] = []

    # ------------------------------------------------------------------ schedule
    def phase_due(self, epochs_done: int) -> bool:
        """Whether a structural phase runs after ``epochs_done`` task-learning epochs."""
        ends = self.config.phase_ends()
        return self.phases_done < len(ends) and epochs_done >= ends[self.phases_done]

    @property
    def finished(self) -> bool:
        return self.phases_done >= self.config.num_phases

    # ------------------------------------------------------------------ task learning
    def alignment_loss(self, plan: BranchingPlan, features: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``λ · Σ_sets mean_pairs (1 − sim(F_i, F_j))`` over every set of sibling task nodes, or ``None`` when
        alignment is off, the phases are over, or no task node has a sibling. ``sim`` is the ``align_similarity``
        plugin (CKA), independent of the ``similarity`` that grouping decisions use."""
        if not self.config.aligns or self.finished:
            return None
        terms = []
        for _, tasks in plan.siblings():
            pairs = [1 - self.align_similarity(pooled(features[a]), pooled(features[b]))
                     for a, b in itertools.combinations(tasks, 2)]
            terms.append(torch.stack(pairs).mean())
            if torch.is_grad_enabled() and features[tasks[0]].requires_grad and not terms[-1].requires_grad:
                raise ValueError(f"similarity {self.config.align_similarity!r} returns no gradient, so it cannot "
                                 "drive the alignment loss (align_similarity); use a differentiable one such as cka")
        return self.config.align_weight * torch.stack(terms).sum() if terms else None

    # ------------------------------------------------------------------ structural phase
    @torch.no_grad()
    def node_features(self, network: BranchedNetwork, holdout: Batches, device: torch.device
                      ) -> dict[str, torch.Tensor]:
        """The spatially averaged outputs (N, C) of every sibling task node on the held-out batches, the network in
        evaluation mode, keyed by task (a task has at most one task node with siblings)."""
        sets = network.plan.siblings()  # (location, tasks) per set of sibling task nodes, shallowest first
        if not sets:
            return {}
        collected: dict[str, list[torch.Tensor]] = {t: [] for _, tasks in sets for t in tasks}
        with evaluating(network):
            for images, _ in holdout():
                outputs = network.run_locations(images.to(device), until=max(location for location, _ in sets))
                for location, tasks in sets:
                    for task in tasks:
                        collected[task].append(pooled(outputs[location][(task,)]).float().cpu())
        return {t: torch.cat(v) for t, v in collected.items()}

    def similarity_matrix(self, features: dict[str, torch.Tensor], tasks: Group) -> np.ndarray:
        """The (T, T) matrix, diagonal 1, of the similarity plugin between the features of ``tasks``."""
        matrix = np.eye(len(tasks))
        for (i, a), (j, b) in itertools.combinations(enumerate(tasks), 2):
            matrix[i, j] = matrix[j, i] = float(self.similarity(features[a], features[b]))
        return matrix

    def measure(self, network: BranchedNetwork, holdout: Batches, device: torch.device
                ) -> list[tuple[int, Group, np.ndarray]]:
        """Pairwise similarity of the task nodes of every sibling set, each at its own location, on the held-out
        batches. Returns ``(location, tasks, (T, T) matrix with diagonal 1)`` per set, shallowest first."""
        features = self.node_features(network, holdout, device)
        return [(location, tasks, self.similarity_matrix(features, tasks))
                for location, tasks in network.plan.siblings()]

    def decide(self, matrix: np.ndarray, tasks: Group) -> tuple[list[list[str]], list[Group]]:
        """The grouping solver's partition of one sibling set (``matrix`` over ``tasks``) and the groups of it
        that merge: those of two or more tasks whose value reaches the threshold, in the built-in solvers' units
        (:func:`~mtsl_plugin.plugins.builtin_grouping.reaches`)."""
        partition = self.solver(matrix, list(tasks), self.config.threshold)
        chosen = [tuple(g) for g in partition if len(g) > 1
                  and reaches(group_value(matrix, [tasks.index(t) for t in g]), self.config.threshold)]
        return partition, chosen

    def structural_phase(self, network: BranchedNetwork, model: nn.Module, optimizer: torch.optim.Optimizer,
                         train_batches: Batches, holdout: Batches, device: torch.device,
                         progress: bool = False) -> PhaseRecord:
        """Run structural phase ``self.phases_done`` over every sibling set and advance; ``model`` is the module
        whose parameters the optimizer holds (the network plus e.g. a weighting method's parameters). Under
        ``torch.distributed`` every rank calls it (with the same replicas and held-out batches) and every rank
        decides on rank 0's similarity matrices."""
        phase = self.phases_done
        started = time.perf_counter()
        # under torch.distributed every rank measures the same held-out batches, and rank 0's similarities decide
        # for all: a value at the threshold (or a tie between partitions) that floating-point noise breaks
        # differently on another device would otherwise give the ranks different plans
        measured = distributed.broadcast_object(self.measure(network, holdout, device))
        record = PhaseRecord(phase=phase, location=measured[0][0] if measured else None)
        merges: dict[int, list[Group]] = {}
        for location, tasks, matrix in measured:
            partition, chosen = self.decide(matrix, tasks)
            if chosen:
                merges.setdefault(location, []).extend(chosen)
            record.similarities.append({"location": location, "tasks": list(tasks), "matrix": matrix.tolist(),
                                        "partition": [list(g) for g in partition],
                                        "merged": [list(g) for g in chosen]})
        if merges:
            created: dict[tuple[int, Group], nn.Module] = {}
            for location, groups in merges.items():
                created.update(self._create(network, optimizer, location, groups))
            if self.config.amalgamate:
                record.amalgamation_losses = self._amalgamate(network, optimizer, created, train_batches, device,
                                                              phase, progress)
            plan = network.plan
            for location, groups in merges.items():
                plan = plan.merge(location, groups)
            network.apply_plan(plan, created)
            sync_parameters(optimizer, model.parameters())
        record.merged = [list(g) for groups in merges.values() for g in groups]
        record.plan = network.plan.to_dict()
        record.seconds = time.perf_counter() - started
        self.records.append(record)
        self.phases_done += 1
        return record

    def _create(self, network: BranchedNetwork, optimizer: torch.optim.Optimizer, location: int,
                groups: list[Group]) -> dict[tuple[int, Group], nn.Module]:
        """Group nodes for ``groups`` at ``location``: averaged weights and optimizer state (or a fresh node
        when average initialisation is off), added to the optimizer."""
        created, new_state = {}, {}
        for group in groups:
            task_nodes = [network.node(location, (t,)) for t in group]
            like = next(task_nodes[0].parameters())  # the group node lives where, and in the dtype, its task nodes do
            node = network.stages.build(location).to(device=like.device, dtype=like.dtype)
            if self.config.average_init:
                node.load_state_dict(average_module_state(task_nodes))
                for param, state in zip(node.parameters(), average_parameter_state(optimizer, task_nodes)):
                    new_state[param] = state
            created[(location, group)] = node
        current = list(optimizer.param_groups[0]["params"])
        sync_parameters(optimizer, current + [p for n in created.values() for p in n.parameters()], new_state)
        return created

    def _amalgamate(self, network: BranchedNetwork, optimizer: torch.optim.Optimizer,
                    created: dict[tuple[int, Group], nn.Module], train_batches: Batches,
                    device: torch.device, phase: int, progress: bool) -> list[float]:
        """Distil each group node (``created``, keyed by location and group) from its frozen task nodes, all in
        one loop over the data; only group nodes and amalgamator modules learn, with a fresh optimizer of their
        own: the run's (its class and settings: Adam, SGD with its momentum, AdamW...) at the run's learning rate
        (``optimizer``'s initial one: a phase after a learning-rate step still distils at the run's rate), as in
        the authors' code (``KnowledgeAmalgamation.fuse`` builds it with ``get_optimizer`` from the command line's
        optimizer and rate). The group nodes' state in ``optimizer`` (the averaged task-node state) is what task
        learning continues from; amalgamation does not touch it.

        The k-th phase that merges amalgamates for ``amalgamation_epochs[k]`` epochs (the list has an entry per
        phase, so it is never used up): the authors' code consumes the list by merging phases, not by phases.

        Returns the mean amalgamation loss (summed over the group nodes) of every epoch.
        """
        epochs = self.config.amalgamation_epochs[sum(1 for r in self.records if r.merged)]  # merging phases before
        amalgamators = {key: self.amalgamator(network.specs[key[0]].out_channels, list(key[1])) for key in created}
        amalgamators = {key: module.to(device=device, dtype=next(created[key].parameters()).dtype)
                        for key, module in amalgamators.items() if module is not None}
        if not amalgamators or epochs == 0:
            return []
        settings = optimizer.param_groups[0]
        own = type(optimizer)([*(p for key in amalgamators for p in created[key].parameters()),
                               *(p for m in amalgamators.values() for p in m.parameters())],
                              **{**{key: settings[key] for key in optimizer.defaults if key in settings},
                                 "lr": settings.get("initial_lr", settings["lr"])})  # set by the LR scheduler
        for key in amalgamators:
            created[key].train()
        history = []
        with evaluating(network):
            for epoch in range(epochs):
                total, count = 0.0, 0
                batches = train_batches()
                for images, _ in each_batch(batches, f"amalgamate phase {phase} ep {epoch}", progress):
                    images = images.to(device)
                    with torch.no_grad():
                        outputs = network.run_locations(images, until=max(location for location, _ in amalgamators))
                    own.zero_grad(set_to_none=True)
                    loss = sum(amalgamators[(loc, group)](network.run_node(loc, group, outputs, images,
                                                                           module=created[(loc, group)]),
                                                          {t: outputs[loc][(t,)] for t in group})
                               for loc, group in amalgamators)
                    loss.backward()
                    own.step()
                    total, count = total + float(loss.detach()), count + 1
                history.append(total / max(count, 1))
        own.zero_grad(set_to_none=True)
        return history

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        return {"phases_done": self.phases_done, "records": [r.to_dict() for r in self.records]}

    def load_state_dict(self, state: dict) -> None:
        self.phases_done = int(state["phases_done"])
        self.records = [PhaseRecord(**r) for r in state["records"]]
