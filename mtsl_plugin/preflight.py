"""Check a run configuration before any training: everything that would make every run of it fail.

:func:`check_config` is called by every benchmark command before it creates a results folder, so a mistake costs
one line (``error: <sentence naming the culprit>``, exit code 2) instead of a folder of failed runs. It checks

* the tasks (built-in letters or declared tasks whose kind accepts their options, none twice) and that the data set
  has a target for each;
* the data set: its name, its root, and for real data **every sample** of the training and test splits (each file
  readable, shapes consistent, images finite and in [0, 1]; non-finite labels, depths or normals are allowed and
  mean "invalid pixel", see :mod:`mtsl_plugin.data`, but a task none of whose targets in a split holds a valid
  pixel is refused, and so are normals stored as an image encoding in [0, 1]), and that the training split is
  larger than the held-out slice (a sample count larger than its split is not refused: the run uses what there is,
  and one line says so, :func:`short_splits`);
* the backbone (built once, so a bad name or weights file is found here; one zero image of the data's size
  runs through it, so a size it cannot run on is named, and in training mode where a training batch holds one
  image, so a BatchNorm that cannot train on it is named; BMTAS's batches are those of each part of its search
  split) and the device;
* the LibMTL weighting method, and the optimizer (built once, by LibMTL's own code);
* MTSL's plugins, each called once on a tiny random input (a plugin returning NaN or a mis-shaped value fails
  here).

Values of a wrong type or out of range (epochs, γ, λ, sample counts, ...) are refused earlier, when the
configuration is made (:mod:`mtsl_plugin.config`, :class:`~mtsl_plugin.learner.schedule.MTSLConfig`).
"""
from __future__ import annotations

import random
import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from mtsl_plugin import distributed
from mtsl_plugin.config import DataConfig, RunConfig
from mtsl_plugin.data import build_dataset
from mtsl_plugin.data.run_data import drops_last_batch, smallest_batch
from mtsl_plugin.learner.schedule import MTSLConfig
from mtsl_plugin.libmtl_compat import LIBMTL_OPTIMIZERS, SINGLE_BACKWARD_WEIGHTINGS, import_libmtl
from mtsl_plugin.plugins import amalgamator, grouping_solver, similarity
from mtsl_plugin.tasks import TASKS
from mtsl_plugin.valid_pixels import has_normal, holds_value


