"""Run one method on one seed end to end: data, model, training (with structural phases), evaluation, files.

Every run writes into its own folder::

    run_dir/
      .lock                  the run's lock: which process trains it (:mod:`~mtsl_plugin.folder_lock`), empty after
      config.json            the RunConfig and method, who trained it (``trained_by``: software, machine, data)
      checkpoint.pt          while the run is unfinished: written after structural phases, at the first epoch
                             end a minute after the last write, and at the end (what resume continues); removed
                             once result.json is written unless ``keep_checkpoint``
      model.pt               the trained weights (plan and model state only), what :func:`load_run` reads
      phase_<k>.json         plan after structural phase k, with the similarity matrices it was decided on
      plan.json              the final plan
      result.json            metrics, params, GMac, timings, history, trained_by (the harness's results.json
                             adds the Δs against STN)
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import Subset

from mtsl_plugin import distributed, folder_lock
from mtsl_plugin.architecture import MTSL, check_arch_args
from mtsl_plugin.checkpoint import CheckpointError, atomic_write, remove_partial_writes
from mtsl_plugin.config import RunConfig
from mtsl_plugin.data import TargetFiles, build_dataset
from mtsl_plugin.data.run_data import RunData
from mtsl_plugin.libmtl_compat import import_libmtl
from mtsl_plugin.methods import MethodSpec, build_method
from mtsl_plugin.network.cost import model_cost
from mtsl_plugin.network.backbones import create_stages, location_count
from mtsl_plugin.network.branched import BranchedNetwork
from mtsl_plugin.network.stages import StageFactory
from mtsl_plugin.plan import BranchingPlan
from mtsl_plugin.preflight import check_weighting
from mtsl_plugin.provenance import provenance
from mtsl_plugin.task_kinds import build_task_set
from mtsl_plugin.tasks import Task, libmtl_task_dict
from mtsl_plugin.trainer import MTLTrainer


CHECKPOINT = "checkpoint.pt"  # an unfinished run's resume state
WEIGHTS = "model.pt"  # a finished run's trained weights
# How a run's networks are first drawn, part of every run's fingerprint, so that a run drawn another way is never
# reused beside this code's: until 2026-12-07 the heads were drawn per width (no entry), now per task's name; until
# 2026-12-08 the authors' network started each residual block's last BatchNorm scale at 0 (timm's zero_init_last)
# and its first decoder block had no projection where the widths matched (only runs of that network changed).
INITIALISATION = "heads per task"
AUTHORS_INITIALISATION = "heads per task; residual BatchNorm scales at 1; dec1 projects"


def initialisation(config: RunConfig) -> str:
    """How ``config``'s networks are first drawn (:data:`INITIALISATION`), for fingerprints."""
    return AUTHORS_INITIALISATION if config.network == "authors" else INITIALISATION


