"""Exact best set partitions by dynamic programming over subsets, for every number of groups at once.

Given an additive score (a partition scores the sum of its groups' weights ``w(G)``), :func:`best_partitions`
returns, for every ``k = 1 .. n``, the best partition of ``range(n)`` into exactly ``k`` groups, and among equal
scores the first in *lowest-first* order (:func:`tie_key`). It visits every (subset, sub-subset holding the
subset's lowest element) pair once: ``3^n / 2`` pairs, vectorised with numpy one subset size at a time (16
elements: 21.5 million pairs).

Lowest-first order compares two partitions group by group, in canonical order (groups ordered by their lowest
element): the first groups that differ decide, and of those the one holding the lowest element of their
difference comes first. It decomposes: write a partition as ``G`` (the group of its lowest element) plus a
partition ``R`` of the rest, whose canonical groups are the partition's next ones. So among optimal choices a
subset keeps the ``G`` that comes first (the largest :func:`first_first_key`) and the lowest-first optimum of its
remainder, which the recursion already holds. (It is not the restricted-growth order of an enumeration:
``{0,4}{1,5}{2,3}`` comes before ``{0,5}{1,3}{2,4}`` here, after it there.)

Scores are integers (:func:`to_units`: weights in units of ``10^-decimals``), so sums are exact and ties are
real ties, never float noise.
"""
from __future__ import annotations

import numpy as np

MAX_ELEMENTS = 16  # 3^16 / 2 pairs take a few seconds; 3^17 / 2 would take three times as long
_NEG = np.int64(-(2 ** 61))  # "no partition": far below any sum of weights (|sum| < 2^58, see to_units)

Partition = tuple[tuple[int, ...], ...]


def subset_members(n: int) -> np.ndarray:
    """``(2^n, n)`` booleans: element ``i`` belongs to subset (bitmask) ``s``."""
    return ((np.arange(1 << n)[:, None] >> np.arange(n)) & 1).astype(bool)


def ordered_pair_sums(matrix: np.ndarray) -> np.ndarray:
    """``(2^n,)``: the sum of ``matrix[i, j]`` over the ordered pairs ``i != j`` of every subset (diagonal
    ignored)."""
    n = matrix.shape[0]
    off = np.where(np.eye(n, dtype=bool), 0.0, np.asarray(matrix, dtype=np.float64))
    members = subset_members(n).astype(np.float64)
    return ((members @ off) * members).sum(axis=1)


def first_first_key(n: int) -> np.ndarray:
    """``(2^n,)``: the subset's bits reversed (element 0 the most significant), so that between two subsets
    the one holding the lowest element of their difference has the larger key."""
    return (subset_members(n) * (1 << np.arange(n - 1, -1, -1))).sum(axis=1).astype(np.int64)


def to_units(*weights: np.ndarray, decimals: int = 12, count: int = MAX_ELEMENTS) -> tuple[list[np.ndarray], int]:
    """The weights as int64 multiples of ``10^-d`` (rounded), with ``d <= decimals`` as large as keeps every
    sum of up to ``count`` of them below ``2^58``; returns the arrays and the scale ``10^d``."""
    largest = max(float(np.abs(w).max(initial=0.0)) for w in weights)
    scale = 10 ** decimals
    while scale > 1 and largest * scale * count >= 2.0 ** 58:
        scale //= 10
    if largest * scale * count >= 2.0 ** 58:
        raise ValueError(f"similarities of magnitude {largest:g} are too large to group exactly")
    return [np.round(np.asarray(w, dtype=np.float64) * scale).astype(np.int64) for w in weights], scale


def best_partitions(weights: np.ndarray) -> list[tuple[int, Partition] | None]:
    """For ``k = 1 .. n`` (index ``k - 1``): ``(score, partition)`` of the best partition of ``range(n)`` into
    exactly ``k`` groups, score = the sum of ``weights[G]`` over its groups (``weights``: ``(2^n,)`` int64 indexed
    by bitmask; weights of singletons count too); the first in lowest-first order among equal scores. Groups are
    tuples of increasing indices, ordered by their lowest one (canonical order)."""
    size = len(weights)
    n = size.bit_length() - 1
    if size != 1 << n or n < 1:
        raise ValueError(f"weights must have 2^n entries for some n >= 1, got {size}")
    if n > MAX_ELEMENTS:
        raise ValueError(f"exact partitioning supports at most {MAX_ELEMENTS} elements, got {n}")
    members = subset_members(n)
    popcount = members.sum(axis=1)
    key = first_first_key(n)
    best = np.full((size, n + 1), _NEG, dtype=np.int64)
    best[0, 0] = 0
    choice = np.zeros((size, n + 1), dtype=np.int64)
    for p in range(1, n + 1):
        masks = np.flatnonzero(popcount == p)
        low = masks & -masks
        rest_bits = np.nonzero(members[masks ^ low])[1].reshape(len(masks), p - 1)  # positions, row-major
        selector = members[: 1 << (p - 1), : p - 1].astype(np.int64)  # the 2^(p-1) subsets of p-1 positions
        groups = low[:, None] | ((1 << rest_bits) @ selector.T)  # (masks, 2^(p-1)): every G holding the low bit
        remainders = masks[:, None] ^ groups
        group_weights, group_keys = weights[groups], key[groups]
        rows = np.arange(len(masks))
        for k in range(1, p + 1):
            previous = best[remainders, k - 1]
            scores = np.where(previous > _NEG, group_weights + previous, _NEG)
            top = scores.max(axis=1)
            pick = np.where(scores == top[:, None], group_keys, -1).argmax(axis=1)
            best[masks, k] = top
            choice[masks, k] = groups[rows, pick]
    full = size - 1
    results: list[tuple[int, Partition] | None] = []
    for k in range(1, n + 1):
        if best[full, k] <= _NEG:
            results.append(None)
            continue
        mask, count, parts = full, k, []
        while mask:
            group = int(choice[mask, count])
            parts.append(tuple(i for i in range(n) if group >> i & 1))
            mask, count = mask ^ group, count - 1
        results.append((int(best[full, k]), tuple(parts)))
    return results


def tie_key(partition: Partition) -> tuple[int, ...]:
    """The key of lowest-first order: of two partitions (canonical, of the same elements) with equal scores, the
    one with the larger key comes first. Each group as :func:`first_first_key` writes it, in canonical order."""
    n = sum(len(group) for group in partition)
    return tuple(sum(1 << (n - 1 - i) for i in group) for group in partition)
