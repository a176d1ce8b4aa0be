"""The contract checks around every plugin object the manager hands out, and the four lookups that hand them out.

:func:`similarity`, :func:`grouping_solver`, :func:`amalgamator` and :func:`task_kind` look the name up afresh
(:func:`mtsl_plugin.plugins.manager._lookup`, so a plugin registered later is seen at once) and wrap the plugin's
object in a ``Checked*`` class that checks each call against the contract in :mod:`mtsl_plugin.plugins.hookspecs`:
the caller's arguments (a mistake there raises ``ValueError``) and the plugin's result (a broken contract, or an
exception a third-party plugin raises, is a one-line :class:`PluginContractError` naming the plugin).
"""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from mtsl_plugin.plugins.manager import (
    _NOUN_OF_KIND,
    BUILTIN_PLUGINS,
    PluginContractError,
    PluginError,
    _describe,
    _failure,
    _lookup,
)


class _Checked:
    """A plugin's object (``__wrapped__``) under its name and plugin, wrapped in a check of its contract; the
    subclasses say which ``kind`` of object it is and check each call."""

    kind = ""

    def __init__(self, wrapped: Callable[..., Any], name: str, plugin: str):
        self.__wrapped__ = wrapped
        self.__doc__ = wrapped.__doc__
        self.name = name
        self.plugin = plugin

    def __repr__(self) -> str:
        return f"<{_NOUN_OF_KIND[self.kind]} {self.name!r} from plugin {self.plugin!r}>"

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        """Call the plugin's object (:func:`_run_plugin_code`)."""
        noun = _NOUN_OF_KIND[self.kind]
        who = f"{noun[0].upper()}{noun[1:]} {self.name!r} of plugin {self.plugin!r}"
        return _run_plugin_code(self.__wrapped__, who, self.plugin, *args, **kwargs)


def _run_plugin_code(function: Callable[..., Any], who: str, plugin: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``function``, code of ``plugin``; an exception a third-party plugin's code raises becomes a one-line
    :class:`PluginContractError` (``"<who> raised <Type: message>."``). The built-ins' own errors, errors of the
    plugin system and out-of-memory pass unchanged."""
    try:
        return function(*args, **kwargs)
    except (PluginError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as error:
        if plugin in BUILTIN_PLUGINS:
            raise
        raise PluginContractError(f"{who} raised {_failure(error)}.") from error


class CheckedSimilarity(_Checked):
    """A similarity metric wrapped in a check of its contract; call it like the metric itself."""

    kind = "similarity"

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return the 0-d similarity of x (N, C1) and y (N, C2)."""
        for argument, value in (("x", x), ("y", y)):
            if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
                raise ValueError(
                    f"Argument {argument} of similarity metric {self.name!r} must be a 2-D float tensor (N, C), "
                    f"got {_describe(value)}."
                )
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"Arguments x and y of similarity metric {self.name!r} must have the same number of rows N, "
                f"got {x.shape[0]} and {y.shape[0]}."
            )
        if x.shape[0] < 4:
            raise ValueError(
                f"Similarity metric {self.name!r} needs at least 4 samples (rows of x and y), got {x.shape[0]}."
            )
        result = self._call(x, y)
        if not (
            isinstance(result, torch.Tensor)
            and result.dim() == 0
            and result.is_floating_point()
            and bool(torch.isfinite(result))
        ):
            raise PluginContractError(
                f"Similarity metric {self.name!r} of plugin {self.plugin!r} returned {_describe(result)}, "
                "expected a 0-d finite float tensor."
            )
        return result


def _task_names(tasks: Sequence[str]) -> list[str]:
    """Return ``tasks`` as a list after checking it holds distinct, non-empty str names."""
    if isinstance(tasks, str):
        raise ValueError(f"Tasks must be a sequence of task names, got the single string {tasks!r}.")
    names = list(tasks)
    if not names or not all(isinstance(t, str) and t for t in names):
        raise ValueError(f"Tasks must be a non-empty sequence of non-empty str names, got {names!r}.")
    if len(set(names)) != len(names):
        raise ValueError(f"Task names must be distinct, got {names!r}.")
    return names