class ForeignRun(ValueError):
    """A run folder holds a run of another configuration: it is refused and kept as it is (nothing, not even a
    failure's traceback, is written into it)."""


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename); a failed write names ``path`` and keeps the old file."""
    text = json.dumps(data, indent=1).encode()
    atomic_write(path, lambda handle: handle.write(text))


def write_config(path: Path, config: RunConfig) -> None:
    """Write ``config`` as YAML (atomically): every field, in the form ``--config`` reads back."""
    text = ("# the effective configuration of this results folder; pass it back with --config\n"
            + yaml.safe_dump(config.to_dict(), sort_keys=False)).encode()
    atomic_write(path, lambda handle: handle.write(text))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_run_tasks(config: RunConfig, num_classes: int) -> dict[str, Task]:
    """The run's tasks, in ``config.tasks`` order: declared ones from ``config.task_specs``, the others built in
    (S with ``num_classes``, the data set's; losses from the set ``config.losses``)."""
    return build_task_set(config.tasks, config.task_specs, num_classes, config.losses)


def build_split(config: RunConfig, split: str, *, n: int | None = None, augment: bool = False,
                progress: bool = True) -> Any:
    """One split of ``config``'s data set (the first ``n`` samples); folder data reads each task's files as its
    declaration says (:class:`~mtsl_plugin.data.folder.TargetFiles`, with each task's rule of which values hold one:
    the built-in ``D`` and a regression declared ``valid: positive`` count 0 as no value, as their losses and
    metrics do). ``progress``: a bar while synthetic scenes are rendered."""
    d = config.data
    targets = None
    if d.name == "folder":
        targets = {name: TargetFiles(task.target, config.task_specs.get(name, {}).get("folder", name),
                                     task.out_channels, task.valid)
                   for name, task in build_run_tasks(config, num_classes=0).items()}
    return build_dataset(d.name, split, root=d.root, height=d.height, width=d.width, n=n, seed=config.seed,
                         augment=augment, targets=targets, progress=progress)


def loader_workers(config: RunConfig) -> int:
    """How many processes read and augment samples besides the main one: ``config.workers``, or when it is None
    (the default) as many as help: no workers for synthetic data, which is drawn from memory faster than workers
    hand batches over (8 ms against 44 ms a batch of 16 at 256x512 on a 2-core CPU), and none on the CPU, where
    workers would take the training's cores. For files on a GPU, one less than this process's share of the cores
    (torchrun's processes on the machine share them), at most 8: reading and augmenting a batch of 8 NYUv2-size
    samples (288x384) takes 0.17 s in the main process of that CPU, likely longer than a GPU's step. The
    samples and their augmentations do not depend on the number (:class:`~mtsl_plugin.data.run_data.RunData`)."""
    if config.workers is not None:
        return config.workers
    if config.data.name == "synthetic" or torch.device(config.device).type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


def build_data(config: RunConfig, progress: bool = True) -> tuple[RunData, Any]:
    """The run's data and its whole (not augmented) training split. Grouping decisions measure
    ``config.data.holdout`` images of the training split (never validation/test): a slice cut from its end and
    trained on by no method (``grouping_data: holdout``), or its first images, trained on too (``train``, the
    authors': all of them when the split holds fewer, as their ``max_images``, so ``holdout: 800`` measures all
    795 NYUv2 training images as they do). Only the samples trained on are augmented (``config.data.augments``):
    grouping decisions see their images as they are, like the authors' similarity data. ``progress``: a bar while
    synthetic scenes are rendered."""
    d = config.data
    cut = d.grouping_data == "holdout"
    n_train = None if d.train is None else d.train + d.holdout * cut
    full = build_split(config, "train", n=n_train, progress=progress)
    trained = full if not d.augments else build_split(config, "train", n=n_train, augment=True, progress=progress)
    test = build_split(config, "test", n=d.test, progress=progress)
    if len(full) <= d.holdout * cut or len(full) < 4:
        raise ValueError(f"the training split of {d.name!r} has {len(full)} samples, too few for a grouping slice of "
                         f"{d.holdout} (data.holdout) besides training" if cut else f"the training split of "
                         f"{d.name!r} has {len(full)} samples; grouping decisions measure at least 4 of them")
    split = len(full) - d.holdout if cut else len(full)
    grouping = range(split, len(full)) if cut else range(min(d.holdout, len(full)))
    workers = loader_workers(config)
    data = RunData(train=Subset(trained, range(split)), holdout=Subset(full, grouping), test=test,
                   batch_size=config.batch_size, seed=config.seed, workers=workers,
                   pin_memory=workers > 0 and torch.device(config.device).type == "cuda")
    return data, full


def build_trainer(config: RunConfig, tasks: dict[str, Task], plan: BranchingPlan | None, stages: StageFactory,
                  learner=None, architecture: type | None = None, arch_args: dict | None = None) -> MTLTrainer:
    """A :class:`MTLTrainer` for ``architecture`` (default MTSL's branched network with ``plan``) and the LibMTL
    weighting ``config.weighting``; the heads come from ``stages`` (one per task)."""
    libmtl = import_libmtl()
    check_weighting(config.weighting, len(tasks))
    heads = run_heads(config, tasks, stages)
    scheduler = {"scheduler": "multistep", "milestones": list(config.lr_steps), "gamma": 0.1}
    branched = architecture is None or issubclass(architecture, MTSL)  # fused execution is the branched network's
    return MTLTrainer(libmtl_task_dict(tasks), getattr(libmtl.weighting, config.weighting), architecture or MTSL,
                      lambda: stages, heads, optim_param=dict(config.optimizer), scheduler_param=scheduler,
                      device=config.device, learner=learner, channels_last=config.channels_last,
                      compile=config.compile, task_weights=config.task_weights, weight_args=config.weight_args,
                      arch_args={**(arch_args or {}), "plan": plan, **({"fused": config.fused} if branched else {})})


def run_heads(config: RunConfig, tasks: dict[str, Task], stages: StageFactory) -> dict[str, torch.nn.Module]:
    """One head per task from ``stages``, each drawn from the seed and the task's name: a built-in task's takes its
    own form on the authors' network, a declared task keeps the plain one."""
    return {t: stages.build_head(task.out_channels, task=None if t in config.task_specs else t, name=t)
            for t, task in tasks.items()}


def single_task_bytes(config: RunConfig) -> int:
    """Bytes of the weights and buffers of ``config``'s single-task networks, one per task (the largest network a
    method here holds, up to its own additions), counted on one node per location and the heads."""
    stages = build_stages(config)
    tasks = build_run_tasks(config, build_split(config, "train", n=1, progress=False).num_classes)

    def size(module: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))

    nodes = sum(size(stages.build(location)) for location in range(stages.num_locations))
    return len(tasks) * nodes + sum(size(head) for head in run_heads(config, tasks, stages).values())


