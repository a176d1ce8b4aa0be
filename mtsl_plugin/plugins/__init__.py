"""MTSL's plugin system: similarity metrics, grouping solvers, amalgamators and task kinds contributed by name.

Third-party plugins write ``from mtsl_plugin.plugins import hookimpl`` and implement the hooks declared in
:mod:`mtsl_plugin.plugins.hookspecs`; they are found through the entry-point group ``"mtsl_plugin"`` or loaded
with :func:`load_plugin`.
"""
from mtsl_plugin.plugins.hookspecs import PROJECT_NAME, hookimpl, hookspec

from mtsl_plugin.plugins.manager import (
    DuplicateNameError,
    PluginContractError,
    PluginError,
    PluginLoadError,
    UnknownNameError,
    available,
    load_plugin,
    plugin_manager,
    reset_plugin_manager,
)
from mtsl_plugin.plugins.contracts import amalgamator, grouping_solver, similarity, task_kind

__all__ = [
    "PROJECT_NAME",
    "hookimpl",
    "hookspec",
    "PluginError",
    "PluginContractError",
    "PluginLoadError",
    "UnknownNameError",
    "DuplicateNameError",
    "similarity",
    "task_kind",
    "grouping_solver",
    "amalgamator",
    "available",
    "load_plugin",
    "plugin_manager",
    "reset_plugin_manager",
]
