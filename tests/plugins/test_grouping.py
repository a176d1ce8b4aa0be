"""Tests of the built-in grouping solvers against an independently written brute force."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from mtsl_plugin.plugins import grouping_solver, partition_dp
from mtsl_plugin.plugins.builtin_grouping import (authors, exhaustive, fewest_groups, group_value, partition_value,
                                                  set_partitions, task_mean_value)

BELL = [1, 1, 2, 5, 15, 52, 203, 877, 4140]


def _all_partitions(items: list[int]) -> list[list[list[int]]]:
    """Every set partition of ``items``, built recursively: the first item joins no one, or one block of the rest."""
    if not items:
        return [[]]
    first, rest = items[0], items[1:]
    result = []
    for partition in _all_partitions(rest):
        result.append([[first]] + partition)
        for index in range(len(partition)):
            result.append(partition[:index] + [[first] + partition[index]] + partition[index + 1 :])
    return result


def _value(similarity: np.ndarray, partition: list[list[int]]) -> float:
    """Algorithm 2 written with loops: mean over groups of (mean over tasks of mean similarity to mates)."""
    group_values = []
    for group in partition:
        task_values = []
        for task in group:
            mates = [similarity[task][other] for other in group if other != task]
            task_values.append(sum(mates) / len(mates) if mates else 0.0)
        group_values.append(sum(task_values) / len(task_values))
    return sum(group_values) / len(group_values)


def _as_sets(partition) -> frozenset:
    return frozenset(frozenset(group) for group in partition)


def _indices(partition: list[list[str]], tasks: list[str]) -> list[list[int]]:
    return [[tasks.index(task) for task in group] for group in partition]


def _assert_canonical(partition: list[list[str]], tasks: list[str]) -> None:
    positions = [[tasks.index(task) for task in group] for group in partition]
    assert sorted(p for group in positions for p in group) == list(range(len(tasks)))
    assert all(group == sorted(group) for group in positions)
    assert [group[0] for group in positions] == sorted(group[0] for group in positions)


def _random_similarity(generator: np.random.Generator, t: int) -> np.ndarray:
    matrix = generator.uniform(0.0, 1.0, size=(t, t))
    matrix = (matrix + matrix.T) / 2.0
    np.fill_diagonal(matrix, 1.0)
    return matrix


@pytest.mark.parametrize("t", [3, 4, 5, 6, 7])
def test_solvers_match_brute_force(t: int) -> None:
    generator = np.random.default_rng(1000 + t)
    tasks = [f"task{i}" for i in range(t)]
    candidates = _all_partitions(list(range(t)))
    assert len(candidates) == BELL[t]
    for _ in range(30):
        similarity = _random_similarity(generator, t)
        threshold = float(generator.uniform(0.0, 0.9))
        scored = [(_value(similarity, p), p) for p in candidates]

        best_value = max(v for v, _ in scored)
        chosen = exhaustive(similarity, tasks, threshold)
        _assert_canonical(chosen, tasks)
        assert _value(similarity, _indices(chosen, tasks)) == pytest.approx(best_value, abs=1e-9)
        optima = [p for v, p in scored if v > best_value - 1e-7]
        if len(optima) == 1:
            assert _as_sets(_indices(chosen, tasks)) == _as_sets(optima[0])

        reaching = [(v, p) for v, p in scored if v >= threshold]
        pool = reaching if reaching else scored
        fewest = min(len(p) for _, p in pool)
        target_value = max(v for v, p in pool if len(p) == fewest) if reaching else best_value
        chosen = fewest_groups(similarity, tasks, threshold)
        _assert_canonical(chosen, tasks)
        assert _value(similarity, _indices(chosen, tasks)) == pytest.approx(target_value, abs=1e-9)
        if reaching:
            assert len(chosen) == fewest
        optima = [p for v, p in pool if v > target_value - 1e-7 and (not reaching or len(p) == fewest)]
        if len(optima) == 1:
            assert _as_sets(_indices(chosen, tasks)) == _as_sets(optima[0])


def _task_mean(similarity: np.ndarray, partition: list[list[int]]) -> float:
    """The authors' score written with loops: mean over every task of its mean similarity to its group mates."""
    values = []
    for group in partition:
        for task in group:
            mates = [similarity[task][other] for other in group if other != task]
            values.append(sum(mates) / len(mates) if mates else 0.0)
    return sum(values) / len(values)


