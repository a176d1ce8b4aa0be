"""Compare multi-task methods on one data set, encoder, optimiser and budget; print the paper-style table.

    python benchmarks/compare.py --methods mtsl                 # quick preset, synthetic data, seed 0
    python benchmarks/compare.py --methods mtsl --preset smoke --seeds 0,1 --out results/demo
    python benchmarks/compare.py --resume results/demo          # continue an interrupted run

STN and One-Net are always trained too: STN is the reference of Δ_MTL and Δ_SD, One-Net the other extreme.
Results go to ``--out`` (default ``results/<preset>-<date>-<time>``): per run ``<method>/seed<k>/`` (config,
weights, checkpoint while unfinished, plan after each structural phase with its similarity matrices, final plan,
result JSON), and at the top ``config.json``, ``config.yaml``, ``results.json``, ``results.csv``, ``table.md`` and
``architecture.png``. An ``--out`` that holds a comparison of the same settings is extended: its finished runs
(STN's included) are reused and the new table covers the old and the new methods and seeds; one of other settings
is refused.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks.figures import alignment_figure, search_figure
from mtsl_plugin import distributed, folder_lock
from benchmarks.cli import (MAX_SEED, UsageError, add_run_args, check_out, config_from_args, join_ranks, parse_list,
                            parse_seeds, run_main)
from benchmarks.harness import (Job, check_jobs, dry_run, exit_code, method_jobs, read_json, source_of, train,
                                with_sources, write_results)
from mtsl_plugin.config import RunConfig
from mtsl_plugin.experiment import num_locations, write_config, write_json
from mtsl_plugin.methods import method_names
from mtsl_plugin.plan import BranchingPlan, PlanError

REFERENCES = ("stn", "onenet")
#: The options --resume takes besides the folder: how the saved runs compute and report, not what they compute.
RESUME_OPTIONS = ("resume", "device", "fused", "channels_last", "compile", "workers", "no_progress", "keep_checkpoints",
                  "plugin", "dry_run")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="mtsl", help="comma-separated method names, or 'all'")
    add_run_args(p)
    p.add_argument("--out", default=None,
                   help="results folder; one holding a comparison of the same settings is extended")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the comparison whose results are in DIR, as it was saved (with it only --device, "
                        "--fused, --channels-last, --compile, --workers, --no-progress, --keep-checkpoints, "
                        "--dry-run, --plugin)")
    p.add_argument("--plan-from", default=None, metavar="DIR",
                   help="retrain ('-R' methods) the final plans of the compare.py results in DIR, e.g. the plan "
                        "MTSL converged to on another data set (MTSL-R-Switch)")
    p.add_argument("--no-align", action="store_true", help="ablation: no alignment loss")
    p.add_argument("--no-average-init", action="store_true", help="ablation: group nodes start fresh")
    p.add_argument("--no-amalgamation", action="store_true", help="ablation: no amalgamation epochs")
    return p.parse_args(argv)


def plans_from(folder: Path, method: str, config: RunConfig, seeds: Sequence[int]) -> dict[int, BranchingPlan]:
    """For "-R" ``method``: the final plan of its source method in results folder ``folder``, per seed."""
    source = source_of(method, config)
    plans = {}
    for seed in seeds:
        path = folder / source / f"seed{seed}" / "result.json"
        if not path.is_file():
            raise UsageError(f"--plan-from {folder}: no finished {source} run of seed {seed} ({path} is missing)")
        result = read_json(path)
        try:
            plan = BranchingPlan.from_dict(result.get("plan"))
        except PlanError as exc:
            raise UsageError(f"--plan-from {folder}: {path}: {exc}") from None
        if plan.tasks != tuple(config.tasks):
            raise UsageError(f"--plan-from {folder}: the {source} plan has tasks {list(plan.tasks)}, this run has "
                             f"{list(config.tasks)}")
        if plan.num_locations != num_locations(config):
            raise UsageError(f"--plan-from {folder}: the {source} plan has {plan.num_locations} locations, this "
                             f"run's network has {num_locations(config)} (setting {config.setting})")
        plans[seed] = plan
    return plans


def build_jobs(methods: list[str], config: RunConfig, seeds: list[int], plan_from: str | None) -> list[Job]:
    """Jobs of the comparison: every method x seed (method-major); with ``plan_from`` the "-R" methods retrain
    that folder's plans (labelled ``<method>-from-<folder name>``) instead of this run's sources."""
    if plan_from is None:
        return method_jobs(with_sources(methods, config), config, seeds)
    folder = Path(plan_from)
    if not any(source_of(m, config) for m in methods):
        raise UsageError(f"--plan-from {folder} applies to retraining ('-R') methods, e.g. mtsl_r; none is requested")
    jobs = []
    for method in methods:
        if source_of(method, config) is None:
            jobs += method_jobs([method], config, seeds)
            continue
        plans = plans_from(folder, method, config, seeds)
        jobs += [Job(f"{method}-from-{folder.name}", method, config.replace(seed=s), plans[s]) for s in seeds]
    return jobs


def report(results: list[dict[str, Any]], out: Path, config: RunConfig) -> str:
    """Write the comparison's table and figures into ``out`` and return the table. The alignment figure (paper
    Fig. 4) compares ``mtsl`` with ``mtsl_noalign``, so it is drawn only when ``config``'s MTSL aligns (not under
    ``--no-align`` or an alignment weight of 0, where both rows run without alignment)."""
    table = write_results(results, out)
    if config.mtsl.align and config.mtsl.align_weight > 0:
        with_align = first_similarities(out, "mtsl", results)
        without_align = first_similarities(out, "mtsl_noalign", results)
        if with_align and without_align:
            alignment_figure(with_align, without_align, out / "alignment.png")
    if any(r.get("history") and "gate_entropy" in r["history"][0] for r in results):
        search_figure(results, out / "search.png")
    return table


def first_similarities(out: Path, label: str, results: Sequence[dict[str, Any]]) -> list[dict]:
    """The similarity record of the first structural phase of every finished run of ``label`` in ``results``
    (paper Fig. 4); a failed run's phase record is left out, as the table leaves out its numbers."""
    paths = [out / label / f"seed{r['seed']}" / "phase_0.json" for r in results
             if r["status"] == "ok" and (r.get("label") or r["method"]) == label]
    records = [json.loads(p.read_text()) for p in paths if p.is_file()]
    return [r["similarities"][0] for r in records if r["similarities"]]


