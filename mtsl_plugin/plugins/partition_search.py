"""Good set partitions by local search, for task counts the exact dynamic programme (:mod:`.partition_dp`) cannot
serve: the best partition found for every number of groups ``k``, in polynomial time and not guaranteed optimal.

The score is the one both grouping scores reduce to (see :mod:`.builtin_grouping`): a partition scores the sum of
its groups' weights, and a group's weight depends only on its size ``n`` and the sum ``P`` of the similarity over
its ordered pairs: ``P / (n (n - 1))`` (its mean, score ``"groups"``) or ``P / (n - 1)`` (``n`` times its mean,
score ``"tasks"``); a task alone weighs 0.

For each ``k`` the search starts from

- the agglomerative partition: from all singletons, repeatedly merge the two groups whose union gains most;
- for ``k`` up to :data:`COARSE`: the exact best partition whose groups are unions of the agglomerative
  partition's :data:`COARSE` groups (the dynamic programme over them), so that whole clusters of similar tasks
  move at once (up to :data:`COARSE` tasks this start is the exact optimum);
- the best partition found for ``k + 1`` with its best pair of groups merged;
- ``restarts`` random partitions into ``k`` groups of near-equal size (a seeded generator: the answer is
  deterministic),

and improves each by the best single move of a task to another group, or swap of two tasks between groups,
until none gains; the best result wins. Every step costs ``O(T^2)`` with per-task group sums kept up to date, so
64 tasks take seconds (``python benchmarks/grouping_speed.py --gap-cases 20`` prints times and the gap to the
exact optimum on random cases).
"""
from __future__ import annotations

import numpy as np

from mtsl_plugin.plugins import partition_dp

Partition = tuple[tuple[int, ...], ...]
SCORES = ("groups", "tasks")
COARSE = 12  # groups of the agglomerative partition solved exactly as units (the dynamic programme takes ~0.01 s)
_GAIN = 1e-12  # a step must gain more than this fraction of the matrix's scale: float noise never cycles


def group_weights(pair_sums: np.ndarray, sizes: np.ndarray, score: str) -> np.ndarray:
    """The weight of groups of ``sizes`` whose ordered pairs sum to ``pair_sums`` (0 for a size below 2)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    divisor = sizes * (sizes - 1) if score == "groups" else sizes - 1
    return np.where(sizes > 1, pair_sums, 0.0) / np.maximum(divisor, 1.0)  # the divisor is >= 1 where sizes > 1


class _State:
    """A partition into ``k`` labelled groups with the sums a step needs: ``member[i, g]`` = the similarity of
    task ``i`` to the members of group ``g``, and every group's pair sum and size."""

    def __init__(self, matrix: np.ndarray, labels: np.ndarray, k: int):
        self.matrix, self.labels, self.k = matrix, labels.copy(), k
        self.member = matrix @ np.eye(k)[labels]  # (T, k)
        self.sizes = np.bincount(labels, minlength=k).astype(np.float64)
        self.pairs = np.bincount(labels, weights=self.member[np.arange(len(labels)), labels], minlength=k)

    def cross(self) -> np.ndarray:
        """``(k, k)``: the similarity summed over the pairs of a member of group ``g`` and one of group ``h``
        (ordered pairs within a group on the diagonal)."""
        return np.eye(self.k)[self.labels].T @ self.member

    def total(self, score: str) -> float:
        return float(group_weights(self.pairs, self.sizes, score).sum())

    def move(self, task: int, target: int) -> None:
        source = self.labels[task]
        self.pairs[source] -= 2 * self.member[task, source]
        self.pairs[target] += 2 * self.member[task, target]
        self.sizes[source] -= 1
        self.sizes[target] += 1
        self.member[:, source] -= self.matrix[:, task]
        self.member[:, target] += self.matrix[:, task]
        self.labels[task] = target

    def best_move(self, score: str) -> tuple[float, int, int]:
        """The best (gain, task, target group) of moving one task to another group; no group may empty."""
        t = np.arange(len(self.labels))
        source = self.labels
        own = self.member[t, source]
        before = group_weights(self.pairs, self.sizes, score)
        left = group_weights(self.pairs[source] - 2 * own, self.sizes[source] - 1, score)  # (T,)
        joined = group_weights(self.pairs[None, :] + 2 * self.member, self.sizes[None, :] + 1, score)  # (T, k)
        gain = left[:, None] + joined - before[source][:, None] - before[None, :]
        gain[t, source] = -np.inf
        gain[self.sizes[source] < 2, :] = -np.inf
        task, target = np.unravel_index(np.argmax(gain), gain.shape)
        return float(gain[task, target]), int(task), int(target)

    def best_swap(self, score: str) -> tuple[float, int, int]:
        """The best (gain, task i, task j) of exchanging two tasks of different groups."""
        t = np.arange(len(self.labels))
        a = self.labels
        before = group_weights(self.pairs, self.sizes, score)
        # i leaves a[i] and j (of group a[j]) takes its place, and the other way round.
        into_a = (self.pairs[a][:, None] - 2 * self.member[t, a][:, None] + 2 * self.member[:, a].T
                  - 2 * self.matrix)  # [i, j]: group a[i] without i, with j
        gain = (group_weights(into_a, self.sizes[a][:, None], score)
                + group_weights(into_a.T, self.sizes[a][None, :], score)
                - before[a][:, None] - before[a][None, :])
        gain[a[:, None] == a[None, :]] = -np.inf
        i, j = np.unravel_index(np.argmax(gain), gain.shape)
        return float(gain[i, j]), int(i), int(j)

    def improve(self, score: str, tolerance: float) -> None:
        """Apply the best move or swap while one gains more than ``tolerance``."""
        for _ in range(100 * len(self.labels) ** 2):  # every step gains: a bound that is never reached
            move_gain, task, target = self.best_move(score)
            swap_gain, i, j = self.best_swap(score) if self.k > 1 else (-np.inf, 0, 0)
            if max(move_gain, swap_gain) <= tolerance:
                return
            if move_gain >= swap_gain:
                self.move(task, target)
            else:
                a, b = self.labels[i], self.labels[j]
                self.move(i, b)
                self.move(j, a)

    def partition(self) -> Partition:
        groups = [tuple(int(i) for i in np.flatnonzero(self.labels == g)) for g in range(self.k)]
        return tuple(sorted(group for group in groups if group))


