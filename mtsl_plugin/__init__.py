"""mtsl-plugin: Multi-Task Structural Learning (ICML 2023) as a LibMTL architecture on timm CNNs.

Importing the package registers :class:`~mtsl_plugin.architecture.MTSL` as ``LibMTL.architecture.MTSL`` (so
LibMTL's lookup of architectures by name finds it) and exposes the plugin lookups::

    import mtsl_plugin
    cka = mtsl_plugin.similarity("cka")              # (x (N, C), y (N, C)) -> 0-d tensor
    solve = mtsl_plugin.grouping_solver("authors")  # (similarity (T, T), tasks, threshold) -> partition
    att = mtsl_plugin.amalgamator("att")             # (channels, tasks) -> nn.Module | None
"""
from mtsl_plugin.libmtl_compat import import_libmtl
from mtsl_plugin.plan import BranchingPlan
from mtsl_plugin.plugins import amalgamator, available, grouping_solver, load_plugin, similarity, task_kind
from mtsl_plugin.architecture import MTSL  # noqa: E402  (after the plugins: the learner imports them)
from mtsl_plugin import libmtl_trainer  # noqa: E402
from mtsl_plugin.libmtl_trainer import Trainer  # noqa: E402  (LibMTL's Trainer interface, running MTSL)

import_libmtl().architecture.MTSL = MTSL

__version__ = "0.1.0"
__all__ = ["MTSL", "Trainer", "BranchingPlan", "similarity", "grouping_solver", "amalgamator", "available", "load_plugin",
           "task_kind", "__version__"]
