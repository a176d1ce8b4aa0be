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

Solvers enumerate every set partition (Bell(T) of them, so at most :data:`MAX_TASKS` tasks) in one canonical
order, restricted-growth strings in lexicographic order, and return the first optimum. Values are compared
after rounding to :data:`DECIMALS` decimals so that float noise does not break ties.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from mtsl_plugin.plugins import hookimpl

MAX_TASKS = 12
"""Largest number of tasks the exhaustive solvers accept (Bell(12) = 4,213,597 partitions, ~30 s on one core)."""

DECIMALS = 9
"""Partition values are rounded to this many decimals before comparison."""

Partition = tuple[tuple[int, ...], ...]


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


def _validated(similarity: torch.Tensor | np.ndarray, tasks: Sequence[str], threshold: float) -> np.ndarray:
    """Return ``similarity`` as a float64 array after checking it, ``tasks`` and ``threshold``."""
    names = list(tasks)
    if not names:
        raise ValueError("Grouping needs at least one task.")
    if len(set(names)) != len(names):
        raise ValueError(f"Grouping needs distinct task names, got {names!r}.")
    if len(names) > MAX_TASKS:
        raise ValueError(
            f"Exhaustive grouping supports at most {MAX_TASKS} tasks (the number of partitions grows as the Bell "
            f"numbers), got {len(names)}."
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


def _scored_partitions(matrix: np.ndarray) -> Iterator[tuple[Partition, float]]:
    """Yield ``(partition, rounded value)`` for every partition of the tasks, in canonical order."""
    n = matrix.shape[0]
    cache: dict[tuple[int, ...], float] = {}
    for partition in set_partitions(n):
        values = []
        for group in partition:
            if group not in cache:
                cache[group] = group_value(matrix, group)
            values.append(cache[group])
        yield partition, round(sum(values) / len(values), DECIMALS)


def _named(partition: Partition, tasks: Sequence[str]) -> list[list[str]]:
    """Translate a partition of indices into a partition of task names."""
    return [[tasks[index] for index in group] for group in partition]


def exhaustive(similarity: torch.Tensor | np.ndarray, tasks: Sequence[str], threshold: float) -> list[list[str]]:
    """Return the partition of ``tasks`` with the highest value (the paper's text); ``threshold`` is ignored.

    Args:
        similarity: (T, T) task similarities; diagonal ignored, treated as symmetric.
        tasks: T distinct task names, in the order of the matrix's rows.
        threshold: unused, accepted for the common solver signature.

    Returns:
        Groups of task names in canonical order; among equal (rounded) values the first partition in
        restricted-growth order wins.
    """
    matrix = _validated(similarity, tasks, threshold)
    best, best_value = None, -np.inf
    for partition, value in _scored_partitions(matrix):
        if value > best_value:
            best, best_value = partition, value
    return _named(best, list(tasks))


def fewest_groups(similarity: torch.Tensor | np.ndarray, tasks: Sequence[str], threshold: float) -> list[list[str]]:
    """Return the partition with the fewest groups among those whose value (mean over groups, the paper's text)
    reaches ``threshold``: the authors' search rule on the paper's score (:func:`authors` is the authors' code).

    Among partitions with (rounded) value >= (rounded) ``threshold``, take the fewest groups, then the highest
    value, then the first in restricted-growth order. If no partition reaches the threshold, return the
    highest-value partition (as :func:`exhaustive`). The all-singletons partition has value 0, so a threshold
    <= 0 always merges everything into one group.

    Args:
        similarity: (T, T) task similarities; diagonal ignored, treated as symmetric.
        tasks: T distinct task names, in the order of the matrix's rows.
        threshold: the similarity threshold gamma.

    Returns:
        Groups of task names in canonical order.
    """
    matrix = _validated(similarity, tasks, threshold)
    bar = round(float(threshold), DECIMALS)
    best, best_value = None, -np.inf
    chosen, chosen_key = None, None
    for partition, value in _scored_partitions(matrix):
        if value > best_value:
            best, best_value = partition, value
        if value >= bar:
            key = (len(partition), -value)
            if chosen_key is None or key < chosen_key:
                chosen, chosen_key = partition, key
    return _named(chosen if chosen is not None else best, list(tasks))


def authors(similarity: torch.Tensor | np.ndarray, tasks: Sequence[str], threshold: float) -> list[list[str]]:
    """The grouping of the authors' code (``GroupTasks.create_selection`` and ``train_stubs.py`` ``fusion_phase``):
    for k = 1, 2, ..., T - 1, the best partition with at most k groups by the mean-over-tasks value
    (:func:`task_mean_value`); stop at the first k whose best reaches ``threshold`` (else keep k = T - 1's best);
    then a group of that partition merges only if its own value exceeds ``threshold`` strictly.

    The partition returned holds the merging groups, and every other task alone, so that what the solver returns
    is what merges. Among equal (rounded) values the partition with fewer groups, then the first in
    restricted-growth order, wins (the authors' order of enumeration is another; ties need equal similarities).

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
    matrix = _validated(similarity, tasks, threshold)
    n = matrix.shape[0]
    if n == 1:
        return [list(tasks)]
    bar = round(float(threshold), DECIMALS)
    best_with: dict[int, tuple[float, Partition]] = {}  # number of groups -> first best partition
    for partition in set_partitions(n):
        value = round(task_mean_value(matrix, partition), DECIMALS)
        if len(partition) not in best_with or value > best_with[len(partition)][0]:
            best_with[len(partition)] = (value, partition)
    chosen = None
    for k in range(1, n):
        if chosen is None or best_with[k][0] > chosen[0]:
            chosen = best_with[k]
        if chosen[0] >= bar:
            break
    merged = [group for group in chosen[1] if len(group) > 1 and round(group_value(matrix, group), DECIMALS) > bar]
    alone = [(index,) for index in range(n) if not any(index in group for group in merged)]
    return _named(tuple(sorted(merged + alone)), list(tasks))


@hookimpl
def mtsl_grouping_solvers() -> dict:
    """Offer ``authors`` (the authors' code, the default), ``exhaustive`` (highest mean-over-groups value) and
    ``fewest_groups`` (fewest groups whose mean-over-groups value reaches the threshold)."""
    return {"authors": authors, "exhaustive": exhaustive, "fewest_groups": fewest_groups}
