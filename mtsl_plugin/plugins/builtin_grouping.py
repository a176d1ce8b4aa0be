"""Built-in grouping plugin: choose a partition of the tasks from their pairwise similarities.

Values (the paper's Algorithm 2), for a (T, T) similarity matrix S whose diagonal is ignored:

- a task's value within its group is its mean similarity to its group mates (0 for a task alone);
- a group's value is the mean of its tasks' values, i.e. the mean of S over the ordered pairs of distinct tasks
  in the group (so an asymmetric S acts as its symmetric part);
- a partition's value is the mean of its groups' values.

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
    """Return the partition with the fewest groups among those whose value reaches ``threshold`` (authors' code).

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


@hookimpl
def mtsl_grouping_solvers() -> dict:
    """Offer ``exhaustive`` (highest value) and ``fewest_groups`` (fewest groups reaching the threshold)."""
    return {"exhaustive": exhaustive, "fewest_groups": fewest_groups}
