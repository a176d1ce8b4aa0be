"""The local-search grouping solvers (``*_local``): the exact optimum where the exact solvers can check them, the
planted groups of task counts the exact solvers refuse, and the same checks of their input."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.grouping_speed import KINDS, random_similarity
from mtsl_plugin.plugins import grouping_solver, partition_search
from mtsl_plugin.plugins.builtin_grouping import (authors, authors_local, best_partitions, exhaustive_local,
                                                  fewest_groups_local, group_value,
                                                  partition_value)

RULES = ("authors", "fewest_groups", "exhaustive")
LOCAL = (authors_local, fewest_groups_local, exhaustive_local)


@pytest.mark.parametrize("t", [2, 3, 4, 5, 6, 7, 8, 9, 12, 14])
def test_local_search_reaches_the_exact_optimum_and_decides_as_the_exact_solvers(t: int) -> None:
    """Random and planted matrices. Up to ``COARSE`` tasks the coarse start is the dynamic programme itself, so
    every k's best partition scores exactly the optimum; beyond, the search is a heuristic: at 14 tasks (these
    seeds) every k's best is within 2 % of the optimum. Every rule merges what its exact solver merges."""
    generator = np.random.default_rng(4000 + t)
    tasks = [f"t{i}" for i in range(t)]
    for trial in range(8 if t < 12 else 4):
        similarity = random_similarity(generator, t, KINDS[trial % 2])
        for score in ("groups", "tasks"):
            exact = [v for v, _ in best_partitions(similarity, score, "exact")]
            local = partition_search.best_partitions(similarity, score)  # the search itself, at any t
            assert [len(p) for _, p in local] == list(range(1, t + 1))
            found = [v for v, _ in local]
            if t <= partition_search.COARSE:
                assert found == pytest.approx(exact, abs=1e-9)
            else:
                assert all(-1e-9 <= e - f <= 0.02 * abs(e) for e, f in zip(exact, found))
        threshold = float(generator.uniform(0.3, 0.9))
        for rule in RULES:
            assert (grouping_solver(f"{rule}_local")(similarity, tasks, threshold)
                    == grouping_solver(rule)(similarity, tasks, threshold)), (rule, threshold)


def test_up_to_coarse_tasks_exact_ties_go_as_the_exact_solvers_take_them() -> None:
    """Similarities on a 1/8 grid (exact ties of partitions' scores are common): up to ``COARSE`` tasks each local
    rule decides as its exact solver, ties included (the search kept another of the tied partitions before)."""
    generator = np.random.default_rng(11)
    for trial in range(300):
        t = int(generator.integers(2, 8))
        upper = np.triu(generator.integers(-2, 9, size=(t, t)) / 8, 1)
        similarity = upper + upper.T + np.eye(t)
        threshold = float(generator.integers(-2, 9) / 8 if trial % 2 else generator.uniform(0, 1))
        tasks = [f"t{i}" for i in range(t)]
        for rule in RULES:
            assert (grouping_solver(f"{rule}_local")(similarity, tasks, threshold)
                    == grouping_solver(rule)(similarity, tasks, threshold)), (rule, similarity, threshold)


def test_best_partitions_scores_are_the_sums_of_their_groups_values() -> None:
    similarity = random_similarity(np.random.default_rng(5), 7)
    for search in ("exact", "local"):
        for total, partition in best_partitions(similarity, "groups", search):
            assert total == pytest.approx(sum(group_value(similarity, g) for g in partition))
        for total, partition in best_partitions(similarity, "tasks", search):
            assert total == pytest.approx(sum(len(g) * group_value(similarity, g) for g in partition))
    with pytest.raises(ValueError, match="search one of"):
        best_partitions(similarity, "groups", "greedy")
    with pytest.raises(ValueError, match="score must be one of"):
        best_partitions(similarity, "pairs")