def _mean_pairwise(similarity: np.ndarray, group: list[int]) -> float:
    pairs = [similarity[a][b] for a in group for b in group if a != b]
    return sum(pairs) / len(pairs)


@pytest.mark.parametrize("t", [3, 4, 5, 6, 7, 8])
def test_authors_rule_matches_brute_force(t: int) -> None:
    """For k = 1, 2, ...: the best partition of at most k groups by the mean over tasks; the first k whose best
    reaches γ (else k = T - 1); then only its groups whose own mean exceeds γ merge."""
    generator = np.random.default_rng(2000 + t)
    tasks = [f"task{i}" for i in range(t)]
    candidates = _all_partitions(list(range(t)))
    merged_somewhere = kept_apart = 0
    for _ in range(12 if t == 8 else 30):
        similarity = _random_similarity(generator, t)
        threshold = float(generator.uniform(0.3, 0.9))
        scored = [(_task_mean(similarity, p), p) for p in candidates]
        for k in range(1, t):
            best_value, best = max(((v, p) for v, p in scored if len(p) <= k), key=lambda vp: vp[0])
            if best_value >= threshold:
                break
        expected = {frozenset(g) for g in best if len(g) > 1 and _mean_pairwise(similarity, g) > threshold}
        chosen = authors(similarity, tasks, threshold)
        _assert_canonical(chosen, tasks)
        assert {frozenset(g) for g in _indices(chosen, tasks) if len(g) > 1} == expected
        assert task_mean_value(similarity, _indices(chosen, tasks)) == pytest.approx(_task_mean(
            similarity, _indices(chosen, tasks)))
        merged_somewhere += bool(expected)
        kept_apart += any(len(g) > 1 for g in best) and len(expected) < sum(len(g) > 1 for g in best)
    assert merged_somewhere and kept_apart  # both branches of the rule were exercised


def test_authors_and_paper_scores_differ_where_large_groups_weigh_more() -> None:
    """{a, b, c} at 0.7 and d at 0.1 from them: with two groups the authors' mean over tasks (0.525) reaches
    γ = 0.5 and {a, b, c} merges; by the paper's mean over groups no partition reaches 0.5 (that one scores 0.35),
    so fewest_groups falls back to the best value, 0.4, first reached by the single group."""
    similarity = np.full((4, 4), 0.7)
    similarity[3, :] = similarity[:, 3] = 0.1
    np.fill_diagonal(similarity, 1.0)
    tasks = list("abcd")
    assert authors(similarity, tasks, 0.5) == [["a", "b", "c"], ["d"]]
    assert task_mean_value(similarity, [[0, 1, 2], [3]]) == pytest.approx(0.525)
    assert partition_value(similarity, [[0, 1, 2], [3]]) == pytest.approx(0.35)
    assert fewest_groups(similarity, tasks, 0.5) == [["a", "b", "c", "d"]]


