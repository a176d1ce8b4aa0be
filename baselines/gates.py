"""Plain-value machinery shared by LTB and BMTAS: choices, task chains, the plan they describe, the two
references' warm-up and temperature schedules, and BMTAS's exact expected number of nodes.

A *chain* lists, for one task, the slot of the supernet node it passes through at each location ``0 .. L-1``
(every location holds ``T`` candidate nodes, one per task slot). Two tasks share location ``l`` iff their
chains agree on locations ``0 .. l``: in LTB a node has one parent, so agreeing at ``l`` implies agreeing
before; in BMTAS each task picks an operation per location, and two tasks that pick the same operation after
parting each get a copy of it (brdav/bmtas ``BranchMobileNetV2._get_branch_mappings``).
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mtsl_plugin.plan import BranchingPlan

# BMTAS's exact expectation sums over the 2^T subsets of tasks; beyond this it is slow and cancels badly
MAX_EXACT_TASKS = 12
# brdav's approximation sums over the T^T choices of operations (brdav enumerates them for every partition)
MAX_BRDAV_TASKS = 7
RESOURCE_FORMS = ("exact", "brdav")


def sample_parents(logits: Tensor, temperature: float) -> tuple[Tensor, list[int]]:
    """One straight-through Gumbel-softmax sample of each row of ``logits`` ``(T, T)``, as LibMTL's LTB draws
    it (``F.gumbel_softmax(logits, tau=temperature, hard=True)``).

    Row ``j`` picks parent ``k`` with probability ``softmax(logits[j])[k]`` at *every* temperature (the argmax
    of ``logits + g`` does not depend on the temperature); the temperature only shapes the gradient of the
    relaxation ``softmax((logits + g) / temperature)``. Returns the ``(T, T)`` selection matrix (one-hot rows
    forward) and the chosen parent slot of every row. The noise comes from torch's global generator.
    """
    selection = F.gumbel_softmax(logits, tau=temperature, hard=True, dim=-1)
    return selection, selection.detach().argmax(dim=-1).tolist()


def argmax_parents(logits: Tensor) -> list[int]:
    """The most likely choice of each row of ``logits`` ``(T, T)``; a tie goes to the row's own slot (the
    single-task networks), otherwise to the lowest slot."""
    logits = logits.detach()
    own = torch.arange(logits.shape[0], device=logits.device)
    best = logits.argmax(dim=-1)
    keep_own = logits[own, own] >= logits.max(dim=-1).values
    return torch.where(keep_own, own, best).tolist()


def identity_parents(num_tasks: int, num_levels: int) -> list[list[int]]:
    """Every child reads the node of its own slot (the single-task networks)."""
    return [list(range(num_tasks)) for _ in range(num_levels)]


def task_chains(parents: Sequence[Sequence[int]]) -> list[list[int]]:
    """LTB: each task's chain, found by following the chosen parents from its head back to the input.

    ``parents[i - 1]`` holds the parent slot chosen by every child at gate level ``i``: levels ``1 .. L-1``
    are the nodes of locations ``1 .. L-1``, level ``L`` the heads (which node of location ``L-1`` task ``j``
    reads)."""
    num_locations = len(parents)
    chains = []
    for task in range(len(parents[-1])):
        slot = parents[-1][task]
        chain = [slot]
        for location in range(num_locations - 1, 0, -1):
            slot = parents[location - 1][slot]
            chain.append(slot)
        chains.append(chain[::-1])
    return chains


def plan_from_chains(tasks: Sequence[str], chains: Sequence[Sequence[int]]
                     ) -> tuple[BranchingPlan, dict[tuple[int, tuple[str, ...]], int]]:
    """The branching plan the chains describe, and the slot of the supernet node behind each of its groups.

    Tasks share location ``l`` iff their chains agree on ``0 .. l``, so the plan is always a valid refinement;
    nodes on no task's chain are dropped. Two groups may stand on the same slot (BMTAS's copies)."""
    partitions, slots = [], {}
    for location in range(len(chains[0])):
        groups: dict[tuple[int, ...], list[str]] = {}
        for task, chain in zip(tasks, chains):
            groups.setdefault(tuple(chain[:location + 1]), []).append(task)
        partitions.append(list(groups.values()))
        for prefix, group in groups.items():
            slots[(location, tuple(group))] = prefix[-1]
    # groups list their tasks in ``tasks`` order, the plan's canonical order, so they key ``slots`` as they are
    return BranchingPlan(tasks, partitions), slots


# ---------------------------------------------------------------------------------------------- schedules
def ltb_warmup(epoch: int, total_epochs: int) -> bool:
    """LibMTL's LTB warm-up: ``epoch < total_epochs / 100`` (0-based epochs; the first epoch of any run)."""
    return epoch < total_epochs / 100


