"""Make PyPI's LibMTL 1.1.5 importable and usable on current PyTorch, in one place.

LibMTL 1.1.5 has three problems on today's stack; everything that touches LibMTL goes through this module:

1. ``LibMTL.model.resnet`` imports ``torchvision.models.utils``, which torchvision removed (0.13). The same function
   lives in ``torch.hub``; we register a tiny alias module under the old name before importing LibMTL.
2. ``LibMTL.weighting.CAGrad`` imports scipy without LibMTL declaring it; our ``setup.py`` depends on scipy.
3. ``LibMTL.Trainer`` hard-codes ``torch.device('cuda:0')`` and draws batches with ``iterator.next()``, which
   Python 3 iterators do not have (its bare ``except`` then restarts the loader, so every step sees the first
   batch). ``mtsl_plugin.trainer.MTLTrainer`` subclasses it with a device argument and a correct batch loop.

Nothing here changes LibMTL's files or global torch state beyond adding the alias module.
"""
from __future__ import annotations

import importlib
import sys
import types
from types import ModuleType

import torch

_ALIAS = "torchvision.models.utils"


def import_libmtl() -> ModuleType:
    """Import and return the ``LibMTL`` package, installing the torchvision alias first if it is needed."""
    if "LibMTL" in sys.modules:
        return sys.modules["LibMTL"]
    try:
        importlib.import_module(_ALIAS)
    except ImportError:
        alias = types.ModuleType(_ALIAS)
        alias.load_state_dict_from_url = torch.hub.load_state_dict_from_url
        alias.__doc__ = "Alias installed by mtsl_plugin.libmtl_compat: torchvision removed this module in 0.13."
        sys.modules[_ALIAS] = alias
    try:
        return importlib.import_module("LibMTL")
    except ImportError as exc:  # e.g. scipy missing in a hand-made environment
        raise ImportError(f"LibMTL could not be imported even with the compatibility shim: {exc}") from exc