def test_authors_tie_between_k_and_more_groups_goes_to_fewer_groups() -> None:
    """{a, b, c} (pairs 0.9, 0.45, 0.45: mean 0.6) with d apart (-1 to all): the best two groups, {a, b, c} {d},
    and the best three, {a, b} {c} {d}, both score 1.8 over the tasks, short of γ · T = 2. The tie keeps the
    partition with fewer groups, so {a, b, c} (0.6 > γ = 0.5) merges, not just {a, b}."""
    similarity = np.full((4, 4), -1.0)
    similarity[0, 1] = similarity[1, 0] = 0.9
    similarity[0, 2] = similarity[2, 0] = similarity[1, 2] = similarity[2, 1] = 0.45
    np.fill_diagonal(similarity, 1.0)
    assert 4 * task_mean_value(similarity, [[0, 1, 2], [3]]) == pytest.approx(1.8)
    assert 4 * task_mean_value(similarity, [[0, 1], [2], [3]]) == pytest.approx(1.8)
    assert authors(similarity, list("abcd"), 0.5) == [["a", "b", "c"], ["d"]]


def _symmetric(upper: dict[tuple[int, int], float], t: int) -> np.ndarray:
    similarity = np.eye(t)
    for (i, j), value in upper.items():
        similarity[i, j] = similarity[j, i] = value
    return similarity


def test_ties_whose_values_have_no_finite_decimals_are_not_broken_by_rounding() -> None:
    """Exact ties of values such as 7/24 (0.291666...): rounding each group's value to 10^-12 once made the
    partitions' scores differ by a unit, so the exact solvers broke the tie by rounding, not as documented."""
    # {a,b} {c,e} {d} (0.25, 0.625, 0) and {a,b,d} {c,e} (-1/24, 0.625) both average 7/24 over their groups:
    # the first in lowest-first order ({a,b,d} holds d, {a,b} not) wins; rounding made 3 groups score 7/24 + 1/3
    # unit.
    pairs = {(0, 1): 0.25, (0, 2): -0.125, (0, 3): -0.25, (0, 4): -0.125, (1, 2): 0.25, (1, 3): -0.125,
             (1, 4): -0.25, (2, 3): 0.0, (2, 4): 0.625, (3, 4): 0.375}
    assert exhaustive(_symmetric(pairs, 5), list("abcde"), 0.0) == [["a", "b", "d"], ["c", "e"]]
    # The one group {a,b,c} has value and mean over tasks 7/24 = γ: reached at k = 1, so the search stops there,
    # and {a,b,c} does not exceed γ strictly, so nothing merges. Rounding γ up, then times T, missed the
    # stop and merged {b,c} of k = 2.
    similarity = _symmetric({(0, 1): 0.0, (0, 2): 0.375, (1, 2): 0.5}, 3)
    assert authors(similarity, list("abc"), 7 / 24) == [["a"], ["b"], ["c"]]
    # No partition reaches γ = 1 by the mean over groups: the best value is 19/24, tied between {a,c} {b,d,e,f}
    # and {a,c} {b,d} {e,f}; the first in lowest-first order ({b,d,e,f} holds e) has two groups.
    pairs = {(0, 1): 0.625, (0, 2): 1.0, (0, 3): 0.0, (0, 4): 0.375, (0, 5): 1.0, (1, 2): 0.5, (1, 3): 0.75,
             (1, 4): -0.125, (1, 5): 0.75, (2, 3): -0.125, (2, 4): 0.375, (2, 5): 0.5, (3, 4): 0.5, (3, 5): 1.0,
             (4, 5): 0.625}
    assert fewest_groups(_symmetric(pairs, 6), list("abcdef"), 1.0) == [["a", "c"], ["b", "d", "e", "f"]]


def test_set_partitions_canonical_order() -> None:
    for n in range(7):
        partitions = list(set_partitions(n))
        assert len(partitions) == BELL[n]
        assert len(set(partitions)) == BELL[n]
    partitions = list(set_partitions(3))
    assert partitions == [((0, 1, 2),), ((0, 1), (2,)), ((0, 2), (1,)), ((0,), (1, 2)), ((0,), (1,), (2,))]