def ltb_temperature(epoch: int, total_epochs: int) -> float:
    """LibMTL's LTB temperature: ``(total_epochs / 20) / sqrt(epoch + 1)`` (0-based epochs)."""
    return total_epochs / 20 / math.sqrt(epoch + 1)


def bmtas_warmup_epochs(total_epochs: int) -> int:
    """brdav/bmtas's warm-up: ``total_epochs // 20`` epochs with fixed single-task paths."""
    return total_epochs // 20


def bmtas_temperature(epoch: int, total_epochs: int, warmup: int, start: float = 5.0, end: float = 0.1
                      ) -> float | None:
    """brdav/bmtas's temperature of 0-based ``epoch``: ``None`` in the warm-up, then linear from ``start`` in
    the first search epoch to ``end`` in the last (``tools.train_search``)."""
    if epoch < warmup:
        return None
    span = max(total_epochs - warmup - 1, 1)
    return min(start - (epoch - warmup) / span * (start - end), start)


# ---------------------------------------------------------------------------------------------- BMTAS's cost
def expected_group_counts(probabilities: Sequence[Tensor]) -> Tensor:
    """BMTAS: the expected number of nodes of the derived network at each location, exactly, shape ``(L,)``.

    ``probabilities[l]`` is the ``(T, T)`` row-stochastic matrix of location ``l`` (``[t, k]``: the
    probability that task ``t`` uses operation ``k`` there), all rows independent. Tasks share location ``l``
    iff they picked the same operation at every location up to ``l``, so with ``agree_l(A) = prod_{m <= l}
    sum_k prod_{t in A} p_m[t, k]`` the probability that all tasks of ``A`` are still together at ``l``, the
    number of groups has the inclusion-exclusion expectation ``E[#groups_l] = sum_{A != {}} (-1)^(|A|+1)
    agree_l(A)`` (each group ``G`` is counted once: ``sum_{{} != A <= G} (-1)^(|A|+1) = 1``). Differentiable.

    brdav's ``BranchingLoss`` instead gives a partition at ``l`` the probability that the operations at ``l``
    form exactly that partition times the probability that the partition at ``l-1`` is coarser, and gives the
    rest to the fully split partition; it misses the outcomes in which a coarser choice at ``l`` meets a finer
    partition at ``l-1``, so it overstates the expected cost (5 tasks, uniform choices: 4.88 instead of 4.62
    nodes at the second location, 4.99 instead of 4.92 at the third). We keep the exact value.
    """
    num_tasks = probabilities[0].shape[0]
    if num_tasks > MAX_EXACT_TASKS:
        raise ValueError(f"the exact expected cost sums over 2^T subsets of tasks; {num_tasks} tasks is more than "
                         f"the {MAX_EXACT_TASKS} it supports")
    device = probabilities[0].device
    dtype = torch.float64  # the alternating sum cancels: keep it exact in double precision
    subsets = torch.arange(1, 1 << num_tasks, device=device)
    member = ((subsets[:, None] >> torch.arange(num_tasks, device=device)) & 1).bool()  # (2^T - 1, T)
    sign = torch.where(member.sum(dim=1) % 2 == 1, 1.0, -1.0).to(dtype)
    agree = torch.ones(len(subsets), device=device, dtype=dtype)
    counts = []
    for probs in probabilities:
        # prod over the tasks of A of p[t, k], for every subset A and operation k: (2^T - 1, T)
        per_op = torch.where(member[:, :, None], probs.to(dtype)[None], torch.ones((), dtype=dtype, device=device))
        agree = agree * per_op.prod(dim=1).sum(dim=1)
        counts.append((sign * agree).sum())
    return torch.stack(counts).to(probabilities[0].dtype)