def saved_comparison(out: Path, option: str) -> dict[str, Any]:
    """The comparison saved in ``out/config.json`` (``config`` as a :class:`RunConfig`, ``methods``, ``seeds``,
    ``plan_from``). A seed outside 0..MAX_SEED (saved before ``--seeds`` was range-checked) is dropped with a note:
    numpy refuses it before any training, so no run of it ever finished."""
    path = out / "config.json"
    meta = read_json(path)
    if not isinstance(meta, dict) or not {"config", "methods", "seeds"} <= meta.keys():
        if isinstance(meta, dict) and "fingerprint" in meta:
            raise UsageError(f"{option} {out} is the folder of one run, not of a comparison; pass its comparison "
                             f"folder (the parent of its method folder), {out.parent.parent}")
        raise UsageError(f"{path} is not the config.json of a compare.py results folder")
    seeds = list(dict.fromkeys(meta["seeds"]))
    bad = [s for s in seeds if not (isinstance(s, int) and 0 <= s <= MAX_SEED)]
    if bad and distributed.is_main():
        print(f"note: {path} lists seed(s) {bad} outside 0..{MAX_SEED}, which no run can use (numpy refuses them "
              "before any training); they are dropped from the comparison", file=sys.stderr, flush=True)
    try:
        config = RunConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{path}: {exc}") from None
    return {**meta, "config": config, "seeds": [s for s in seeds if s not in bad]}


def extend_comparison(out: Path, config: RunConfig, methods: list[str], seeds: list[int],
                      plan_from: str | None) -> tuple[list[str], list[int]]:
    """Methods and seeds of the comparison in the existing folder ``out`` extended by the requested ones; only a
    comparison of the same settings can be extended (its finished runs are reused, its table covers all)."""
    if not (out / "config.json").is_file():
        raise UsageError(f"--out {out} already holds files but no config.json, so it is not a compare.py results "
                         "folder; choose a new folder")
    meta = saved_comparison(out, "--out")
    if meta["config"].fingerprint() != config.fingerprint() or meta.get("plan_from") != plan_from:
        raise UsageError(f"--out {out} holds a comparison with other settings; pass --resume {out} to continue it, "
                         "or choose a new folder")
    return list(dict.fromkeys([*meta["methods"], *methods])), sorted({*meta["seeds"], *seeds})


