"""The hook specifications of MTSL: the one place where the plugin API is declared.

MTSL merges task nodes in three steps, and each step is open to plugins:

1. *measure* how similar the tasks' features are (a similarity metric, e.g. linear CKA),
2. *group* the tasks into a partition given those similarities (a grouping solver),
3. *amalgamate* each new group node from the task nodes it replaces (an amalgamator).

The tasks themselves are open too: a *task kind* turns a task declared in a run's configuration into its loss,
metric and target layout (:mod:`mtsl_plugin.task_kinds`).

A plugin is a plain module (or any object) whose functions are marked with :data:`hookimpl` and named like the
specifications below. Each hook takes no argument and returns a dict ``name -> object``; a plugin may offer
several names, and names are global across plugins (two plugins offering the same name is an error).
Third-party plugins arrive through the entry-point group ``"mtsl_plugin"`` or ``--plugin module``; the built-ins
(``mtsl_plugin.plugins.builtin_similarity``, ``.builtin_grouping``, ``.builtin_amalgamation``, ``.builtin_tasks``)
are registered the very same way.

The hooks are called whenever a name is looked up or listed (``similarity(name)``, ``available(kind)``, ...),
so an implementation must be cheap and free of side effects. The plugin manager wraps every object it hands
out with a check of the contract stated here; a plugin that breaks it, or whose hook or object raises, fails with
a one-line ``PluginContractError`` naming the plugin. ``load_plugin`` calls a module's hooks once and refuses
(``PluginLoadError``) one that raises or returns neither a dict nor ``None`` (which offers nothing).

This module imports no implementation.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Union

import pluggy

if TYPE_CHECKING:
    import numpy as np
    import torch

    from mtsl_plugin.tasks import Task

PROJECT_NAME = "mtsl_plugin"
"""The pluggy project name, which is also the entry-point group third-party packages declare."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

SimilarityMetric = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
"""``metric(x, y) -> 0-d tensor`` with x of shape (N, C1) and y of shape (N, C2)."""

GroupingSolver = Callable[[Union["torch.Tensor", "np.ndarray"], Sequence[str], float], list[list[str]]]
"""``solver(similarity, tasks, threshold) -> partition of tasks``."""

AmalgamatorFactory = Callable[[int, Sequence[str]], Union["torch.nn.Module", None]]
"""``factory(channels, tasks) -> loss module or None``."""

TaskKind = Callable[..., "Task"]
"""``kind(name, **options) -> mtsl_plugin.tasks.Task``."""


@hookspec
def mtsl_similarity_metrics() -> dict[str, SimilarityMetric]:
    """Return the similarity metrics this plugin offers, by name.

    Each metric is called as ``metric(x, y)`` where

    - ``x`` is a float tensor of shape (N, C1): one task node's output, spatially averaged (one row per image);
    - ``y`` is a float tensor of shape (N, C2) with the same N (N >= 4; C1 and C2 may differ), on the same
      device as ``x``.

    It returns a 0-d finite float tensor; higher means more similar, nominally in [-1, 1] (e.g. CKA lies in
    about [0, 1]). A metric used in MTSL's alignment loss must be differentiable in ``x`` and ``y``; a metric
    that is not (e.g. one computed through numpy) must say so in its docstring and is then usable only to
    decide the grouping. The manager checks that both inputs are 2-D with the same N and that the result is a
    0-d finite tensor.
    """


@hookspec
def mtsl_grouping_solvers() -> dict[str, GroupingSolver]:
    """Return the grouping solvers this plugin offers, by name.

    Each solver is called as ``solver(similarity, tasks, threshold)`` where

    - ``similarity`` is a (T, T) torch tensor or numpy array of pairwise task similarities; its diagonal is to
      be ignored and it is to be treated as symmetric;
    - ``tasks`` is a sequence of T distinct task names (str), in the order of the matrix's rows;
    - ``threshold`` is a float, the similarity threshold gamma (a solver may ignore it and must then say so).

    It returns a partition of ``tasks`` as ``list[list[str]]``: every task exactly once, no empty group.
    The canonical order is: groups ordered by the position of their first task in ``tasks``, tasks within a
    group in ``tasks`` order; ties between equally good partitions are broken deterministically. The manager
    passes the solver a copy of the matrix (so editing it in place is harmless), checks that the result is a
    partition of ``tasks`` and returns it in the canonical order. Before any training a run calls its solver
    once on a random matrix of its own tasks, so a solver that cannot serve them (the exact built-ins refuse
    more than 16 tasks) should raise ``ValueError`` with a one-line message then.
    """


@hookspec
def mtsl_amalgamators() -> dict[str, AmalgamatorFactory]:
    """Return the amalgamators this plugin offers, by name, as factories.

    Each factory is called as ``factory(channels, tasks)`` when a group node is created for the tasks
    ``tasks`` (a sequence of task names) at a location whose nodes output ``channels`` channels. It returns

    - ``None``: no distillation, the group node keeps its initialisation (the average of the task nodes); or
    - a ``torch.nn.Module`` whose ``forward(group_out, task_outs)`` takes ``group_out`` of shape (N, C, H, W),
      the group node's output, and ``task_outs``, a dict task name -> (N, C, H, W) tensor holding the frozen
      task nodes' outputs on the same input, and returns a 0-d finite loss tensor. The module's own parameters
      are trained together with the group node; the task outputs are fixed targets.

    The manager checks that the factory returns None or a module, and (through a forward hook, so the module
    must be called as ``module(group_out, task_outs)``) that every loss is a 0-d finite tensor, which carries a
    gradient whenever ``group_out`` requires one and grad mode is on.
    """


@hookspec
def mtsl_task_kinds() -> dict[str, TaskKind]:
    """Return the task kinds this plugin offers, by name (e.g. ``"segmentation"``, ``"regression"``).

    A run's configuration declares a task as ``{kind: <name>, <options>}``; the kind is called as
    ``kind(task_name, **options)`` with every key of the declaration but ``kind`` and ``folder`` (read by the data
    set). It returns an :class:`mtsl_plugin.tasks.Task` named ``task_name``: the head's output channels, the loss
    ``loss_fn(pred (N, C, H, W), target) -> 0-d tensor``, a factory of a torchmetrics ``Metric`` (updated with
    ``(postprocess(pred), target)`` over the whole data set), the metric's name and direction, and the target
    layout (one of ``mtsl_plugin.tasks.TARGET_LAYOUTS``: how a data set reads, resizes and mirrors the target).
    A kind raises ``ValueError`` naming the task for a bad option value. The ``Task`` itself refuses a
    ``higher_is_better`` that is not a bool and an ``out_channels`` its layout cannot have (``labels`` >= 2,
    ``binary`` 1, ``normals`` 3, ``image`` 3, ``dense`` any). The manager checks that the options fit the kind's
    signature (an unknown or missing option is named), that the result is a ``Task`` of that name, and tries its
    loss and metric once on a tiny random batch of its layout (``mtsl_plugin.task_kinds.probe_task``): the loss
    must be a finite 0-d tensor with a gradient to the prediction, the metric factory must make a torchmetrics
    ``Metric`` whose ``update`` and ``compute`` work. Build losses and metrics from module-level functions and
    ``functools.partial``, not closures, so that the task pickles like the built-in ones (LibMTL's task dict is
    copied that way, e.g. by data-loader workers).
    """
