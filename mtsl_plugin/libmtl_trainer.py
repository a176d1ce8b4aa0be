"""MTSL through LibMTL's own calls: ``Trainer(...)`` with LibMTL's arguments, then ``train(...)`` and ``test(...)``.

A LibMTL user's script (``examples/nyu/main.py`` and the like) builds ``Trainer(task_dict, weighting,
architecture, encoder_class, decoders, rep_grad, multi_input, optim_param, scheduler_param, **kwargs)`` and calls
``train(train_dataloaders, test_dataloaders, epochs, val_dataloaders=None)``. :class:`Trainer` takes exactly
that and runs MTSL's loop (:meth:`MTLTrainer.fit`: alignment loss, structural phases, checkpoints) when the
architecture is MTSL, or our loop without a structural learner for any other architecture:

* LibMTL's own architectures (HPS, MMoE, ...) get ``encoder_class`` and ``decoders`` exactly as LibMTL passes
  them (their shared gradients are zeroed in place, so LibMTL's gradient weightings run on torch >= 2:
  :func:`~mtsl_plugin.libmtl_compat.zero_grads_in_place`); the points below are about this project's
  architectures (MTSL, cross-stitch, MTAN, LTB, BMTAS);

* ``weighting`` / ``architecture``: LibMTL classes or their names (``"EW"``, ``"MTSL"``);
* ``encoder_class``: a zero-argument callable returning our stages (:func:`~mtsl_plugin.network.create_stages`)
  or a timm CNN (e.g. ``lambda: timm.create_model("resnet18")`` or ``"convnext_atto"``), whose stages become the
  merge locations (:meth:`TimmStages.from_model` for other families than ResNets);
* ``decoders``: task -> head; a LibMTL head (``head(features)`` on one tensor) reads the last location's output
  and is upsampled to the input size (one whose first layer is ``nn.Linear`` reads it average-pooled, ``(N, C)``:
  classification and regression heads); our heads (``head(features, size)``) are used as they are;
* ``kwargs``: LibMTL's ``weight_args`` and ``arch_args``; ``arch_args["mtsl"]`` holds MTSL's options (an
  :class:`~mtsl_plugin.learner.schedule.MTSLConfig` or a dict of its fields; without ``task_epochs``, the
  paper's schedule scaled to the epochs of the ``train()`` call that starts the run, kept by a resumed run),
  ``arch_args["plan"]`` a starting plan (a :class:`~mtsl_plugin.plan.BranchingPlan` or its dict form),
  ``arch_args["network"]`` / ``arch_args["setting"]`` the stages built over a timm model (``network`` other than
  ``compact`` on a ResNet only: :func:`~mtsl_plugin.libmtl_adapters.as_stages`);
  ``save_path`` (a folder: the resume checkpoint ``checkpoint.pt``, continued by a new ``Trainer`` on the same
  folder, and the final weights ``model.pt``; one process trains in it at a time), ``load_path`` (weights or a
  checkpoint to start from, its plan used; a folder means its ``model.pt``, where LibMTL reads ``best.pt``; a bare
  state dict, LibMTL's ``best.pt``, is loaded as LibMTL loads it, ``strict=False``, into architectures without a
  plan), ``device`` (default CUDA when available);
* ``process_preds``: a subclass's override is applied to every batch's predictions before the losses (training)
  and the metrics (:meth:`Trainer.test`), as in LibMTL; overrides of ``_process_data``, ``_compute_loss`` and
  ``_prepare_dataloaders``, which this loop never calls, are refused;
* refused in one line when the Trainer is built: ``multi_input=True`` (a loader per task), optimizers and
  schedulers LibMTL 1.1.5 does not build (``reduce`` of later versions), a ``rep_grad`` setting the weighting
  method refuses, ``bilevel_param`` other than None, unknown keyword arguments; ``train(return_weight=True)``
  is refused when called.

``test()`` prints every metric of the task dict with its name and returns each task's first metric.

Evaluation and best-epoch selection: LibMTL evaluates the test loader after every epoch and reports the best
epoch by the test results when no validation loader is given. Here the model of the **last** epoch is the
result (MTSL's architecture changes during training; the paper reports the final network), the test loader is
evaluated once, after training, and never selects anything. ``val_dataloaders``, when given, is evaluated after
training too and its data is what grouping decisions are measured on; without it, grouping decisions use the
first 800 training samples (as the authors do, through the training set's own transform).

Under ``torchrun`` (LibMTL has no data parallelism) a :class:`Trainer` joins the process group torchrun
describes, unless the script joined it (gloo on CPU; NCCL and ``cuda:<LOCAL_RANK>`` on CUDA), and trains a
``DistributedDataParallel`` model as our commands do: the training loader's ``batch_size`` is the global batch and
each of the N processes trains on its share of every batch the loader draws (batch/N; a batch N does not divide,
an iterable dataset and ``batch_size=None`` are refused before training), so every sample is trained on once an
epoch; a loader whose sampler is a ``DistributedSampler`` already splits the data and is kept (see
:class:`LoaderData`). Each rank augments its samples in its own way in the loader's workers
(:class:`~mtsl_plugin.distributed.RankShares`) and, with our data sets, in the main process too
(:func:`~mtsl_plugin.data.real.random_window`); a dataset of yours that draws from the global RNG in the main
process (``num_workers=0``) draws alike on every rank. Rank 0 writes ``save_path``; every rank evaluates the whole
test and validation loaders (the metrics' states are summed over the ranks, so their ratios are the whole set's);
a test loader whose sampler is a ``DistributedSampler`` is evaluated in the shares it draws, and the up to N - 1
samples it repeats to even them out count twice.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Subset

from mtsl_plugin import distributed, folder_lock
from mtsl_plugin.architecture import MTSL
from mtsl_plugin.checkpoint import CheckpointError, file_version, remove_partial_writes
from mtsl_plugin.data import FolderDataset
from mtsl_plugin.data.real import NpyLayoutDataset
from mtsl_plugin.data.run_data import RunData, smallest_batch
from mtsl_plugin.learner.schedule import MTSLConfig, require, scale_schedule
from mtsl_plugin.learner.structural import StructuralLearner
from mtsl_plugin.libmtl_adapters import as_head, as_plan, as_stages, check_encoder_class
from mtsl_plugin.libmtl_compat import (check_trainer_args, check_trainer_hooks, import_libmtl, libmtl_method,
                                       read_bare_state_dict)
from mtsl_plugin.plan import BranchingPlan
from mtsl_plugin.preflight import check_mtsl, check_weighting, read_every_sample, rng_untouched
from mtsl_plugin.trainer import MTLTrainer

AUTHORS_SIMILARITY_SAMPLES = 800  # the authors measure similarity on the first 800 training images
CHECKPOINT, WEIGHTS = "checkpoint.pt", "model.pt"
#: MTLTrainer's own keyword arguments (``device``, ``channels_last``, ...), taken by :class:`Trainer` besides
#: LibMTL's ``weight_args`` and ``arch_args``.
_OWN_KEYWORDS = frozenset(name for name, p in inspect.signature(MTLTrainer.__init__).parameters.items()
                          if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "learner")  # the Trainer's own


@contextmanager
def augmentation_off(dataset: Dataset):
    """Run the block with ``dataset``'s augmentation (its ``augment`` flag) off: checks read the stored samples."""
    augment = dataset.augment
    dataset.augment = False
    try:
        yield
    finally:
        dataset.augment = augment


