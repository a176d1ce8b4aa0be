"""Make PyPI's LibMTL 1.1.5 importable and usable on current PyTorch, in one place.

LibMTL 1.1.5 has three problems on today's stack; everything that touches LibMTL goes through this module:

1. ``LibMTL.model.resnet`` imports ``torchvision.models.utils``, which torchvision removed (0.13). The same function
   lives in ``torch.hub``; we register a tiny alias module under the old name before importing LibMTL.
2. ``LibMTL.weighting.CAGrad`` imports scipy without LibMTL declaring it; our ``setup.py`` depends on scipy.
3. ``LibMTL.Trainer`` hard-codes ``torch.device('cuda:0')`` and draws batches with ``iterator.next()``, which
   Python 3 iterators do not have (its bare ``except`` then restarts the loader, so every step sees the first
   batch). ``mtsl_plugin.trainer.MTLTrainer`` subclasses it with a device argument and a correct batch loop.
4. Its weighting methods read their hyperparameters from ``weight_args``, which only LibMTL's own command line
   fills in (``LibMTL.config.prepare_args``): built any other way, DWA, GradNorm, MGDA, GradVac, GradDrop, CAGrad
   and RLW raise a KeyError at their first step. :func:`weight_args` gives them LibMTL's command-line defaults.

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


#: The hyperparameters each LibMTL weighting method reads from ``weight_args``, at the defaults of LibMTL's own
#: command line (``LibMTL.config``); methods not listed take none.
WEIGHT_ARG_DEFAULTS: dict[str, dict[str, float | int | str]] = {
    "DWA": {"T": 2.0},
    "GradNorm": {"alpha": 1.5},
    "MGDA": {"mgda_gn": "none"},
    "GradVac": {"beta": 0.5},
    "GradDrop": {"leak": 0.0},
    "CAGrad": {"calpha": 0.5, "rescale": 1},
    "RLW": {"dist": "Normal"},
}
#: LibMTL 1.1.5's weighting methods in two kinds. These backpropagate one weighted sum of the losses (so they run
#: under DistributedDataParallel, which reduces one backward per forward):
SINGLE_BACKWARD_WEIGHTINGS = ("EW", "UW", "DWA", "GLS", "RLW")
#: and these combine the tasks' gradients of the shared parameters (``get_share_params``), one backward per task;
#: with none shared they have nothing to act on (IMTL fails: its matrix is singular), so the losses are summed.
GRADIENT_WEIGHTINGS = ("MGDA", "IMTL", "PCGrad", "GradVac", "CAGrad", "GradNorm", "GradDrop")
#: The values LibMTL accepts for the string-valued hyperparameters.
WEIGHT_ARG_CHOICES: dict[str, tuple[str, ...]] = {
    "mgda_gn": ("none", "l2", "loss", "loss+"),
    "dist": ("Uniform", "Normal", "Dirichlet", "Bernoulli", "constrained_Bernoulli"),
}


def _typed(value: object, kind: type) -> float | int | str:
    """``value`` (a number, or its text from the command line) as ``kind``; ``ValueError`` if it is not one."""
    if isinstance(value, bool) or (kind is str and not isinstance(value, str)):
        raise ValueError
    if kind is str:
        return value
    number = float(value)
    if kind is int:
        if number != int(number):
            raise ValueError
        return int(number)
    return number


def weight_args(weighting: str, given: dict | None = None) -> dict[str, float | int | str]:
    """The ``weight_args`` of LibMTL weighting method ``weighting``: its defaults (:data:`WEIGHT_ARG_DEFAULTS`)
    with ``given`` on top, each value of its default's type. Raises ``ValueError`` naming a key the method does
    not take or a value it cannot use."""
    defaults = WEIGHT_ARG_DEFAULTS.get(weighting, {})
    result = dict(defaults)
    for key, value in (given or {}).items():
        if key not in defaults:
            takes = f"takes {', '.join(defaults)}" if defaults else "takes none"
            raise ValueError(f"weight_args: LibMTL's {weighting} has no hyperparameter {key!r} (it {takes})")
        kind = type(defaults[key])
        try:
            result[key] = _typed(value, kind)
        except (TypeError, ValueError):
            noun = {float: "a number", int: "a whole number", str: "a string"}[kind]
            raise ValueError(f"weight_args: {weighting}'s {key} must be {noun}, got {value!r}") from None
        if key in WEIGHT_ARG_CHOICES and result[key] not in WEIGHT_ARG_CHOICES[key]:
            raise ValueError(f"weight_args: {weighting}'s {key} must be one of "
                             f"{', '.join(WEIGHT_ARG_CHOICES[key])}, got {value!r}")
    return result