def test_group_and_partition_values_by_hand() -> None:
    similarity = np.array([[1.0, 0.8, 0.2], [0.6, 1.0, 0.4], [0.2, 0.4, 1.0]])
    assert group_value(similarity, [2]) == 0.0
    # Task 0 -> 0.8, task 1 -> 0.6: an asymmetric matrix acts as its symmetric part.
    assert group_value(similarity, [0, 1]) == pytest.approx(0.7)
    # Task values: 0 -> (0.8 + 0.2) / 2, 1 -> (0.6 + 0.4) / 2, 2 -> (0.2 + 0.4) / 2.
    assert group_value(similarity, [0, 1, 2]) == pytest.approx((0.5 + 0.5 + 0.3) / 3)
    assert partition_value(similarity, [[0, 1], [2]]) == pytest.approx(0.35)


def test_identical_tasks_form_one_group() -> None:
    tasks = ["S", "D", "N", "E", "A"]
    similarity = np.ones((5, 5))
    assert fewest_groups(similarity, tasks, 0.9) == [tasks]
    assert grouping_solver("fewest_groups")(torch.ones(5, 5), tasks, 1.0) == [tasks]


def test_unreachable_threshold_returns_highest_value_partition() -> None:
    generator = np.random.default_rng(7)
    tasks = list("abcde")
    for _ in range(10):
        similarity = _random_similarity(generator, 5)
        assert fewest_groups(similarity, tasks, 1.5) == exhaustive(similarity, tasks, 1.5)


def test_non_positive_threshold_merges_everything() -> None:
    similarity = np.array([[1.0, -0.5, -0.9], [-0.5, 1.0, -0.2], [-0.9, -0.2, 1.0]])
    assert fewest_groups(similarity, ["a", "b", "c"], 0.0) == [["a"], ["b"], ["c"]]
    assert fewest_groups(similarity, ["a", "b", "c"], -0.6) == [["a", "b", "c"]]


def test_output_follows_task_order() -> None:
    # b-d and a-c are the similar pairs; groups come by first task, tasks in the given order.
    similarity = np.array(
        [[1.0, 0.0, 0.9, 0.0], [0.0, 1.0, 0.0, 0.8], [0.9, 0.0, 1.0, 0.0], [0.0, 0.8, 0.0, 1.0]]
    )
    assert exhaustive(similarity, ["a", "b", "c", "d"], 0.0) == [["a", "c"], ["b", "d"]]
    order = [3, 2, 1, 0]
    reordered = similarity[np.ix_(order, order)]
    assert exhaustive(reordered, ["d", "c", "b", "a"], 0.0) == [["d", "b"], ["c", "a"]]


def test_ties_are_broken_by_canonical_order_not_float_noise() -> None:
    # {a,b},{c,d} and {a,c},{b,d} are equally good; 0.1 + 0.2 differs from 0.3 only by rounding error.
    noisy = 0.1 + 0.2
    assert noisy > 0.3
    similarity = np.array(
        [[1.0, 0.3, noisy, 0.0], [0.3, 1.0, 0.0, noisy], [noisy, 0.0, 1.0, 0.3], [0.0, noisy, 0.3, 1.0]]
    )
    tasks = ["a", "b", "c", "d"]
    assert exhaustive(similarity, tasks, 0.0) == [["a", "b"], ["c", "d"]]
    assert fewest_groups(similarity, tasks, 0.3) == [["a", "b"], ["c", "d"]]
    # All values equal: the first partition in canonical order (one group) wins.
    assert exhaustive(np.zeros((4, 4)), tasks, 0.0) == [tasks]


def test_numpy_and_torch_inputs_agree_and_diagonal_is_ignored() -> None:
    generator = np.random.default_rng(3)
    similarity = _random_similarity(generator, 6)
    tasks = list("uvwxyz")
    expected = fewest_groups(similarity, tasks, 0.55)
    assert fewest_groups(torch.tensor(similarity, dtype=torch.float32), tasks, 0.55) == expected
    np.fill_diagonal(similarity, np.nan)
    assert fewest_groups(similarity, tasks, 0.55) == expected


