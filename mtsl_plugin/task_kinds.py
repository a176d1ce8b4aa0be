"""Task kinds: a user's own tasks, declared in a run's configuration instead of written as code.

A *declaration* names a kind and its options, e.g. (YAML)::

    tasks:
      parts: {kind: segmentation, classes: 4}
      flow:  {kind: regression, channels: 2, loss: l1, metric: rmse}
      mask:  {kind: binary, metric: iou, folder: masks}

:func:`declare_task` turns one into a :class:`~mtsl_plugin.tasks.Task`. The kinds are plugins
(``mtsl_task_kinds`` in :mod:`mtsl_plugin.plugins.hookspecs`); the built-in ones, registered by
:mod:`mtsl_plugin.plugins.builtin_tasks`, are the functions below:

==============  ==============================  ==============================  ===========================
kind            options                         losses (default first)           metrics (default first)
==============  ==============================  ==============================  ===========================
segmentation    ``classes`` (>= 2)              ``cross_entropy``                ``miou`` ↑, ``accuracy`` ↑
regression      ``channels`` (>= 1), ``valid``  ``l1``, ``mse``                  ``rmse`` ↓, ``mae`` ↓, ``mse`` ↓
binary          -                               ``balanced_bce``, ``bce``        ``bce`` ↓, ``iou`` ↑
normals         -                               ``cosine``                       ``cos`` ↑
reconstruction  -                               ``mse``                          ``mse`` ↓
==============  ==============================  ==============================  ===========================

Every kind also takes ``higher_is_better`` (true or false: the metric's direction, default the metric's own)
and ``title``.
A regression's ``valid`` says which target values count: ``finite`` (default; NaN = no value) or ``positive``
(also 0 = no value, as depth maps store it). ``folder`` (the data sub-folder, default the task's name) and
``kind`` are read by the caller, not by the kind. Predictions and targets have the shapes of the kind's target
layout (:data:`~mtsl_plugin.tasks.TARGET_LAYOUTS`); losses are means over valid pixels, metrics accumulate sums
over the whole data set (pixel-weighted), as for the built-in tasks S D E N A.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import BinaryJaccardIndex, MulticlassAccuracy, MulticlassJaccardIndex

from mtsl_plugin.learner.schedule import require
from mtsl_plugin.losses import as_float, edge_loss, masked_mean, normal_loss, reconstruction_loss, segmentation_loss
from mtsl_plugin.metrics import ImageMSE, MeanBCE, MeanCosine, RegressionError
from mtsl_plugin.tasks import TASKS, VALID_RULES, Task, build_tasks, normalise_normals
from mtsl_plugin.valid_pixels import IGNORE_INDEX, holds_value

#: Keys of a declaration that the caller reads (never passed to the kind).
DECLARATION_KEYS = ("kind", "folder")


# ----------------------------------------------------------------------------------------------- regression
def regression_loss(pred: Tensor, target: Tensor, *, power: int, valid: str) -> Tensor:
    """Mean of ``|pred - target| ** power`` over the valid target values
    (:func:`~mtsl_plugin.valid_pixels.holds_value`); both ``(N, C, H, W)``. Invalid values are replaced before the
    difference, so a NaN target never reaches the gradient."""
    mask = holds_value(target, valid)
    error = (as_float(pred) - torch.where(mask, target, 0.0)).abs()
    return masked_mean(error if power == 1 else error ** power, mask)


# ----------------------------------------------------------------------------------------------- binary
def binary_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Plain BCE with logits, mean over all pixels; both ``(N, 1, H, W)``, target in {0, 1}."""
    return F.binary_cross_entropy_with_logits(as_float(pred), target.to(as_float(pred).dtype))


class BinaryIoU(BinaryJaccardIndex):
    """Intersection over union of ``sigmoid(logits) > 0.5`` with the {0, 1} target over the whole data set;
    takes the raw logits ``(N, 1, H, W)`` (torchmetrics applies the sigmoid to values outside [0, 1])."""

    def update(self, preds: Tensor, target: Tensor) -> None:  # noqa: D102
        super().update(torch.sigmoid(preds.float()), target.long())


