"""MTSL's structural learner: align, measure, group, create, amalgamate, remove.

One :class:`StructuralLearner` drives a :class:`BranchedNetwork` through the phases of an :class:`MTSLConfig`:

* during task learning, :meth:`alignment_loss` adds ``λ · mean(1 − CKA)`` over pairs of sibling task nodes at the
  current location (features spatially averaged to (N, C));
* at the end of phase k, :meth:`structural_phase` measures the pairwise similarity (the ``similarity`` plugin:
  CKA, or RSA for MTSL-RSA, which is not differentiable and so never drives the alignment) of the sibling task
  nodes on a held-out slice of the *training* data, lets the grouping solver choose a partition, and for every
  group whose value reaches the threshold creates a group node (weights and optimizer state averaged over the
  task nodes), distils it with the amalgamator against the frozen task nodes, then removes the task nodes so
  their branches hang off the group node.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mtsl_plugin.learner.optim import average_module_state, average_parameter_state, sync_parameters
from mtsl_plugin.learner.schedule import MTSLConfig
from mtsl_plugin.network.branched import BranchedNetwork
from mtsl_plugin.plan import BranchingPlan, Group
from mtsl_plugin.plugins import amalgamator, grouping_solver, similarity
from mtsl_plugin.plugins.builtin_grouping import group_value

Batches = Callable[[], Iterable[tuple[torch.Tensor, dict[str, torch.Tensor]]]]


@dataclass
class PhaseRecord:
    """What one structural phase saw and did (written to the results directory as JSON)."""

    phase: int
    location: int | None
    similarities: list[dict] = field(default_factory=list)  # one per sibling set: tasks, matrix, partition
    merged: list[list[str]] = field(default_factory=list)
    amalgamation_losses: list[float] = field(default_factory=list)
    plan: dict | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"phase": self.phase, "location": self.location, "similarities": self.similarities,
                "merged": self.merged, "amalgamation_losses": self.amalgamation_losses, "plan": self.plan,
                "seconds": self.seconds}


def pooled(features: torch.Tensor) -> torch.Tensor:
    """Spatially averaged features: (N, C, H, W) -> (N, C)."""
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

    @staticmethod
    def current_siblings(plan: BranchingPlan) -> tuple[int | None, list[Group]]:
        """The shallowest location with sibling task nodes, and the sibling sets there."""
        siblings = plan.siblings()
        if not siblings:
            return None, []
        location = siblings[0][0]
        return location, [tasks for loc, tasks in siblings if loc == location]

    # ------------------------------------------------------------------ task learning
    def alignment_loss(self, plan: BranchingPlan, features: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``λ · Σ_sets mean_pairs (1 − sim(F_i, F_j))`` over sibling task nodes at the current location, or
        ``None`` when alignment is off, the phases are over, or no task node has a sibling. ``sim`` is the
        ``align_similarity`` plugin (CKA), independent of the ``similarity`` that grouping decisions use."""
        if not self.config.align or self.finished or self.config.align_weight == 0:
            return None
        _, sets = self.current_siblings(plan)
        terms = []
        for tasks in sets:
            pairs = [1 - self.align_similarity(pooled(features[a]), pooled(features[b]))
                     for a, b in itertools.combinations(tasks, 2)]
            terms.append(torch.stack(pairs).mean())
            if torch.is_grad_enabled() and features[tasks[0]].requires_grad and not terms[-1].requires_grad:
                raise ValueError(f"similarity {self.config.align_similarity!r} returns no gradient, so it cannot "
                                 "drive the alignment loss (align_similarity); use a differentiable one such as cka")
        return self.config.align_weight * torch.stack(terms).sum() if terms else None

    # ------------------------------------------------------------------ structural phase
    @torch.no_grad()
    def measure(self, network: BranchedNetwork, holdout: Batches, device: torch.device
                ) -> tuple[int | None, list[tuple[Group, np.ndarray]]]:
        """Pairwise similarity of the sibling task nodes at the current location on the held-out batches.

        Returns the location and, per sibling set, its tasks and a (T, T) similarity matrix (diagonal 1).
        """
        location, sets = self.current_siblings(network.plan)
        if location is None:
            return None, []
        was_training = network.training
        network.eval()
        collected: dict[str, list[torch.Tensor]] = {t: [] for tasks in sets for t in tasks}
        for images, _ in holdout():
            outputs = network.run_locations(images.to(device), until=location)
            for task in collected:
                collected[task].append(pooled(outputs[location][(task,)]).float().cpu())
        network.train(was_training)
        feats = {t: torch.cat(v) for t, v in collected.items()}
        result = []
        for tasks in sets:
            matrix = np.eye(len(tasks))
            for (i, a), (j, b) in itertools.combinations(enumerate(tasks), 2):
                matrix[i, j] = matrix[j, i] = float(self.similarity(feats[a], feats[b]))
            result.append((tasks, matrix))
        return location, result

    def structural_phase(self, network: BranchedNetwork, model: nn.Module, optimizer: torch.optim.Optimizer,
                         train_batches: Batches, holdout: Batches, device: torch.device,
                         progress: bool = False) -> PhaseRecord:
        """Run structural phase ``self.phases_done`` and advance; ``model`` is the module whose parameters the
        optimizer holds (the network plus e.g. a weighting method's parameters)."""
        phase = self.phases_done
        started = time.perf_counter()
        location, measured = self.measure(network, holdout, device)
        record = PhaseRecord(phase=phase, location=location)
        groups: list[Group] = []
        for tasks, matrix in measured:
            partition = self.solver(matrix, list(tasks), self.config.threshold)
            chosen = [tuple(g) for g in partition
                      if len(g) > 1 and group_value(matrix, [tasks.index(t) for t in g]) >= self.config.threshold]
            groups.extend(chosen)
            record.similarities.append({"tasks": list(tasks), "matrix": matrix.tolist(),
                                        "partition": [list(g) for g in partition],
                                        "merged": [list(g) for g in chosen]})
        if groups:
            created = self._create(network, optimizer, location, groups)
            if self.config.amalgamate:
                record.amalgamation_losses = self._amalgamate(
                    network, model, optimizer, location, created, train_batches, device, phase, progress)
            network.apply_plan(network.plan.merge(location, groups), created)
            sync_parameters(optimizer, model.parameters())
        record.merged = [list(g) for g in groups]
        record.plan = network.plan.to_dict()
        record.seconds = time.perf_counter() - started
        self.records.append(record)
        self.phases_done += 1
        return record

    def _create(self, network: BranchedNetwork, optimizer: torch.optim.Optimizer, location: int,
                groups: list[Group]) -> dict[tuple[int, Group], nn.Module]:
        """Group nodes for ``groups`` at ``location``: averaged weights and optimizer state (or a fresh node
        when average initialisation is off), added to the optimizer."""
        device = next(network.parameters()).device
        created, new_state = {}, {}
        for group in groups:
            task_nodes = [network.node(location, (t,)) for t in group]
            node = network.stages.build(location).to(device)
            if self.config.average_init:
                node.load_state_dict(average_module_state(task_nodes))
                for param, state in zip(node.parameters(), average_parameter_state(optimizer, task_nodes)):
                    new_state[param] = state
            created[(location, group)] = node
        current = list(optimizer.param_groups[0]["params"])
        sync_parameters(optimizer, current + [p for n in created.values() for p in n.parameters()], new_state)
        return created

    def _amalgamate(self, network: BranchedNetwork, model: nn.Module, optimizer: torch.optim.Optimizer,
                    location: int, created: dict[tuple[int, Group], nn.Module], train_batches: Batches,
                    device: torch.device, phase: int, progress: bool) -> list[float]:
        """Distil each group node from its frozen task nodes; only group nodes and amalgamator modules learn.

        Returns the mean amalgamation loss of every epoch.
        """
        epochs = self.config.amalgamation_epochs[phase]
        channels = network.specs[location].out_channels
        losses = {key: self.amalgamator(channels, list(key[1])) for key in created}
        losses = {key: module.to(device) for key, module in losses.items() if module is not None}
        if not losses or epochs == 0:
            return []
        helper_params = [p for m in losses.values() for p in m.parameters()]
        group_params = list(optimizer.param_groups[0]["params"])
        sync_parameters(optimizer, group_params + helper_params)
        was_training = network.training
        network.eval()
        for key in losses:
            created[key].train()
        history = []
        for epoch in range(epochs):
            total, count = 0.0, 0
            batches = train_batches()
            for images, _ in tqdm(batches, desc=f"amalgamate phase {phase} ep {epoch}", leave=False,
                                  disable=None if progress else True):
                images = images.to(device)
                with torch.no_grad():
                    outputs = network.run_locations(images, until=location)
                optimizer.zero_grad(set_to_none=True)
                loss = sum(losses[key](network.run_node(location, key[1], outputs, images, module=created[key]),
                                       {t: outputs[location][(t,)] for t in key[1]})
                           for key in losses)
                loss.backward()
                optimizer.step()
                total, count = total + float(loss.detach()), count + 1
            history.append(total / max(count, 1))
        network.train(was_training)
        optimizer.zero_grad(set_to_none=True)
        sync_parameters(optimizer, group_params)
        return history

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        return {"phases_done": self.phases_done, "records": [r.to_dict() for r in self.records]}

    def load_state_dict(self, state: dict) -> None:
        self.phases_done = int(state["phases_done"])
        self.records = [PhaseRecord(**r) for r in state["records"]]