def _resolve(value: Any, namespace: Any, kind: str) -> type:
    if isinstance(value, str):
        if not hasattr(namespace, value):
            raise ValueError(f"LibMTL has no {kind} named {value!r}")
        return getattr(namespace, value)
    return value


def _start_file(save_path: Path | None, load_path: str | Path | None) -> tuple[Path | None, bool]:
    """The file a Trainer starts from and whether it resumes: ``save_path``'s checkpoint of an unfinished run
    wins over ``load_path`` (a file, or a folder holding ``model.pt``); a ``load_path`` that is neither is
    refused."""
    load_path = None if load_path is None else Path(load_path)
    if load_path is not None and load_path.is_dir():  # LibMTL reads <folder>/best.pt; our save_path holds model.pt
        if not (load_path / WEIGHTS).is_file():
            raise FileNotFoundError(f"load_path {str(load_path)!r} is a folder without {WEIGHTS} (the weights a "
                                    "Trainer writes to its save_path)")
        load_path = load_path / WEIGHTS
    if load_path is not None and not load_path.is_file():
        raise FileNotFoundError(f"load_path {str(load_path)!r} is not a file")
    resume = save_path / CHECKPOINT if save_path is not None else None
    if resume is not None and resume.is_file():
        return resume, True
    return load_path, False


