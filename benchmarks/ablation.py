"""The ablation of MTSL's parts (paper Table 4): alignment off/on x group-node creation by averaging (avg),
attention-based amalgamation (ATT) or both.

    python benchmarks/ablation.py                               # quick preset, synthetic data, seed 0
    python benchmarks/ablation.py --preset smoke --seeds 0,1 --out results/demo   # reuses demo's runs

Six MTSL variants plus STN (the Δ reference) are trained, or reused from ``--out`` (which may be the folder of
an earlier ``compare.py`` run: its ``stn``, ``mtsl`` and ``mtsl_noalign`` runs are the same runs). Without
"avg" a group node starts from the fresh initialisation instead of the average of the task nodes; without
"ATT" it is not distilled (no amalgamation epochs). Writes ``<out>/ablation/``: ``ablation.md`` (the paper's
layout: alignment, avg, ATT, Δ_SD, Δ_MTL, params, GMac, converged plan), the full ``table.md``,
``results.csv``, ``results.json`` and ``architecture.png``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from benchmarks.cli import add_out_arg, add_run_args, config_from_args, out_folder, parse_seeds, run_main
from benchmarks.harness import Job, check_jobs, dry_run, exit_code, publish, train
from benchmarks.report import summary_table
from mtsl_plugin import distributed
from mtsl_plugin.config import RunConfig
from mtsl_plugin.learner.schedule import MTSLConfig

#: (row label, registry method, alignment, avg, ATT) in the paper's order; the last row is MTSL itself.
ROWS: tuple[tuple[str, str, bool, bool, bool], ...] = (
    ("mtsl_noalign_avg", "mtsl", False, True, False),
    ("mtsl_noalign_att", "mtsl", False, False, True),
    ("mtsl_noalign", "mtsl_noalign", False, True, True),
    ("mtsl_avg", "mtsl", True, True, False),
    ("mtsl_att", "mtsl", True, False, True),
    ("mtsl", "mtsl", True, True, True),
)


def ablation_jobs(config: RunConfig, seeds: Sequence[int]) -> list[Job]:
    """STN and the six variants for every seed (variants of ``config``'s MTSL options)."""
    jobs = [Job("stn", "stn", config.replace(seed=s)) for s in seeds]
    for label, method, align, avg, att in ROWS:
        fields = {**config.mtsl.to_dict(), "average_init": avg, "amalgamate": att}  # every row its switches
        if method == "mtsl":  # mtsl_noalign switches alignment off itself: its runs are compare.py's
            fields["align"] = align
        variant = config.replace(mtsl=MTSLConfig.from_dict(fields))
        jobs += [Job(label, method, variant.replace(seed=s)) for s in seeds]
    return jobs


def ablation_table(results: list[dict[str, Any]]) -> str:
    """The paper's Table 4 layout in Markdown, mean over seeds (the first seed's plan)."""
    mark = {True: "✓", False: "✗"}
    rows = [([mark[align], mark[avg], mark[att]], label) for label, _, align, avg, att in ROWS]
    return summary_table(results, ["Alignment", "avg", "ATT"], rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    add_out_arg(p, "ablation")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        config = config_from_args(args)
        seeds = parse_seeds(args.seeds)
        out = out_folder(args, "ablation", config)
        jobs = ablation_jobs(config, seeds)
        need = check_jobs(jobs, not args.no_progress, out, args.keep_checkpoints)
        if args.dry_run:
            return dry_run(jobs, out, need)
        results = train(jobs, out, args)
        if distributed.is_main():  # under torchrun every rank trains; rank 0 alone reports
            publish(results, out / "ablation", ablation_table(results), "ablation.md")
        return exit_code(results)

    return run_main(body, args, distributed_ok=True)


if __name__ == "__main__":
    sys.exit(main())
