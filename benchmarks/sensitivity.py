"""How MTSL's result depends on the grouping threshold, the alignment weight, the set of tasks, and the seed /
initialisation (paper Tables 6, 7 and 5), and BMTAS's on its resource weight (paper Table 8).

    python benchmarks/sensitivity.py --sweep threshold --values 0.5,0.6,0.7,0.8,0.9,0.95
    python benchmarks/sensitivity.py --sweep align-weight --values 0,0.02,0.05,0.1,0.2   # λ of λ·(1 − CKA)
    python benchmarks/sensitivity.py --sweep tasks                      # every subset leaving one task out
    python benchmarks/sensitivity.py --sweep tasks --values S,E,D,N     # one named subset
    python benchmarks/sensitivity.py --sweep seeds --seeds 0,1,2 --inits random,resnet18.pth
    python benchmarks/sensitivity.py --sweep bmtas-lambda --values 0.01,0.05,0.2,1   # BMTAS's λ (paper Table 8)

``threshold`` trains MTSL once per γ (and STN, the Δ reference, once), ``align-weight`` once per alignment
weight λ (0: no alignment loss); ``tasks`` trains STN and MTSL on each subset; ``seeds`` trains MTSL per seed and
per initialisation (``random``, ``pretrained`` for timm's weights, or a local weights file) and prints the
converged plan layer by layer; ``bmtas-lambda`` trains BMTAS once per resource-loss weight λ (and STN) and
tabulates Δ_MTL against the derived network's cost. Runs already in ``--out`` (e.g. an earlier ``compare.py``
folder) are reused. Writes ``<out>/sensitivity-<sweep>/``: ``sensitivity.md`` (the sweep's table), ``table.md``,
``results.csv``, ``results.json``, ``architecture.png`` and ``sensitivity.png``.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from baselines.bmtas import DEFAULT_RESOURCE_WEIGHT
from benchmarks.figures import sweep_figure
from benchmarks.cli import (UsageError, add_out_arg, add_run_args, config_from_args, distinct, out_folder, parse_list,
                            parse_seeds, run_main)
from benchmarks.harness import Job, check_jobs, dry_run, exit_code, publish, train
from benchmarks.report import aggregate, escape_cell, first_line_of, summary_table
from mtsl_plugin import distributed
from mtsl_plugin.config import RunConfig
from mtsl_plugin.learner.schedule import MTSLConfig
from mtsl_plugin.plan import BranchingPlan
from mtsl_plugin.plan_figure import draw_plans

SWEEPS = ("threshold", "align-weight", "tasks", "seeds", "bmtas-lambda")
# the sweeps over one MTSL option: sweep -> (the option, its runs' label prefix: mtsl_threshold0.7, mtsl_align0.05)
MTSL_OPTIONS = {"threshold": ("threshold", "threshold"), "align-weight": ("align_weight", "align")}


# ------------------------------------------------------------------------------------------------ jobs
def mtsl_option_jobs(config: RunConfig, seeds: Sequence[int], sweep: str, values: Sequence[float]) -> list[Job]:
    """STN, then MTSL at every value in ``values`` of the option the sweep varies (:data:`MTSL_OPTIONS`), for every
    seed."""
    option = MTSL_OPTIONS[sweep][0]
    jobs = [Job("stn", "stn", config.replace(seed=s)) for s in seeds]
    for value in values:
        variant = config.replace(mtsl=MTSLConfig.from_dict({**config.mtsl.to_dict(), option: value}))
        jobs += [Job(mtsl_option_label(config, sweep, value), "mtsl", variant.replace(seed=s)) for s in seeds]
    return jobs


def number_text(value: float) -> str:
    """``value`` as the sweeps name it: ``{:g}`` (``0.7``, ``50``), or its ``repr`` where ``{:g}`` would round it
    (``0.1234561``), so that distinct values have distinct labels and earlier labels stay what they were."""
    text = f"{value:g}"
    return text if float(text) == value else repr(value)


def mtsl_option_label(config: RunConfig, sweep: str, value: float) -> str:
    """``mtsl`` for the configuration's own value (so compare.py's run is reused), else e.g.
    ``mtsl_threshold<γ>`` or ``mtsl_align<λ>``."""
    option, prefix = MTSL_OPTIONS[sweep]
    return "mtsl" if value == getattr(config.mtsl, option) else f"mtsl_{prefix}{number_text(value)}"


def bmtas_lambda_jobs(config: RunConfig, seeds: Sequence[int], values: Sequence[float]) -> list[Job]:
    """STN, then BMTAS at every resource-loss weight λ in ``values``, for every seed."""
    jobs = [Job("stn", "stn", config.replace(seed=s)) for s in seeds]
    for value in values:
        jobs += [Job(bmtas_label(value), "bmtas", config.replace(seed=s), arch_args=(("resource_weight", value),))
                 for s in seeds]
    return jobs


def bmtas_label(value: float) -> str:
    """``bmtas`` for the default λ (so compare.py's run is reused), else ``bmtas_lambda<λ>``."""
    return "bmtas" if value == DEFAULT_RESOURCE_WEIGHT else f"bmtas_lambda{number_text(value)}"


def task_subsets(tasks: Sequence[str], value: str) -> list[tuple[str, ...]]:
    """``all``: every subset of ``tasks`` that leaves one task out; else the named subset, e.g. ``S,E,D,N``."""
    if value == "all":
        if len(tasks) < 3:
            raise UsageError(f"--sweep tasks needs at least 3 tasks to leave one out, the run has {list(tasks)}")
        return [tuple(c) for c in itertools.combinations(tasks, len(tasks) - 1)]
    subset = parse_list(value, "values")
    unknown = [t for t in subset if t not in tasks]
    if unknown or len(set(subset)) != len(subset) or len(subset) < 2:
        raise UsageError(f"--values {value!r} must name at least 2 distinct tasks of {list(tasks)}")
    return [tuple(t for t in tasks if t in subset)]  # in the run's task order


def subset_name(subset: Sequence[str]) -> str:
    """A task subset in its runs' labels: ``SEDN``; joined by ``+`` where a name is longer than a letter
    (``parts+flow``), so that two subsets never share a label (``ab``, ``c`` and ``a``, ``bc``)."""
    return ("" if all(len(t) == 1 for t in subset) else "+").join(subset)


def tasks_jobs(config: RunConfig, seeds: Sequence[int], subsets: Sequence[tuple[str, ...]]) -> list[Job]:
    """STN and MTSL on every task subset, for every seed."""
    jobs = []
    for subset in subsets:
        name = subset_name(subset)
        jobs += [Job(f"{method}_{name}", method, config.replace(seed=s, tasks=subset))
                 for method in ("stn", "mtsl") for s in seeds]
    return jobs


def init_config(config: RunConfig, init: str) -> RunConfig:
    """``config`` with the backbone initialised by ``init``: random, pretrained (timm) or a weights file."""
    if init == "random":
        return config.replace(pretrained=False, weights=None)
    if init == "pretrained":
        return config.replace(pretrained=True, weights=None)
    if not Path(init).is_file():
        raise UsageError(f"--inits {init!r} is neither 'random', 'pretrained' nor a weights file")
    return config.replace(pretrained=False, weights=str(init))


def init_label(config: RunConfig, init: str) -> str:
    """``mtsl`` when ``init`` is the configuration's own initialisation (so compare.py's runs are reused), else
    ``mtsl_<init>`` (a weights file by its stem)."""
    if init_config(config, init) == config:
        return "mtsl"
    return f"mtsl_{init if init in ('random', 'pretrained') else Path(init).stem}"


def seeds_jobs(config: RunConfig, seeds: Sequence[int], inits: Sequence[str]) -> list[Job]:
    """MTSL for every initialisation and seed (no reference: this sweep is about the converged plans)."""
    return [Job(init_label(config, init), "mtsl", init_config(config, init).replace(seed=s))
            for init in inits for s in seeds]


# ------------------------------------------------------------------------------------------------ tables
def grouping_table(results: list[dict[str, Any]], init_names: dict[str, str]) -> str:
    """The converged plan of every run, one column per location (paper Table 5): a cell lists the groups,
    e.g. ``SE DNA`` (``parts+flow heat`` for task names of several letters, as the plans' text writes them);
    ``init_names`` maps a run's label to its initialisation's name in the table. A failed run's row shows the
    first line of its error, escaped, so that the row stays one row of the table."""
    ok = [r for r in results if r["status"] == "ok" and r.get("plan")]
    failed = [r for r in results if r["status"] != "ok"]
    if not ok:
        return "no run finished\n" + "".join(f"- {r['label']} seed {r['seed']}: {r['error']}\n" for r in failed)
    locations = BranchingPlan.from_dict(ok[0]["plan"]).num_locations
    lines = ["| Init | Seed | " + " | ".join(str(l) for l in range(locations)) + " |",
             "|:---|---:|" + ":---:|" * locations]
    for r in ok:
        plan = BranchingPlan.from_dict(r["plan"])
        cells = [" ".join("".join(g) if all(len(t) == 1 for t in g) else "+".join(g) for g in partition)
                 for partition in plan.partitions]
        lines.append(f"| {init_names[r['label']]} | {r['seed']} | " + " | ".join(cells) + " |")
    lines += [f"| {init_names[r['label']]} | {r['seed']} | failed: {escape_cell(first_line_of(str(r['error'])))} |"
              for r in failed]
    return "\n".join(lines) + "\n"


def _series(results: list[dict[str, Any]], labels: Sequence[str], field: str) -> list[float | None]:
    entries = aggregate(results)
    values = []
    for label in labels:
        stat = entries[label][field] if label in entries and entries[label]["ok"] else None
        values.append(None if stat is None else stat["mean"])
    return values


def seeds_report(results: list[dict[str, Any]], init_names: dict[str, str], folder: Path) -> str:
    """The seeds sweep's table (converged plan per initialisation and seed) and its plan figure."""
    plans = {f"{init_names[r['label']]} seed {r['seed']}": BranchingPlan.from_dict(r["plan"])
             for r in results if r["status"] == "ok" and r.get("plan")}
    if plans:
        draw_plans(plans, folder / "sensitivity.png")
    return grouping_table(results, init_names)


def sweep_report(sweep: str, results: list[dict[str, Any]], rows: Sequence[tuple[str, str]],
                 values: Sequence[float], folder: Path) -> str:
    """The table of a threshold, align-weight, tasks or bmtas-lambda sweep (one row per ``(shown value, run
    label)``) and its figure: Δ_MTL and parameters (and GMac for BMTAS) against the swept value."""
    numeric = sweep != "tasks"
    name = {"threshold": "γ", "align-weight": "Alignment λ", "tasks": "Tasks", "bmtas-lambda": "λ"}[sweep]
    table = summary_table(results, [name], [([shown], label) for shown, label in rows])
    labels = [label for _, label in rows]
    xs = values if numeric else [shown for shown, _ in rows]
    panels = {"Δ_MTL (%)": _series(results, labels, "delta_mtl"),
              "Params (M)": _series(results, labels, "params_m")}
    if sweep == "bmtas-lambda":
        panels["GMac"] = _series(results, labels, "gmac")
    sweep_figure(xs, panels, folder / "sensitivity.png",
                 {"threshold": "threshold γ", "align-weight": "alignment weight λ", "tasks": "tasks",
                  "bmtas-lambda": "BMTAS λ"}[sweep],
                 kind="line" if numeric else "bar")
    return table


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", required=True, choices=SWEEPS)
    p.add_argument("--values", default=None,
                   help="threshold: comma-separated γ (default 0.5,0.6,0.7,0.8,0.9,0.95); align-weight: "
                        "comma-separated λ (default 0,0.02,0.05,0.1,0.2); tasks: 'all' (default) or one subset, e.g. "
                        "S,E,D,N; bmtas-lambda: comma-separated λ (default 0.01,0.05,0.2,1)")
    p.add_argument("--inits", default=None,
                   help="seeds sweep: comma-separated initialisations: random (default), pretrained, or weights "
                        "files")
    add_run_args(p, default_seeds=None)
    add_out_arg(p, "sensitivity")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        config = config_from_args(args)
        if args.values is not None and args.sweep == "seeds":  # an option another sweep reads, silently unused
            raise UsageError("--values does not apply to --sweep seeds (its seeds are --seeds, its "
                             "initialisations --inits)")
        if args.inits is not None and args.sweep != "seeds":
            raise UsageError(f"--inits applies to --sweep seeds only, not to --sweep {args.sweep}")
        # given empty ('') they are refused by parse_list, not taken for the defaults
        seeds = parse_seeds(args.seeds if args.seeds is not None else "0,1,2" if args.sweep == "seeds" else "0")
        out = out_folder(args, "sensitivity", config)
        folder = out / f"sensitivity-{args.sweep}"
        if args.sweep == "bmtas-lambda" and distributed.launched():
            raise UsageError("BMTAS's bilevel search runs in one process; start the bmtas-lambda sweep without "
                             "torchrun")
        values: list[float] = []
        init_names: dict[str, str] = {}  # the seeds sweep's: run label -> initialisation
        if args.sweep in ("threshold", "align-weight", "bmtas-lambda"):
            text = args.values if args.values is not None else {
                "threshold": "0.5,0.6,0.7,0.8,0.9,0.95", "align-weight": "0,0.02,0.05,0.1,0.2",
                "bmtas-lambda": "0.01,0.05,0.2,1"}[args.sweep]
            try:
                values = distinct([float(v) for v in parse_list(text, "values")], "values")
            except ValueError:
                raise UsageError(f"--values must be comma-separated numbers for the {args.sweep} sweep, got "
                                 f"{text!r}") from None
            if args.sweep in MTSL_OPTIONS:  # γ and λ are checked with every configuration (finite, λ ≥ 0)
                jobs = mtsl_option_jobs(config, seeds, args.sweep, values)
                rows = [(number_text(v), mtsl_option_label(config, args.sweep, v)) for v in values]
            else:
                bad = [v for v in values if not 0 <= v < math.inf]
                if bad:
                    raise UsageError(f"--values: BMTAS's resource weight λ must be a finite number ≥ 0, got "
                                     f"{number_text(bad[0])}")
                jobs = bmtas_lambda_jobs(config, seeds, values)
                rows = [(number_text(v), bmtas_label(v)) for v in values]
        elif args.sweep == "tasks":
            subsets = task_subsets(config.tasks, "all" if args.values is None else args.values)
            jobs = tasks_jobs(config, seeds, subsets)
            rows = [(",".join(s), f"mtsl_{subset_name(s)}") for s in subsets]
        else:
            inits = distinct(parse_list("random" if args.inits is None else args.inits, "inits"), "inits")
            jobs = seeds_jobs(config, seeds, inits)
            init_names = {init_label(config, i): i if i in ("random", "pretrained") else Path(i).stem for i in inits}
            rows = []
        need = check_jobs(jobs, not args.no_progress, out, args.keep_checkpoints)
        if args.dry_run:
            return dry_run(jobs, out, need)
        results = train(jobs, out, args)
        if distributed.is_main():  # under torchrun every rank trains; rank 0 alone reports
            table = (seeds_report(results, init_names, folder) if args.sweep == "seeds"
                     else sweep_report(args.sweep, results, rows, values, folder))
            publish(results, folder, table, "sensitivity.md")
        return exit_code(results)

    return run_main(body, args, distributed_ok=True)


if __name__ == "__main__":
    sys.exit(main())
