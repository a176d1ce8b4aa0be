"""Seconds the exact grouping solvers take per number of tasks, on random symmetric similarity matrices.

    python benchmarks/grouping_speed.py                       # 4..16 tasks, every built-in solver
    python benchmarks/grouping_speed.py --tasks 8,12,16 --repeats 3

Prints one row per task count: the median wall-clock seconds of each solver (one process, one thread: run it
alone, nothing else training beside it).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Sequence

import numpy as np
import torch

from benchmarks.cli import refuse_torchrun
from mtsl_plugin.plugins.builtin_grouping import MAX_TASKS, authors, exhaustive, fewest_groups

SOLVERS = {"authors": authors, "exhaustive": exhaustive, "fewest_groups": fewest_groups}


def random_similarity(generator: np.random.Generator, tasks: int) -> np.ndarray:
    matrix = generator.uniform(0.0, 1.0, (tasks, tasks))
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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(str(t) for t in range(4, MAX_TASKS + 1)),
                   help=f"comma-separated task counts (at most {MAX_TASKS})")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if refuse_torchrun():
        return 2
    try:
        counts = [int(t) for t in args.tasks.split(",")]
    except ValueError:
        counts = []
    problem = (f"--tasks must be comma-separated task counts in 1..{MAX_TASKS}, got {args.tasks!r}"
               if not counts or any(not 1 <= t <= MAX_TASKS for t in counts) else
               f"--repeats must be at least 1, got {args.repeats}" if args.repeats < 1 else
               f"--seed must be 0 or more, got {args.seed}" if args.seed < 0 else None)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    generator = np.random.default_rng(args.seed)
    print("| tasks | " + " | ".join(f"{name} (s)" for name in SOLVERS) + " |")
    print("|---:|" + "---:|" * len(SOLVERS))
    for count in counts:
        matrix = random_similarity(generator, count)
        cells = [f"{time_solver(solver, matrix, args.repeats):.4f}" for solver in SOLVERS.values()]
        print(f"| {count} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
