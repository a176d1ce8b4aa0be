"""The five built-in dense tasks: what each predicts, its head width, loss, metric and the direction in which the
metric improves; and the LibMTL adapters around a task.

Letters follow the MTSL paper: ``S`` semantic segmentation, ``D`` depth, ``E`` edges, ``N`` surface normals,
``A`` auto-encoding (reconstructing the image). Every prediction is a raw head output at full resolution:

- ``S``: logits ``(N, C, H, W)``; target int64 ``(N, H, W)`` class index, ``-1`` = ignore.
- ``D``: metres ``(N, 1, H, W)``; target metres ``(N, 1, H, W)``, ``0`` = no depth.
- ``E``: logits ``(N, 1, H, W)``; target ``(N, 1, H, W)`` in ``{0, 1}``.
- ``N``: unnormalised normals ``(N, 3, H, W)``; target unit normals ``(N, 3, H, W)``, zero vector = invalid.
- ``A``: image ``(N, 3, H, W)``; target the input image in ``[0, 1]``.

The losses are in :mod:`mtsl_plugin.losses` (the ``standard`` set, and the MTSL authors' forms that
``losses: authors`` trains with: :data:`~mtsl_plugin.losses.AUTHORS_LOSSES`). Metrics are :class:`torchmetrics.Metric`
objects (:mod:`mtsl_plugin.metrics`) that accumulate sums across batches, so a dataset score is exact
(pixel-weighted), never a mean of batch scores. Losses are means over valid pixels; a batch without any valid pixel
gives a zero loss that still belongs to the graph (no NaN).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Callable, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassJaccardIndex

from mtsl_plugin.losses import (AUTHORS_LOSSES, depth_loss, edge_loss, normal_loss, reconstruction_loss,
                                segmentation_loss)
from mtsl_plugin.metrics import ImageMSE, MaskedRMSE, MeanBCE, MeanCosine
from mtsl_plugin.valid_pixels import IGNORE_INDEX

TASKS: tuple[str, ...] = ("S", "D", "E", "N", "A")
#: Each built-in task's metric name (plain data, so that reports can label columns without building tasks).
METRIC_NAMES: dict[str, str] = {"S": "mIoU", "D": "RMSE", "E": "BCE", "N": "cos", "A": "MSE"}
#: Each built-in task's metric direction.
HIGHER_IS_BETTER: dict[str, bool] = {"S": True, "D": False, "E": False, "N": True, "A": False}
#: The layouts of a task's target (how a data set reads, resizes and mirrors it; shapes of one sample):
#: ``labels`` int64 ``(H, W)`` class index, -1 = ignore (nearest-neighbour resize); ``binary`` float32 ``(1, H, W)``
#: in {0, 1} (nearest-neighbour); ``dense`` float32 ``(C, H, W)``, non-finite = no value (bilinear over the valid
#: values); ``normals`` float32 ``(3, H, W)`` unit vectors, zero = invalid (mirroring negates x); ``image``: the
#: input image itself, no file of its own.
TARGET_LAYOUTS: tuple[str, ...] = ("labels", "binary", "dense", "normals", "image")
#: Which values of a ``dense`` target hold a value: ``finite`` (NaN and inf are none) or ``positive`` (0 and
#: negative values are none too, as depth maps store it).
VALID_RULES: tuple[str, ...] = ("finite", "positive")
#: The loss sets of the built-in tasks: ``standard`` (this package's default) and ``authors``
#: (:data:`~mtsl_plugin.losses.AUTHORS_LOSSES`).
LOSS_SETS: tuple[str, ...] = ("standard", "authors")


def normalise_normals(pred: Tensor) -> Tensor:
    """Unit-length normals from an unnormalised prediction ``(N, 3, H, W)`` (zero stays zero)."""
    return F.normalize(pred, dim=1, eps=1e-8)


def _identity(pred: Tensor) -> Tensor:
    return pred


# ----------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """One dense task: its head width, loss, metric and metric direction.

    ``loss_fn(pred, target)`` returns a 0-d tensor; ``metric_factory()`` returns a fresh torchmetrics metric
    whose ``update`` takes ``(postprocess(pred), target)``; ``postprocess_fn`` maps a raw head output to what
    the metric reads (normalised normals; identity elsewhere). ``target`` is the layout of the task's target
    (:data:`TARGET_LAYOUTS`), which tells a data set how to read, resize and mirror it.
    """

    name: str
    title: str
    out_channels: int
    metric_name: str
    higher_is_better: bool
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    metric_factory: Callable[[], Metric]
    postprocess_fn: Callable[[Tensor], Tensor] = _identity
    target: str = "dense"
    valid: str = "finite"  # which dense target values hold a value (VALID_RULES); data sets read the others as NaN

    # The channel count each target layout fixes (``out_channels`` must equal it; ``labels`` needs at least 2
    # classes, ``dense`` takes any). Not annotated, so not a field.
    layout_channels = {"binary": 1, "normals": 3, "image": 3}

    def __post_init__(self) -> None:
        """Refuse, in one line naming the task, a field of the wrong type or a channel count its target layout
        cannot have (:attr:`layout_channels`): a Task from a plugin's kind is checked like a built-in one."""
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a task's name must be a non-empty str, got {self.name!r}")
        problem = None
        if self.target not in TARGET_LAYOUTS:
            problem = f"target layout {self.target!r} is not one of {TARGET_LAYOUTS}"
        elif self.valid not in VALID_RULES:
            problem = f"valid rule {self.valid!r} is not one of {VALID_RULES}"
        elif isinstance(self.out_channels, bool) or not isinstance(self.out_channels, int) or self.out_channels < 1:
            problem = f"out_channels must be an int >= 1, got {self.out_channels!r}"
        elif not isinstance(self.higher_is_better, bool):  # bool("false") is True: a string would flip Δ_MTL
            problem = f"higher_is_better must be True or False, got {self.higher_is_better!r}"
        elif not isinstance(self.title, str) or not isinstance(self.metric_name, str):
            field = "title" if not isinstance(self.title, str) else "metric_name"
            problem = f"{field} must be a str, got {getattr(self, field)!r}"
        else:
            for field in ("loss_fn", "metric_factory", "postprocess_fn"):
                if not callable(getattr(self, field)):
                    problem = f"{field} must be callable, got {getattr(self, field)!r}"
                    break
        channels = self.layout_channels.get(self.target)
        if problem is None and self.target == "labels" and self.out_channels < 2:
            problem = (f"a labels target needs at least 2 classes (output channels, one logit per class), but the "
                       f"task has {self.out_channels}")
        elif problem is None and channels is not None and self.out_channels != channels:
            problem = (f"a{'n' if self.target[0] in 'aeiou' else ''} {self.target} target has {channels} "
                       f"channel{'s' if channels > 1 else ''}, but the task has {self.out_channels} output "
                       f"channel{'s' if self.out_channels > 1 else ''}")
        if problem is not None:
            raise ValueError(f"task {self.name!r}: {problem}")

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """The training loss (0-d tensor) of a raw prediction ``(N, out_channels, H, W)`` against ``target``:
        ``(N, H, W)`` class indices for a ``labels`` layout, ``(N, out_channels, H, W)`` for every other."""
        if pred.dim() != 4 or pred.shape[1] != self.out_channels:
            raise ValueError(
                f"task {self.name} expects predictions (N, {self.out_channels}, H, W), got {tuple(pred.shape)}"
            )
        expected = "(N, H, W)" if self.target == "labels" else f"(N, {self.out_channels}, H, W)"
        if (target.dim() != 3 if self.target == "labels" else
                target.dim() != 4 or target.shape[1] != self.out_channels):
            raise ValueError(
                f"task {self.name} ({self.target} target) expects targets {expected}, got prediction "
                f"{tuple(pred.shape)} and target {tuple(target.shape)}"
            )
        if pred.shape[0] != target.shape[0] or pred.shape[-2:] != target.shape[-2:]:
            raise ValueError(
                f"task {self.name} got prediction {tuple(pred.shape)} and target {tuple(target.shape)} "
                "with different batch or spatial sizes"
            )
        loss = self.loss_fn(pred, target)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            described = (f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else
                         f"{type(loss).__name__} {loss!r}"[:200])
            raise ValueError(f"task {self.name}: its loss returned {described}, expected a 0-d tensor "
                             "(a mean over the valid pixels)")
        return loss

    def make_metric(self) -> Metric:
        """A fresh metric; ``update(postprocess(pred), target)`` per batch, ``compute()`` gives a 0-d tensor."""
        return self.metric_factory()

    def postprocess(self, pred: Tensor) -> Tensor:
        """The raw prediction as the metric reads it (same shape)."""
        return self.postprocess_fn(pred)