def _checkpoint_plan(start: Path, tasks: list[str], num_locations: int, origin: str,
                     advice: str) -> BranchingPlan | None:
    """The plan held by the checkpoint or weights ``start`` (``None`` for a file without one), refused in one line
    naming ``origin`` when its tasks or merge locations are not the trainer's."""
    plan = MTLTrainer.checkpoint_plan(start)
    if plan is not None and list(plan.tasks) != tasks:
        raise ValueError(f"{origin} holds a network of tasks {list(plan.tasks)}, not this trainer's {tasks}: "
                         f"{advice}")
    if plan is not None and plan.num_locations != num_locations:
        raise ValueError(f"{origin} holds a network of {plan.num_locations} merge locations, not the "
                         f"{num_locations} of this trainer's encoder: {advice}")
    return plan


class LoaderData(RunData):
    """:class:`RunData` over a user's loaders: training batches come from the user's loader (its own sampler,
    order and transforms, so a resumed run sees other batches than an uninterrupted one); everything else
    (grouping data, amalgamation, BMTAS's split) is batched at the loader's batch size, in an order drawn from
    ``seed`` (:meth:`Trainer.train` passes the seed torch had when the Trainer was built: LibMTL's
    ``set_random_seed``).

    Under ``torch.distributed`` each rank trains on its share of every batch the loader draws
    (:class:`~mtsl_plugin.distributed.RankShares`): the user's batch_size is the global batch, batch/N a rank's,
    and a batch N does not divide is refused. A loader whose sampler is a ``DistributedSampler`` already splits the
    data: it is used as it is (batch_size per rank). Its ``set_epoch`` is called before every epoch, as a torch
    training loop does, in one process too."""

    def __init__(self, loader: DataLoader, grouping: Dataset, test: Dataset, seed: int = 0):
        super().__init__(train=loader.dataset, holdout=grouping, test=test, batch_size=loader.batch_size or 1,
                         seed=seed)
        self.loader = self.train_loader = loader
        size, sampler = distributed.world_size(), loader.sampler
        if size == 1:
            return
        if isinstance(sampler, DistributedSampler):
            if (sampler.num_replicas, sampler.rank) != (size, distributed.rank()):
                raise ValueError(f"train_dataloaders' DistributedSampler splits the data for rank {sampler.rank} of "
                                 f"{sampler.num_replicas} processes, but this is rank {distributed.rank()} of {size}")
            return
        if isinstance(loader.dataset, IterableDataset) or loader.batch_sampler is None:
            raise ValueError(f"train_dataloaders cannot be split over {size} processes: it does not draw batches of "
                             "sample indices (an iterable dataset, or batch_size=None); start it without torchrun")
        if loader.batch_size is not None:
            distributed.per_rank_batch(loader.batch_size)
        self.train_loader = distributed.RankShares(loader)

    def batches(self, dataset: Dataset, key: Sequence[int] | None = None, shard: bool = True) -> DataLoader:
        if dataset is self.train and key is not None and key[0] == 0:  # the epochs' training batches
            if isinstance(self.loader.sampler, DistributedSampler):
                self.loader.sampler.set_epoch(key[1])
            return self.train_loader
        return super().batches(dataset, key, shard)


