"""What every benchmark command shares: the run options, the jobs they train (reusing finished runs), and Δs.

A **job** is one training run: a registry method on one configuration and seed, stored in
``<out>/<label>/seed<k>/``. ``label`` names the row of a table; it is the method's name unless a command trains
a variant (``ablation.py``'s ``mtsl_noalign_avg``, ``sensitivity.py``'s ``mtsl_threshold0.5``...). A job whose
folder already holds a finished run of the same fingerprint (see :func:`~mtsl_plugin.experiment.run_fingerprint`)
is reused, one with a checkpoint of the same fingerprint is continued, and a folder holding a *different* run is
never overwritten: :func:`check_jobs` refuses the command before any training, naming the folder. So every command
can point ``--out`` at the folder of an earlier ``compare.py`` run and train only what is missing.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import baselines  # noqa: F401  (registers the baseline methods)
from benchmarks.report import aggregate, delta_mtl, format_table, write_csv, write_markdown
from mtsl_plugin import distributed
from mtsl_plugin.config import GROUPING_DATA, NETWORKS, PRESETS, SETTINGS, RunConfig, load_config_file, load_preset
from mtsl_plugin.experiment import method_spec, num_locations, run_fingerprint, run_method, write_json
from mtsl_plugin.learner.schedule import MTSLConfig
from mtsl_plugin.methods import build_method
from mtsl_plugin.network.backbones import architecture_family
from mtsl_plugin.plan import BranchingPlan
from mtsl_plugin.plan_figure import draw_plans
from mtsl_plugin.checkpoint import CheckpointError
from mtsl_plugin.plugins import PluginError, load_plugin
from mtsl_plugin.preflight import check_config, check_distributed
from mtsl_plugin.tasks import LOSS_SETS


class UsageError(Exception):
    """Bad command-line input; printed as one line, exit code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a batch scheduler's time limit or preemption, torchrun stopping the other ranks of a failed
    job), raised where the process is, so that it unwinds as Ctrl-C does: a checkpoint being written is abandoned
    and its temporary file removed (the previous one stays), and the command ends with one line on how to go on."""


class RankFailure(RuntimeError):
    """Under torchrun, a run that failed on this rank alone: the command stops (exit code 1), since the other ranks
    may be waiting in a collective of that run; torchrun then stops them."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises :class:`Terminated` (in the main thread; the handler before is restored)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: The exceptions a command turns into ``error: <message>`` and exit code 2 (OSError and CheckpointError: a file
#: that could not be read or written, e.g. on a full disk; their messages name it).
USER_ERRORS = (UsageError, PluginError, ValueError, OSError, CheckpointError)


