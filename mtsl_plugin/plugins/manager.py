"""The plugin manager: collects similarity metrics, grouping solvers, amalgamators and task kinds from plugins by
name.

Plugins are registered in this order, all through ``pm.register(module)``:

1. the built-in modules :data:`BUILTIN_PLUGINS` (so the built-ins prove the public API),
2. every module declared in the entry-point group ``"mtsl_plugin"`` of an installed distribution,
3. modules named explicitly with :func:`load_plugin` (the CLI's ``--plugin module``).

Lookups (:func:`similarity`, :func:`grouping_solver`, :func:`amalgamator`, :func:`task_kind`) call the hooks
afresh, so a plugin registered later is seen at once, and hand out the plugin's object wrapped in a check of its contract
(see :mod:`mtsl_plugin.plugins.hookspecs`).

Errors: an unknown name raises :class:`UnknownNameError` (a ``KeyError``) listing the available names; a name
offered by two plugins raises :class:`DuplicateNameError` naming both; a plugin that breaks its contract
raises :class:`PluginContractError` naming the plugin; a module that cannot be imported or registered raises
:class:`PluginLoadError`. All four derive from :class:`PluginError`. Mistakes of the *caller* (e.g. a 3-D
feature tensor, a similarity matrix of the wrong size) raise ``ValueError``.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import pluggy
import torch

from mtsl_plugin.plugins import hookspecs
from mtsl_plugin.plugins.hookspecs import PROJECT_NAME

BUILTIN_PLUGINS: tuple[str, ...] = (
    "mtsl_plugin.plugins.builtin_similarity",
    "mtsl_plugin.plugins.builtin_grouping",
    "mtsl_plugin.plugins.builtin_amalgamation",
    "mtsl_plugin.plugins.builtin_tasks",
)
"""Import names of the built-in plugin modules, registered first."""

_HOOK_OF_KIND: dict[str, str] = {
    "similarity": "mtsl_similarity_metrics",
    "grouping": "mtsl_grouping_solvers",
    "amalgamator": "mtsl_amalgamators",
    "task": "mtsl_task_kinds",
}
_NOUN_OF_KIND: dict[str, str] = {
    "similarity": "similarity metric",
    "grouping": "grouping solver",
    "amalgamator": "amalgamator",
    "task": "task kind",
}

_plugin_manager: pluggy.PluginManager | None = None


class PluginError(Exception):
    """Base class of every error raised by the plugin system."""


class UnknownNameError(PluginError, KeyError):
    """No registered plugin offers the requested name; the message lists the available ones."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(PluginError):
    """Two plugins offer the same name for the same kind of object."""


class PluginLoadError(PluginError, ImportError):
    """A plugin module could not be imported or registered."""


class PluginContractError(PluginError):
    """A plugin returned something that breaks the contract stated in ``hookspecs``."""