def _segmentation(num_classes: int) -> Task:
    # torchmetrics 1.9, average="macro": pixels labelled -1 are dropped before the confusion matrix, and classes
    # with no pixel in either prediction or target get weight 0, so they do not enter the mean. (A partial of a
    # class, unlike a closure, keeps the task picklable.)
    make_metric = partial(MulticlassJaccardIndex, num_classes=num_classes, ignore_index=IGNORE_INDEX, average="macro")
    return Task("S", "semantic segmentation", num_classes, METRIC_NAMES["S"], HIGHER_IS_BETTER["S"],
                segmentation_loss, make_metric, target="labels")


_FIXED: dict[str, Callable[[], Task]] = {
    "D": lambda: Task("D", "depth estimation", 1, METRIC_NAMES["D"], HIGHER_IS_BETTER["D"], depth_loss, MaskedRMSE,
                      valid="positive"),
    "E": lambda: Task("E", "edge detection", 1, METRIC_NAMES["E"], HIGHER_IS_BETTER["E"], edge_loss, MeanBCE,
                      target="binary"),
    "N": lambda: Task("N", "surface normal estimation", 3, METRIC_NAMES["N"], HIGHER_IS_BETTER["N"], normal_loss,
                      MeanCosine, normalise_normals, target="normals"),
    # the sums of squared errors and element counts of all batches (float64): pixel-weighted, as every metric here
    "A": lambda: Task("A", "auto-encoding", 3, METRIC_NAMES["A"], HIGHER_IS_BETTER["A"], reconstruction_loss,
                      ImageMSE, target="image"),
}


