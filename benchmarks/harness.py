"""What every benchmark command shares: the jobs they train (reusing finished runs), their Δs and results files
(the command-line side, run options and exit codes, is :mod:`benchmarks.cli`).

A **job** is one training run: a registry method on one configuration and seed, stored in
``<out>/<label>/seed<k>/``. ``label`` names the row of a table; it is the method's name unless a command trains
a variant (``ablation.py``'s ``mtsl_noalign_avg``, ``sensitivity.py``'s ``mtsl_threshold0.5``...). A job whose
folder already holds a finished run of the same fingerprint (see :func:`~mtsl_plugin.experiment.run_fingerprint`)
is reused, one with a checkpoint of the same fingerprint is continued, and a folder holding a *different* run is
never overwritten: :func:`check_jobs` refuses the command before any training, naming the folder. So every command
can point ``--out`` at the folder of an earlier ``compare.py`` run and train only what is missing, also while another
command trains there: a job whose folder another process holds (:mod:`~mtsl_plugin.folder_lock`) is put off,
then waited for (:func:`run_jobs`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import baselines  # noqa: F401  (registers the baseline methods)
from benchmarks.cli import RankFailure, UsageError, nearest_existing
from benchmarks.report import aggregate, delta_mtl, format_table, with_provenance_note, write_csv, write_markdown
from mtsl_plugin import distributed, folder_lock
from mtsl_plugin.architecture import check_arch_args
from mtsl_plugin.config import RunConfig
from mtsl_plugin.experiment import (CHECKPOINT, ForeignRun, method_spec, num_locations, run_fingerprint, run_method,
                                    single_task_bytes, training_epochs, write_json)
from mtsl_plugin.methods import build_method
from mtsl_plugin.plan import BranchingPlan
from mtsl_plugin.plan_figure import draw_plans
from mtsl_plugin.preflight import check_config, check_distributed


@dataclass(frozen=True)
class Job:
    """One run to train: ``method`` on ``config`` (seed included), stored under ``<out>/<label>/seed<k>``.

    ``plan`` is the plan a retraining ("-R") method retrains; when ``None`` it is the final plan of the
    method's source trained earlier in the same job list (same seed and configuration).
    """

    label: str
    method: str
    config: RunConfig
    plan: BranchingPlan | None = None
    arch_args: tuple[tuple[str, Any], ...] = ()  # overrides of the method's architecture options

    def run_dir(self, out: Path) -> Path:
        return out / self.label / f"seed{self.config.seed}"


def source_of(method: str, config: RunConfig) -> str | None:
    """The method whose final plan ``method`` retrains ("-R" methods), else ``None``. A builder that fails
    here fails again, reported, when its run starts."""
    try:
        return build_method(method, config, num_locations(config)).retrains
    except Exception:  # noqa: BLE001
        return None


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


def method_jobs(methods: Sequence[str], config: RunConfig, seeds: Sequence[int]) -> list[Job]:
    """One job per method and seed, labelled by the method's name (method-major order)."""
    return [Job(m, m, config.replace(seed=s)) for m in methods for s in seeds]


def retrained_plan(job: Job, results: list[dict[str, Any]]) -> BranchingPlan | None:
    """For a "-R" job, the plan it retrains: its own ``plan``, else the final plan of its source's run of the
    same seed and configuration trained earlier in this job list."""
    source = source_of(job.method, job.config)
    if source is None or job.plan is not None:
        return job.plan
    for r in results:
        if (r["method"] == source and r["seed"] == job.config.seed and r["status"] == "ok" and r.get("plan")
                and r.get("config_fingerprint") == job.config.fingerprint()):
            return BranchingPlan.from_dict(r["plan"])
    raise ValueError(f"{job.method} retrains the plan of {source}, whose run (seed {job.config.seed}) did not finish")


