"""Built-in grouping plugin: choose a partition of the tasks from their pairwise similarities.

Values, for a (T, T) similarity matrix S whose diagonal is ignored:

- a task's value within its group is its mean similarity to its group mates (0 for a task alone);
- a group's value is the mean of its tasks' values, i.e. the mean of S over the ordered pairs of distinct tasks
  in the group (so an asymmetric S acts as its symmetric part);
- a partition's value has two definitions, and the solvers say which they use:

  * **mean over groups** (the paper's text, Algorithm 2): the mean of its groups' values
    (:func:`partition_value`; solvers ``exhaustive`` and ``fewest_groups``);
  * **mean over tasks** (the authors' code, ``utilities/generic_utils.py`` ``GroupTasks.select_groups``): the mean
    of its tasks' values, so large groups weigh more (:func:`task_mean_value`; solver ``authors``, the default).

All three solvers are exact and reduce to one dynamic programme over subsets (:mod:`.partition_dp`): both
scores are additive over groups once the number of groups ``k`` is fixed (mean over tasks: ``sum_G |G| v(G) / T``;
mean over groups: ``sum_G v(G) / k``), so the best partition for every ``k`` at once decides every rule. Up to
:data:`MAX_TASKS` tasks (16 tasks in seconds on one core: ``python benchmarks/grouping_speed.py``); more are
refused, naming ``authors_local``, ``fewest_groups_local`` and ``exhaustive_local``: the same three rules on the
best partition for every ``k`` that local search finds (:mod:`.partition_search`), for any number of tasks and
without a guarantee of optimality (``grouping_speed.py --gap-cases`` measures the gap). Among equal values the
exact solvers take the first partition in lowest-first order (:func:`.partition_dp.tie_key`: group by group in
canonical order, the group that holds the lowest element of a difference comes first; not the order of an
enumeration, nor the authors'). The similarities are rounded to integer units of 10^-12 (fewer decimals from 11
tasks on, so that sums fit in 64 bits: :func:`partition_dp.to_units`), so float noise never breaks a tie; values
and scores are then exact rationals, so a real tie (of partitions with different group sizes or numbers of
groups) is never broken by rounding either. A value or score is compared with the threshold γ after both are
rounded to those units.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from fractions import Fraction

import numpy as np
import torch

from mtsl_plugin.plugins import hookimpl, partition_dp, partition_search

MAX_TASKS = partition_dp.MAX_ELEMENTS
"""Largest number of tasks the solvers accept (the dynamic programme visits 3^T / 2 subset pairs)."""

Partition = tuple[tuple[int, ...], ...]
SEARCHES = ("exact", "local")


def set_partitions(n: int) -> Iterator[Partition]:
    """Yield every partition of ``range(n)``, as restricted-growth strings in lexicographic order.

    Each partition is a tuple of groups (tuples of indices in increasing order), ordered by their first index.
    The first partition is the single group ``((0, ..., n-1),)`` and the last is all singletons.
    ``n = 0`` yields the empty partition once.
    """
    if n < 0:
        raise ValueError(f"set_partitions needs a non-negative number of elements, got {n}.")
    if n == 0:
        yield ()
        return
    labels = [0] * n  # labels[i] = group of element i; labels[i] <= max(labels[:i]) + 1
    while True:
        groups: list[list[int]] = []
        for element, label in enumerate(labels):
            if label == len(groups):
                groups.append([])
            groups[label].append(element)
        yield tuple(tuple(group) for group in groups)
        # Successor: bump the last position that may still grow, reset everything after it to 0.
        prefix_max = [0] * n
        for i in range(1, n):
            prefix_max[i] = max(prefix_max[i - 1], labels[i - 1])
        i = n - 1
        while i > 0 and labels[i] > prefix_max[i]:
            i -= 1
        if i == 0:
            return
        labels[i] += 1
        labels[i + 1 :] = [0] * (n - i - 1)


def group_value(similarity: np.ndarray, group: Sequence[int]) -> float:
    """Return the value of ``group`` (task indices) under the (T, T) ``similarity``: mean task value, 0 if alone."""
    members = list(group)
    if len(members) < 2:
        return 0.0
    block = np.asarray(similarity, dtype=np.float64)[np.ix_(members, members)]
    task_values = (block.sum(axis=1) - np.diag(block)) / (len(members) - 1)
    return float(task_values.mean())


def partition_value(similarity: np.ndarray, partition: Sequence[Sequence[int]]) -> float:
    """Return the value of ``partition`` (groups of task indices): the mean of its groups' values."""
    if not partition:
        raise ValueError("partition_value needs a partition with at least one group.")
    return float(np.mean([group_value(similarity, group) for group in partition]))