def check_config(config: RunConfig, *, scan: bool = True, progress: bool = True,
                 learner: MTSLConfig | None = None, architecture: type | None = None) -> None:
    """Raise ``ValueError`` (one sentence naming the culprit) if ``config`` cannot train; see the module doc.
    ``scan=False`` skips reading every sample of real data (when the same data was checked already); ``learner``:
    the MTSL configuration the method runs (``None`` for a method without structural phases), whose grouping
    solver must accept the run's tasks and whose alignment loss (CKA) needs at least 4 images in every batch;
    ``architecture``: the method's LibMTL architecture class (``None``: MTSL's branched network), whose own
    training sets are the ones whose batches are checked (:func:`training_sets`)."""
    from mtsl_plugin.experiment import build_data, build_run_tasks, build_split, build_stages  # experiment imports us

    check_device(config.device)
    check_weighting(config.weighting, len(config.tasks))
    check_optimizer(config.optimizer)
    check_mtsl(config.mtsl if learner is None else learner, None if learner is None else config.tasks)
    d = config.data
    notes: list[str] = []  # printed once every check has passed (an error stays the one line printed)
    if d.name == "synthetic":  # generated scenes are valid by construction: render none of them here
        dataset = build_dataset(d.name, "train", height=d.height, width=d.width, n=0, progress=False)
        trained = d.train
    else:
        data, dataset = build_data(config)
        trained = len(data.train)
        if scan:
            test = build_split(config, "test", n=d.test)
            notes = short_splits(d, dataset, trained, len(data.holdout), test)
            read_every_sample(dataset, f"{d.name} train split", progress)
            read_every_sample(test, f"{d.name} test split", progress)
    build_run_tasks(config, dataset.num_classes)  # unknown, undeclared or repeated tasks, bad declarations
    unknown = sorted(set(config.task_weights) - set(TASKS) - set(config.task_specs))
    if unknown:  # weights of known tasks that do not run (e.g. in a task sweep) are ignored
        raise ValueError(f"task_weights names task(s) {unknown} that are neither built in ({', '.join(TASKS)}) nor "
                         "declared")
    missing = [t for t in config.tasks if t not in dataset.tasks]
    if missing:
        raise ValueError(f"dataset {d.name!r} has no target for task(s) {missing}; it has {list(dataset.tasks)}")
    stages = build_stages(config)
    stages.check_input_size(dataset.height, dataset.width)  # some CNNs need a least size or multiple
    # under torchrun each process trains on its share of a batch (a last one cut to a multiple of the processes);
    # MTSL's amalgamation reads whole batches in every process
    processes = distributed.world_size()
    distributed.per_rank_batch(config.batch_size)  # a batch the processes do not divide: refused here, not at step 1
    amalgamates = learner is not None and learner.amalgamate and any(learner.amalgamation_epochs)
    for samples, over in training_sets(architecture, trained):
        drop_last = drops_last_batch(samples, config.batch_size)
        smallest = smallest_batch(samples, config.batch_size, drop_last)
        share = smallest_batch(samples, config.batch_size, drop_last, processes)
        if share == 0:  # fewer samples than processes: an epoch would train no step, saying nothing
            raise ValueError(f"batch_size {config.batch_size} over {over} gives each of {processes} processes no "
                             "image in a step: use more training samples or fewer processes")
        if share == 1 or (amalgamates and smallest == 1):  # BatchNorm on a 1x1 feature map fails at that step
            gives = "a batch of 1 image" if processes == 1 or share != 1 else f"each of {processes} processes 1 image"
            try:
                stages.check_batch_of_one(dataset.height, dataset.width)
            except ValueError as exc:
                raise ValueError(f"batch_size {config.batch_size} over {over} gives {gives}, and {exc}: use another "
                                 "batch_size or number of training samples") from None
        if learner is not None and learner.aligns and smallest < 4:
            raise ValueError(f"MTSL's alignment loss measures CKA on every training batch and needs at least 4 "
                             f"images, but batch_size {config.batch_size} over {over} gives a batch of {smallest}: "
                             "use a batch_size of at least 4 (and at least 4 training samples)")
    for note in notes if distributed.is_main() else ():
        print(note, file=sys.stderr, flush=True)


def training_sets(architecture: type | None, trained: int) -> list[tuple[int, str]]:
    """The sets of training samples a method draws its training batches from, each as (samples, the words that
    name it in a message): the ``trained`` samples, or for an architecture searched by bilevel optimisation
    (BMTAS) the two parts it splits them into (``architecture.search_sizes``), each batched on its own, so the
    last batch of a part can hold one image where the whole set's does not."""
    sizes = getattr(architecture, "search_sizes", None)
    if sizes is None:
        return [(trained, f"{trained} training samples")]
    weights, searched = sizes(trained)
    return [(n, f"the {n} of {trained} training samples {architecture.label} trains its {part} on")
            for n, part in ((weights, "weights"), (searched, "architecture"))]


def short_splits(d: DataConfig, train_split: Any, trained: int, held_out: int, test: Any) -> list[str]:
    """One line for each of ``d``'s sample counts (data.train, data.holdout with ``grouping_data: train``,
    data.test) larger than what its split of real or folder data holds: the run uses what there is (``trained``
    training and ``held_out`` grouping samples of ``train_split``, every sample of ``test``), which the smoke
    preset's counts on a small data set rely on, but a user who asked for more should know (:func:`check_config`
    prints them). ``train_split`` and ``test`` are the splits read with those counts."""
    lines = []
    cut = d.grouping_data == "holdout"
    stored, where = len(train_split), train_split.split_dir
    if d.train is not None and d.train + d.holdout * cut > stored:
        besides = f" (besides {d.holdout} held out for grouping decisions)" if cut else ""
        lines.append(f"data: train asks for {d.train} samples{besides}, {where} holds {stored}: using {trained}")
    if not cut and d.holdout > stored:
        lines.append(f"data: holdout asks for {d.holdout} samples, {where} holds {stored}: using {held_out}")
    if d.test is not None and d.test > len(test):
        lines.append(f"data: test asks for {d.test} samples, {test.split_dir} holds {len(test)}: using {len(test)}")
    return lines


def check_device(device: str) -> None:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name torch knows (e.g. cpu, cuda, cuda:1)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: torch sees no CUDA GPU on this machine (use --device cpu)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif parsed.type != "cpu":
        raise ValueError(f"device {device!r} is not supported; use cpu or cuda")