def saved_text(out: Path) -> str | None:
    """The text of ``out/config.json`` (the comparison saved there), ``None`` if there is none."""
    path = out / "config.json"
    return path.read_text() if path.is_file() else None


def flag(dest: str) -> str:
    return f"--{dest.replace('_', '-')}"


def options_besides_resume(args: argparse.Namespace) -> list[str]:
    """The options given with ``--resume`` (those that differ from their defaults) that it does not take."""
    defaults = vars(parse_args([]))
    return [flag(key) for key, value in vars(args).items()
            if key in defaults and key not in RESUME_OPTIONS and value != defaults[key]]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        if args.resume is not None:
            out = Path(args.resume)
            if not (out / "config.json").is_file():
                raise UsageError(f"--resume {out}: no config.json there, so it is not a compare.py results folder")
            ignored = options_besides_resume(args)
            if ignored:
                raise UsageError(f"--resume continues the comparison saved in {out} as it was; it takes no "
                                 f"{', '.join(ignored)} (only {', '.join(map(flag, RESUME_OPTIONS[1:]))})")
            meta = saved_comparison(out, "--resume")
            config, methods, seeds = meta["config"], meta["methods"], meta["seeds"]
            if not seeds:
                raise UsageError(f"--resume {out}: its config.json lists no seed a run can use; choose a new folder")
            config = config.replace(device=args.device or config.device, fused=args.fused or config.fused,
                                    channels_last=args.channels_last or config.channels_last,
                                    compile=args.compile or config.compile,
                                    workers=config.workers if args.workers is None else args.workers)
            config = join_ranks(config)
            plan_from = meta.get("plan_from")
        else:
            config = config_from_args(args)
            requested = (method_names(config.setting) if args.methods == "all"
                         else parse_list(args.methods, "methods"))
            unknown = [m for m in requested if m not in method_names()]
            if unknown:
                raise UsageError(f"unknown method(s) {unknown}; registered: {', '.join(sorted(method_names()))}")
            methods, seeds, plan_from = list(dict.fromkeys([*REFERENCES, *requested])), parse_seeds(args.seeds), \
                args.plan_from
            started = distributed.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))  # one folder for every rank
            out = check_out(Path(args.out or f"results/{config.preset}-{started}"))
            seen = saved_text(out)
            if out.exists() and any(p.name != folder_lock.LOCK_FILE for p in out.iterdir()):
                methods, seeds = extend_comparison(out, config, methods, seeds, plan_from)
        # --resume continues the comparison config.json saves: until this command has saved its own there (a new
        # folder, or one it extends by methods or seeds), the same command again is what continues it
        resume_command = f"python benchmarks/compare.py --resume {out}"
        args.results_folder = out
        if args.resume is not None:
            args.continue_with = resume_command
        else:  # a default --out is dated: the same command again would start another folder
            args.continue_with = "the same command again" if args.out else f"the same command with --out {out}"
        jobs = build_jobs(methods, config, seeds, plan_from)
        # before any training and before the results folder is made
        need = check_jobs(jobs, not args.no_progress, out, args.keep_checkpoints)
        if args.dry_run:
            return dry_run(jobs, out, need)
        # a command started on the same folder meanwhile (a job array) may have saved its comparison: both go in
        with folder_lock.holding(out, wait=True):
            listed = methods, seeds
            if args.resume is None and saved_text(out) not in (None, seen):
                listed = extend_comparison(out, config, methods, seeds, plan_from)
            write_json(out / "config.json", {"config": config.to_dict(), "methods": listed[0], "seeds": listed[1],
                                             "plan_from": plan_from})
            write_config(out / "config.yaml", config)  # the effective configuration, itself a valid --config
        args.continue_with = resume_command
        results = train(jobs, out, args)
        if distributed.is_main():  # under torchrun every rank trains; rank 0 alone reports
            print(report(results, out, config))
            print(f"\nresults in {out}")
        return exit_code(results)

    return run_main(body, args, distributed_ok=True)


if __name__ == "__main__":
    sys.exit(main())