def task_mean_value(similarity: np.ndarray, partition: Sequence[Sequence[int]]) -> float:
    """Return the value of ``partition`` as the authors' code scores it: the mean over *tasks* of each task's
    mean similarity to its group mates (0 for a task alone)."""
    if not partition:
        raise ValueError("task_mean_value needs a partition with at least one group.")
    sizes = [len(group) for group in partition]
    return float(sum(size * group_value(similarity, group) for size, group in zip(sizes, partition)) / sum(sizes))


def _validated(similarity: torch.Tensor | np.ndarray, tasks: Sequence[str], threshold: float,
               search: str) -> np.ndarray:
    """Return ``similarity`` as a float64 array after checking it, ``tasks`` and ``threshold`` (the number of
    tasks against the exact limit when ``search`` is ``"exact"``)."""
    names = list(tasks)
    if not names:
        raise ValueError("Grouping needs at least one task.")
    if len(set(names)) != len(names):
        raise ValueError(f"Grouping needs distinct task names, got {names!r}.")
    if search == "exact" and len(names) > MAX_TASKS:
        raise ValueError(
            f"Exact grouping supports at most {MAX_TASKS} tasks (its dynamic programme grows as 3^T), got "
            f"{len(names)}; the local-search solvers (authors_local, fewest_groups_local, exhaustive_local) "
            f"take any number, without a guarantee of optimality."
        )
    if isinstance(similarity, torch.Tensor):
        similarity = similarity.detach().to("cpu", torch.float64).numpy()
    matrix = np.asarray(similarity, dtype=np.float64)
    if matrix.shape != (len(names), len(names)):
        raise ValueError(
            f"Similarity matrix has shape {matrix.shape}, expected {(len(names), len(names))} for tasks {names!r}."
        )
    off_diagonal = ~np.eye(len(names), dtype=bool)
    if not np.isfinite(matrix[off_diagonal]).all():
        raise ValueError("Similarity matrix has non-finite off-diagonal entries.")
    if not np.isfinite(float(threshold)):
        raise ValueError(f"Grouping threshold must be finite, got {threshold!r}.")
    return np.where(off_diagonal, matrix, 0.0)