def build_tasks(names: Sequence[str], num_classes: int, losses: str = "standard") -> dict[str, Task]:
    """The tasks named by ``names`` (letters from :data:`TASKS`), in that order.

    ``num_classes`` is the number of semantic classes; it must be at least 2 when ``S`` is requested. ``losses``
    (:data:`LOSS_SETS`) picks the training losses: ``standard`` (the first ones of :mod:`mtsl_plugin.losses`) or
    ``authors`` (:data:`~mtsl_plugin.losses.AUTHORS_LOSSES`); the metrics are the same for both.
    """
    if losses not in LOSS_SETS:
        raise ValueError(f"unknown loss set {losses!r}; choose one of {', '.join(LOSS_SETS)}")
    if isinstance(names, str):
        names = list(names)
    tasks: dict[str, Task] = {}
    for name in names:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; choose from {list(TASKS)}")
        if name in tasks:
            raise ValueError(f"task {name!r} is requested twice")
        if name == "S":
            if num_classes < 2:
                raise ValueError(f"semantic segmentation needs num_classes >= 2, got {num_classes}")
            tasks[name] = _segmentation(num_classes)
        else:
            tasks[name] = _FIXED[name]()
        if losses == "authors":
            tasks[name] = dataclasses.replace(tasks[name], loss_fn=AUTHORS_LOSSES[name])
    if not tasks:
        raise ValueError("build_tasks needs at least one task name")
    return tasks


# ----------------------------------------------------------------------------------------------- LibMTL
@lru_cache(maxsize=None)
def _libmtl_adapters() -> tuple[type, type]:
    """LibMTL ``AbsLoss``/``AbsMetric`` subclasses wrapping a :class:`Task` (built once, after the shim)."""
    from mtsl_plugin.libmtl_compat import import_libmtl

    libmtl = import_libmtl()

    class LibMTLTaskLoss(libmtl.loss.AbsLoss):
        """LibMTL loss record around ``task.loss``."""

        def __init__(self, task: Task):
            super().__init__()
            self.task = task

        def compute_loss(self, pred: Tensor, gt: Tensor) -> Tensor:
            return self.task.loss(pred, gt)

    class LibMTLTaskMetric(libmtl.metrics.AbsMetric):
        """LibMTL metric around a torchmetrics metric of ``task``; ``score_fun`` gives ``[float]``."""

        def __init__(self, task: Task):
            super().__init__()
            self.task = task
            self.metric = task.make_metric()

        def update_fun(self, pred: Tensor, gt: Tensor) -> None:
            if self.metric.device != pred.device:
                self.metric = self.metric.to(pred.device)
            # contiguous: torchmetrics flattens with .view, which a channels-last prediction refuses
            self.metric.update(self.task.postprocess(pred.detach()).contiguous(), gt.contiguous())
            self.bs.append(pred.shape[0])

        def score_fun(self) -> list[float]:
            return [float(self.metric.compute())]

        def reinit(self) -> None:
            super().reinit()
            self.metric.reset()

    for cls in (LibMTLTaskLoss, LibMTLTaskMetric):  # resolvable by pickle through the module __getattr__
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return LibMTLTaskLoss, LibMTLTaskMetric


def __getattr__(name: str) -> type:
    if name in ("LibMTLTaskLoss", "LibMTLTaskMetric"):
        loss_cls, metric_cls = _libmtl_adapters()
        return loss_cls if name == "LibMTLTaskLoss" else metric_cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def libmtl_task_dict(tasks: Mapping[str, Task]) -> dict[str, dict]:
    """LibMTL's ``task_dict``: per task ``{'metrics': [name], 'metrics_fn': AbsMetric, 'loss_fn': AbsLoss,
    'weight': [1 if higher is better else 0]}``, in the order of ``tasks``."""
    loss_cls, metric_cls = _libmtl_adapters()
    return {
        name: {
            "metrics": [task.metric_name],
            "metrics_fn": metric_cls(task),
            "loss_fn": loss_cls(task),
            "weight": [1 if task.higher_is_better else 0],
        }
        for name, task in tasks.items()
    }