def read_json(path: Path) -> Any:
    """The JSON in ``path``; a damaged file is a ``ValueError`` naming it."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} cannot be read as JSON ({exc})") from None


def saved_run(run_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """The record of the run in ``run_dir`` (``result.json`` once finished, else ``config.json``), ``None`` if it
    holds none; a run of another fingerprint is refused (``ValueError`` naming the folder), so it is never
    overwritten (:class:`~mtsl_plugin.experiment.ForeignRun`)."""
    for path in (run_dir / "result.json", run_dir / "config.json"):
        if path.exists():
            record = read_json(path)
            if record.get("fingerprint") != fingerprint:
                raise ForeignRun(f"{run_dir} holds a run of another configuration; it is kept: choose another --out")
            return record
    return None


def check_run_folders(jobs: Sequence[Job], out: Path) -> None:
    """Before any training: no job's folder in ``out`` holds a run of another fingerprint (what :func:`run_job`
    would refuse when the job's turn comes). A "-R" job retraining the plan of a source run in the same list is
    skipped: its fingerprint is known once that run has finished."""
    for job in jobs:
        run_dir = job.run_dir(out)
        if not ((run_dir / "result.json").exists() or (run_dir / "config.json").exists()):
            continue
        try:
            spec = method_spec(job.method, job.config, dict(job.arch_args))
        except Exception:  # noqa: BLE001  a builder that fails here fails again, reported, when its run starts
            continue
        if spec.retrains is None or job.plan is not None:
            saved_run(run_dir, run_fingerprint(job.method, job.config, spec, job.plan))


#: The margin on the single-task networks' size for what a method holds besides (cross-stitch's units, the
#: searches' gates, MTAN's attention, Adam's step counts, RNG states and records in a checkpoint).
SIZE_MARGIN = 1.1


def optimizer_copies(optimizer: dict[str, Any]) -> int:
    """Copies of the weights the optimizer ``optimizer`` configures keeps per parameter, at least Adam's two
    moments: three for Adam with ``amsgrad`` (the moments' running maximum) and for RMSprop with ``momentum`` and
    ``centered`` (square average, momentum buffer, gradient average)."""
    name = optimizer.get("optim")
    copies = {"adam": 2 + bool(optimizer.get("amsgrad")),
              "rmsprop": 1 + bool(optimizer.get("momentum")) + bool(optimizer.get("centered"))}.get(name, 2)
    return max(2, copies)


def disk_need(jobs: Sequence[Job], out: Path, keep_checkpoints: bool = False) -> int:
    """Bytes the runs of ``jobs`` not yet finished in ``out`` may write there at most: each run's weights (bounded
    by the single-task networks' size, :func:`~mtsl_plugin.experiment.single_task_bytes`, times
    :data:`SIZE_MARGIN`), its checkpoint when ``keep_checkpoints`` keeps it, and two checkpoints of the run in
    training (the last one stays until the next, written to a temporary file, is renamed over it; removed when
    the run finishes). A checkpoint holds the weights and the optimizer's copies of them
    (:func:`optimizer_copies`: Adam's two moments make it three times the weights). The checkpoint an unfinished
    run left in ``out`` is on the disk already (free space does not count it): it is that run's last checkpoint
    when it continues, and a kept checkpoint replaces it. Another run's leftover stays until that run finishes,
    so it frees nothing for the run in training. JSON records and figures take kilobytes."""
    bounds, sizes = [], {}  # per unfinished run: its weights, its checkpoint, the checkpoint it left
    for job in jobs:
        if (job.run_dir(out) / "result.json").exists():  # finished: reused
            continue
        checkpoint = job.run_dir(out) / CHECKPOINT
        key = job.config.fingerprint(exclude=("device", "seed", "mtsl"))
        if key not in sizes:  # the device, seed, execution and MTSL's options change no network's size
            weights = SIZE_MARGIN * single_task_bytes(job.config)
            sizes[key] = weights, (1 + optimizer_copies(job.config.optimizer)) * weights
        bounds.append((*sizes[key], checkpoint.stat().st_size if checkpoint.is_file() else 0))
    if not bounds:
        return 0
    weights = sum(w for w, _, _ in bounds)
    if keep_checkpoints:  # every run's checkpoint stays, and the run in training writes its next beside its last
        need = weights + sum(c - left for _, c, left in bounds) + 2 * max(c for _, c, _ in bounds)
    else:  # one run trains at a time: its last checkpoint (the one it left, when it continues) and the one written
        need = weights + max(max(c, 2 * c - left) for _, c, left in bounds)
    return max(0, int(need))


def check_disk(jobs: Sequence[Job], out: Path, keep_checkpoints: bool = False) -> int:
    """Before any training: the disk holding ``out`` has room for :func:`disk_need` (a run that fills the disk
    fails at its next checkpoint, keeping the one before, after hours on a large preset); returns that need."""
    need = disk_need(jobs, out, keep_checkpoints)
    free = shutil.disk_usage(nearest_existing(out)).free
    if need > free:
        raise UsageError(f"--out {out}: the runs to train may write up to {size_text(need)} (their weights, and "
                         f"{'their' if keep_checkpoints else 'the'} checkpoints with the optimizer's state), but the "
                         f"disk holding it has {size_text(free)} free; free some space or choose another --out")
    return need


def size_text(size: float) -> str:
    """``size`` bytes as MiB or GiB, one decimal."""
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def check_jobs(jobs: Sequence["Job"], progress: bool = True, out: Path | None = None,
               keep_checkpoints: bool = False) -> int | None:
    """Check every configuration of ``jobs`` (:func:`~mtsl_plugin.preflight.check_config`) before any training;
    the seed only changes which synthetic scenes are drawn, so each configuration is checked once, and each real
    data set is read through once. No two jobs may share a folder, and with ``out`` no job's folder there may hold
    a run of another fingerprint (:func:`check_run_folders`). Every job's ``arch_args`` must be ones its
    architecture takes (:func:`~mtsl_plugin.architecture.check_arch_args`), and under torchrun every job must be one
    that DistributedDataParallel can train (:func:`~mtsl_plugin.preflight.check_distributed`). With ``out``, the
    disk holding it must have room for the runs (:func:`check_disk`; ``keep_checkpoints`` as the command keeps
    them), and the bytes they may write are returned (``None`` without ``out``)."""
    folders: dict[tuple[str, int], Job] = {}
    learners, architectures = [], []
    for job in jobs:
        if folders.setdefault((job.label, job.config.seed), job) is not job:
            raise UsageError(f"two of the requested runs would share the folder {job.label}/seed{job.config.seed}; "
                             "give them distinct names")
        try:
            spec = method_spec(job.method, job.config, dict(job.arch_args))
        except Exception:  # noqa: BLE001  a method that cannot be built fails in its own row (run_job)
            learners.append(None)
            architectures.append(None)
            continue
        learners.append(spec.learner.config if spec.learner is not None else None)
        architectures.append(spec.architecture)
        try:
            check_arch_args(spec.architecture, len(job.config.tasks), num_locations(job.config), spec.arch_args,
                            epochs=training_epochs(job.config, spec))
            if distributed.active():
                check_distributed(job.config.weighting, getattr(spec.architecture, "arch_optimizer", None) is not None,
                                  job.config.compile)
        except ValueError as exc:
            raise UsageError(f"{job.label}: {exc}") from None
    if out is not None:
        check_run_folders(jobs, out)
    checked, scanned = set(), set()
    for job, mtsl, architecture in zip(jobs, learners, architectures):
        # an architecture matters to the check only where it splits the training set (training_sets: BMTAS)
        splits = hasattr(architecture, "search_sizes")
        key = json.dumps([job.config.replace(seed=0).to_dict(), mtsl and mtsl.to_dict(),
                          f"{architecture.__module__}.{architecture.__qualname__}" if splits else None],
                         sort_keys=True)
        if key in checked:
            continue
        check_config(job.config, scan=job.config.data not in scanned, progress=progress, learner=mtsl,
                     architecture=architecture)
        checked.add(key)
        scanned.add(job.config.data)
    return check_disk(jobs, out, keep_checkpoints) if out is not None else None


def dry_run(jobs: Sequence[Job], out: Path | None, need: int | None = None) -> int:
    """``--dry-run``, after the command's checks passed: print what each job would do (reuse its finished run,
    continue its checkpoint, train, or wait for the process training in its folder) and ``need``, the bytes the
    runs may write (what :func:`check_jobs` returned), and write nothing; exit code 0."""
    if distributed.is_main():
        for job in jobs if out is not None else ():
            run_dir = job.run_dir(out)
            who = folder_lock.busy(run_dir)
            action = (f"wait for {who}, which trains it, then reuse or continue its run" if who else
                      "reuse the finished run" if (run_dir / "result.json").exists() else
                      "continue from the checkpoint" if (run_dir / CHECKPOINT).exists() else "train")
            print(f"[{job.label} seed {job.config.seed}] would {action} in {run_dir}")
        disk = f"; the runs may write up to {size_text(need)}" if need is not None else ""
        print(f"dry run: every check passed{disk}; nothing was trained or written", flush=True)
    return 0


def run_job(job: Job, out: Path, results: list[dict[str, Any]], progress: bool,
            keep_checkpoints: bool = False, wait: bool = True) -> dict[str, Any]:
    """Train ``job`` (or reuse / continue its folder); raises on failure. A folder another process trains in (a
    second command on the same ``--out``) is waited for, then its finished run reused (or, if that process
    stopped early, its checkpoint continued); without ``wait`` it raises
    :class:`~mtsl_plugin.folder_lock.FolderBusy` instead."""
    run_dir = job.run_dir(out)
    tag = f"[{job.label} seed {job.config.seed}]"

    def say(text: str) -> None:
        if distributed.is_main():
            print(f"{tag} {text}", flush=True)

    try:  # every rank computes these alike from the same records, so a failure here is every rank's
        plan = retrained_plan(job, results)
        spec = method_spec(job.method, job.config, dict(job.arch_args))
    except Exception as exc:
        raise distributed.on_every_rank(exc)
    with folder_lock.holding(run_dir, wait=wait, on_wait=lambda who: say(f"waiting for {who}, which trains it")):
        try:  # read under the lock, which no other process then writes: alike on every rank
            previous = saved_run(run_dir, run_fingerprint(job.method, job.config, spec, plan))
        except ValueError as exc:
            raise distributed.on_every_rank(exc)
        if previous is not None and previous.get("status") == "ok":  # only result.json has a status
            say(f"reusing the finished run in {run_dir}")
            if previous.get("checkpoint_kept") is False and not keep_checkpoints and distributed.is_main():
                (run_dir / CHECKPOINT).unlink(missing_ok=True)  # a stop between result.json and its removal left it
            result = previous
        else:
            say("training")
            result = run_method(job.config, job.method, run_dir, resume=True, progress=progress, plan=plan,
                                keep_checkpoint=keep_checkpoints, arch_args=dict(job.arch_args),
                                check=False)  # check_jobs checked
        if distributed.is_main():  # an earlier failure's traceback (error.txt, error<rank>.txt) no longer holds
            for stale in run_dir.glob("error*.txt"):
                stale.unlink(missing_ok=True)
    return {**result, "label": job.label}


def retrains(job: Job, source: Job) -> bool:
    """Whether ``job`` retrains the final plan of ``source``'s run (see :func:`retrained_plan`)."""
    return (job.plan is None and source.method == source_of(job.method, job.config)
            and source.config.fingerprint() == job.config.fingerprint())