#: LibMTL weighting methods no method here can run, and why.
UNSUPPORTED_WEIGHTINGS = {"GradDrop": "it works on the gradients of one shared representation (LibMTL's rep_grad), "
                                      "which these networks do not expose"}


def check_weighting(weighting: str, num_tasks: int) -> None:
    names = [n for n in import_libmtl().weighting.__all__ if n not in ("AbsWeighting", *UNSUPPORTED_WEIGHTINGS)]
    if weighting in UNSUPPORTED_WEIGHTINGS:
        raise ValueError(f"LibMTL weighting {weighting} cannot be used here: {UNSUPPORTED_WEIGHTINGS[weighting]}; "
                         f"choose from {', '.join(names)}")
    if weighting not in names:
        raise ValueError(f"unknown LibMTL weighting {weighting!r}; choose from {', '.join(names)}")
    if weighting == "CAGrad" and num_tasks != 3:  # LibMTL 1.1.5's solver reshapes its weights to (1, 3)
        raise ValueError(f"LibMTL 1.1.5's CAGrad is written for exactly 3 tasks (its solver's shapes are fixed), "
                         f"got {num_tasks}")


def check_distributed(weighting: str, bilevel: bool, compiled: bool) -> None:
    """Under torchrun: refuse, in one line, what DistributedDataParallel cannot train (weighting methods that
    backpropagate each task separately, a bilevel architecture search, a compiled forward)."""
    if weighting not in SINGLE_BACKWARD_WEIGHTINGS:
        how = ("backpropagates each task separately" if hasattr(import_libmtl().weighting, weighting) else
               "is not LibMTL's, so not known to backpropagate once per step")  # a user's own method
        raise ValueError(f"weighting {weighting} {how}, which DistributedDataParallel does not support; use one "
                         f"of {', '.join(SINGLE_BACKWARD_WEIGHTINGS)} with several processes")
    if bilevel:
        raise ValueError("bilevel architecture search (BMTAS) runs in one process; start it without torchrun")
    if compiled:
        raise ValueError("compiled training (--compile) runs in one process; start it without torchrun")