class CheckedGroupingSolver(_Checked):
    """A grouping solver wrapped in a check of its contract; returns the partition in canonical order."""

    kind = "grouping"

    def __call__(
        self, similarity: torch.Tensor | np.ndarray, tasks: Sequence[str], threshold: float
    ) -> list[list[str]]:
        """Partition ``tasks`` given their (T, T) ``similarity`` and the threshold gamma."""
        names = _task_names(tasks)
        shape = tuple(similarity.shape) if hasattr(similarity, "shape") else np.shape(similarity)
        if shape != (len(names), len(names)):
            raise ValueError(
                f"The similarity matrix passed to grouping solver {self.name!r} has shape {shape}, "
                f"expected ({len(names)}, {len(names)}) for tasks {names!r}."
            )
        # a copy: a solver that edits its matrix in place must not change the caller's (the merge decision
        # re-reads it, and the phase record writes it)
        if isinstance(similarity, torch.Tensor):
            similarity = similarity.detach().clone()
        else:
            similarity = np.array(similarity, copy=True)
        result = self._call(similarity, list(names), float(threshold))
        complaint = (
            f"Grouping solver {self.name!r} of plugin {self.plugin!r} returned {_describe(result)}, "
            f"which is not a partition of the tasks {names!r} into non-empty groups."
        )
        if not isinstance(result, (list, tuple)) or not all(
            isinstance(group, (list, tuple)) and group for group in result
        ):
            raise PluginContractError(complaint)
        flat = [task for group in result for task in group]
        if len(flat) != len(names) or not all(isinstance(t, str) for t in flat) or set(flat) != set(names):
            raise PluginContractError(complaint)
        position = {task: index for index, task in enumerate(names)}
        groups = [sorted(group, key=position.__getitem__) for group in result]
        return sorted(groups, key=lambda group: position[group[0]])


class _LossContract:
    """Forward hook checking that an amalgamation module returns a 0-d finite loss."""

    def __init__(self, name: str, plugin: str):
        self.name = name
        self.plugin = plugin

    def __call__(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if not (
            isinstance(output, torch.Tensor)
            and output.dim() == 0
            and output.is_floating_point()
            and bool(torch.isfinite(output))
        ):
            raise PluginContractError(
                f"Amalgamator {self.name!r} of plugin {self.plugin!r} computed a loss that is {_describe(output)}, "
                "expected a 0-d finite float tensor."
            )
        group_out = inputs[0] if inputs else None
        trained = isinstance(group_out, torch.Tensor) and group_out.requires_grad
        if torch.is_grad_enabled() and trained and not output.requires_grad:
            raise PluginContractError(
                f"Amalgamator {self.name!r} of plugin {self.plugin!r} computed a loss with no gradient "
                "(requires_grad is False, though the group node's output requires one), so it cannot train the "
                "group node: compute it with torch operations on group_out, not from .detach(), .item() or numpy."
            )


class CheckedAmalgamator(_Checked):
    """An amalgamator factory wrapped in a check of its contract; call it like the factory itself."""

    kind = "amalgamator"

    def __call__(self, channels: int, tasks: Sequence[str]) -> torch.nn.Module | None:
        """Return the loss module for a group node of ``channels`` channels merging ``tasks``, or None."""
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"Amalgamator {self.name!r} needs a positive int number of channels, got {channels!r}.")
        names = _task_names(tasks)
        module = self._call(channels, list(names))
        if module is None:
            return None
        if not isinstance(module, torch.nn.Module):
            raise PluginContractError(
                f"Amalgamator {self.name!r} of plugin {self.plugin!r} returned {_describe(module)}, "
                "expected None or a torch.nn.Module."
            )
        if self.plugin not in BUILTIN_PLUGINS:  # an exception in its forward is named too, not only the factory's
            who = f"The module of amalgamator {self.name!r} of plugin {self.plugin!r}"
            module.forward = partial(_run_plugin_code, module.forward, who, self.plugin)
        module.register_forward_hook(_LossContract(self.name, self.plugin))
        return module