def _describe(value: Any) -> str:
    """Return a short human-readable description of ``value`` for error messages."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return f"a 0-d tensor of value {value.item()!r}"
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _register(pm: pluggy.PluginManager, module_name: str) -> ModuleType:
    """Import ``module_name`` and register it with ``pm`` (a no-op if it already is); return the module."""
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise PluginLoadError(
            f"Could not import plugin module {module_name!r}: {type(error).__name__}: {error}."
        ) from error
    if pm.is_registered(module):
        return module
    try:
        pm.register(module)
        pm.check_pending()
    except (ValueError, pluggy.PluginValidationError) as error:
        if pm.is_registered(module):
            pm.unregister(module)
        raise PluginLoadError(f"Could not register plugin module {module_name!r}: {error}.") from error
    if not pm.get_hookcallers(module):
        pm.unregister(module)
        raise PluginLoadError(
            f"Plugin module {module_name!r} implements no {PROJECT_NAME} hook "
            "(functions named like the hooks in mtsl_plugin.plugins.hookspecs and marked with @hookimpl)."
        )
    return module


def plugin_manager() -> pluggy.PluginManager:
    """Return the process-wide plugin manager, building it on first use.

    Built from the hook specifications, the built-in modules, then the entry-point group ``"mtsl_plugin"``.
    """
    global _plugin_manager
    if _plugin_manager is None:
        pm = pluggy.PluginManager(PROJECT_NAME)
        pm.add_hookspecs(hookspecs)
        for module_name in BUILTIN_PLUGINS:
            _register(pm, module_name)
        try:
            pm.load_setuptools_entrypoints(PROJECT_NAME)
            pm.check_pending()
        except Exception as error:
            raise PluginLoadError(
                f"Could not load the plugins of entry-point group {PROJECT_NAME!r}: {type(error).__name__}: {error}."
            ) from error
        _plugin_manager = pm
    return _plugin_manager


def reset_plugin_manager() -> None:
    """Forget the cached plugin manager (and every plugin loaded into it); the next lookup rebuilds it."""
    global _plugin_manager
    _plugin_manager = None


def load_plugin(module_name: str) -> ModuleType:
    """Import the module ``module_name`` and register it as a plugin; idempotent. Returns the module.

    Raises :class:`PluginLoadError` if the module cannot be imported or implements no hook.
    """
    if not isinstance(module_name, str) or not module_name:
        raise PluginLoadError(f"A plugin module must be named by a non-empty import name, got {module_name!r}.")
    return _register(plugin_manager(), module_name)


def _collect(kind: str) -> dict[str, tuple[str, Any]]:
    """Call the hook of ``kind`` on every plugin and return ``name -> (plugin name, object)``."""
    if kind not in _HOOK_OF_KIND:
        raise ValueError(f"Unknown plugin kind {kind!r}; expected one of {sorted(_HOOK_OF_KIND)}.")
    pm = plugin_manager()
    hook_name = _HOOK_OF_KIND[kind]
    noun = _NOUN_OF_KIND[kind]
    offered: dict[str, tuple[str, Any]] = {}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        if impl.hookwrapper or impl.wrapper:
            continue  # wrappers surround the call; they contribute no names
        plugin = pm.get_name(impl.plugin) or impl.plugin_name
        result = impl.function()
        if result is None:
            continue
        if not isinstance(result, dict):
            raise PluginContractError(
                f"Plugin {plugin!r} returned {_describe(result)} from {hook_name}, expected a dict name -> {noun}."
            )
        for name, obj in result.items():
            if not isinstance(name, str) or not name:
                raise PluginContractError(
                    f"Plugin {plugin!r} offers a {noun} under the name {name!r}, expected a non-empty str."
                )
            if not callable(obj):
                raise PluginContractError(
                    f"Plugin {plugin!r} offers {noun} {name!r} as {_describe(obj)}, which is not callable."
                )
            if name in offered:
                raise DuplicateNameError(
                    f"The {noun} {name!r} is offered by two plugins, {offered[name][0]!r} and {plugin!r}."
                )
            offered[name] = (plugin, obj)
    return offered


def available(kind: str) -> list[str]:
    """Return the sorted names offered for ``kind``: ``"similarity"``, ``"grouping"``, ``"amalgamator"`` or
    ``"task"``."""
    return sorted(_collect(kind))


def _lookup(kind: str, name: str) -> tuple[str, Any]:
    """Return ``(plugin name, object)`` offered for ``name`` of ``kind``, or raise :class:`UnknownNameError`."""
    offered = _collect(kind)
    if name not in offered:
        raise UnknownNameError(
            f"Unknown {_NOUN_OF_KIND[kind]} {name!r}; available: {', '.join(sorted(offered)) or 'none'}."
        )
    return offered[name]


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
        result = self.__wrapped__(x, y)
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
        result = self.__wrapped__(similarity, list(names), float(threshold))
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


class CheckedAmalgamator(_Checked):
    """An amalgamator factory wrapped in a check of its contract; call it like the factory itself."""

    kind = "amalgamator"

    def __call__(self, channels: int, tasks: Sequence[str]) -> torch.nn.Module | None:
        """Return the loss module for a group node of ``channels`` channels merging ``tasks``, or None."""
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"Amalgamator {self.name!r} needs a positive int number of channels, got {channels!r}.")
        names = _task_names(tasks)
        module = self.__wrapped__(channels, list(names))
        if module is None:
            return None
        if not isinstance(module, torch.nn.Module):
            raise PluginContractError(
                f"Amalgamator {self.name!r} of plugin {self.plugin!r} returned {_describe(module)}, "
                "expected None or a torch.nn.Module."
            )
        module.register_forward_hook(_LossContract(self.name, self.plugin))
        return module


class CheckedTaskKind(_Checked):
    """A task kind wrapped in a check of its contract: ``kind(task_name, options) -> Task``."""

    kind = "task"

    def __call__(self, task: str, options: dict[str, Any]) -> Any:
        """The task ``task`` of this kind with ``options`` (the declaration's keys but ``kind`` and ``folder``)."""
        from mtsl_plugin.tasks import Task  # deferred: the tasks module pulls in torchmetrics

        try:
            inspect.signature(self.__wrapped__).bind(task, **options)
        except TypeError as error:
            raise ValueError(f"task {task!r} of kind {self.name!r}: {error}") from None
        result = self.__wrapped__(task, **options)
        if not isinstance(result, Task) or result.name != task:
            raise PluginContractError(
                f"Task kind {self.name!r} of plugin {self.plugin!r} returned {_describe(result)}, "
                f"expected a mtsl_plugin.tasks.Task named {task!r}."
            )
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