class TrainerLearner(StructuralLearner):
    """The structural learner of a :class:`Trainer`. Without ``task_epochs`` in ``arch_args['mtsl']`` (``scaled``),
    the paper's schedule (``base``, the user's options) is scaled to the epochs of the ``train()`` call that starts
    the run; that epoch count, ``scaled_for``, is part of the checkpoint state, so a new Trainer on the same
    ``save_path`` continues the schedule the run started with (not the unscaled one). Amalgamation epochs the
    options give (``given_amalgamation``) are kept as given, as a configuration file's are."""

    def __init__(self, config: MTSLConfig, scaled: bool, given_amalgamation: bool = False):
        super().__init__(config)
        self.base, self.scaled, self.given_amalgamation = config, scaled, given_amalgamation
        self.scaled_for: int | None = None

    def scaled_config(self, epochs: int) -> MTSLConfig:
        """``base``'s schedule scaled to ``epochs`` (:func:`~mtsl_plugin.learner.schedule.scale_schedule`), the
        amalgamation epochs the options gave kept."""
        config = scale_schedule(self.base, epochs)
        if not self.given_amalgamation:
            return config
        given = self.base.amalgamation_epochs[:config.num_phases]
        return MTSLConfig.from_dict({**config.to_dict(), "amalgamation_epochs": given})

    @classmethod
    def from_options(cls, options: MTSLConfig | Mapping | None, tasks: tuple[str, ...]) -> "TrainerLearner":
        """The learner of ``arch_args['mtsl']`` (a config, a dict of its fields or ``None``), its plugins and
        grouping solver checked on ``tasks`` before any training."""
        options = options.to_dict() if isinstance(options, MTSLConfig) else dict(options or {})
        learner = cls(MTSLConfig.from_dict(options), scaled="task_epochs" not in options,
                      given_amalgamation="amalgamation_epochs" in options)
        check_mtsl(learner.config, tasks)
        return learner

    def state_dict(self) -> dict:
        return {**super().state_dict(), "scaled_for": self.scaled_for}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.scaled_for = state.get("scaled_for")  # absent from checkpoints written before it was stored
        if self.scaled and self.scaled_for is not None:
            self.config = self.scaled_config(self.scaled_for)