# ----------------------------------------------------------------------------------------------- the kinds
_DIRECTION = {"miou": True, "accuracy": True, "rmse": False, "mae": False, "mse": False, "bce": False, "iou": True,
              "cos": True}
_METRIC_LABEL = {"miou": "mIoU", "accuracy": "acc", "rmse": "RMSE", "mae": "MAE", "mse": "MSE", "bce": "BCE",
                 "iou": "IoU", "cos": "cos"}


def _pick(name: str, what: str, choice: str, table: Mapping[str, Any]) -> Any:
    if not isinstance(choice, str) or choice not in table:  # a list would not even hash
        raise ValueError(f"task {name!r}: unknown {what} {choice!r}; choose from {list(table)}")
    return table[choice]


def _task(name: str, title: str | None, kind: str, channels: int, metric: str, higher_is_better: bool | None,
          loss_fn: Callable, metric_factory: Callable[[], Metric], target: str,
          postprocess_fn: Callable | None = None, valid: str = "finite") -> Task:
    require(f"task {name!r}: higher_is_better", higher_is_better, bool, optional=True)  # bool("false") is True
    direction = _DIRECTION[metric] if higher_is_better is None else higher_is_better
    extra = {} if postprocess_fn is None else {"postprocess_fn": postprocess_fn}
    return Task(name, title or f"{name} ({kind})", channels, _METRIC_LABEL[metric], direction, loss_fn,
                metric_factory, target=target, valid=valid, **extra)


def _count(name: str, what: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"task {name!r}: {what} must be an integer >= {least}, got {value!r}")
    return value


def segmentation(name: str, *, classes: int, loss: str = "cross_entropy", metric: str = "miou",
                 higher_is_better: bool | None = None, title: str | None = None) -> Task:
    """Per-pixel classification into ``classes`` classes: logits ``(N, classes, H, W)``, target ``labels``."""
    classes = _count(name, "classes", classes, 2)
    loss_fn = _pick(name, "loss", loss, {"cross_entropy": segmentation_loss})
    common = {"num_classes": classes, "ignore_index": IGNORE_INDEX}
    metric_factory = _pick(name, "metric", metric, {
        "miou": partial(MulticlassJaccardIndex, average="macro", **common),
        "accuracy": partial(MulticlassAccuracy, average="micro", **common)})
    return _task(name, title, "segmentation", classes, metric, higher_is_better, loss_fn, metric_factory, "labels")


def regression(name: str, *, channels: int = 1, loss: str = "l1", metric: str = "rmse", valid: str = "finite",
               higher_is_better: bool | None = None, title: str | None = None) -> Task:
    """Per-pixel values with ``channels`` channels: prediction and target ``(N, channels, H, W)`` (``dense``)."""
    channels = _count(name, "channels", channels, 1)
    _pick(name, "valid rule", valid, dict.fromkeys(VALID_RULES))
    loss_fn = _pick(name, "loss", loss, {"l1": partial(regression_loss, power=1, valid=valid),
                                         "mse": partial(regression_loss, power=2, valid=valid)})
    metric_factory = _pick(name, "metric", metric, {"rmse": partial(RegressionError, 2, True, valid),
                                                    "mae": partial(RegressionError, 1, False, valid),
                                                    "mse": partial(RegressionError, 2, False, valid)})
    return _task(name, title, "regression", channels, metric, higher_is_better, loss_fn, metric_factory, "dense",
                 valid=valid)


def binary(name: str, *, loss: str = "balanced_bce", metric: str = "bce", higher_is_better: bool | None = None,
           title: str | None = None) -> Task:
    """Per-pixel yes/no (edges, masks): logits ``(N, 1, H, W)``, target ``binary``. ``balanced_bce`` weighs the
    two classes by each other's frequency in the batch (HED, the built-in E's loss)."""
    loss_fn = _pick(name, "loss", loss, {"balanced_bce": edge_loss, "bce": binary_loss})
    metric_factory = _pick(name, "metric", metric, {"bce": MeanBCE, "iou": BinaryIoU})
    return _task(name, title, "binary", 1, metric, higher_is_better, loss_fn, metric_factory, "binary")