def test_forty_tasks_in_planted_groups_are_found() -> None:
    """Forty tasks in five shuffled groups (similarity 0.9 ± 0.05 within, 0.3 ± 0.05 across), far past the exact
    limit: the authors' rule returns the five groups at γ = 0.8; by the paper's score four groups (two of them
    joined) already reach 0.8, so ``fewest_groups`` returns the five at 0.85; ``exhaustive`` (the highest mean
    over groups, which favours small tight groups) finds a partition scoring above the planted one."""
    generator = np.random.default_rng(11)
    labels = generator.permutation(np.arange(40) % 5)
    similarity = np.where(labels[:, None] == labels[None, :], 0.9, 0.3) + generator.uniform(-0.05, 0.05, (40, 40))
    tasks = [f"task{i}" for i in range(40)]
    planted = {frozenset(tasks[i] for i in np.flatnonzero(labels == g)) for g in range(5)}
    assert {frozenset(g) for g in authors_local(similarity, tasks, 0.8)} == planted
    assert len(fewest_groups_local(similarity, tasks, 0.8)) == 4
    assert {frozenset(g) for g in fewest_groups_local(similarity, tasks, 0.85)} == planted
    found = [[tasks.index(t) for t in g] for g in exhaustive_local(similarity, tasks, 0.8)]
    assert partition_value(similarity, found) > partition_value(
        similarity, [list(np.flatnonzero(labels == g)) for g in range(5)])


def test_local_rules_keep_the_exact_edge_cases() -> None:
    tasks = list("SDENA")
    assert authors_local(np.ones((5, 5)), tasks, 0.9) == [tasks]  # identical tasks merge
    assert authors_local(np.full((5, 5), 0.5), tasks, 0.9) == [[t] for t in tasks]  # γ above every similarity
    assert authors_local(np.ones((1, 1)), ["S"], 0.8) == [["S"]]
    assert fewest_groups_local(np.full((3, 3), -0.5), list("abc"), -0.6) == [list("abc")]


def test_exact_solvers_refuse_seventeen_tasks_naming_the_local_ones() -> None:
    with pytest.raises(ValueError, match="at most 16 tasks.*authors_local"):
        authors(np.eye(17), [f"t{i}" for i in range(17)], 0.8)


@pytest.mark.parametrize("solver", LOCAL)
def test_local_input_validation(solver) -> None:
    with pytest.raises(ValueError, match="shape"):
        solver(np.ones((3, 3)), ["a", "b"], 0.5)
    with pytest.raises(ValueError, match="distinct"):
        solver(np.ones((2, 2)), ["a", "a"], 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        solver(np.full((3, 3), np.nan), ["a", "b", "c"], 0.5)
    with pytest.raises(ValueError, match="threshold"):
        solver(np.ones((2, 2)), ["a", "b"], float("inf"))


def test_search_steps_keep_their_sums_and_the_arguments_are_checked() -> None:
    """After the search, the kept pair sums and per-task group sums equal those computed from scratch."""
    generator = np.random.default_rng(2)
    matrix = random_similarity(generator, 12)
    matrix = np.where(np.eye(12, dtype=bool), 0.0, matrix)
    state = partition_search._State(matrix, generator.permutation(12) % 4, 4)
    state.improve("tasks", 1e-12)
    fresh = partition_search._State(matrix, state.labels, 4)
    assert np.allclose(state.member, fresh.member) and np.allclose(state.pairs, fresh.pairs)
    assert np.array_equal(state.sizes, fresh.sizes) and min(state.sizes) >= 1
    with pytest.raises(ValueError, match="restarts"):
        partition_search.best_partitions(matrix, "tasks", restarts=-1)
    with pytest.raises(ValueError, match="score"):
        partition_search.best_partitions(matrix, "pairs")


def test_up_to_coarse_tasks_the_coarse_start_alone_is_the_exact_optimum(monkeypatch) -> None:
    """The documented guarantee behind the exact answers up to ``COARSE`` tasks: the coarse start (the dynamic
    programme over the agglomerative partition's ``COARSE`` groups) is itself optimal, with no improving step and
    no random start."""
    monkeypatch.setattr(partition_search._State, "improve", lambda self, score, tolerance: None)
    generator = np.random.default_rng(7)
    t = partition_search.COARSE
    for trial in range(4):
        similarity = random_similarity(generator, t, KINDS[trial % 2])
        for score in ("groups", "tasks"):
            exact = [v for v, _ in best_partitions(similarity, score, "exact")]
            found = [v for v, _ in partition_search.best_partitions(similarity, score, restarts=0)]
            assert found == pytest.approx(exact, abs=1e-9)