def build_stages(config: RunConfig) -> StageFactory:
    """The backbone stages of ``config``'s backbone, setting and network (:func:`create_stages`: on a ResNet 10
    locations with the decoder, 6 encoder-only; on another timm CNN of k feature stages 2k and k + 1)."""
    return create_stages(config.backbone, pretrained=config.pretrained, weights=config.weights,
                         decoder=config.setting == "encoder-decoder", seed=config.seed,
                         backbone_args=config.backbone_args, network=config.network)


def num_locations(config: RunConfig) -> int:
    """The number of merge locations of ``config``'s stage table (what methods build their plans over), counted
    on the table itself, without weights (once per backbone, its arguments, setting and network)."""
    return location_count(config.backbone, decoder=config.setting == "encoder-decoder",
                          backbone_args=config.backbone_args, network=config.network)


def method_spec(method: str, config: RunConfig, arch_args: dict | None = None) -> MethodSpec:
    """The registered method's spec, with ``arch_args`` overriding its architecture options (e.g. BMTAS's
    ``resource_weight`` in a λ sweep)."""
    spec = build_method(method, config, num_locations(config))
    return dataclasses.replace(spec, arch_args={**spec.arch_args, **arch_args}) if arch_args else spec


def run_fingerprint(method: str, config: RunConfig, spec: MethodSpec, plan: BranchingPlan | None = None) -> str:
    """A short hash of everything a run's results depend on: the method, the configuration (not the device),
    MTSL's options only for methods with a structural learner, the epochs a method adds, its architecture
    options, the plan a "-R" method retrains, and :func:`initialisation`; a weights file counts by its contents
    (:func:`weights_digest`), not by its path. Runs with equal fingerprints are interchangeable, so STN and
    One-Net runs are shared by every MTSL variant of a sweep."""
    exclude = ("device",) if spec.learner is not None else ("device", "mtsl")
    retrained = plan.to_json() if plan is not None and spec.retrains is not None else None
    extra = {"method": method, "extra_epochs": spec.extra_epochs, "retrained_plan": retrained,
             "initialisation": initialisation(config)}
    digest = weights_digest(config.weights)
    if digest is not None:  # a weights file is its contents, not how its path is written: other weights at the
        exclude += ("weights",)  # same path were reused, and ./w.pth was refused beside w.pth
        extra["weights_sha256"] = digest
    if spec.arch_args:  # a method's architecture options (e.g. cross-stitch's unit learning rate) change results
        extra["arch_args"] = spec.arch_args
    return config.fingerprint(exclude=exclude, extra=extra)