class CheckedTaskKind(_Checked):
    """A task kind wrapped in a check of its contract: ``kind(task_name, options) -> Task``.

    The options must fit the kind's signature; the result must be a ``Task`` of that name whose loss and metric
    work on a tiny random batch of its target layout (:func:`mtsl_plugin.task_kinds.probe_task`). A ``ValueError``
    of a third-party kind (a bad option, or a ``Task`` refusing its fields) gets the kind and plugin appended; any
    other exception it raises, or a failing probe, is a one-line :class:`PluginContractError` naming the task,
    the kind and the plugin.
    """

    kind = "task"

    def __call__(self, task: str, options: dict[str, Any]) -> Any:
        """The task ``task`` of this kind with ``options`` (the declaration's keys but ``kind`` and ``folder``)."""
        from mtsl_plugin.tasks import Task  # deferred: the tasks module pulls in torchmetrics

        signature = inspect.signature(self.__wrapped__)
        named = [p.name for p in list(signature.parameters.values())[1:]
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        takes_any = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
        unknown = [option for option in options if option not in named and not takes_any]
        if unknown:  # before missing ones: a misspelt option would otherwise be reported as a missing one
            close = difflib.get_close_matches(unknown[0], named, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"task {task!r} of kind {self.name!r}: unknown option {unknown[0]!r}{hint}; its options "
                             f"are {', '.join(named) or 'none'}")
        try:
            signature.bind(task, **options)
        except TypeError as error:
            raise ValueError(f"task {task!r} of kind {self.name!r}: {error}") from None
        try:
            result = self.__wrapped__(task, **options)
        except ValueError as error:  # a bad option value, or a Task refusing its fields: name where it came from
            if self.plugin in BUILTIN_PLUGINS or isinstance(error, PluginError):
                raise
            raise ValueError(
                f"{' '.join(str(error).split())} (task kind {self.name!r} of plugin {self.plugin!r})"
            ) from error
        except (PluginError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as error:
            raise PluginContractError(
                f"Task kind {self.name!r} of plugin {self.plugin!r} raised {_failure(error)} for task {task!r}."
            ) from error
        if not isinstance(result, Task) or result.name != task:
            raise PluginContractError(
                f"Task kind {self.name!r} of plugin {self.plugin!r} returned {_describe(result)}, "
                f"expected a mtsl_plugin.tasks.Task named {task!r}."
            )
        from mtsl_plugin.task_kinds import probe_task  # deferred: task_kinds imports this package

        try:
            probe_task(result)
        except ValueError as error:
            raise PluginContractError(
                f"Task {task!r} of kind {self.name!r} (plugin {self.plugin!r}) fails before any training: {error}."
            ) from error
        return result


def similarity(name: str) -> CheckedSimilarity:
    """Return the similarity metric ``name``, wrapped in a contract check. Raises :class:`UnknownNameError`."""
    plugin, metric = _lookup("similarity", name)
    return CheckedSimilarity(metric, name, plugin)


def grouping_solver(name: str) -> CheckedGroupingSolver:
    """Return the grouping solver ``name``, wrapped in a contract check. Raises :class:`UnknownNameError`."""
    plugin, solver = _lookup("grouping", name)
    return CheckedGroupingSolver(solver, name, plugin)


def amalgamator(name: str) -> CheckedAmalgamator:
    """Return the amalgamator factory ``name``, wrapped in a contract check. Raises :class:`UnknownNameError`."""
    plugin, factory = _lookup("amalgamator", name)
    return CheckedAmalgamator(factory, name, plugin)


def task_kind(name: str) -> CheckedTaskKind:
    """Return the task kind ``name``, wrapped in a contract check. Raises :class:`UnknownNameError`."""
    plugin, kind = _lookup("task", name)
    return CheckedTaskKind(kind, name, plugin)