class Trainer(MTLTrainer):
    """LibMTL's ``Trainer`` interface with MTSL's training (see the module docstring, torchrun included)."""

    def __init__(self, task_dict, weighting, architecture, encoder_class, decoders, rep_grad=False,
                 multi_input=False, optim_param=None, scheduler_param=None, save_path=None, load_path=None, *,
                 device: str | torch.device | None = None, **kwargs):
        libmtl = import_libmtl()
        # what the Trainer draws itself (the layers it adds to a timm encoder, its own batches) follows the seed the
        # script gave torch (LibMTL's set_random_seed), as the script's encoder and loaders do
        seed = torch.initial_seed() % (1 << 63)
        check_trainer_hooks(type(self), MTLTrainer)  # a subclass's override that would be silently ignored
        weighting = _resolve(weighting, libmtl.weighting, "weighting method")
        architecture = _resolve(architecture, libmtl.architecture, "architecture")
        ours = getattr(architecture, "reads_stages", False)  # MTSL, the baselines, and subclasses of theirs
        method = libmtl_method(weighting)  # LibMTL's, one derived from it, or (None) a user's own
        if method is None and not issubclass(weighting, libmtl.weighting.AbsWeighting):
            raise ValueError(f"weighting {weighting!r} is neither a LibMTL weighting method nor a subclass of "
                             "LibMTL's AbsWeighting")
        if method is not None and (ours or method != "GradDrop"):  # GradDrop works on LibMTL's architectures'
            check_weighting(method, len(task_dict))  # representation; before training: CAGrad on other than 3 tasks
        check_trainer_args(method or weighting.__name__, rep_grad, multi_input, optim_param, scheduler_param,
                           {k: v for k, v in kwargs.items() if k not in _OWN_KEYWORDS})
        check_encoder_class(encoder_class)
        arch_args = dict(kwargs.get("arch_args") or {})
        mtsl = arch_args.pop("mtsl", None)
        if ours:  # our architectures run on merge-location stages and call heads with the output size
            stages = as_stages(encoder_class, arch_args.pop("network", "compact"),
                               arch_args.pop("setting", "encoder-decoder"), seed=seed)
            encoder_class, decoders = (lambda: stages), {t: as_head(d) for t, d in dict(decoders).items()}
        self.save_path = None if save_path is None else Path(save_path)
        # the checkpoint this Trainer continues (or its absence): train() refuses one another process changed since
        self._checkpoint_read = None if self.save_path is None else file_version(self.save_path / CHECKPOINT)
        start, resuming = _start_file(self.save_path, load_path)
        self._start = start  # named when a resumed run's schedule does not fit
        origin, advice = ((f"save_path's checkpoint {start} (an unfinished run, which a Trainer on that save_path "
                           "resumes)", "choose another save_path to start afresh") if resuming else
                          (f"load_path {start}", "check load_path"))
        bare = read_bare_state_dict(start) if start is not None and not resuming else None
        if bare is not None and (issubclass(architecture, MTSL) or "plan" in arch_args):
            raise ValueError(f"load_path {start} is a bare state dict (as LibMTL's save_path writes best.pt), without "
                             f"the {architecture.__name__} network's plan: give a {WEIGHTS} or {CHECKPOINT} written "
                             "by this package")
        learner = None
        if issubclass(architecture, MTSL):
            learner = TrainerLearner.from_options(mtsl, tuple(task_dict))
            plan = as_plan(arch_args.get("plan"))
            if start is not None and bare is None:
                plan = _checkpoint_plan(start, list(task_dict), stages.num_locations, origin, advice)
            arch_args["plan"] = plan or BranchingPlan.single_task(list(task_dict), stages.num_locations)
        elif mtsl is not None:
            raise ValueError(f"arch_args['mtsl'] is for the MTSL architecture, not {architecture.__name__}")
        device = distributed.init_from_env(str(device or ("cuda" if torch.cuda.is_available() else "cpu")))
        super().__init__(task_dict, weighting, architecture, encoder_class, decoders, rep_grad, multi_input,
                         optim_param, scheduler_param, device=device, learner=learner,
                         **{**kwargs, "arch_args": arch_args})
        self.seed = seed
        if bare is not None:  # as LibMTL loads its load_path: the weights only, keys of other modules left out
            self.load_bare(start, bare)
        elif start is not None:
            self._load_start(start, origin, advice)

    def _load_start(self, start: Path, origin: str, advice: str) -> None:
        """Load the checkpoint or weights the run starts from; one that does not fit is refused naming ``origin``."""
        try:
            self.load(start)
        except CheckpointError:  # unreadable: its message names the file
            raise
        except (ValueError, RuntimeError) as exc:  # another architecture, or modules of other shapes
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
            reason = " ".join(lines[:2])  # load_state_dict's first mismatch is on its second line
            reason = reason if len(reason) <= 300 else reason[:297] + "..."
            raise ValueError(f"{origin} does not fit this trainer ({reason}): {advice}") from None

    def load_bare(self, path: Path, state: dict[str, torch.Tensor]) -> None:
        """Take the weights of a bare state dict (LibMTL's ``best.pt``) as LibMTL's ``load_path`` does
        (``load_state_dict(strict=False)``); a file holding none of the model's parameters is refused."""
        if not set(state) & set(self.model.state_dict()):
            raise ValueError(f"load_path {path} holds none of this model's parameters (its keys start "
                             f"{sorted(state)[:3]}): check load_path")
        try:
            self.model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # a parameter of another shape
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise ValueError(f"load_path {path} does not fit this trainer ({' '.join(lines[:2])[:300]}): check "
                             "load_path") from None

    def train(self, train_dataloaders, test_dataloaders, epochs: int, val_dataloaders=None,
              return_weight: bool = False, progress: bool = True) -> dict[str, dict[str, float]]:
        """Train for ``epochs`` epochs (MTSL's phases, alignment and checkpoints included), then evaluate.

        Returns ``{"test": {task: metric}}`` (plus ``"val"`` when ``val_dataloaders`` is given), the last epoch's
        model's results. With ``save_path`` an unfinished run in that folder is resumed. Before any training, the
        loaders are checked against the task dict (one sample of each) and MTSL's needs (see :meth:`check_loaders`).
        """
        if isinstance(train_dataloaders, Mapping):
            raise ValueError("train_dataloaders must be one DataLoader whose samples hold every task's target, not a "
                             "dict of loaders (LibMTL's multi_input setting, which this Trainer does not support)")
        if return_weight:
            raise ValueError("return_weight is not supported: the task weights are not recorded per batch")
        require("epochs", epochs, int, 1)
        if self.learner is not None:
            self.set_schedule(epochs)
        self.check_loaders(train_dataloaders, test_dataloaders, val_dataloaders, progress)
        if val_dataloaders is not None:
            grouping = val_dataloaders.dataset
        else:
            dataset = train_dataloaders.dataset
            grouping = Subset(dataset, range(min(AUTHORS_SIMILARITY_SAMPLES, len(dataset))))
        data = LoaderData(train_dataloaders, grouping, test_dataloaders.dataset, seed=self.seed)
        if self.save_path is None:
            self.fit(data, epochs, progress=progress)
        else:  # another process training into save_path: FolderBusy, before any step
            checkpoint = self.save_path / CHECKPOINT
            with folder_lock.holding(self.save_path):
                if distributed.broadcast_object(file_version(checkpoint) != self._checkpoint_read):
                    raise ValueError(f"{checkpoint} changed after this Trainer was built (another process trained "
                                     f"in {self.save_path}); it is kept: build a new Trainer to continue from it")
                if distributed.is_main():
                    remove_partial_writes(self.save_path)
                self.fit(data, epochs, checkpoint=checkpoint, progress=progress)
                # rank 0 writes; a failed write stops every rank (the others would wait in test()'s collectives)
                distributed.fail_together(lambda: self.save_weights(self.save_path / WEIGHTS), CheckpointError)
                self._checkpoint_read = file_version(checkpoint)
        results = {"test": self.test(test_dataloaders)}
        if val_dataloaders is not None:
            results["val"] = self.test(val_dataloaders, mode="val")
        return results

    def set_schedule(self, epochs: int) -> None:
        """The MTSL schedule of a ``train(..., epochs)`` call: ``arch_args['mtsl']``'s own ``task_epochs``, or the
        paper's schedule scaled to the epochs of the call that started the run (a resumed run keeps it: a run
        started with other epochs and phases left to do is refused). Refuses phases ending after ``epochs``."""
        learner = self.learner
        if getattr(learner, "scaled", False):
            started = self.epochs_done > 0 or learner.phases_done > 0
            scaled_for = learner.scaled_for if started and learner.scaled_for is not None else epochs
            if scaled_for != epochs and not learner.finished:
                where = f" (from {self._start})" if self._start is not None else ""
                raise ValueError(f"the run being continued{where} scaled MTSL's schedule to train(epochs={scaled_for}) "
                                 f"and {learner.phases_done} of its {learner.config.num_phases} phases are done: "
                                 f"continue it with epochs={scaled_for}, or start afresh (a new Trainer on another "
                                 "save_path)")
            learner.config, learner.scaled_for = learner.scaled_config(scaled_for), scaled_for
            source = f"the paper's schedule scaled to {scaled_for} epochs, at least one per phase"
            advice = (f"; train for at least {learner.config.num_phases} epochs or give arch_args['mtsl'] task_epochs"
                      if scaled_for == epochs else "")
        else:
            source, advice = "arch_args['mtsl'] task_epochs", ""
        ends = learner.config.phase_ends()
        if ends and ends[-1] > epochs:
            raise ValueError(f"MTSL's phases end after {ends[-1]} task-learning epochs ({source}) but train() was "
                             f"given {epochs} epochs{advice}")

    def check_loaders(self, train_dataloaders, test_dataloaders, val_dataloaders=None, progress: bool = True
                      ) -> None:
        """Refuse, in one line naming the loader, what would fail later (at the first step, at a structural phase,
        or after all training): a loader without a ``dataset`` or with no samples; a dataset whose first sample
        (read without moving the global RNGs) lacks a target of the task dict; a training loader that yields no
        batch. A loader over this package's file data sets (:class:`~mtsl_plugin.data.FolderDataset`, NYUv2,
        Cityscapes) has every sample read once, without augmentation, as the benchmark commands read theirs
        (:func:`~mtsl_plugin.preflight.read_every_sample`): a file that cannot be read, a wrong shape or class,
        a task without a valid pixel is named before training, not when an epoch reaches it. While MTSL has phases
        left and task nodes with siblings, also grouping data (``val_dataloaders``, else the training set) under 4
        samples and a training batch under 4 samples: CKA needs 4."""
        loaders = {"train_dataloaders": train_dataloaders, "test_dataloaders": test_dataloaders}
        if val_dataloaders is not None:
            loaders["val_dataloaders"] = val_dataloaders
        sizes, read = {}, []  # read: the data sets read through (one given as test and val is read once)
        for name, loader in loaders.items():
            dataset = getattr(loader, "dataset", None)
            if dataset is None:
                raise ValueError(f"{name} must be a torch DataLoader, got {type(loader).__name__}")
            try:
                sizes[name] = len(dataset)
            except TypeError:  # an iterable dataset: no sample to look at before training
                continue
            if sizes[name] == 0:
                raise ValueError(f"{name} holds no samples")
            with rng_untouched():
                sample = dataset[0]
            targets = sample[1] if isinstance(sample, (tuple, list)) and len(sample) == 2 else None
            if isinstance(targets, Mapping):
                missing = [t for t in self.task_name if t not in targets]
                if missing:
                    raise ValueError(f"{name} has no target for task(s) {missing} of the task dict (its samples "
                                     f"hold {list(targets)})")
            if isinstance(dataset, (FolderDataset, NpyLayoutDataset)) and all(dataset is not d for d in read):
                read.append(dataset)  # files: each read once, as compare.py reads its data
                with rng_untouched(), augmentation_off(dataset):
                    read_every_sample(dataset, f"{name}' samples", progress)
        size, batch = sizes.get("train_dataloaders"), getattr(train_dataloaders, "batch_size", None)
        if size is None:
            return
        drop_last = bool(getattr(train_dataloaders, "drop_last", False))
        if batch is not None and drop_last and size < batch:
            raise ValueError(f"train_dataloaders yields no batch: {size} samples, batch_size {batch} and "
                             "drop_last=True")
        learner = self.learner
        if learner is None or learner.finished or not self.model.plan.siblings():
            return
        grouping = "val_dataloaders" if val_dataloaders is not None else "train_dataloaders"
        if sizes.get(grouping, 4) < 4:
            on = "them" if val_dataloaders is not None else "the training set (no val_dataloaders given)"
            raise ValueError(f"{grouping} holds {sizes[grouping]} sample(s), but MTSL measures task similarity "
                             f"(CKA) on {on} and needs at least 4")
        if batch is not None and learner.config.aligns:
            smallest = smallest_batch(size, batch, drop_last)
            if smallest < 4:
                raise ValueError(f"train_dataloaders yields a batch of {smallest} sample(s) ({size} samples, "
                                 f"batch_size {batch}, drop_last={drop_last}), but MTSL's alignment loss measures "
                                 "CKA on each batch and needs at least 4: use drop_last=True or a larger batch_size")

    def test(self, test_dataloaders, epoch: int | None = None, mode: str = "test") -> dict[str, float]:
        """Evaluate ``test_dataloaders``: every metric of the task dict is printed with its name (one line, tasks
        separated by ``|``, as LibMTL prints them, ``mode`` first), each task's first metric is returned
        (``{task: value}``). ``epoch`` is LibMTL's signature only: no epoch is picked or recorded here."""
        scores = self.scores(test_dataloaders)
        names = {t: list(self.task_dict[t].get("metrics", [])) for t in self.task_name}
        print(f"{mode}: " + " | ".join(
            f"{t} " + " ".join(f"{names[t][i] if i < len(names[t]) else f'metric{i}'} {v:.4f}"
                               for i, v in enumerate(values)) for t, values in scores.items()))
        return {t: values[0] for t, values in scores.items()}
