"""The plugin manager: collects similarity metrics, grouping solvers, amalgamators and task kinds from plugins by
name.

Plugins are registered in this order, all through ``pm.register(module)``:

1. the built-in modules :data:`BUILTIN_PLUGINS` (so the built-ins prove the public API),
2. every module declared in the entry-point group ``"mtsl_plugin"`` of an installed distribution,
3. modules named explicitly with :func:`load_plugin` (the CLI's ``--plugin module``).

Lookups (:func:`_lookup`, behind :func:`mtsl_plugin.plugins.contracts.similarity` and its siblings) call the hooks
afresh, so a plugin registered later is seen at once; :mod:`mtsl_plugin.plugins.contracts` hands out the plugin's
object wrapped in a check of its contract (see :mod:`mtsl_plugin.plugins.hookspecs`).

Errors: an unknown name raises :class:`UnknownNameError` (a ``KeyError``) listing the available names; a name
offered by two plugins raises :class:`DuplicateNameError` naming both; a plugin that breaks its contract, or
whose hook or object raises, raises :class:`PluginContractError` naming the plugin (one line); a module that
cannot be imported or registered, or whose hook raises or returns neither a dict nor None when
:func:`load_plugin` first calls it, raises :class:`PluginLoadError`. All four derive from :class:`PluginError`.
A plugin whose hook fails does not stop the lookup of a name another plugin offers; listing the names
(:func:`available`) or looking up a name no working plugin offers names the failing plugin. Mistakes of the
*caller* (e.g. a 3-D feature tensor, a similarity matrix of the wrong size) raise ``ValueError``.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
from types import ModuleType
from typing import Any

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
    """Return a short one-line description of ``value`` for error messages (a multi-line ``repr``, such as a numpy
    array's or a module's, is joined onto one line)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return f"a 0-d tensor of value {value.item()!r}"
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = " ".join(repr(value).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _failure(error: BaseException) -> str:
    """``error`` as ``Type: message`` on one line, at most 300 characters."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= 300 else text[:297] + "..."


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


def _on_import_path(directory: str) -> bool:
    """Whether ``directory`` is on ``sys.path`` (``""`` stands for the working directory)."""
    target = os.path.realpath(directory)
    return any(isinstance(entry, str) and os.path.realpath(entry or os.curdir) == target for entry in sys.path)


def _import(module_name: str) -> ModuleType:
    """Import ``module_name``; a module that only the working directory holds is imported from there, as
    ``python -m`` (which puts the working directory on the import path) would find it.

    ``python benchmarks/compare.py --plugin blob_kind`` puts ``benchmarks/``, not the working directory, on the
    path; the working directory is then appended to ``sys.path`` (so that the plugin's own imports, and
    data-loader workers unpickling its tasks, find it too). Appended, it never shadows an installed module.
    """
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        top = module_name.partition(".")[0]
        here = os.getcwd()
        if (error.name != top or _on_import_path(here)
                or importlib.machinery.PathFinder.find_spec(top, [here]) is None):
            raise
    sys.path.append(here)
    importlib.invalidate_caches()
    return importlib.import_module(module_name)


def load_plugin(module_name: str) -> ModuleType:
    """Import the module ``module_name`` (from the import path or, failing that, the working directory) and
    register it as a plugin; idempotent. Returns the module.

    Each hook the module implements is called once on registration, so a hook that raises or returns neither a
    dict nor None is refused here, naming the module and the hook, rather than at a later lookup.

    Raises :class:`PluginLoadError` if the module cannot be imported, implements no hook, or a hook fails.
    """
    if not isinstance(module_name, str) or not module_name:
        raise PluginLoadError(f"A plugin module must be named by a non-empty import name, got {module_name!r}.")
    pm = plugin_manager()
    try:
        module = _import(module_name)
    except Exception as error:
        if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
            stem = os.path.splitext(os.path.basename(module_name.rstrip("/" + os.sep)))[0]
            hint = (f" A plugin is named by its module's import name: name the module, not its file: {stem} "
                    "(from the folder that holds it, or with that folder on PYTHONPATH).")
        elif isinstance(error, ModuleNotFoundError) and error.name == module_name.partition(".")[0]:
            hint = f" It was looked for on the import path and in the working directory {os.getcwd()}."
        else:
            hint = ""
        raise PluginLoadError(f"Could not import plugin module {module_name!r}: {_failure(error)}.{hint}") from error
    if pm.is_registered(module):
        return module
    _register(pm, module_name)
    _check_hooks(pm, module, module_name)
    return module


def _check_hooks(pm: pluggy.PluginManager, module: ModuleType, module_name: str) -> None:
    """Call each hook of the newly registered ``module`` once; unregister it and raise :class:`PluginLoadError`
    if one raises or returns something other than a dict of callables or None (see :func:`_offers`)."""
    kind_of_hook = {hook: kind for kind, hook in _HOOK_OF_KIND.items()}
    for caller in pm.get_hookcallers(module) or []:
        for impl in caller.get_hookimpls():
            if impl.plugin is not module or impl.hookwrapper or impl.wrapper or caller.name not in kind_of_hook:
                continue
            try:
                _offers(pm, impl, kind_of_hook[caller.name])
            except PluginContractError as error:
                pm.unregister(module)
                raise PluginLoadError(f"{error} Its module {module_name!r} is not loaded.") from error


def _offers(pm: pluggy.PluginManager, impl: Any, kind: str) -> tuple[str, dict[str, Any]]:
    """Call one plugin's hook of ``kind``; return ``(plugin name, {name: object})`` after checking the result
    (a dict of callables under non-empty str names, or None). A hook that raises or breaks this is a
    :class:`PluginContractError` naming the plugin and the hook."""
    hook_name = _HOOK_OF_KIND[kind]
    noun = _NOUN_OF_KIND[kind]
    plugin = pm.get_name(impl.plugin) or impl.plugin_name
    try:
        result = impl.function()
    except Exception as error:
        raise PluginContractError(f"Plugin {plugin!r}: its hook {hook_name} raised {_failure(error)}.") from error
    if result is None:
        return plugin, {}
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
    return plugin, result


def _collect(kind: str) -> tuple[dict[str, tuple[str, Any]], list[PluginContractError]]:
    """Call the hook of ``kind`` on every plugin; return ``name -> (plugin name, object)`` over the plugins whose
    hook answered, and the errors of those whose hook raised or broke its contract."""
    if kind not in _HOOK_OF_KIND:
        raise ValueError(f"Unknown plugin kind {kind!r}; expected one of {sorted(_HOOK_OF_KIND)}.")
    pm = plugin_manager()
    noun = _NOUN_OF_KIND[kind]
    offered: dict[str, tuple[str, Any]] = {}
    broken: list[PluginContractError] = []
    for impl in getattr(pm.hook, _HOOK_OF_KIND[kind]).get_hookimpls():
        if impl.hookwrapper or impl.wrapper:
            continue  # wrappers surround the call; they contribute no names
        try:
            plugin, result = _offers(pm, impl, kind)
        except PluginContractError as error:
            broken.append(error)
            continue
        for name, obj in result.items():
            if name in offered:
                raise DuplicateNameError(
                    f"The {noun} {name!r} is offered by two plugins, {offered[name][0]!r} and {plugin!r}."
                )
            offered[name] = (plugin, obj)
    return offered, broken


def available(kind: str) -> list[str]:
    """Return the sorted names offered for ``kind``: ``"similarity"``, ``"grouping"``, ``"amalgamator"`` or
    ``"task"``. A plugin whose hook fails makes the list incomplete: :class:`PluginContractError` naming it."""
    offered, broken = _collect(kind)
    if broken:
        raise broken[0]
    return sorted(offered)


def _lookup(kind: str, name: str) -> tuple[str, Any]:
    """Return ``(plugin name, object)`` offered for ``name`` of ``kind``, or raise :class:`UnknownNameError`
    (:class:`PluginContractError` naming the plugin when a plugin whose hook failed might have offered it)."""
    offered, broken = _collect(kind)
    if name not in offered:
        if broken:
            raise PluginContractError(
                f"The {_NOUN_OF_KIND[kind]} {name!r} is offered by no working plugin, and a broken one might "
                f"offer it: {broken[0]}"
            ) from broken[0]
        raise UnknownNameError(
            f"Unknown {_NOUN_OF_KIND[kind]} {name!r}; available: {', '.join(sorted(offered)) or 'none'}."
        )
    return offered[name]
