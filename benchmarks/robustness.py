"""Robustness of trained multi-task models to natural corruptions and PGD attacks (paper MTSL, robustness tables).

    python benchmarks/robustness.py --methods onenet,mtsl                  # quick preset, seed 0
    python benchmarks/robustness.py --methods mtsl --out results/demo      # reuse the runs of a compare.py folder
    python benchmarks/robustness.py --methods onenet,mtsl --corruptions noise,blur --epsilons 1,2 --attack-tasks S

The requested methods are trained (or reused: finished runs in ``--out`` of the same configuration, e.g. those of
an earlier ``compare.py``; "-R" methods train their source method first). Then every finished run is evaluated on

* the clean test set;
* the test set under each natural corruption of the chosen categories (noise, blur, weather, digital) at
  severities 1-5; a category's score is the mean over its corruptions and severities. Only the input images are
  corrupted (targets, the auto-encoder's included, stay clean); every model sees the same corrupted images;
* PGD attacks (L∞, no random start, the 0-255 pixel scale) on each attacked task's own loss at each ε, scoring
  every task under each attack.

Results go to ``<out>/robustness/``: ``robustness.json`` (every number), ``robustness.csv``, ``robustness.md``
(the two tables, mean ± std over seeds), ``corruptions.png`` and ``pgd.png``. A report already there is extended
when it was made with the same settings (its other methods and seeds stay in it) and refused, before any
training, when it was not: it is never replaced. A run whose evaluation fails (e.g. out of memory under the attack)
gets a failed row saying why and the exit code 1; the other runs' numbers are written, and numbers an earlier
report holds for that method and seed are kept.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.cli import (RankFailure, UsageError, add_out_arg, add_run_args, config_from_args, out_folder,
                            parse_list, parse_seeds, run_main)
from benchmarks.harness import check_jobs, dry_run, exit_code, method_jobs, train, with_sources
from benchmarks.perturbations import (CATEGORIES, CORRUPTIONS, ELASTIC_REFERENCE_SIZE, EPSILONS, MIN_SIZE,
                                      SEVERITIES, corrupt_images, corruptions_package, pgd_attack)
from benchmarks.report import earlier_report
from benchmarks.robustness_report import eps_key, write_report
from mtsl_plugin import distributed
from mtsl_plugin.config import RunConfig
from mtsl_plugin.experiment import load_run
from mtsl_plugin.methods import method_names
from mtsl_plugin.trainer import MTLTrainer

DEFAULT_ATTACK_TASKS = ("S", "D")
Batches = Iterable[tuple[torch.Tensor, Mapping[str, torch.Tensor]]]
IndexedBatches = Iterable[tuple[int, tuple[torch.Tensor, Mapping[str, torch.Tensor]]]]
Perturb = Callable[[MTLTrainer, torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="onenet,mtsl", help="comma-separated method names")
    add_run_args(p)
    add_out_arg(p, "robustness")
    p.add_argument("--corruptions", default="all", help="'all', 'none' or categories: " + ",".join(CATEGORIES))
    p.add_argument("--epsilons", default=",".join(f"{e:g}" for e in EPSILONS),
                   help="PGD budgets on the 0-255 pixel scale, or 'none'")
    p.add_argument("--attack-tasks", default=None,
                   help=f"tasks whose loss PGD attacks (default {','.join(DEFAULT_ATTACK_TASKS)}: those of them the "
                        "runs have)")
    return p.parse_args(argv)


def parse_categories(text: str) -> list[str]:
    """``all``, ``none`` or a comma-separated list of :data:`CATEGORIES` names."""
    if text.strip() == "all":
        return list(CATEGORIES)
    if text.strip() == "none":
        return []
    categories = parse_list(text, "corruptions")
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise UsageError(f"unknown corruption categor{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; "
                         f"choose from all, none, {', '.join(CATEGORIES)}")
    return list(dict.fromkeys(categories))


def parse_epsilons(text: str) -> list[float]:
    """``none`` or comma-separated positive budgets on the 0-255 scale (at most 255), no two with one
    :func:`~benchmarks.robustness_report.eps_key`."""
    if text.strip() == "none":
        return []
    epsilons = []
    for item in parse_list(text, "epsilons"):
        try:
            eps = float(item)
        except ValueError:
            raise UsageError(f"--epsilons must be comma-separated numbers, got {item!r}") from None
        if not np.isfinite(eps) or not 0 < eps <= 255:  # 255 already lets PGD reach every image in [0, 1]
            raise UsageError(f"--epsilons must be positive numbers of at most 255 (0-255 scale), got {item!r}")
        epsilons.append(eps)
    check_budgets(epsilons)
    return sorted(set(epsilons))


def parse_attack_tasks(text: str | None, tasks: Sequence[str]) -> list[str]:
    """The attacked tasks among ``tasks`` (the runs' tasks). The default (``None``: S, D) keeps those the runs
    have; a task named explicitly, ``S,D`` included, must be one of ``tasks``."""
    requested = list(DEFAULT_ATTACK_TASKS) if text is None else parse_list(text, "attack-tasks")
    missing = [t for t in requested if t not in tasks]
    if missing and text is not None:
        raise UsageError(f"--attack-tasks: the runs have no task {', '.join(missing)}; choose from "
                         f"{', '.join(tasks)}")
    return [t for t in dict.fromkeys(requested) if t in tasks]


def settings_of(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two reports' numbers comparable: the runs' configuration (seed and device aside), the corruptions
    (with elastic_transform, the image size its parameters are scaled from: reports without one hold the package's
    own elastic numbers) and the package and version that corrupted (reports without one: unknown), severities,
    budgets and the set of attacked tasks (each attack is evaluated on its own, so their order changes no
    number)."""
    elastic = any("elastic_transform" in names for names in meta["categories"].values())
    return {"config": RunConfig.from_dict(meta["config"]).fingerprint(exclude=("device", "seed")),
            **{k: meta[k] for k in ("categories", "severities", "epsilons")},
            "attack_tasks": sorted(meta["attack_tasks"]),
            "elastic_reference_size": meta.get("elastic_reference_size") if elastic else None,
            "corruptions_package": meta.get("corruptions_package") if meta["categories"] else None}


def check_budgets(epsilons: Iterable[float]) -> None:
    """Refuse, with a ``ValueError`` of one sentence, two distinct budgets with one
    :func:`~benchmarks.robustness_report.eps_key`: the numbers of one would overwrite the other's."""
    seen: dict[str, float] = {}
    for eps in epsilons:
        other = seen.setdefault(eps_key(eps), eps)
        if other != eps:
            raise ValueError(f"the PGD budgets {other!r} and {eps!r} agree to 6 significant digits, so their numbers "
                             f"would share the key {eps_key(eps)}; give budgets that differ in those digits")


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate_models(trainers: Sequence[MTLTrainer], batches: Batches, perturb: Perturb | None = None,
                    tick: Callable[[], None] = lambda: None) -> list[dict[str, float]]:
    """Each trainer's task metrics over ``batches`` of ``(images (N, 3, H, W), targets)``, in one pass.

    Every batch is read once and fed to all models; ``perturb(trainer, images, targets)`` (e.g. a PGD attack)
    replaces a model's input images. Metrics accumulate over batches exactly as ``trainer.evaluate`` does.
    """
    for trainer in trainers:
        trainer.model.eval()
        for task in trainer.task_name:
            trainer.task_dict[task]["metrics_fn"].reinit()
    for images, gts in batches:
        for trainer in trainers:
            x = images.to(trainer.device)
            if perturb is not None:
                x = perturb(trainer, x, gts)
            with torch.no_grad(), trainer.autocast():
                preds = trainer.model(x)
            for task in trainer.task_name:
                trainer.task_dict[task]["metrics_fn"].update_fun(preds[task].float(), gts[task].to(trainer.device))
            tick()
    return [{t: float(tr.task_dict[t]["metrics_fn"].score_fun()[0]) for t in tr.task_name} for tr in trainers]


def batch_seed(corruption: str, severity: int, batch: int) -> int:
    """The corruption seed of one test batch: derived from (corruption index, severity, batch index)."""
    return int(np.random.SeedSequence([CORRUPTIONS.index(corruption), severity, batch]).generate_state(1)[0])


def corrupted(batches: IndexedBatches, corruption: str, severity: int) -> Batches:
    """``batches`` (each with its index in the test loader) with their images corrupted (targets untouched),
    made one batch at a time; the seed of a batch's corruption depends on its index."""
    for index, (images, gts) in batches:
        yield corrupt_images(images, corruption, severity, batch_seed(corruption, severity, index)), gts


def pgd_perturbation(task: str, eps: float) -> Perturb:
    """A :data:`Perturb` that attacks ``task``'s own loss with PGD at budget ``eps`` (0-255 scale)."""
    def perturb(trainer: MTLTrainer, images: torch.Tensor, gts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        def model_fn(x: torch.Tensor) -> torch.Tensor:
            with trainer.autocast():
                return trainer.model(x)[task].float()

        return pgd_attack(model_fn, trainer.task_dict[task]["loss_fn"].compute_loss, images,
                          gts[task].to(trainer.device), eps)

    return perturb


def evaluate_runs(trainers: Sequence[MTLTrainer], batches: Callable[[], IndexedBatches], categories: Sequence[str],
                  epsilons: Sequence[float], attack_tasks: Sequence[str], progress: bool) -> list[dict[str, Any]]:
    """Clean, corrupted and attacked metrics of models that share one test set (``batches()`` iterates this
    process's batches of it with their indices in the test loader: all of them, or a rank's share under torchrun,
    :func:`mtsl_plugin.distributed.own_batches`; the metrics are summed across the ranks).

    Returns per trainer ``{"clean": {task: m}, "corruptions": {name: {severity: {task: m}}},
    "categories": {category: {task: mean over its corruptions and severities}},
    "pgd": {attacked task: {eps: {task: m}}}}`` (severity and ε keys are strings).
    """
    check_budgets(epsilons)
    n_batches = sum(1 for _ in batches())
    names = [n for c in categories for n in CATEGORIES[c]]
    attacks = [(t, e) for t in attack_tasks for e in epsilons]
    total = n_batches * len(trainers) * (1 + len(names) * len(SEVERITIES) + len(attacks))
    records: list[dict[str, Any]] = [{"clean": {}, "corruptions": {}, "categories": {}, "pgd": {}} for _ in trainers]
    with tqdm(total=total, desc="robustness", disable=None if progress else True) as bar:
        def run(label: str, data: Batches, perturb: Perturb | None = None) -> list[dict[str, float]]:
            bar.set_postfix_str(label)
            return evaluate_models(trainers, data, perturb, tick=bar.update)

        def plain() -> Batches:
            return (batch for _, batch in batches())

        for record, scores in zip(records, run("clean", plain())):
            record["clean"] = scores
        for name in names:
            for severity in SEVERITIES:
                for record, scores in zip(records, run(f"{name} {severity}", corrupted(batches(), name, severity))):
                    record["corruptions"].setdefault(name, {})[str(severity)] = scores
        for task, eps in attacks:
            for record, scores in zip(records, run(f"PGD {task} ε={eps:g}", plain(), pgd_perturbation(task, eps))):
                record["pgd"].setdefault(task, {})[eps_key(eps)] = scores
    for record in records:
        for category in categories:
            per_level = [s for n in CATEGORIES[category] for s in record["corruptions"][n].values()]
            record["categories"][category] = {t: statistics.fmean(s[t] for s in per_level) for t in record["clean"]}
    return records


def evaluate_each(labels: Sequence[str], evaluate: Callable[[Sequence[str]], list[dict[str, Any]]]
                  ) -> dict[str, dict[str, Any] | Exception]:
    """Each label's record of ``evaluate(labels)`` (e.g. :func:`evaluate_runs` of those runs' models), or the
    exception its evaluation raised. All labels are evaluated in one pass (each batch perturbed once for all
    models); when that pass fails, each label alone, so that one run's failure (out of memory, a model or task
    loss the attack cannot take a gradient through) loses no other run's numbers. Under torchrun a failure
    stops the command instead (:class:`~benchmarks.cli.RankFailure`): the other ranks may be waiting in a
    collective of the failed pass."""

    def attempt(some: Sequence[str]) -> list[dict[str, Any]] | Exception:
        try:
            return evaluate(some)
        except Exception as exc:  # recorded in the run's row, as a failed training is
            if not distributed.raised_on_every_rank(exc):
                raise RankFailure(f"evaluating {', '.join(some)} failed on rank {distributed.rank()}: {exc} (under "
                                  "torchrun a failure of one rank stops every rank)") from exc
            return exc

    whole = attempt(labels)
    if not isinstance(whole, Exception):
        return dict(zip(labels, whole))
    if len(labels) == 1:
        return {labels[0]: whole}
    alone = {label: attempt([label]) for label in labels}
    return {label: r if isinstance(r, Exception) else r[0] for label, r in alone.items()}


def merge_runs(earlier: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The runs of an earlier report of the same settings extended with ``new`` ones (earlier first): a new run
    replaces the earlier record of its label and seed, except that a new failure never replaces earlier numbers
    (they measure the same settings; the failure is reported on stderr and in the exit code)."""
    def key(run: Mapping[str, Any]) -> tuple[str, int]:
        return run["label"], run["seed"]

    earlier_ok = {key(r): r for r in earlier if r["status"] == "ok"}
    latest = [earlier_ok.get(key(r), r) if r["status"] != "ok" else r for r in new]
    replaced = {key(r) for r in latest}
    return [dict(r) for r in earlier if key(r) not in replaced] + [dict(r) for r in latest]


# ----------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        config = config_from_args(args)
        requested = parse_list(args.methods, "methods")
        unknown = [m for m in requested if m not in method_names()]
        if unknown:
            raise UsageError(f"unknown method(s) {unknown}; registered: {', '.join(sorted(method_names()))}")
        seeds, categories = parse_seeds(args.seeds), parse_categories(args.corruptions)
        epsilons, attack_tasks = parse_epsilons(args.epsilons), parse_attack_tasks(args.attack_tasks, config.tasks)
        height, width = config.data.height, config.data.width
        if categories and height is not None and width is not None and min(height, width) < MIN_SIZE:
            raise UsageError(f"corruptions need images of at least {MIN_SIZE}x{MIN_SIZE} pixels, the runs have "
                             f"{height}x{width}; pass --corruptions none")
        if not categories and not (epsilons and attack_tasks):
            raise UsageError("nothing to evaluate: no corruption category (--corruptions) and no PGD attack "
                             "(--epsilons and an attacked task the runs have)")
        methods = with_sources(requested, config)
        out = out_folder(args, "robustness", config)
        meta = {"config": config.to_dict(), "methods": methods, "seeds": seeds,
                "categories": {c: list(CATEGORIES[c]) for c in categories}, "severities": list(SEVERITIES),
                "epsilons": epsilons, "attack_tasks": attack_tasks, "elastic_reference_size": ELASTIC_REFERENCE_SIZE,
                "corruptions_package": corruptions_package() if categories else None}
        # before any training: a report of other settings is refused (and kept), one of these settings extended
        earlier = earlier_report(out / "robustness" / "robustness.json",
                                 lambda e: settings_of(e) == settings_of(meta), "a robustness report")
        jobs = method_jobs(methods, config, seeds)
        need = check_jobs(jobs, not args.no_progress, out, args.keep_checkpoints)
        if args.dry_run:
            return dry_run(jobs, out, need)
        out.mkdir(parents=True, exist_ok=True)
        is_main = distributed.is_main()  # under torchrun every rank trains and evaluates its share; rank 0 reports
        results = train(jobs, out, args)

        runs: list[dict[str, Any]] = []
        for seed in seeds:  # the runs of one seed share a test set: load them together, each batch made once
            pairs = [(job, r) for job, r in zip(jobs, results) if job.config.seed == seed]
            loaded: dict[str, tuple[MTLTrainer, Any, RunConfig]] = {}
            outcome: dict[str, dict[str, Any] | Exception] = {}
            for job, r in pairs:
                if r["status"] == "ok":
                    try:
                        loaded[job.label] = load_run(job.run_dir(out), config.device, not args.no_progress)
                    except Exception as exc:  # this run's row says why; the others go on
                        outcome[job.label] = exc
            if loaded:
                data = next(iter(loaded.values()))[1]
                count = len(data.batches(data.test))

                def evaluate(labels: Sequence[str]) -> list[dict[str, Any]]:
                    return evaluate_runs([loaded[label][0] for label in labels],
                                         lambda: distributed.own_batches(data.batches(data.test), count),
                                         categories, epsilons, attack_tasks, not args.no_progress and is_main)

                outcome.update(evaluate_each(list(loaded), evaluate))
            for job, r in pairs:
                record = {"label": job.label, "method": job.method, "seed": seed, "status": r["status"],
                          "error": r.get("error"), "metric_names": r.get("metric_names", {}),
                          "higher_is_better": r.get("higher_is_better", {}), "trained_by": r.get("trained_by")}
                scores = outcome.get(job.label, {})
                if isinstance(scores, Exception):
                    record.update(status="failed", error=f"evaluation failed: {scores}")
                    if is_main:
                        print(f"[{job.label} seed {seed}] evaluation failed: {scores}", file=sys.stderr, flush=True)
                    scores = {}
                runs.append({**record, **scores})
            loaded.clear()  # this seed's models go before the next seed's are loaded

        failed = any(r["status"] != "ok" for r in runs)
        runs = merge_runs(earlier["runs"] if earlier else [], runs)  # earlier runs stay in the report
        meta.update(methods=list(dict.fromkeys(r["label"] for r in runs)),
                    seeds=sorted({r["seed"] for r in runs}))
        if is_main:
            text = write_report(out / "robustness", meta, runs, list(config.tasks), categories, epsilons,
                                attack_tasks)
            print(text)
            print(f"robustness results in {out / 'robustness'}")
        return 1 if failed else exit_code(results)

    return run_main(body, args, distributed_ok=True)


if __name__ == "__main__":
    sys.exit(main())
