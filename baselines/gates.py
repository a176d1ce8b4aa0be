"""Gate machinery shared by LTB and BMTAS: parent choices, task chains, the plan they describe, the Gumbel
temperature schedule, and the exact expected number of nodes in use.

Gates are numbered by the *child* level they feed. With ``T`` tasks and ``L`` merge locations there are ``L``
gate levels, each a ``(T, T)`` matrix of logits whose row ``j`` scores the candidate parents of the child in
task slot ``j``:

* level ``i`` for ``i = 1 .. L-1``: the node in slot ``j`` at location ``i`` picks a node (slot ``k``) at
  location ``i-1`` as its input;
* level ``L`` (the heads): task ``j``'s head picks the node (slot ``k``) at location ``L-1`` it reads.

Location 0 has no gate: every node there reads the image. A list ``parents`` holds, at index ``i-1``, the
``T`` parent slots chosen at level ``i``. Everything here is plain values or small tensors; no network.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mtsl_plugin.plan import BranchingPlan

# the exact expectation walks distributions over subsets of slots: 2^T states; beyond this it is too slow
MAX_EXACT_TASKS = 8


def sample_parents(logits: Tensor, temperature: float) -> tuple[Tensor, list[int]]:
    """One straight-through Gumbel-softmax sample of each row of ``logits`` ``(T, T)`` at ``temperature``.

    Row ``j`` picks parent ``k`` with probability ``softmax(logits[j] / temperature)[k]`` (Gumbel-max on the
    sharpened logits), so annealing the temperature concentrates the sampled architectures on the most likely
    one. Returns the ``(T, T)`` selection matrix (one-hot rows in the forward pass; in the backward pass the
    gradients of the relaxation ``softmax(logits / temperature + g)``, ``g`` the same Gumbel noise) and the
    chosen parent slot of every row. The noise comes from torch's global generator (seeded by the run, saved in
    checkpoints).
    """
    selection = F.gumbel_softmax(logits / temperature, tau=1.0, hard=True, dim=-1)
    return selection, selection.detach().argmax(dim=-1).tolist()


def argmax_parents(logits: Tensor) -> list[int]:
    """The most likely parent slot of each row of ``logits`` ``(T, T)``; a tie goes to the child's own slot
    (the warm-up structure), otherwise to the lowest slot."""
    logits = logits.detach()
    own = torch.arange(logits.shape[0], device=logits.device)
    best = logits.argmax(dim=-1)
    keep_own = logits[own, own] >= logits.max(dim=-1).values
    return torch.where(keep_own, own, best).tolist()


def identity_parents(num_tasks: int, num_levels: int) -> list[list[int]]:
    """Every child reads the node of its own slot (the single-task networks of the warm-up)."""
    return [list(range(num_tasks)) for _ in range(num_levels)]


def task_chains(parents: Sequence[Sequence[int]]) -> list[list[int]]:
    """For every task, the slot of the node it passes through at each location ``0 .. L-1``, found by
    following the chosen parents from its head back to the input."""
    num_locations = len(parents)
    chains = []
    for task in range(len(parents[-1])):
        slot = parents[-1][task]  # the node at L-1 the head reads
        chain = [slot]
        for location in range(num_locations - 1, 0, -1):
            slot = parents[location - 1][slot]
            chain.append(slot)
        chains.append(chain[::-1])
    return chains


def plan_from_parents(tasks: Sequence[str], parents: Sequence[Sequence[int]]
                      ) -> tuple[BranchingPlan, dict[tuple[int, tuple[str, ...]], int]]:
    """The branching plan the parent choices describe, and the slot of the node behind each of its groups.

    Two tasks share location ``l`` iff their chains pass through the same node there; chains that meet stay
    together towards the input (one parent per node), so the plan is always a valid refinement. Nodes on no
    task's chain are dropped.
    """
    chains = task_chains(parents)
    partitions, slots = [], {}
    for location in range(len(parents)):
        groups: dict[int, list[str]] = {}
        for task, chain in zip(tasks, chains):
            groups.setdefault(chain[location], []).append(task)
        partitions.append(list(groups.values()))
        for slot, group in groups.items():
            slots[(location, tuple(group))] = slot
    # groups list their tasks in ``tasks`` order, the plan's canonical order, so they key ``slots`` as they are
    return BranchingPlan(tasks, partitions), slots


def warmup_epochs(total_epochs: int, fraction: float = 0.2) -> int:
    """Epochs in which the gates are not trained: ``round(fraction * total_epochs)``."""
    return int(round(fraction * total_epochs))


def temperature(epoch: int, total_epochs: int, warmup: int, start: float = 1.0, end: float = 0.1) -> float | None:
    """The Gumbel-softmax temperature of ``epoch`` (0-based): ``None`` during the ``warmup`` epochs (gates
    fixed), then exponential decay from ``start`` in the first search epoch to ``end`` in the last one."""
    if epoch < warmup:
        return None
    span = max(total_epochs - warmup - 1, 1)
    progress = min(max((epoch - warmup) / span, 0.0), 1.0)
    return start * math.exp(progress * math.log(end / start))


def expected_node_counts(probabilities: Sequence[Tensor]) -> Tensor:
    """The expected number of distinct nodes in use at each location, exactly, shape ``(L,)``.

    ``probabilities[i-1]`` is the ``(T, T)`` row-stochastic matrix of gate level ``i`` (``[j, k]``: the
    probability that child ``j`` picks parent ``k``; level ``L`` are the heads). All gates are independent.
    A node is in use iff it feeds a head or a node in use one location deeper. Because the set of nodes in use
    at location ``l`` depends only on the gates deeper than ``l``, the sets form a Markov chain from the heads
    (all ``T`` in use) to the input; it is propagated as a distribution over the ``2^T`` subsets of slots:
    given the set ``S`` in use at ``l+1``, the set at ``l`` is the union of the independent choices of the
    children in ``S``. (The per-node product ``1 - prod_c (1 - u_c p_cj)`` would treat the children's use as
    independent, which it is not.) Differentiable in the probabilities.
    """
    num_tasks = probabilities[-1].shape[0]
    if num_tasks > MAX_EXACT_TASKS:
        raise ValueError(f"the exact expected cost enumerates 2^T subsets of nodes; {num_tasks} tasks is more "
                         f"than the {MAX_EXACT_TASKS} it supports")
    device, dtype = probabilities[-1].device, probabilities[-1].dtype
    states = 1 << num_tasks
    subsets = torch.arange(states, device=device)
    slot_bits = 1 << torch.arange(num_tasks, device=device)
    member = (subsets[:, None] & slot_bits) != 0  # (2^T, T): slot k in subset s
    size = member.sum(dim=1).to(dtype)
    # adds[k, a, b] = 1 iff b = a with slot k added: a child picking parent k moves a picked set a to b
    adds = torch.zeros(num_tasks, states, states, device=device, dtype=dtype)
    adds[torch.arange(num_tasks, device=device)[:, None], subsets[None, :], subsets[None, :] | slot_bits[:, None]] = 1
    in_use = torch.zeros(states, device=device, dtype=dtype)
    in_use[states - 1] = 1.0  # every head is in use
    counts = []
    for probs in reversed(probabilities):
        steps = torch.einsum("ck,kab->cab", probs, adds)  # child c's choice as a transition between picked sets
        # joint[s, a]: probability that s is in use one location deeper and its children handled so far
        # picked the set a of parents
        joint = in_use[:, None] * (subsets == 0).to(dtype)  # nothing picked yet: column 0
        for child in range(num_tasks):
            joint = torch.where(member[:, child, None], joint @ steps[child], joint)
        in_use = joint.sum(dim=0)
        counts.append((in_use * size).sum())
    return torch.stack(counts[::-1])