def _merged(matrix: np.ndarray, labels: np.ndarray, k: int, score: str) -> np.ndarray:
    """``labels`` (``k`` groups) with the two groups whose union gains most merged, relabelled ``0 .. k-2``."""
    state = _State(matrix, labels, k)
    cross = state.cross()
    union = group_weights(state.pairs[:, None] + state.pairs[None, :] + 2 * cross,
                          state.sizes[:, None] + state.sizes[None, :], score)
    before = group_weights(state.pairs, state.sizes, score)
    gain = union - before[:, None] - before[None, :]
    gain[np.tril_indices(k)] = -np.inf
    g, h = np.unravel_index(np.argmax(gain), gain.shape)
    labels = np.where(labels == h, g, labels)
    return np.unique(labels, return_inverse=True)[1]


def _coarse_exact(matrix: np.ndarray, labels: np.ndarray, score: str) -> dict[int, np.ndarray]:
    """For every ``k`` up to the number of groups in ``labels``: the best partition into ``k`` groups whose groups
    are unions of ``labels``' groups, by the dynamic programme over those groups (as task labels)."""
    count = int(labels.max()) + 1
    state = _State(matrix, labels, count)
    cross = state.cross()
    members = partition_dp.subset_members(count).astype(np.float64)
    pairs = partition_dp.ordered_pair_sums(cross) + members @ np.diag(cross)  # across groups + within them
    weights = group_weights(pairs, members @ state.sizes, score)
    (units,), _ = partition_dp.to_units(weights, count=max(count, partition_dp.MAX_ELEMENTS))
    found = partition_dp.best_partitions(units)
    out = {}
    for k, (_, partition) in enumerate(found, start=1):
        coarse = np.empty(count, dtype=np.int64)
        for label, group in enumerate(partition):
            coarse[list(group)] = label
        out[k] = coarse[labels]
    return out


def best_partitions(matrix: np.ndarray, score: str, restarts: int = 8, seed: int = 0) -> list[tuple[float, Partition]]:
    """For ``k = 1 .. T`` (index ``k - 1``): ``(score, partition)`` of the best partition into exactly ``k`` groups
    that the search found, groups in canonical order (increasing indices, ordered by their lowest one).

    Args:
        matrix: (T, T) similarities; only their symmetric part off the diagonal counts.
        score: ``"groups"`` or ``"tasks"`` (the group weights above).
        restarts: random starts per ``k``, besides the agglomerative, coarse and merged ones.
        seed: the random starts' seed.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if restarts < 0:
        raise ValueError(f"restarts must be 0 or more, got {restarts}")
    matrix = np.asarray(matrix, dtype=np.float64)
    n = matrix.shape[0]
    matrix = np.where(np.eye(n, dtype=bool), 0.0, (matrix + matrix.T) / 2)
    tolerance = _GAIN * max(1.0, float(np.abs(matrix).max(initial=0.0))) * n
    generator = np.random.default_rng(seed)
    agglomerative = {n: np.arange(n)}
    for k in range(n - 1, 0, -1):
        agglomerative[k] = _merged(matrix, agglomerative[k + 1], k + 1, score)
    coarse = _coarse_exact(matrix, agglomerative[min(n, COARSE)], score)
    results: dict[int, tuple[float, np.ndarray]] = {}
    for k in range(n, 0, -1):
        starts = [agglomerative[k]] + ([coarse[k]] if k in coarse else [])
        if k < n:
            starts.append(_merged(matrix, results[k + 1][1], k + 1, score))
        starts += [generator.permutation(n) % k for _ in range(restarts if 1 < k < n else 0)]
        for start in starts:
            state = _State(matrix, start, k)
            state.improve(score, tolerance)
            total = state.total(score)
            if k not in results or total > results[k][0] + tolerance:
                results[k] = (total, state.labels)
    return [(results[k][0], _State(matrix, results[k][1], k).partition()) for k in range(1, n + 1)]
