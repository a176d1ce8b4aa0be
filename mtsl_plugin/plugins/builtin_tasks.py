"""Built-in plugin: the task kinds a run's configuration can declare (:mod:`mtsl_plugin.task_kinds`)."""
from __future__ import annotations

from mtsl_plugin.plugins import hookimpl
from mtsl_plugin.task_kinds import BUILTIN_KINDS


@hookimpl
def mtsl_task_kinds():
    """segmentation, regression, binary, normals and reconstruction (see :mod:`mtsl_plugin.task_kinds`)."""
    return dict(BUILTIN_KINDS)