def weights_digest(path: str | None) -> str | None:
    """The SHA-256 of a weights file's contents (read once per path, size and modification time), ``None``
    without a file there (a missing one is named by the checks before training)."""
    if path is None or not os.path.isfile(path):
        return None
    stat = os.stat(path)
    return _file_digest(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _file_digest(path: str, size: int, modified: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _claim_run_dir(run_dir: Path, fingerprint: str, resume: bool) -> Path:
    """Make ``run_dir`` this run's folder and return its ``config.json`` path. A folder holding a run of another
    fingerprint, a checkpoint without ``resume`` (an unfinished run, which starting afresh would overwrite at its
    first save), or (``resume``) a checkpoint without the ``config.json`` that says which run wrote it, is refused
    and kept as it is; files a kill cut short (``*.tmp``, beside the intact files they were replacing) go."""
    saved = run_dir / "config.json"
    if saved.exists() and json.loads(saved.read_text()).get("fingerprint") != fingerprint:
        raise ForeignRun(f"{run_dir} holds a run of another configuration; it is kept: choose another folder")
    if not resume and (run_dir / CHECKPOINT).exists():
        run = ("the finished run of its result.json (kept by keep_checkpoint)" if (run_dir / "result.json").exists()
               else "an unfinished run")
        raise ValueError(f"{run_dir / CHECKPOINT} holds {run}, which starting afresh would overwrite; it is kept: "
                         "continue it (resume=True) or choose another folder")
    if resume and (run_dir / CHECKPOINT).exists() and not saved.exists():  # it is written before any checkpoint
        raise ValueError(f"{run_dir / CHECKPOINT} has no config.json beside it to say which run wrote it; it is "
                         "kept: choose another folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():  # under torchrun rank 0 owns the folder
        remove_partial_writes(run_dir)
    distributed.barrier()
    return saved


def training_epochs(config: RunConfig, spec: MethodSpec) -> int:
    """The epochs ``spec``'s method trains under ``config``: MTSL's scaled schedule, or the preset's epochs, plus
    the method's ``extra_epochs``."""
    return (config.mtsl.total_epochs if spec.learner is not None else config.epochs) + spec.extra_epochs


def run_method(config: RunConfig, method: str, run_dir: str | Path, *, resume: bool = False,
               progress: bool = True, plan: BranchingPlan | None = None,
               keep_checkpoint: bool = False, arch_args: dict | None = None, check: bool = True
               ) -> dict[str, Any]:
    """Train and evaluate ``method``; returns (and writes) its result record.

    With ``resume`` a checkpoint in ``run_dir`` is continued; ``plan`` is the plan a retraining ("-R") method
    retrains; ``arch_args`` override the method's architecture options. A ``run_dir`` that holds a run of another
    fingerprint (:func:`run_fingerprint`) is never touched, nor one another process trains in (it raises
    :class:`~mtsl_plugin.folder_lock.FolderBusy` naming that process).
    A finished run keeps its trained weights (``model.pt``); its resume checkpoint is removed once
    ``result.json`` is written, unless ``keep_checkpoint``.
    With ``check`` the configuration (data included) is checked first (:func:`~mtsl_plugin.preflight.check_config`),
    before any folder or training; callers that checked it already (the benchmark commands) pass ``check=False``.
    """
    run_dir = Path(run_dir)
    spec = method_spec(method, config, arch_args)
    check_arch_args(spec.architecture, len(config.tasks), num_locations(config), spec.arch_args,
                    epochs=training_epochs(config, spec))
    if spec.retrains is not None and plan is None:
        raise ValueError(f"method {method!r} retrains the final plan of {spec.retrains!r}: pass that plan")
    if check:
        from mtsl_plugin.preflight import check_config  # preflight imports this module
        check_config(config, progress=progress, learner=spec.learner.config if spec.learner else None,
                     architecture=spec.architecture)
    fingerprint = run_fingerprint(method, config, spec, plan)
    with folder_lock.holding(run_dir):  # another process training in run_dir: FolderBusy, the folder untouched
        return _train(config, method, run_dir, spec, fingerprint, resume=resume, progress=progress, plan=plan,
                      keep_checkpoint=keep_checkpoint, arch_args=arch_args)


def _train(config: RunConfig, method: str, run_dir: Path, spec: MethodSpec, fingerprint: str, *, resume: bool,
           progress: bool, plan: BranchingPlan | None, keep_checkpoint: bool, arch_args: dict | None
           ) -> dict[str, Any]:
    """:func:`run_method` once its checks passed and it holds ``run_dir``."""
    saved = _claim_run_dir(run_dir, fingerprint, resume)
    seed_everything(config.seed)
    data, dataset = build_data(config, progress)
    missing = [t for t in config.tasks if t not in dataset.tasks]
    if missing:
        raise ValueError(f"dataset {config.data.name!r} has no target for task(s) {missing}")
    tasks = build_run_tasks(config, dataset.num_classes)
    stages = build_stages(config)
    start_plan = plan or spec.plan
    checkpoint = run_dir / CHECKPOINT
    if resume and checkpoint.exists() and start_plan is not None:
        start_plan = MTLTrainer.checkpoint_plan(checkpoint)
    trainer = build_trainer(config, tasks, start_plan, stages, spec.learner, spec.architecture, spec.arch_args)
    if resume and checkpoint.exists():
        trainer.load(checkpoint)
    # who trained the run: one entry per process whose training the checkpoint holds, then this one; a checkpoint
    # from before checkpoints held them: the folder's record (a run from before that: null, unrecorded)
    earlier = trainer.trained_by if resume and checkpoint.exists() else []
    if earlier is None:
        earlier = json.loads(saved.read_text()).get("trained_by", [None])
    trainer.trained_by = [*earlier, provenance(config, distributed.world_size())]
    # rank 0 writes the run's files; a write that fails there stops every rank (fail_together), so no rank goes
    # on to collectives, or to the next run of a sweep, without the others
    meta = {"method": method, "config": config.to_dict(), "fingerprint": fingerprint,
            **({"arch_args": arch_args} if arch_args else {}),
            "trained_by": trainer.trained_by}
    distributed.fail_together(lambda: write_json(saved, meta), CheckpointError)

    def on_phase(record: dict) -> None:
        write_json(run_dir / f"phase_{record['phase']}.json", record)

    started = time.perf_counter()
    history = trainer.fit(data, training_epochs(config, spec), checkpoint=checkpoint, on_phase=on_phase,
                          progress=progress)
    phase_seconds = sum(r.seconds for r in spec.learner.records) if spec.learner is not None else 0.0
    train_seconds = sum(h["seconds"] for h in history) + phase_seconds  # structural phases included
    metrics = trainer.evaluate(data.batches(distributed.shard_samples(data.test)))  # each rank its share
    final_plan = spec.final_plan(trainer.model) if spec.final_plan else getattr(trainer.model, "plan", None)
    # a searched plan (LTB, BMTAS) costs what the branched network derived from it costs, not the supernet: that
    # network is built on the host for counting only (no second trainer, device copy or compilation)
    costed = (BranchedNetwork(final_plan, stages, run_heads(config, tasks, stages)) if spec.final_plan is not None
              else trainer.model)
    cost = model_cost(costed, config.data.height, config.data.width)

    def write_weights() -> None:
        if final_plan is not None:
            write_json(run_dir / "plan.json", final_plan.to_dict())
        trainer.save_weights(run_dir / WEIGHTS)

    distributed.fail_together(write_weights, CheckpointError)
    result = {
        "method": method, "seed": config.seed, "status": "ok", "error": None,
        "metrics": metrics,
        "higher_is_better": {t: task.higher_is_better for t, task in tasks.items()},
        "metric_names": {t: task.metric_name for t, task in tasks.items()},
        "plan": final_plan.to_dict() if final_plan is not None else None,
        "plan_text": final_plan.describe() if final_plan is not None else None,
        "params_m": cost.params / 1e6, "gmac": cost.gmac,
        "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - started,
        "history": history, "fingerprint": fingerprint, "trained_by": meta["trained_by"],
        "config_fingerprint": config.fingerprint(),  # to find the source run of a "-R" method
        "reference_key": config.fingerprint(exclude=("device", "mtsl")),  # runs with one STN reference
        "checkpoint_kept": keep_checkpoint,  # else a checkpoint.pt beside this file is one a stop left behind
    }
    distributed.fail_together(lambda: write_json(run_dir / "result.json", result), CheckpointError)
    if not keep_checkpoint and distributed.is_main():
        checkpoint.unlink(missing_ok=True)
    distributed.barrier()  # every rank sees this run's files before the next job looks for finished runs
    return result


def load_run(run_dir: str | Path, device: str | None = None, progress: bool = True
             ) -> tuple[MTLTrainer, RunData, RunConfig]:
    """The trained model of the finished run in ``run_dir`` (rebuilt from its ``config.json`` and ``model.pt``),
    with the run's data, ready for evaluation (``trainer.evaluate``, ``trainer.model``, ``trainer.task_dict``);
    ``progress``: a bar while synthetic scenes are rendered."""
    run_dir = Path(run_dir)
    if not (run_dir / "result.json").is_file():
        raise FileNotFoundError(f"{run_dir} holds no finished run (no result.json)")
    meta = json.loads((run_dir / "config.json").read_text())
    config = RunConfig.from_dict(meta["config"])
    if device is not None:
        config = config.replace(device=device)
    spec = method_spec(meta["method"], config, meta.get("arch_args"))
    weights = run_dir / WEIGHTS
    if not weights.is_file():  # a run finished before weights files existed keeps its checkpoint
        weights = run_dir / CHECKPOINT
    if not weights.is_file():
        raise FileNotFoundError(f"{run_dir} holds no trained weights ({WEIGHTS}, or the {CHECKPOINT} of a run "
                                "finished before weights files existed)")
    seed_everything(config.seed)
    data, dataset = build_data(config, progress)
    tasks = build_run_tasks(config, dataset.num_classes)
    trainer = build_trainer(config, tasks, MTLTrainer.checkpoint_plan(weights), build_stages(config),
                            spec.learner, spec.architecture, spec.arch_args)
    trainer.load(weights)
    trainer.model.eval()
    return trainer, data, config