def normals(name: str, *, loss: str = "cosine", metric: str = "cos", higher_is_better: bool | None = None,
            title: str | None = None) -> Task:
    """Surface normals: unnormalised ``(N, 3, H, W)`` predictions, unit-vector targets (``normals``)."""
    loss_fn = _pick(name, "loss", loss, {"cosine": normal_loss})
    metric_factory = _pick(name, "metric", metric, {"cos": MeanCosine})
    return _task(name, title, "normals", 3, metric, higher_is_better, loss_fn, metric_factory, "normals",
                 normalise_normals)


def reconstruction(name: str, *, loss: str = "mse", metric: str = "mse", higher_is_better: bool | None = None,
                   title: str | None = None) -> Task:
    """Reconstruct the input image: ``(N, 3, H, W)``, target the image (``image``, no file of its own)."""
    loss_fn = _pick(name, "loss", loss, {"mse": reconstruction_loss})
    metric_factory = _pick(name, "metric", metric, {"mse": ImageMSE})
    return _task(name, title, "reconstruction", 3, metric, higher_is_better, loss_fn, metric_factory, "image")


BUILTIN_KINDS: dict[str, Callable[..., Task]] = {
    "segmentation": segmentation, "regression": regression, "binary": binary, "normals": normals,
    "reconstruction": reconstruction,
}


# ----------------------------------------------------------------------------------------------- the probe
#: The size of the random batch :func:`probe_task` tries a task on: (N, H, W).
PROBE_SIZE = (2, 4, 4)