def run_jobs(jobs: Sequence[Job], out: Path, progress: bool, keep_checkpoints: bool = False) -> list[dict[str, Any]]:
    """Run every job in order; a failing job is recorded (``status: failed``, ``error.txt`` in its folder) and the
    others still run. Under torchrun that holds for failures every rank raised together (a NaN loss, a write that
    failed on rank 0, ranks whose networks differ); a failure of one rank alone (out of memory, a file it could not
    read) stops the command (:class:`~benchmarks.cli.RankFailure`, its traceback in ``error<rank>.txt``). Returns
    one result record per job, in the order of ``jobs``, ``label`` added. A finished run keeps its weights and
    records; its resume checkpoint is removed unless ``keep_checkpoints``.

    A job whose folder another process trains in (commands sharing an ``--out``) is put off until the jobs after
    it have run, and then waited for (:func:`run_job`), so that commands on one folder share out its runs rather
    than queue behind each other; a job retraining the plan of a job put off is put off with it."""
    done: dict[int, dict[str, Any]] = {}
    put_off: list[int] = []
    for wait in (False, True):
        for i in put_off if wait else range(len(jobs)):
            job = jobs[i]
            if not wait and any(retrains(job, jobs[k]) for k in put_off):
                put_off.append(i)
                continue
            try:
                done[i] = run_job(job, out, [done[k] for k in sorted(done)], progress, keep_checkpoints, wait)
            except folder_lock.FolderBusy as busy:  # only without wait
                if distributed.is_main():
                    print(f"[{job.label} seed {job.config.seed}] {busy.holder}, trains it; back to it after the "
                          "other runs", flush=True)
                put_off.append(i)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # keep going with the other jobs; the table shows the failure
                done[i] = failed_row(job, out, exc)
    return [done[i] for i in range(len(jobs))]