@pytest.mark.parametrize("solver", [exhaustive, fewest_groups, authors])
def test_input_validation(solver) -> None:
    with pytest.raises(ValueError, match="shape"):
        solver(np.ones((3, 3)), ["a", "b"], 0.5)
    with pytest.raises(ValueError, match="distinct"):
        solver(np.ones((2, 2)), ["a", "a"], 0.5)
    bad = np.ones((3, 3))
    bad[0, 2] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        solver(bad, ["a", "b", "c"], 0.5)
    with pytest.raises(ValueError, match="at most 16 tasks"):
        solver(np.ones((17, 17)), [str(i) for i in range(17)], 0.5)
    with pytest.raises(ValueError, match="at least one task"):
        solver(np.ones((0, 0)), [], 0.5)
    with pytest.raises(ValueError, match="threshold"):
        solver(np.ones((2, 2)), ["a", "b"], float("nan"))


# ------------------------------------------------------------------------------------ exact: DP vs enumeration
def _enumerated(similarity: np.ndarray, solver: str, threshold: float) -> list[list[int]]:
    """Every rule by enumerating all partitions (``set_partitions``), group values written with loops as exact
    fractions of the similarities rounded, as the solvers do, to units of 1e-12 (a score is compared with the
    threshold once both are rounded to those units); ties go to the first in lowest-first order: of the first
    groups (in canonical order) that differ, the one holding the lowest element of their difference."""
    n = len(similarity)

    def units(x) -> int:
        return round(x * 10 ** 12)

    def value(group):  # mean over the group's ordered pairs
        pairs = [Fraction(units(similarity[a][b]), 10 ** 12) for a in group for b in group if a != b]
        return sum(pairs) / len(pairs) if pairs else Fraction(0)

    bar = units(threshold)
    scored = []
    for partition in set_partitions(n):
        by_groups = sum(value(g) for g in partition)
        by_tasks = sum(len(g) * value(g) for g in partition)
        scored.append((partition, by_groups, by_tasks))

    def lowest_first(partition):  # each group's membership, element 0 first: larger where it holds the lower
        return [[i in group for i in range(n)] for group in partition]

    def first_best(candidates, key):
        return max(candidates, key=lambda c: (key(c), lowest_first(c[0])))

    highest = first_best(scored, lambda c: c[1] / len(c[0]))[0]
    if solver == "exhaustive":
        return [list(g) for g in highest]
    if solver == "fewest_groups":
        reaching = [c for c in scored if units(c[1] / len(c[0])) >= bar]
        if not reaching:
            return [list(g) for g in highest]
        fewest = min(len(c[0]) for c in reaching)
        return [list(g) for g in first_best([c for c in reaching if len(c[0]) == fewest], lambda c: c[1])[0]]
    if n == 1:
        return [[0]]
    chosen = None
    for k in range(1, n):
        best_k = first_best([c for c in scored if len(c[0]) == k], lambda c: c[2])
        if chosen is None or best_k[2] > chosen[2]:
            chosen = best_k
        if units(chosen[2] / n) >= bar:
            break
    merged = [g for g in chosen[0] if len(g) > 1 and units(value(g)) > bar]
    alone = [(i,) for i in range(n) if not any(i in g for g in merged)]
    return [list(g) for g in sorted(merged + alone)]


def test_ordered_pair_sums_ignore_the_diagonal() -> None:
    """Every subset's sum over its ordered pairs of distinct members, written with loops, whatever the diagonal
    holds (the local search's coarse start passes within-group sums there)."""
    generator = np.random.default_rng(9)
    matrix = generator.uniform(-1.0, 1.0, size=(5, 5))
    np.fill_diagonal(matrix, generator.uniform(2.0, 3.0, size=5))
    expected = [sum(matrix[a, b] for a in range(5) for b in range(5) if a != b and mask >> a & 1 and mask >> b & 1)
                for mask in range(1 << 5)]
    assert partition_dp.ordered_pair_sums(matrix) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 6, 7, 8, 9])