def _probe_batch(task: Task, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A random raw prediction ``(N, out_channels, H, W)`` (requiring grad) and a valid target of the task's
    layout: classes in ``[0, C)``, {0, 1} masks, values in ``[0, 1)``, unit normals or an image."""
    n, h, w = PROBE_SIZE
    c = task.out_channels
    pred = torch.randn(n, c, h, w, generator=generator).requires_grad_()
    if task.target == "labels":
        target = torch.randint(0, c, (n, h, w), generator=generator)
    elif task.target == "binary":
        target = (torch.rand(n, 1, h, w, generator=generator) > 0.5).float()
    elif task.target == "normals":
        target = F.normalize(torch.randn(n, 3, h, w, generator=generator), dim=1)
    else:  # dense, image
        target = torch.rand(n, c, h, w, generator=generator)
    return pred, target


def probe_task(task: Task) -> None:
    """Try ``task``'s loss and metric once on a tiny random batch of its layout (:data:`PROBE_SIZE`), so a loss
    that is not a finite 0-d tensor with a gradient to the prediction, or a metric factory that does not make a
    working torchmetrics ``Metric``, is refused before any training rather than at step 1 or after training.

    Draws from its own generator (the global random state is untouched). Raises ``ValueError`` saying what
    failed, without the task's name (the caller names the task, its kind and plugin).
    """
    from mtsl_plugin.plugins.manager import _describe, _failure  # deferred: the manager imports the built-in kinds

    with torch.inference_mode(False):
        pred, target = _probe_batch(task, torch.Generator().manual_seed(0))
    shapes = f"a prediction {tuple(pred.shape)} and a {task.target} target {tuple(target.shape)}"
    with torch.inference_mode(False), torch.enable_grad():  # the caller may be evaluating
        try:
            loss = task.loss_fn(pred, target)  # the batch fits the layout: Task.loss's shape checks would pass
        except Exception as error:  # noqa: BLE001  any failure of the plugin's code is reported as one line
            raise ValueError(f"its loss on {shapes} raised {_failure(error)}") from error
        if not (isinstance(loss, Tensor) and loss.dim() == 0 and loss.is_floating_point()
                and bool(torch.isfinite(loss.detach()))):
            raise ValueError(f"its loss on {shapes} returned {_describe(loss)}, expected a finite 0-d float tensor")
        if not loss.requires_grad or torch.autograd.grad(loss, pred, allow_unused=True)[0] is None:
            raise ValueError(f"its loss on {shapes} has no gradient with respect to the prediction (is it computed "
                             "from pred.detach(), numpy or .item()?)")
    try:
        metric = task.make_metric()
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"its metric_factory raised {_failure(error)}") from error
    if not isinstance(metric, Metric):
        raise ValueError(f"its metric_factory returned {_describe(metric)}, expected a torchmetrics Metric")
    try:
        metric.update(task.postprocess(pred.detach()), target)
        float(metric.compute())
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"its metric on {shapes} raised {_failure(error)}") from error


def declare_task(name: str, declaration: Mapping[str, Any]) -> Task:
    """The :class:`Task` ``name`` of a declaration ``{kind: ..., <the kind's options>, folder: ...}``; the kind is
    looked up among the plugins' task kinds. A mistake (no kind, unknown kind or option, bad value, a ``folder``,
    or without one the name, that is no folder inside each split's: :func:`~mtsl_plugin.data.folder.folder_problem`)
    raises ``ValueError`` naming the task. The task's loss and metric are tried once on a tiny random batch
    (:func:`probe_task`), so a kind whose loss or metric does not work is refused here, naming the task, its kind
    and plugin (``PluginContractError``), not at the first step or after training."""
    from mtsl_plugin.plugins import UnknownNameError, task_kind  # deferred: the manager imports the built-in kinds

    if not isinstance(declaration, Mapping):
        raise ValueError(f"task {name!r}: a declaration is a mapping with a 'kind', got {declaration!r}")
    if "kind" not in declaration:
        raise ValueError(f"task {name!r}: its declaration names no 'kind'")
    if not isinstance(declaration["kind"], str):  # a list would not even hash
        raise ValueError(f"task {name!r}: kind must be the name of a task kind (e.g. segmentation), got "
                         f"{declaration['kind']!r}")
    from mtsl_plugin.data.folder import folder_problem  # deferred: the data package is not needed otherwise

    if "folder" in declaration and (problem := folder_problem(declaration["folder"])):
        raise ValueError(f"task {name!r}: folder {problem}")
    if "folder" not in declaration and isinstance(name, str) and name and (problem := folder_problem(name)):
        raise ValueError(f"task {name!r}: its folder, by default its name, {problem}; give its folder (folder: ...)")
    options = {k: v for k, v in declaration.items() if k not in DECLARATION_KEYS}
    try:
        kind = task_kind(declaration["kind"])
    except UnknownNameError as error:
        raise ValueError(f"task {name!r}: {error}") from None
    return kind(name, options)


def build_task_set(names: Sequence[str], declarations: Mapping[str, Mapping[str, Any]], num_classes: int,
                   losses: str = "standard") -> dict[str, Task]:
    """The tasks ``names``, in that order: a declared one from its declaration (:func:`declare_task`), any other
    from the built-in tasks S D E N A (:func:`~mtsl_plugin.tasks.build_tasks`, S with ``num_classes`` classes,
    trained with the loss set ``losses``)."""
    if len(set(names)) != len(names):
        raise ValueError(f"a task is requested twice in {list(names)}")
    tasks: dict[str, Task] = {}
    for name in names:
        if name in declarations:
            tasks[name] = declare_task(name, declarations[name])
        elif name not in TASKS:
            raise ValueError(f"task {name!r} is neither declared (tasks: {{{name}: {{kind: ..., ...}}}} in a "
                             f"--config file) nor a built-in task ({', '.join(TASKS)})")
        elif name == "S" and num_classes < 2:
            raise ValueError("task 'S' needs its classes on this data: declare it, e.g. "
                             "tasks: {S: {kind: segmentation, classes: 13}}")
        else:
            tasks.update(build_tasks([name], num_classes, losses))
    if not tasks:
        raise ValueError("a run needs at least one task")
    return tasks