def brdav_group_counts(probabilities: Sequence[Tensor]) -> Tensor:
    """BMTAS: the expected number of nodes at each location as brdav's ``BranchingLoss`` computes it, shape ``(L,)``
    (the option ``resource="brdav"``; :func:`expected_group_counts` is the exact value, our default).

    For every partition ``k`` of the tasks but the fully split one, ``q_l(k)`` is the probability that the
    operations chosen at ``l`` group the tasks exactly as ``k`` (under ``probabilities[l]``, rows independent);
    ``P_0(k) = q_0(k)`` and ``P_l(k) = q_l(k) * sum_c P_{l-1}(c)`` over the partitions ``c`` (not fully split) that
    ``k`` refines, ``k`` itself included; the fully split partition gets ``1 - sum_k P_l(k)``. The count is
    ``sum_k P_l(k) * |k|``. The outcomes in which the choices at ``l`` group tasks that parted before are counted
    as fully split, so the count is too high wherever tasks are not all certain. Differentiable.
    """
    num_tasks = probabilities[0].shape[0]
    if num_tasks > MAX_BRDAV_TASKS:
        raise ValueError(f"brdav's resource loss sums over the T^T choices of operations; {num_tasks} tasks is more "
                         f"than the {MAX_BRDAV_TASKS} it supports (resource 'exact' serves up to {MAX_EXACT_TASKS})")
    choices, partition_of, refines, blocks, split = (
        torch.as_tensor(a, device=probabilities[0].device) for a in _brdav_tables(num_tasks))
    dtype = torch.float64
    rows = torch.arange(num_tasks, device=choices.device)
    refines, blocks = refines.to(dtype), blocks.to(dtype)
    counts, previous = [], None
    for probs in probabilities:
        chance = probs.to(dtype)[rows, choices].prod(dim=1)  # (T^T,): every choice of operations
        exactly = torch.zeros(len(blocks), dtype=dtype, device=chance.device).index_add(0, partition_of, chance)
        together = exactly if previous is None else exactly * (refines @ previous)
        together = torch.where(split, 1 - torch.where(split, 0.0, together).sum(), together)
        counts.append((together * blocks).sum())
        previous = together
    return torch.stack(counts).to(probabilities[0].dtype)


@functools.lru_cache(maxsize=None)
def _brdav_tables(num_tasks: int) -> tuple[np.ndarray, ...]:
    """Every choice of operations ``(T^T, T)``, the partition each one makes (index into the ``B`` partitions),
    ``refines[k, c]`` (every group of ``k`` lies in one of ``c``), the partitions' sizes, and which one is fully
    split."""
    choices = np.array(list(itertools.product(range(num_tasks), repeat=num_tasks)), dtype=np.int64)
    # a partition's canonical form: every task labelled by the first task that chose its operation
    first = (choices[:, :, None] == choices[:, None, :]).argmax(axis=2)
    labels, partition_of = np.unique(first, axis=0, return_inverse=True)
    together = labels[:, :, None] == labels[:, None, :]  # (B, T, T)
    refines = (together[:, None] <= together[None, :]).all(axis=(2, 3))
    blocks = np.array([len(set(row)) for row in labels.tolist()])
    return choices, partition_of.reshape(-1), refines, blocks, blocks == num_tasks