def add_run_args(p: argparse.ArgumentParser, default_seeds: str = "0") -> None:
    """The options that define the runs (data, backbone, budget, MTSL's plugins); shared by every command."""
    p.add_argument("--preset", default="quick", choices=PRESETS)
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML file of configuration fields over the preset (as the presets or a results folder's "
                        "config.yaml write them); the options below go on top")
    p.add_argument("--setting", default=None, choices=SETTINGS,
                   help="encoder-decoder (default): 10 merge locations on a ResNet (paper Table 2); encoder: 6, "
                        "DeepLab heads (Table 1)")
    p.add_argument("--seeds", default=default_seeds, help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--dataset", default=None,
                   help="synthetic (default), nyuv2, cityscapes, or folder (your own data; declare its tasks in a "
                        "--config file, README 'Your own data and tasks')")
    p.add_argument("--data-root", default=None, help="folder of a preprocessed real data set or of folder data")
    p.add_argument("--no-augment", action="store_true",
                   help="real data: no random zoom and flip of the training samples (on by default)")
    p.add_argument("--grouping-data", default=None, choices=GROUPING_DATA,
                   help="the images MTSL's grouping decisions measure: holdout (default; a slice of the training "
                        "split no method trains on) or train (its first images, trained on too: the authors')")
    p.add_argument("--tasks", default=None,
                   help="comma-separated task names: built-in letters S,D,E,N,A or tasks declared in --config")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--fused", action="store_true",
                   help="MTSL and plans: run the nodes of a location as one vmapped call (grouped convolutions)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for weights and images")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the forward (compiled again after every structural edit; one process)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes that read and augment the samples besides the main one (default: none for "
                        "synthetic data or on the CPU, up to 8 for real data on a GPU); no result depends on it")
    p.add_argument("--backbone", default=None,
                   help="timm CNN name (default resnet18), e.g. resnet50, convnext_atto, efficientnet_b0, "
                        "regnetx_002, mobilenetv3_small_100; another family than the preset's drops its "
                        "backbone_args")
    p.add_argument("--network", default=None, choices=NETWORKS,
                   help="stage table: compact (the CPU presets', any timm CNN) or authors (the paper preset's, the "
                        "authors' code; ResNets)")
    p.add_argument("--pretrained", action="store_true", help="timm's pretrained backbone weights")
    p.add_argument("--weights", default=None, help="local backbone weights file")
    p.add_argument("--weighting", default=None, help="LibMTL weighting method, e.g. EW (default) or UW")
    p.add_argument("--weight-args", default=None, metavar="KEY=VALUE,...",
                   help="the weighting method's hyperparameters, e.g. mgda_gn=l2 for MGDA or T=2 for DWA (default: "
                        "LibMTL's command-line defaults)")
    p.add_argument("--losses", default=None, choices=LOSS_SETS,
                   help="the built-in tasks' losses: standard (default) or authors (the MTSL authors' code's)")
    p.add_argument("--task-weights", default=None, metavar="T=W,...",
                   help="fixed factors on the task losses before the weighting method, e.g. E=10,A=100 (default 1)")
    p.add_argument("--similarity", default=None, help="similarity plugin: cka (default) or rsa")
    p.add_argument("--grouping", default=None, help="grouping-solver plugin: authors (default, the authors' code), fewest_groups or exhaustive "
                        "(the paper's text's score)")
    p.add_argument("--amalgamator", default=None, help="amalgamator plugin (default att)")
    p.add_argument("--threshold", type=float, default=None, help="grouping threshold γ (default 0.8)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE", help="import a plugin module")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished run's resume checkpoint (optimizer and RNG state, about 3x the size of "
                        "its weights); by default a finished run keeps its weights (model.pt) only")


def add_out_arg(p: argparse.ArgumentParser, command: str, reuses: bool = True) -> None:
    """``--out`` of an evaluation command: a folder (default ``results/<command>-<preset>``, see
    :func:`out_folder`) that may hold earlier runs, which the command reuses (``reuses``)."""
    reused = "; may hold earlier runs, which are reused" if reuses else ""
    p.add_argument("--out", default=None, help=f"results folder (default results/{command}-<preset>){reused}")


def out_folder(args: argparse.Namespace, command: str, config: RunConfig) -> Path:
    """The command's results folder (``--out``, default ``results/<command>-<preset>``), checked; remembered on
    ``args`` for the line an interruption prints (:func:`run_main`)."""
    args.results_folder = check_out(Path(args.out or f"results/{command}-{config.preset}"))
    return args.results_folder