def failed_row(job: Job, out: Path, exc: Exception) -> dict[str, Any]:
    """The result record of ``job``, which failed with ``exc`` (its traceback in the folder's ``error.txt``); a
    failure of this rank alone under torchrun raises :class:`~benchmarks.cli.RankFailure` instead."""
    alone = not distributed.raised_on_every_rank(exc)  # then the others may wait in this run's collectives
    with contextlib.suppress(OSError):  # the traceback is a courtesy; a full disk must not lose the row
        job.run_dir(out).mkdir(parents=True, exist_ok=True)
        if (distributed.is_main() or alone) and not isinstance(exc, ForeignRun):  # not into another's run
            (job.run_dir(out) / f"error{distributed.rank() or ''}.txt").write_text(traceback.format_exc())
    if alone:
        raise RankFailure(f"[{job.label} seed {job.config.seed}] failed on rank {distributed.rank()}: {exc} "
                          "(under torchrun a failure of one rank stops every rank)") from exc
    print(f"[{job.label} seed {job.config.seed}] failed: {exc}", file=sys.stderr, flush=True)
    return {"method": job.method, "label": job.label, "seed": job.config.seed, "status": "failed", "error": str(exc)}


def train(jobs: Sequence[Job], out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run ``jobs`` into ``out`` as the command's options ask (progress bars, kept checkpoints) and add every run's
    Δs (:func:`add_deltas`). Under torchrun every rank trains and only rank 0 shows progress."""
    results = run_jobs(jobs, out, not args.no_progress and distributed.is_main(), args.keep_checkpoints)
    add_deltas(results)
    return results


def exit_code(results: Sequence[dict[str, Any]]) -> int:
    """A command's exit code: 1 when any run failed (its row says why), else 0."""
    return 1 if any(r["status"] != "ok" for r in results) else 0


def add_deltas(results: list[dict[str, Any]]) -> None:
    """Δ_MTL and Δ_SD (percent) of every run against the STN run of the same configuration (seed, tasks, data,
    budget...; MTSL's options aside): the runs' ``reference_key``. A run without a usable reference (none, or a
    metric of 0 there) gets ``None``."""
    reference = {r["reference_key"]: r for r in results if r["method"] == "stn" and r["status"] == "ok"}
    for r in results:
        if r["status"] != "ok":
            continue
        ref = reference.get(r["reference_key"])
        if ref is None:
            r["delta_mtl"] = r["delta_sd"] = None
            continue
        sd = [t for t in ("S", "D") if t in r["metrics"]]
        try:
            r["delta_mtl"] = delta_mtl(r["metrics"], ref["metrics"], r["higher_is_better"])
            r["delta_sd"] = delta_mtl(r["metrics"], ref["metrics"], r["higher_is_better"], sd) if len(sd) == 2 else None
        except ValueError as error:  # e.g. an STN metric of 0: no Δ, but the table of the finished runs is written
            r["delta_mtl"] = r["delta_sd"] = None
            if distributed.is_main():
                print(f"[{r['label']} seed {r['seed']}] no Δ: {error}", file=sys.stderr, flush=True)


def final_plans(results: Sequence[dict[str, Any]]) -> dict[str, BranchingPlan]:
    """The final plan of each row (label) of ``results``, from its first successful seed."""
    plans: dict[str, BranchingPlan] = {}
    for r in results:
        if r["status"] == "ok" and r.get("plan"):
            plans.setdefault(r.get("label") or r["method"], BranchingPlan.from_dict(r["plan"]))
    return plans


def publish(results: list[dict[str, Any]], folder: Path, table: str, name: str) -> None:
    """Write ``results`` (:func:`write_results`) and a command's own ``table`` as ``folder/name``, and print it
    (with :func:`~benchmarks.report.provenance_note` under it when its runs disagree)."""
    write_results(results, folder)
    table = with_provenance_note(table, results)
    write_markdown(table, folder / name)
    print(table)
    print(f"results in {folder}")


def write_results(results: list[dict[str, Any]], folder: Path) -> str:
    """Write the comparison table (``table.md``, with :func:`~benchmarks.report.provenance_note` under it when its
    runs disagree; ``results.csv``), every run's record (``results.json``) and the final architectures side by side
    (``architecture.png``) into ``folder``; return the table."""
    ok = [r for r in results if r["status"] == "ok"]
    tasks: list[str] = []
    higher: dict[str, bool] = {}
    metric_names: dict[str, str] = {}
    for r in ok:  # a task sweep has runs of different task sets
        tasks += [t for t in r["metrics"] if t not in tasks]
        higher.update(r["higher_is_better"])
        metric_names.update(r.get("metric_names") or {})
    aggregated = aggregate(results)
    table = with_provenance_note(format_table(aggregated, tasks, higher, metric_names or None), results)
    write_markdown(table, folder / "table.md")
    write_csv(aggregated, folder / "results.csv")
    write_json(folder / "results.json", [{k: v for k, v in r.items() if k != "history"} for r in results])
    plans = final_plans(results)
    if plans:
        draw_plans(plans, folder / "architecture.png")
    return table