@pytest.mark.parametrize("solver", ["authors", "exhaustive", "fewest_groups"])
def test_dynamic_programme_equals_enumeration_ties_included(t: int, solver: str) -> None:
    """Random matrices, random thresholds, and matrices of few distinct values (many exact ties, where the
    lowest-first tie-break decides): the solver returns exactly the enumeration's partition."""
    generator = np.random.default_rng(3000 + t)
    tasks = [f"t{i}" for i in range(t)]
    for trial in range({8: 4, 9: 2}.get(t, 12)):
        if trial % 2:
            similarity = _random_similarity(generator, t)
        else:  # few distinct values: exact ties everywhere
            similarity = generator.choice([0.25, 0.5, 0.75, 1.0], size=(t, t))
            similarity = np.triu(similarity, 1) + np.triu(similarity, 1).T + np.eye(t)
        threshold = float(generator.choice([0.25, 0.5, 0.6, 0.75, float(generator.uniform(0, 1))]))
        expected = _enumerated(similarity, solver, threshold)
        chosen = grouping_solver(solver)(similarity, tasks, threshold)
        assert _indices(chosen, tasks) == expected, (solver, threshold, similarity.tolist())


@pytest.mark.parametrize("solver, threshold, upper, expected", [
    ("exhaustive", 0.3, [[.1, .5, -.05, .5, .65], [.35, .2, -.1, .45], [.55, .65, .3], [.4, .25], [.65]],
     [[0, 4], [1, 5], [2, 3]]),
    ("authors", 0.8, [[.75, .875, .875, .125, .75, .5], [.375, .75, 1, 0, .875], [.375, .625, .625, .125],
                      [.5, .625, .625], [.75, .5], [.125]], [[0], [1, 4], [2], [3], [5], [6]]),
    # a tie across numbers of groups: restricted-growth order took {0,5} {1,2,3,4}
    ("exhaustive", 0.0, [[0, .5, 1, .5, 1], [.75, 1, 1, .25], [0, .5, .5], [.75, 0], [.5]], [[0, 3], [1, 4], [2, 5]]),
])
def test_ties_go_lowest_first_not_in_restricted_growth_order(solver, threshold, upper, expected) -> None:
    """Exact ties where lowest-first order and an enumeration's (restricted-growth) order part (helper-59's
    cases): {0,4}{1,5}{2,3} and {0,5}{1,3}{2,4} score alike and differ first at element 3 in restricted-growth
    order, but lowest-first compares the groups of element 0 first, and {0,4} holds 4. The documentation said
    restricted-growth order (and ``exhaustive`` broke a tie across numbers of groups in it); the seeds of the test
    above never met such a tie."""
    t = len(upper) + 1
    similarity = _symmetric({(i, i + 1 + j): v for i, row in enumerate(upper) for j, v in enumerate(row)}, t)
    tasks = [f"t{i}" for i in range(t)]
    assert _enumerated(similarity, solver, threshold) == expected
    assert _indices(grouping_solver(solver)(similarity, tasks, threshold), tasks) == expected


def test_sixteen_tasks_are_solved_and_seventeen_refused() -> None:
    """16 tasks in two blocks of 8 (0.9 within, 0.1 across): every solver finds the two blocks."""
    similarity = np.full((16, 16), 0.1)
    similarity[:8, :8] = similarity[8:, 8:] = 0.9
    tasks = [f"t{i}" for i in range(16)]
    blocks = [tasks[:8], tasks[8:]]
    assert authors(similarity, tasks, 0.8) == blocks
    assert fewest_groups(similarity, tasks, 0.8) == blocks
    assert exhaustive(similarity, tasks, 0.8) == blocks
    with pytest.raises(ValueError, match="at most 16 tasks"):
        authors(np.eye(17), [f"t{i}" for i in range(17)], 0.8)