def check_out(out: Path) -> Path:
    """``out`` if it can be a results folder: a folder this process can write in, or one it can create (checked
    on its nearest existing parent, creating nothing); a file there, or in the way, is refused."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; name a folder for the results")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--out {out} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out} cannot be {'written' if existing == out else 'created'}: "
                         f"{existing} is not writable")
    return out


def check_jobs(jobs: Sequence["Job"], progress: bool = True, out: Path | None = None) -> None:
    """Check every configuration of ``jobs`` (:func:`~mtsl_plugin.preflight.check_config`) before any training;
    the seed only changes which synthetic scenes are drawn, so each configuration is checked once, and each real
    data set is read through once. No two jobs may share a folder, and with ``out`` no job's folder there may hold
    a run of another fingerprint (:func:`check_run_folders`). Under torchrun every job must be one that
    DistributedDataParallel can train (:func:`~mtsl_plugin.preflight.check_distributed`)."""
    folders: dict[tuple[str, int], Job] = {}
    for job in jobs:
        if folders.setdefault((job.label, job.config.seed), job) is not job:
            raise UsageError(f"two of the requested runs would share the folder {job.label}/seed{job.config.seed}; "
                             "give them distinct names")
        if distributed.active():
            architecture = method_spec(job.method, job.config, dict(job.arch_args)).architecture
            try:
                check_distributed(job.config.weighting, getattr(architecture, "arch_optimizer", None) is not None,
                                  job.config.compile)
            except ValueError as exc:
                raise UsageError(f"{job.label}: {exc}") from None
    if out is not None:
        check_run_folders(jobs, out)
    checked, scanned = set(), set()
    for job in jobs:
        key = json.dumps(job.config.replace(seed=0).to_dict(), sort_keys=True)
        if key in checked:
            continue
        check_config(job.config, scan=job.config.data not in scanned, progress=progress)
        checked.add(key)
        scanned.add(job.config.data)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The :class:`RunConfig` of :func:`add_run_args`' options (plugins named there must be loaded already)."""
    config = load_preset(args.preset)
    if args.config:
        config = load_config_file(args.config, base=config)
    data = config.data
    if args.no_augment:
        data = dataclasses.replace(data, augment=False)
    if args.grouping_data is not None:
        data = dataclasses.replace(data, grouping_data=args.grouping_data)
    if args.data_root is not None and (args.dataset or data.name) == "synthetic":
        raise UsageError(f"--data-root {args.data_root}: the data set is synthetic (generated, no folder); pass "
                         "--dataset nyuv2, cityscapes or folder too")
    if args.dataset is not None:  # a root of the configuration's own data set stays unless --data-root replaces it
        root = args.data_root if args.data_root is not None or args.dataset != data.name else data.root
        data = type(data)(**{**data.__dict__, "name": args.dataset, "root": root})
        if args.dataset != "synthetic":  # real data: use the whole split unless the preset is a smoke test
            data = type(data)(**{**data.__dict__, "train": data.train if config.preset == "smoke" else None,
                                 "test": data.test if config.preset == "smoke" else None})
    elif args.data_root is not None:  # the real data set of the preset or --config, read from another folder
        data = dataclasses.replace(data, root=args.data_root)
    mtsl = config.mtsl.to_dict()
    for key, value in (("similarity", args.similarity), ("grouping", args.grouping),
                       ("amalgamator", args.amalgamator), ("threshold", args.threshold)):
        if value is not None:
            mtsl[key] = value
    mtsl.update({k: False for k, flag in (("align", getattr(args, "no_align", False)),
                                          ("average_init", getattr(args, "no_average_init", False)),
                                          ("amalgamate", getattr(args, "no_amalgamation", False))) if flag})
    changes: dict[str, Any] = {"data": data, "mtsl": MTSLConfig.from_dict(mtsl)}
    for key in ("device", "setting"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    if args.fused:
        changes["fused"] = True
    if args.channels_last:
        changes["channels_last"] = True
    if args.compile:
        changes["compile"] = True
    if args.workers is not None:
        changes["workers"] = args.workers
    if args.tasks is not None:
        changes["tasks"] = parse_tasks(args.tasks)
    if getattr(args, "task_weights", None):
        changes["task_weights"] = {**config.task_weights, **parse_task_weights(args.task_weights)}
    if getattr(args, "weight_args", None):
        changes["weight_args"] = {**config.weight_args, **parse_pairs(args.weight_args, "weight-args", "mgda_gn=l2")}
    for key in ("backbone", "network", "weights", "weighting", "losses"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    if args.backbone is not None and architecture_family(args.backbone) is None:
        raise UsageError(f"--backbone {args.backbone!r} is not a timm model name (e.g. resnet18, convnext_atto, "
                         "efficientnet_b0, regnetx_002, mobilenetv3_small_100)")
    if args.backbone is not None and architecture_family(args.backbone) != architecture_family(config.backbone):
        changes["backbone_args"] = {}  # the preset's (e.g. a ResNet's channels) are another family's arguments
    if args.pretrained:
        changes["pretrained"] = True
    config = config.replace(**changes)
    return config  # the rest is checked with every job's configuration: check_jobs


def load_plugins(args: argparse.Namespace) -> None:
    for module in args.plugin:
        load_plugin(module)


def parse_list(text: str, what: str) -> list[str]:
    """``--what a,b,c`` as ``["a", "b", "c"]``; an empty list or item (``mtsl,``, ``0,,1``) is refused."""
    items = [x.strip() for x in text.split(",")]
    if items == [""]:
        raise UsageError(f"--{what} is empty")
    if "" in items:
        raise UsageError(f"--{what} has an empty item: {text!r}")
    return items


def distinct(values: Sequence[Any], what: str) -> list[Any]:
    """``values`` as a list if none is given twice (two equal values would be counted as two samples); else a
    :class:`UsageError` naming the first repeated one."""
    for index, value in enumerate(values):
        if value in values[:index]:
            raise UsageError(f"--{what}: {value} is given twice")
    return list(values)


def parse_tasks(text: str) -> tuple[str, ...]:
    """``--tasks S,D,E`` as ``("S", "D", "E")``; an empty list or name is refused (a task given twice is refused
    with the configuration, by :func:`check_jobs`)."""
    return tuple(parse_list(text, "tasks"))


def parse_pairs(text: str, option: str, example: str) -> dict[str, str]:
    """``--<option> a=1,b=x`` as ``{"a": "1", "b": "x"}``: non-empty keys, each once, and values."""
    pairs: dict[str, str] = {}
    for item in parse_list(text, option):
        key, equals, value = (part.strip() for part in item.partition("="))
        if not key or not equals or not value:
            raise UsageError(f"--{option} takes KEY=VALUE pairs, e.g. {example}; got {item!r}")
        if key in pairs:
            raise UsageError(f"--{option}: {key} is given twice")
        pairs[key] = value
    return pairs


def parse_task_weights(text: str) -> dict[str, float]:
    """``--task-weights E=10,A=100`` as ``{"E": 10.0, "A": 100.0}``."""
    weights = {}
    for task, value in parse_pairs(text, "task-weights", "E=10,A=100").items():
        try:
            weights[task] = float(value)
        except ValueError:
            raise UsageError(f"--task-weights: the weight of task {task} must be a number, got {value!r}") from None
    return weights


#: The largest seed: numpy, which every run seeds, takes seeds in 0..2**32 - 1.
MAX_SEED = 2**32 - 1


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` as ``[0, 1, 2]``: integers in 0..:data:`MAX_SEED`, none twice."""
    try:
        seeds = [int(s) for s in parse_list(text, "seeds")]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers, got {text!r}") from None
    for seed in seeds:
        if not 0 <= seed <= MAX_SEED:
            raise UsageError(f"--seeds: {seed} is not in 0..{MAX_SEED}")
    return distinct(seeds, "seeds")


def read_json(path: Path) -> Any:
    """The JSON in ``path``; a damaged file is a ``ValueError`` naming it."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} cannot be read as JSON ({exc})") from None


def refuse_torchrun() -> bool:
    """For a command that runs in one process: under torchrun, print the one-line refusal and return True."""
    if distributed.launched():
        print(f"error: {Path(sys.argv[0]).name} runs in one process; start it without torchrun", file=sys.stderr)
        return True
    return False


def run_main(main_body, args: argparse.Namespace, distributed_ok: bool = False) -> int:
    """Run a command's body; user errors become one line on stderr and exit code 2. Under torchrun a command
    that supports it (``distributed_ok``: compare, ablation, sensitivity, robustness) joins the process group;
    the others refuse to start."""
    if not distributed_ok and refuse_torchrun():
        return 2
    try:
        with sigterm_as_interrupt():
            load_plugins(args)
            if distributed.launched():
                args.device = distributed.init_from_env(args.device or "cpu")
            return main_body()
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RankFailure as exc:
        print(f"error: {exc}{how_to_go_on(args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: one line on how to go on, not a traceback
        if distributed.is_main():
            print(("terminated" if isinstance(exc, Terminated) else "interrupted") + how_to_go_on(args),
                  file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def how_to_go_on(args: argparse.Namespace) -> str:
    """``; <where a stopped command's finished runs are and the command that continues it>``, or nothing for a
    command that keeps no results folder."""
    folder = getattr(args, "results_folder", None)
    if folder is None:
        return ""
    return (f"; finished runs and the last checkpoint are kept in {folder}: "
            f"{getattr(args, 'continue_with', 'the same command again')} continues")


# ------------------------------------------------------------------------------------------------ jobs
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


def saved_run(run_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """The record of the run in ``run_dir`` (``result.json`` once finished, else ``config.json``), ``None`` if it
    holds none; a run of another fingerprint is refused (``ValueError`` naming the folder), so it is never
    overwritten."""
    for path in (run_dir / "result.json", run_dir / "config.json"):
        if path.exists():
            record = read_json(path)
            if record.get("fingerprint") != fingerprint:
                raise ValueError(f"{run_dir} holds a run of another configuration; it is kept: choose another --out")
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


def run_job(job: Job, out: Path, results: list[dict[str, Any]], progress: bool,
            keep_checkpoints: bool = False) -> dict[str, Any]:
    """Train ``job`` (or reuse / continue its folder); raises on failure."""
    run_dir = job.run_dir(out)
    plan = retrained_plan(job, results)
    spec = method_spec(job.method, job.config, dict(job.arch_args))
    previous = saved_run(run_dir, run_fingerprint(job.method, job.config, spec, plan))
    tag = f"[{job.label} seed {job.config.seed}]"
    if previous is not None and previous.get("status") == "ok":  # only result.json has a status
        if distributed.is_main():
            print(f"{tag} reusing the finished run in {run_dir}", flush=True)
        return {**previous, "label": job.label}
    if distributed.is_main():
        print(f"{tag} training", flush=True)
    result = run_method(job.config, job.method, run_dir, resume=True, progress=progress, plan=plan,
                        keep_checkpoint=keep_checkpoints, arch_args=dict(job.arch_args), check=False)  # check_jobs
    return {**result, "label": job.label}


def run_jobs(jobs: Sequence[Job], out: Path, progress: bool, keep_checkpoints: bool = False) -> list[dict[str, Any]]:
    """Run every job in order; a failing job is recorded (``status: failed``, ``error.txt`` in its folder) and the
    others still run. Under torchrun that holds for failures every rank raised together (a NaN loss, a write that
    failed on rank 0, ranks whose networks differ); a failure of one rank alone (out of memory, a file it could not
    read) stops the command (:class:`RankFailure`, its traceback in ``error<rank>.txt``). Returns one result
    record per job, ``label`` added. A finished run keeps its weights and records; its resume checkpoint is removed
    unless ``keep_checkpoints``."""
    results: list[dict[str, Any]] = []
    for job in jobs:
        try:
            results.append(run_job(job, out, results, progress, keep_checkpoints))
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # keep going with the other jobs; the table shows the failure
            alone = not distributed.raised_on_every_rank(exc)  # then the others may wait in this run's collectives
            with contextlib.suppress(OSError):  # the traceback is a courtesy; a full disk must not lose the row
                job.run_dir(out).mkdir(parents=True, exist_ok=True)
                if distributed.is_main() or alone:
                    (job.run_dir(out) / f"error{distributed.rank() or ''}.txt").write_text(traceback.format_exc())
            if alone:
                raise RankFailure(f"[{job.label} seed {job.config.seed}] failed on rank {distributed.rank()}: {exc} "
                                  "(under torchrun a failure of one rank stops every rank)") from exc
            print(f"[{job.label} seed {job.config.seed}] failed: {exc}", file=sys.stderr, flush=True)
            results.append({"method": job.method, "label": job.label, "seed": job.config.seed, "status": "failed",
                            "error": str(exc)})
    return results


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
    """Write ``results`` (:func:`write_results`) and a command's own ``table`` as ``folder/name``, and print it."""
    write_results(results, folder)
    write_markdown(table, folder / name)
    print(table)
    print(f"results in {folder}")


def write_results(results: list[dict[str, Any]], folder: Path) -> str:
    """Write the comparison table (``table.md``, ``results.csv``), every run's record (``results.json``) and the
    final architectures side by side (``architecture.png``) into ``folder``; return the table."""
    ok = [r for r in results if r["status"] == "ok"]
    tasks: list[str] = []
    higher: dict[str, bool] = {}
    metric_names: dict[str, str] = {}
    for r in ok:  # a task sweep has runs of different task sets
        tasks += [t for t in r["metrics"] if t not in tasks]
        higher.update(r["higher_is_better"])
        metric_names.update(r.get("metric_names") or {})
    aggregated = aggregate(results)
    table = format_table(aggregated, tasks, higher, metric_names or None)
    write_markdown(table, folder / "table.md")
    write_csv(aggregated, folder / "results.csv")
    write_json(folder / "results.json", [{k: v for k, v in r.items() if k != "history"} for r in results])
    plans = final_plans(results)
    if plans:
        draw_plans(plans, folder / "architecture.png")
    return table
