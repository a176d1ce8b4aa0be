"""Compare multi-task methods on one data set, encoder, optimiser and budget; print the paper-style table.

    python benchmarks/compare.py --methods mtsl                 # quick preset, synthetic data, seed 0
    python benchmarks/compare.py --methods mtsl --preset smoke --seeds 0,1 --out results/demo
    python benchmarks/compare.py --resume results/demo          # continue an interrupted run

STN and One-Net are always trained too: STN is the reference of Δ_MTL and Δ_SD, One-Net the other extreme.
Results go to ``--out`` (default ``results/<preset>-<time>``): per run ``<method>/seed<k>/`` (config, checkpoint,
plan after each structural phase with its similarity matrices, final plan, result JSON), and at the top
``config.json``, ``results.json``, ``results.csv``, ``table.md`` and ``architecture.png``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import timm

import baselines  # noqa: F401  (registers the baseline methods)
from benchmarks.figures import alignment_figure
from benchmarks.report import aggregate, delta_mtl, format_table, write_csv, write_markdown
from mtsl_plugin.config import NUM_LOCATIONS, PRESETS, SETTINGS, RunConfig, load_preset
from mtsl_plugin.experiment import run_method, write_json
from mtsl_plugin.learner.schedule import MTSLConfig
from mtsl_plugin.methods import build_method, method_names
from mtsl_plugin.plan import BranchingPlan
from mtsl_plugin.plan_figure import draw_plans
from mtsl_plugin.plugins import PluginError, amalgamator, grouping_solver, load_plugin, similarity

REFERENCES = ("stn", "onenet")


class UsageError(Exception):
    """Bad command-line input; printed as one line, exit code 2."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="mtsl", help="comma-separated method names, or 'all'")
    p.add_argument("--preset", default="quick", choices=PRESETS)
    p.add_argument("--setting", default="encoder-decoder", choices=SETTINGS,
                   help="encoder-decoder: 10 merge locations (paper Table 2); encoder: 6, DeepLab heads (Table 1)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--dataset", default=None, help="synthetic (default), nyuv2 or cityscapes")
    p.add_argument("--data-root", default=None, help="folder of a preprocessed real data set")
    p.add_argument("--tasks", default=None, help="comma-separated task letters (default: all the data has)")
    p.add_argument("--out", default=None, help="results folder (must not hold results already)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run whose results are in DIR")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--backbone", default=None, help="timm ResNet name (default resnet18)")
    p.add_argument("--pretrained", action="store_true", help="timm's pretrained backbone weights")
    p.add_argument("--weights", default=None, help="local backbone weights file")
    p.add_argument("--weighting", default=None, help="LibMTL weighting method, e.g. EW (default) or UW")
    p.add_argument("--similarity", default=None, help="similarity plugin (default cka)")
    p.add_argument("--grouping", default=None, help="grouping-solver plugin (default fewest_groups)")
    p.add_argument("--amalgamator", default=None, help="amalgamator plugin (default att)")
    p.add_argument("--threshold", type=float, default=None, help="grouping threshold γ (default 0.8)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE", help="import a plugin module")
    p.add_argument("--no-align", action="store_true", help="ablation: no alignment loss")
    p.add_argument("--no-average-init", action="store_true", help="ablation: group nodes start fresh")
    p.add_argument("--no-amalgamation", action="store_true", help="ablation: no amalgamation epochs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    config = load_preset(args.preset)
    data = config.data
    if args.dataset is not None:
        data = type(data)(**{**data.__dict__, "name": args.dataset, "root": args.data_root})
        if args.dataset != "synthetic":  # real data: use the whole split unless the preset is a smoke test
            data = type(data)(**{**data.__dict__, "train": data.train if args.preset == "smoke" else None,
                                 "test": data.test if args.preset == "smoke" else None})
    mtsl = config.mtsl.to_dict()
    for key, value in (("similarity", args.similarity), ("grouping", args.grouping),
                       ("amalgamator", args.amalgamator), ("threshold", args.threshold)):
        if value is not None:
            mtsl[key] = value
    mtsl.update({k: False for k, flag in (("align", args.no_align), ("average_init", args.no_average_init),
                                          ("amalgamate", args.no_amalgamation)) if flag})
    changes: dict[str, Any] = {"data": data, "mtsl": MTSLConfig.from_dict(mtsl), "device": args.device,
                               "setting": args.setting}
    if args.tasks:
        changes["tasks"] = tuple(t.strip() for t in args.tasks.split(","))
    for key in ("backbone", "weights", "weighting"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    if args.pretrained:
        changes["pretrained"] = True
    config = config.replace(**changes)
    if not timm.is_model(config.backbone) or not config.backbone.startswith(("resnet", "resnext", "seresnet")):
        raise UsageError(f"--backbone {config.backbone!r} is not a timm ResNet (e.g. resnet18, resnet34, resnet50)")
    similarity(config.mtsl.similarity), grouping_solver(config.mtsl.grouping), amalgamator(config.mtsl.amalgamator)
    return config


def parse_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise UsageError(f"--{what} is empty")
    return items


def run_all(config: RunConfig, methods: list[str], seeds: list[int], out: Path, resume: bool,
            progress: bool) -> list[dict[str, Any]]:
    """Train every method x seed (reusing finished runs of the same configuration); failures are recorded."""
    results = []
    for method in methods:
        for seed in seeds:
            run_config = config.replace(seed=seed)
            run_dir = out / method / f"seed{seed}"
            done = run_dir / "result.json"
            if done.exists():
                previous = json.loads(done.read_text())
                if previous.get("fingerprint") == run_config.fingerprint() and previous.get("status") == "ok":
                    print(f"[{method} seed {seed}] reusing the finished run in {run_dir}", flush=True)
                    results.append(previous)
                    continue
            print(f"[{method} seed {seed}] training", flush=True)
            try:
                plan = retrained_plan(method, run_config, results)
                results.append(run_method(run_config, method, run_dir, resume=resume, progress=progress,
                                          plan=plan))
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # keep going with the other methods; the table shows the failure
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "error.txt").write_text(traceback.format_exc())
                print(f"[{method} seed {seed}] failed: {exc}", file=sys.stderr, flush=True)
                results.append({"method": method, "seed": seed, "status": "failed", "error": str(exc)})
    return results


def source_of(method: str, config: RunConfig) -> str | None:
    """The method whose final plan ``method`` retrains ("-R" methods), else ``None``. A builder that fails
    here fails again, reported, when its run starts."""
    try:
        return build_method(method, config, NUM_LOCATIONS[config.setting]).retrains
    except Exception:  # noqa: BLE001
        return None


def retrained_plan(method: str, config: RunConfig, results: list[dict[str, Any]]) -> BranchingPlan | None:
    """For a "-R" method, the final plan of the method it retrains (same seed, trained earlier in this run)."""
    source = source_of(method, config)
    if source is None:
        return None
    for r in results:
        if r["method"] == source and r["seed"] == config.seed and r["status"] == "ok" and r.get("plan"):
            return BranchingPlan.from_dict(r["plan"])
    raise ValueError(f"{method} retrains the plan of {source}, whose run (seed {config.seed}) did not finish")


def with_sources(methods: list[str], config: RunConfig) -> list[str]:
    """``methods`` with every "-R" method's source method inserted before it (if not already earlier)."""
    ordered: list[str] = []
    for method in methods:
        source = source_of(method, config)
        if source is not None and source not in ordered:
            ordered.append(source)
        if method not in ordered:
            ordered.append(method)
    return ordered


def add_deltas(results: list[dict[str, Any]]) -> None:
    """Δ_MTL and Δ_SD of every run against the STN run of the same seed (in percent)."""
    reference = {r["seed"]: r for r in results if r["method"] == "stn" and r["status"] == "ok"}
    for r in results:
        if r["status"] != "ok":
            continue
        ref = reference.get(r["seed"])
        if ref is None:
            r["delta_mtl"] = r["delta_sd"] = None
            continue
        r["delta_mtl"] = delta_mtl(r["metrics"], ref["metrics"], r["higher_is_better"])
        sd = [t for t in ("S", "D") if t in r["metrics"]]
        r["delta_sd"] = delta_mtl(r["metrics"], ref["metrics"], r["higher_is_better"], sd) if len(sd) == 2 else None


def report(results: list[dict[str, Any]], out: Path) -> str:
    ok = [r for r in results if r["status"] == "ok"]
    tasks = list(ok[0]["metrics"]) if ok else []
    higher = ok[0]["higher_is_better"] if ok else {}
    aggregated = aggregate(results)
    table = format_table(aggregated, tasks, higher)
    write_markdown(table, out / "table.md")
    write_csv(aggregated, out / "results.csv")
    write_json(out / "results.json", [{k: v for k, v in r.items() if k != "history"} for r in results])
    plans = {}
    for r in ok:
        if r.get("plan"):
            plans.setdefault(r["method"], BranchingPlan.from_dict(r["plan"]))
    if plans:
        draw_plans(plans, out / "architecture.png")
    with_align, without_align = first_similarities(out, "mtsl"), first_similarities(out, "mtsl_noalign")
    if with_align and without_align:
        alignment_figure(with_align, without_align, out / "alignment.png")
    return table


def first_similarities(out: Path, method: str) -> list[dict]:
    """The similarity record of the first structural phase of every seed of ``method`` (paper Fig. 4)."""
    records = [json.loads(p.read_text()) for p in sorted(out.glob(f"{method}/seed*/phase_0.json"))]
    return [r["similarities"][0] for r in records if r["similarities"]]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        for module in args.plugin:
            load_plugin(module)
        if args.resume is not None:
            out = Path(args.resume)
            saved = out / "config.json"
            if not saved.is_file():
                raise UsageError(f"--resume {out}: no config.json there, so it is not a compare.py results folder")
            meta = json.loads(saved.read_text())
            config, methods, seeds = RunConfig.from_dict(meta["config"]), meta["methods"], meta["seeds"]
            config = config.replace(device=args.device)
        else:
            config = config_from_args(args)
            requested = (method_names(config.setting) if args.methods == "all"
                         else parse_list(args.methods, "methods"))
            unknown = [m for m in requested if m not in method_names()]
            if unknown:
                raise UsageError(f"unknown method(s) {unknown}; registered: {', '.join(sorted(method_names()))}")
            methods = with_sources(list(dict.fromkeys([*REFERENCES, *requested])), config)
            try:
                seeds = [int(s) for s in parse_list(args.seeds, "seeds")]
            except ValueError:
                raise UsageError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
            out = Path(args.out or f"results/{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
            if out.exists() and any(out.iterdir()):
                raise UsageError(f"--out {out} already holds files; pass --resume {out} to continue it, or "
                                 "choose a new folder")
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "config.json", {"config": config.to_dict(), "methods": methods, "seeds": seeds})
        results = run_all(config, methods, seeds, out, args.resume is not None, not args.no_progress)
    except (UsageError, PluginError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    add_deltas(results)
    table = report(results, out)
    print(table)
    print(f"\nresults in {out}")
    return 1 if any(r["status"] != "ok" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
