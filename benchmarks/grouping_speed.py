"""Seconds the grouping solvers take per number of tasks, and how far local search falls from the exact optimum.

    python benchmarks/grouping_speed.py                            # 4..16 tasks exact, 4..64 by local search
    python benchmarks/grouping_speed.py --tasks 8,12,16 --repeats 3
    python benchmarks/grouping_speed.py --tasks 10,13,16 --gap-cases 20

The first table gives the median wall-clock seconds of every built-in solver on a random symmetric similarity
matrix (exact solvers only up to their limit, 16 tasks). With ``--gap-cases N`` a second table compares local
search with the exact dynamic programme on ``N`` random matrices per task count (up to 16) and kind: uniform
similarities, and planted groups (0.85 within, 0.5 across, ±0.15 noise). For both scores it counts the numbers of
groups ``k`` at which the best partition found scores below the exact best, the worst such gap, and how often each
rule, at a threshold drawn from [0.3, 0.9], decides exactly what the exact solver decides. One process, one
thread: run it alone, nothing else training beside it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Sequence

import numpy as np
import torch

from benchmarks.cli import UsageError, distinct, run_main
from mtsl_plugin.plugins import builtin_grouping, partition_search
from mtsl_plugin.plugins.builtin_grouping import MAX_TASKS

RULES = ("authors", "fewest_groups", "exhaustive")
SOLVERS = {name: getattr(builtin_grouping, name) for rule in RULES for name in (rule, f"{rule}_local")}
KINDS = ("uniform", "planted")
MAX_COUNT = 256


def random_similarity(generator: np.random.Generator, tasks: int, kind: str = "uniform") -> np.ndarray:
    """A symmetric (T, T) matrix with ones on the diagonal: uniform in [0, 1], or planted groups with noise."""
    if kind == "uniform":
        matrix = generator.uniform(0.0, 1.0, (tasks, tasks))
    else:
        labels = generator.integers(0, max(2, tasks // 3), tasks)
        matrix = np.where(labels[:, None] == labels[None, :], 0.85, 0.5)
        matrix = matrix + generator.uniform(-0.15, 0.15, (tasks, tasks))
    matrix = (matrix + matrix.T) / 2
    np.fill_diagonal(matrix, 1.0)
    return matrix


def time_solver(solver, matrix: np.ndarray, repeats: int) -> float:
    names = [f"t{i}" for i in range(len(matrix))]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        solver(matrix, names, 0.8)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gap_row(generator: np.random.Generator, tasks: int, kind: str, cases: int) -> str:
    """One row of the gap table: local search against the exact optimum on ``cases`` random matrices."""
    names = [f"t{i}" for i in range(tasks)]
    below = compared = 0
    worst = 0.0
    same = dict.fromkeys(RULES, 0)
    for _ in range(cases):
        matrix = random_similarity(generator, tasks, kind)
        for score in ("groups", "tasks"):
            exact = builtin_grouping.best_partitions(matrix, score, "exact")
            # the search itself (up to partition_search.COARSE tasks the *_local solvers take the exact programme)
            local = partition_search.best_partitions(matrix, score)
            for (optimum, _), (found, _) in zip(exact, local):
                compared += 1
                if found < optimum - 1e-9:
                    below += 1
                    worst = max(worst, (optimum - found) / abs(optimum))
        threshold = float(generator.uniform(0.3, 0.9))
        for rule in RULES:
            same[rule] += SOLVERS[rule](matrix, names, threshold) == SOLVERS[f"{rule}_local"](matrix, names, threshold)
    decisions = " / ".join(f"{same[rule]}/{cases}" for rule in RULES)
    return f"| {tasks} | {kind} | {cases} | {below}/{compared} | {100 * worst:.2f} | {decisions} |"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="4,6,8,10,12,14,16,24,32,48,64",
                   help=f"comma-separated task counts (at most {MAX_COUNT}; exact solvers up to {MAX_TASKS})")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gap-cases", type=int, default=0,
                   help=f"random matrices per task count (up to {MAX_TASKS}) and kind to compare local search with "
                        "the exact optimum on (default 0: no comparison)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    return run_main(lambda: report(args), args)


def report(args: argparse.Namespace) -> int:
    """Time the solvers as ``args`` ask and print the tables (bad options: ``UsageError`` before any timing)."""
    try:
        counts = [int(t) for t in args.tasks.split(",")]
    except ValueError:
        counts = []
    distinct(counts, "tasks")  # a count timed twice, on two random matrices, would read as one row repeated
    problem = (f"--tasks must be comma-separated task counts in 1..{MAX_COUNT}, got {args.tasks!r}"
               if not counts or any(not 1 <= t <= MAX_COUNT for t in counts) else
               f"--repeats must be at least 1, got {args.repeats}" if args.repeats < 1 else
               f"--gap-cases must be 0 or more, got {args.gap_cases}" if args.gap_cases < 0 else
               f"--seed must be 0 or more, got {args.seed}" if args.seed < 0 else None)
    if problem:
        raise UsageError(problem)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core; given back after, as main() may run in a process that goes on (a test)
    try:
        print_tables(args, counts)
    finally:
        torch.set_num_threads(threads)
    return 0


def print_tables(args: argparse.Namespace, counts: list[int]) -> None:
    """The timing table of ``counts`` and, with ``--gap-cases``, the local search's gaps to the optimum."""
    generator = np.random.default_rng(args.seed)
    print("| tasks | " + " | ".join(f"{name} (s)" for name in SOLVERS) + " |")
    print("|---:|" + "---:|" * len(SOLVERS))
    for count in counts:
        matrix = random_similarity(generator, count)
        cells = [f"{time_solver(solver, matrix, args.repeats):.4f}" if count <= MAX_TASKS or "_local" in name
                 else "—" for name, solver in SOLVERS.items()]
        print(f"| {count} | " + " | ".join(cells) + " |", flush=True)
    gap_counts = [count for count in counts if count <= MAX_TASKS]
    if args.gap_cases and gap_counts:
        print("\n| tasks | matrices | cases | k below the optimum | worst gap (%) | same decision "
              f"({' / '.join(RULES)}) |")
        print("|---:|:---|---:|---:|---:|:---|")
        for count in gap_counts:
            for kind in KINDS:
                print(gap_row(generator, count, kind, args.gap_cases), flush=True)


if __name__ == "__main__":
    sys.exit(main())