def check_optimizer(optimizer: Mapping[str, Any]) -> None:
    """Build the optimizer once, with LibMTL's own code (as every run does) over a one-parameter stand-in model, so
    a missing or unknown ``optim``, an argument it does not take or a value it refuses (a negative ``lr``) is named
    here (:data:`~mtsl_plugin.libmtl_compat.LIBMTL_OPTIMIZERS` only names them in messages)."""
    if "optim" not in optimizer:
        raise ValueError(f"optimizer names no 'optim' (one of {', '.join(LIBMTL_OPTIMIZERS)}; a --config file's "
                         f"optimizer replaces the preset's whole), got {dict(optimizer)}")
    stand_in = SimpleNamespace(model=torch.nn.Linear(1, 1))
    try:
        import_libmtl().Trainer._prepare_optimizer(stand_in, dict(optimizer), None)
    except KeyError:
        raise ValueError(f"optimizer.optim {optimizer['optim']!r} is not an optimizer LibMTL builds; choose from "
                         f"{', '.join(LIBMTL_OPTIMIZERS)}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"optimizer {dict(optimizer)} cannot be built: {exc}") from None


@contextmanager
def rng_untouched(devices: Sequence[int | str | torch.device] = ()):
    """Run the block without moving the global RNGs (torch CPU and the CUDA ``devices``, numpy, Python): reading a
    sample whose transform draws random numbers must not change the run (nor a resumed run's batches)."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=list(devices)):
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def check_mtsl(config: MTSLConfig, tasks: tuple[str, ...] | None = None) -> None:
    """Every plugin the configuration names is called once on a tiny random input, so a plugin that returns NaN or
    a mis-shaped value is stopped here, naming the plugin (``PluginContractError``); the grouping solver on a
    random similarity matrix of ``tasks`` when given (a solver may refuse their number), else of three tasks.
    The global RNGs are left where they were (an amalgamator's modules draw their initialisation): a caller that
    has seeded them, as a LibMTL script has when it builds a ``Trainer``, draws afterwards what it would without
    the check."""
    with rng_untouched():
        _call_plugins(config, tasks)


def _call_plugins(config: MTSLConfig, tasks: tuple[str, ...] | None) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=generator, requires_grad=True)
    y = torch.randn(8, 6, generator=generator)
    for name in dict.fromkeys((config.similarity, config.align_similarity)):
        value = similarity(name)(x, y)
        if config.aligns and name == config.align_similarity and not value.requires_grad:
            raise ValueError(f"similarity {name!r} returns no gradient, so it cannot drive the alignment loss "
                             "(align_similarity); use a differentiable one such as cka")
    names = list(tasks) if tasks else ["S", "D", "E"]
    matrix = torch.rand(len(names), len(names), generator=generator, dtype=torch.float64).numpy()
    grouping_solver(config.grouping)((matrix + matrix.T) / 2, names, config.threshold)
    pair = names[:2] if len(names) > 1 else ["S", "D"]
    module = amalgamator(config.amalgamator)(4, pair)  # None: no distillation
    if module is not None:
        features = {t: torch.randn(2, 4, 3, 3, generator=generator) for t in pair}
        # a group output that requires grad: the contract check refuses a loss without a gradient
        module(torch.randn(2, 4, 3, 3, generator=generator, requires_grad=True), features)


def read_every_sample(dataset: torch.utils.data.Dataset, what: str, progress: bool = True) -> None:
    """Read every sample of ``dataset`` once; its loader names the file of the first bad one.

    On the training split of folder data it also collects the classes of each segmentation task (``labels``
    layout, ``(H, W)`` targets, -1 = ignore) and refuses a task whose training labels hold at most one class: it
    would learn that class everywhere and score a perfect mIoU. The usual cause is a two-class mask stored as a
    0/255 PNG, whose 255 reads as "ignore". The rule is deliberately narrow: a split that lacks some of many
    classes (a small subset of a 40-class data set) is normal and passes, and so does the test split.

    On folder, NYUv2 and Cityscapes data (either split) it refuses a task none of whose targets holds a valid pixel
    at the data set's size (:func:`_value_rules`: every label ignore, every dense value NaN or, under the
    ``positive`` rule, 0, every normal zero): its loss would be 0 at every step (training split) or its metric NaN
    (test split), found only after training. A sample without a valid pixel is normal and passes.

    It also refuses a normals task of those data sets whose split looks like a normal map's image encoding
    (:func:`_check_not_encoded`).
    """
    classes = _label_classes(dataset)
    files = _stored_targets(dataset)
    rules = _value_rules(files)
    empty = set(rules)  # the tasks no sample read so far holds a valid pixel of
    unsigned = {task for task, stored in files.items() if stored.layout == "normals"}  # and none a negative normal
    for index in tqdm(range(len(dataset)), desc=f"checking {what}", leave=False, disable=None if progress else True):
        _, targets = dataset[index]
        for task, seen in classes.items():
            labels = targets[task]
            seen |= torch.bincount(labels[labels >= 0].flatten(), minlength=len(seen))[:len(seen)] > 0
        empty -= {task for task in empty if bool(rules[task][0](targets[task]).any())}
        unsigned -= {task for task in unsigned if bool((targets[task] < 0).any())}  # invalid normals are 0
    for task, seen in classes.items():
        if int(seen.sum()) <= 1:
            found = f"only class {int(seen.nonzero()[0, 0])}" if seen.any() else "no class"
            raise ValueError(f"task {task!r}: the training labels in {files[task].folder} hold {found} besides "
                             f"ignore, but a segmentation task of {len(seen)} classes needs at least two; in PNG "
                             "labels 255 means ignore, so store a mask's foreground as 1 (and further classes as 2, "
                             "3, ...)")
    for task, (_, none) in rules.items():
        if task in empty:
            outcome = "learn from no pixel" if dataset.split == "train" else "score NaN"
            raise ValueError(f"task {task!r}: no target of the {what} in {files[task].folder} holds a valid pixel (at "
                             f"{dataset.height}x{dataset.width} every pixel is {none}), so the task would {outcome}")
    for task in unsigned:
        _check_not_encoded(task, what, files[task].folder, files[task].paths)


class _StoredTargets(NamedTuple):
    """How a task's targets are stored, as preflight reads them: their layout, which values hold a value (a dense
    layout's :data:`~mtsl_plugin.tasks.VALID_RULES` rule), their folder and the file of each sample, in sample
    order (not :class:`~mtsl_plugin.data.folder.TargetFiles`, a folder task's declaration)."""
    layout: str
    valid: str
    folder: Path
    paths: list[Path]


def _stored_targets(dataset: torch.utils.data.Dataset) -> dict[str, _StoredTargets]:
    """Task -> how its targets are stored, for each target that folder data, NYUv2 and Cityscapes read from a file
    of its own (not ``E`` and ``A``, which are derived, nor a folder task of the ``image`` layout); empty for any
    other data set (synthetic scenes are drawn, valid by construction)."""
    from mtsl_plugin.data import FolderDataset
    from mtsl_plugin.data.real import LETTER_LAYOUTS, NpyLayoutDataset

    if isinstance(dataset, FolderDataset):
        return {task: _StoredTargets(spec.layout, spec.valid, dataset.split_dir / spec.folder,
                                   [dataset.files[task][sample] for sample in dataset.ids])
                for task, spec in dataset.targets.items() if task in dataset.files}
    if isinstance(dataset, NpyLayoutDataset):  # D: 0 = no depth
        return {task: _StoredTargets(LETTER_LAYOUTS[task], "positive", dataset.split_dir / folder,
                                   [dataset.split_dir / folder / dataset.names[i] for i in dataset.indices])
                for task, folder in dataset.folders.items() if task in LETTER_LAYOUTS}
    return {}


def _check_not_encoded(task: str, what: str, folder: Any, paths: list) -> None:
    """Refuse normals stored as an image encoding ``(n + 1) / 2`` in [0, 1] (floats; unsigned integers are refused
    when read), called for a split none of whose valid normals has a negative component: encoded normals are not
    unit vectors (``|(n + 1) / 2| = sqrt(1 + (nx + ny + nz) / 2)``, from 0.37 to 1.37), so the split is refused
    when over half of its stored float normals (finite, not all zero) differ from length 1 by more than 0.05 (a
    median length alone would miss an encoded scene whose normals spread evenly over the sphere). A true split
    that happens to hold no negative component (one plane facing the camera, (0, 0, 1)) is of unit length and
    passes; so do signed-integer normals, which are directions of any length."""
    from mtsl_plugin.data.real import read_npy

    off = total = 0  # the valid normals whose length is not within 0.05 of 1, and all valid normals
    for path in paths:
        normals = read_npy(path, mmap_mode="r")
        if normals.dtype.kind != "f":
            continue
        normals = np.asarray(normals, dtype=np.float64).reshape(-1, 3)
        lengths = np.linalg.norm(normals[np.isfinite(normals).all(axis=1) & (normals != 0).any(axis=1)], axis=1)
        off, total = off + int((np.abs(lengths - 1) > 0.05).sum()), total + len(lengths)
    if 2 * off > total:
        raise ValueError(f"task {task!r}: no normal of the {what} in {folder} has a negative component and "
                         f"{off} of {total} are not unit vectors (length not within 0.05 of 1): they look like a "
                         "normal map's image encoding (n + 1) / 2 in [0, 1], not normals; map them to normals with "
                         "2 * value - 1")


def _label_classes(dataset: torch.utils.data.Dataset) -> dict[str, torch.Tensor]:
    """Task -> all-false ``(classes,)`` bool tensor for each segmentation task of folder data's training split
    (what :func:`read_every_sample` checks); empty for any other data set or split."""
    from mtsl_plugin.data import FolderDataset

    if not isinstance(dataset, FolderDataset) or dataset.split != "train":
        return {}
    return {task: torch.zeros(spec.channels, dtype=torch.bool) for task, spec in dataset.targets.items()
            if spec.layout == "labels"}


#: What a pixel without a value holds, by target layout (a dense one's by its rule), for the messages.
_NO_VALUE = {"labels": "ignore (-1; 255 in a PNG)", "finite": "NaN or inf", "positive": "NaN, inf, 0 or negative",
             "normals": "a zero or non-finite vector"}


def _value_rules(files: Mapping[str, _StoredTargets]) -> dict[str, tuple[Any, str]]:
    """Task -> (where a target of one sample holds a valid pixel: a function of the target, giving a bool tensor;
    what an invalid pixel holds) for each task of ``files`` (:func:`_stored_targets`) whose targets can lack a value
    (``labels``, ``dense`` and ``normals`` layouts; not ``binary`` ones)."""
    rules = {}
    for task, stored in files.items():
        if stored.layout == "labels":
            rules[task] = (lambda t: t >= 0, _NO_VALUE["labels"])
        elif stored.layout == "dense":
            rules[task] = (partial(holds_value, rule=stored.valid), _NO_VALUE[stored.valid])
        elif stored.layout == "normals":
            rules[task] = (lambda t: has_normal(t[None]), _NO_VALUE["normals"])
    return rules