class _Best:
    """The best partition for every number of groups under one score, in integer units (see the module): exact
    (``search="exact"``, the dynamic programme) or the best that local search finds (``"local"``; up to
    :data:`~.partition_search.COARSE` tasks the dynamic programme, which local search starts from there, so that
    ties go as the exact solvers take them)."""

    def __init__(self, matrix: np.ndarray, score: str, search: str = "exact"):
        n = matrix.shape[0]
        # A group of s tasks has the value P / (s (s - 1)), P the sum over its ordered pairs. With the entries
        # rounded to integer units once and every value multiplied by the lcm of the s (s - 1), values, their
        # weights and sums are exact integers: a tie (across group sizes, numbers of groups or with the
        # threshold) is a tie whatever the decimals, not one the rounding of each value breaks.
        if search == "exact" or n <= partition_search.COARSE:  # up to COARSE tasks local search's start is this
            self.multiple = math.lcm(*(s * (s - 1) for s in range(2, n + 1)))
            (units,), self.scale = partition_dp.to_units(matrix, count=max(n * (n - 1), 1) * self.multiple)
            members = partition_dp.subset_members(n).astype(np.int64)
            pairs = ((members @ units) * members).sum(axis=1)  # the diagonal is 0
            size = members.sum(axis=1)
            groups = None
        else:  # the groups of the partitions found, in Python integers (any number of tasks, any group sizes)
            found = partition_search.best_partitions(matrix, score)
            groups = sorted({group for _, partition in found for group in partition})
            self.multiple = math.lcm(*{len(group) * (len(group) - 1) for group in groups if len(group) > 1})
            (units,), self.scale = partition_dp.to_units(matrix, count=max(n * (n - 1), 1))
            pairs = np.array([int(units[np.ix_(group, group)].sum()) for group in groups], dtype=object)
            size = np.array([len(group) for group in groups], dtype=object)
        # a group's value (mean over its pairs) in units of 1 / (scale * multiple); 0 for a task alone
        self.value = np.where(size > 1, pairs * (self.multiple // np.maximum(size * (size - 1), 1)), 0)
        self.weight = self.value if score == "groups" else size * self.value  # "tasks": each task its own value
        if groups is None:
            self.by_count = partition_dp.best_partitions(self.weight)  # index k - 1: (sum of weights, partition)
            self._index = _bits
        else:
            index = {group: i for i, group in enumerate(groups)}
            self.by_count = [(int(sum(self.weight[index[g]] for g in partition)), partition)
                             for _, partition in found]
            self._index = index.__getitem__

    def units(self, threshold: float) -> int:
        """``threshold`` as an integer multiple of ``1 / scale`` (rounded as an entry of the matrix is)."""
        return round(float(threshold) * self.scale)

    def mean_units(self, total: int, count: int) -> int:
        """A sum of weights divided by ``count`` (groups or tasks), rounded to a multiple of ``1 / scale``, as a
        threshold is: a mean equal to the threshold up to its rounding reaches it."""
        return round(Fraction(int(total), count * self.multiple))

    def group_value(self, group: tuple[int, ...]) -> int:
        """A group's value (mean similarity over its pairs), as a multiple of ``1 / scale``."""
        return self.mean_units(self.value[self._index(group)], 1)

    def highest_mean(self) -> Partition:
        """The highest mean over groups (sum / k) over all k; the lowest-first among equal means."""
        candidates = [(total, k, part) for k, (total, part) in enumerate(self.by_count, start=1)]
        top_total, top_k, _ = max(candidates, key=lambda c: Fraction(c[0], c[1]))
        tied = [part for total, k, part in candidates if total * top_k == top_total * k]
        return max(tied, key=partition_dp.tie_key)


def best_partitions(similarity: torch.Tensor | np.ndarray, score: str, search: str = "exact") -> list[
        tuple[float, Partition]]:
    """For ``k = 1 .. T`` (index ``k - 1``): the best partition of the tasks (indices) into exactly ``k`` groups
    and its score, the sum of its groups' values (``score="groups"``, the paper's text: divide by ``k`` for the
    mean) or of their values times their sizes (``"tasks"``, the authors' code: divide by ``T``); exact
    (``search="exact"``, at most :data:`MAX_TASKS` tasks) or the best that local search finds (``"local"``)."""
    if score not in partition_search.SCORES or search not in SEARCHES:
        raise ValueError(f"score must be one of {partition_search.SCORES} and search one of {SEARCHES}, got "
                         f"{score!r} and {search!r}")
    best = _Best(_validated(similarity, [str(i) for i in range(len(similarity))], 0.0, search), score, search)
    return [(total / (best.scale * best.multiple), partition) for total, partition in best.by_count]


def reaches(value: float, threshold: float) -> bool:
    """``value >= threshold`` compared in the solvers' units (:func:`partition_dp.to_units`), so that a group a
    solver chose for reaching the threshold is not dropped by float noise (0.19999999999999998 reaches 0.2)."""
    (units, bar), _ = partition_dp.to_units(np.float64(value), np.float64(threshold))
    return bool(units >= bar)


def _named(partition: Partition, tasks: Sequence[str]) -> list[list[str]]:
    """Translate a partition of indices into a partition of task names."""
    return [[tasks[index] for index in group] for group in partition]


def _highest(best: _Best, n: int, bar: int) -> Partition:
    return best.highest_mean()


def _fewest(best: _Best, n: int, bar: int) -> Partition:
    for k, (total, partition) in enumerate(best.by_count, start=1):
        if best.mean_units(total, k) >= bar:  # the best with k groups reaches the threshold: none with fewer did
            return partition
    return best.highest_mean()


def _authors(best: _Best, n: int, bar: int) -> Partition:
    if n == 1:
        return ((0,),)
    chosen = None
    for total, partition in best.by_count[: n - 1]:  # exactly k groups; "at most k" keeps the earlier on ties
        if chosen is None or total > chosen[0]:
            chosen = (total, partition)
        if best.mean_units(chosen[0], n) >= bar:  # the mean over the n tasks reaches the threshold
            break
    merged = [group for group in chosen[1] if len(group) > 1 and best.group_value(group) > bar]
    alone = [(index,) for index in range(n) if not any(index in group for group in merged)]
    return tuple(sorted(merged + alone))


_RULES = {"exhaustive": (_highest, "groups"), "fewest_groups": (_fewest, "groups"), "authors": (_authors, "tasks")}


def _solve(rule: str, search: str, similarity: torch.Tensor | np.ndarray, tasks: Sequence[str],
           threshold: float) -> list[list[str]]:
    matrix = _validated(similarity, tasks, threshold, search)
    decide, score = _RULES[rule]
    best = _Best(matrix, score, search)
    return _named(decide(best, matrix.shape[0], best.units(threshold)), list(tasks))


def exhaustive(similarity: torch.Tensor | np.ndarray, tasks: Sequence[str], threshold: float) -> list[list[str]]:
    """Return the partition of ``tasks`` with the highest value (the paper's text); ``threshold`` is ignored.

    Args:
        similarity: (T, T) task similarities; diagonal ignored, treated as symmetric.
        tasks: T distinct task names, in the order of the matrix's rows.
        threshold: unused, accepted for the common solver signature.

    Returns:
        Groups of task names in canonical order; among equal values the first partition in lowest-first order
        (see the module) wins.
    """
    return _solve("exhaustive", "exact", similarity, tasks, threshold)


def fewest_groups(similarity: torch.Tensor | np.ndarray, tasks: Sequence[str], threshold: float) -> list[list[str]]:
    """Return the partition with the fewest groups among those whose value (mean over groups, the paper's text)
    reaches ``threshold``: the authors' search rule on the paper's score (:func:`authors` is the authors' code).

    Among partitions with value >= ``threshold``, take the fewest groups, then the highest value, then the first
    in lowest-first order (see the module). If no partition reaches the threshold, return the highest-value
    partition (as :func:`exhaustive`). The all-singletons partition has value 0, so a threshold <= 0 is always
    reached (never that fallback); where similarities are negative the fewest groups reaching it can be many.

    Args:
        similarity: (T, T) task similarities; diagonal ignored, treated as symmetric.
        tasks: T distinct task names, in the order of the matrix's rows.
        threshold: the similarity threshold gamma.

    Returns:
        Groups of task names in canonical order.
    """
    return _solve("fewest_groups", "exact", similarity, tasks, threshold)


def authors(similarity: torch.Tensor | np.ndarray, tasks: Sequence[str], threshold: float) -> list[list[str]]:
    """The grouping of the authors' code (``GroupTasks.create_selection`` and ``train_stubs.py`` ``fusion_phase``):
    for k = 1, 2, ..., T - 1, the best partition with at most k groups by the mean-over-tasks value
    (:func:`task_mean_value`); stop at the first k whose best reaches ``threshold`` (else keep k = T - 1's best);
    then a group of that partition merges only if its own value exceeds ``threshold`` strictly.

    The partition returned holds the merging groups, and every other task alone, so that what the solver returns
    is what merges. Among equal values the partition with fewer groups, then the first in lowest-first order (see
    the module), wins (the authors' order of enumeration is another; ties need equal similarities).

    The authors' enumeration has a flaw this solver does not copy: its check that a combination of groups covers
    every task exactly once clears its set of seen tasks on a repeat and goes on, so some *overlapping*
    combinations of three or more groups pass as partitions (were one the best at some k, the search would stop
    there and return the previous k's partition). This solver searches real partitions only; on 460 random
    5-task matrices (thresholds 0.3 to 0.95) it merged exactly what a re-implementation of that procedure merged.

    Args:
        similarity: (T, T) task similarities; diagonal ignored, treated as symmetric.
        tasks: T distinct task names, in the order of the matrix's rows.
        threshold: the similarity threshold gamma.
    """
    return _solve("authors", "exact", similarity, tasks, threshold)


def authors_local(similarity: torch.Tensor | np.ndarray, tasks: Sequence[str], threshold: float) -> list[list[str]]:
    """:func:`authors`'s rule on the best partitions that local search finds (:mod:`.partition_search`): any
    number of tasks, no guarantee of optimality (its gap: ``python benchmarks/grouping_speed.py --gap-cases``).
    Up to 12 tasks it is :func:`authors` (the dynamic programme is local search's start there; ties included)."""
    return _solve("authors", "local", similarity, tasks, threshold)


def fewest_groups_local(similarity: torch.Tensor | np.ndarray, tasks: Sequence[str],
                        threshold: float) -> list[list[str]]:
    """:func:`fewest_groups`'s rule on the best partitions that local search finds (see :func:`authors_local`)."""
    return _solve("fewest_groups", "local", similarity, tasks, threshold)


def exhaustive_local(similarity: torch.Tensor | np.ndarray, tasks: Sequence[str], threshold: float) -> list[list[str]]:
    """:func:`exhaustive`'s rule on the best partitions that local search finds (see :func:`authors_local`)."""
    return _solve("exhaustive", "local", similarity, tasks, threshold)


def _bits(group: Sequence[int]) -> int:
    return sum(1 << index for index in group)


@hookimpl
def mtsl_grouping_solvers() -> dict:
    """Offer ``authors`` (the authors' code, the default), ``exhaustive`` (highest mean-over-groups value) and
    ``fewest_groups`` (fewest groups whose mean-over-groups value reaches the threshold), exact up to
    :data:`MAX_TASKS` tasks, and the same three rules on partitions found by local search for more tasks
    (``authors_local``, ``exhaustive_local``, ``fewest_groups_local``)."""
    return {"authors": authors, "exhaustive": exhaustive, "fewest_groups": fewest_groups,
            "authors_local": authors_local, "exhaustive_local": exhaustive_local,
            "fewest_groups_local": fewest_groups_local}
