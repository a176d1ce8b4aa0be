"""Make PyPI's LibMTL 1.1.5 importable and usable on current PyTorch, in one place.

LibMTL 1.1.5 has these problems on today's stack; everything that touches LibMTL goes through this module:

1. ``LibMTL.model.resnet`` imports ``torchvision.models.utils``, which torchvision removed (0.13). The same function
   lives in ``torch.hub``; we register a tiny alias module under the old name before importing LibMTL.
2. ``LibMTL.weighting.CAGrad`` imports scipy without LibMTL declaring it; our ``setup.py`` depends on scipy.
3. ``LibMTL.Trainer`` hard-codes ``torch.device('cuda:0')`` and draws batches with ``iterator.next()``, which
   Python 3 iterators do not have (its bare ``except`` restarts the loader and calls ``.next()`` again, so the first
   step raises AttributeError). ``mtsl_plugin.trainer.MTLTrainer`` subclasses it with a device argument and a
   correct batch loop.
4. Its weighting methods read their hyperparameters from ``weight_args``, which only LibMTL's own command line
   fills in (``LibMTL.config.prepare_args``): built any other way, DWA, GradNorm, MGDA, GradVac, GradDrop, CAGrad
   and RLW raise a KeyError at their first step. :func:`weight_args` gives them LibMTL's command-line defaults.
5. Its architectures clear the shared gradients between the tasks' backward passes of a gradient-combining
   weighting (MGDA, PCGrad, ...) with ``Module.zero_grad()``, which sets them to None since torch 2.0; the
   weighting's ``_reset_grad`` then writes into ``param.grad.data`` and fails at the first step.
   :func:`zero_grads_in_place` gives an architecture class that zeroes them in place, as torch 1.x did.

It also says, in one line each, which of LibMTL's ``Trainer`` arguments and overrides ``mtsl_plugin.Trainer``
cannot use (:func:`check_trainer_args`, :func:`check_trainer_hooks`), and reads the bare state dict LibMTL's
``save_path`` writes (:func:`read_bare_state_dict`).

Nothing here changes LibMTL's files or global torch state beyond adding the alias module.
"""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

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
#: and these combine the tasks' gradients of the shared parameters (``get_share_params``: those every task uses; a
#: node of some tasks only gets their summed gradient) or, under ``rep_grad=True`` (GradDrop's only setting:
#: :data:`REPRESENTATION_WEIGHTINGS`), of the shared representation, one backward per task; with none shared they
#: have nothing to act on (IMTL fails: its matrix is singular), so the losses are summed.
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


def libmtl_method(weighting: type | str) -> str | None:
    """The LibMTL weighting method ``weighting`` is: its name for one of LibMTL's classes (or a name), the nearest
    LibMTL class's for a subclass of one (a user's ``MyMGDA(MGDA)`` takes MGDA's hyperparameters and rules), and
    ``None`` for a user's own method (a subclass of ``AbsWeighting`` only), whose ``weight_args`` are passed on
    unchecked, as LibMTL's Trainer passes them."""
    if isinstance(weighting, str):
        return weighting
    namespace = import_libmtl().weighting
    for cls in getattr(weighting, "__mro__", ()):
        if cls.__name__ != "AbsWeighting" and getattr(namespace, cls.__name__, None) is cls:
            return cls.__name__
    return None


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


#: The optimizers and learning-rate schedulers LibMTL 1.1.5's ``Trainer._prepare_optimizer`` builds (dictionaries
#: local to it), by the names its ``optim_param['optim']`` and ``scheduler_param['scheduler']`` take.
LIBMTL_OPTIMIZERS = ("sgd", "adam", "adagrad", "rmsprop")
LIBMTL_SCHEDULERS = ("exp", "step", "cos")
#: LibMTL weighting methods that combine the gradients of the shared representation (``rep_grad=True`` only), and
#: those that combine the shared parameters' gradients (``rep_grad=False`` only); each refuses the other setting
#: with a ValueError at its first step.
REPRESENTATION_WEIGHTINGS = ("GradDrop",)
PARAMETER_WEIGHTINGS = ("PCGrad", "GradVac", "CAGrad")


_ZEROING: dict[type, type] = {}  # LibMTL architecture -> its in-place-zeroing subclass


def zero_shared_grads_in_place(self) -> None:
    """An architecture's ``zero_grad_share_params``: the gradients of ``self.get_share_params()`` zeroed in place,
    not set to None, since LibMTL's gradient-combining weightings write into ``param.grad.data`` (module doc, 5).
    MTSL and the baselines take it as theirs; :func:`zero_grads_in_place` gives it to LibMTL's architectures."""
    for param in self.get_share_params():
        if param.grad is not None:
            param.grad.zero_()


def zero_grads_in_place(architecture: type) -> type:
    """A subclass of LibMTL architecture ``architecture`` (same name, so checkpoints and messages name it) whose
    ``zero_grad_share_params`` zeroes the gradients of ``get_share_params()`` in place (see the module doc, 5)."""
    cached = _ZEROING.get(architecture)
    if cached is None:
        cached = type(architecture.__name__, (architecture,),
                      {"zero_grad_share_params": zero_shared_grads_in_place, "__module__": architecture.__module__,
                       "__qualname__": architecture.__qualname__, "__doc__": architecture.__doc__})
        _ZEROING[architecture] = cached
    return cached


def check_trainer_args(weighting: str, rep_grad: bool, multi_input: bool, optim_param: Mapping | None,
                       scheduler_param: Mapping | None, kwargs: Mapping[str, Any]) -> None:
    """Refuse, in one line naming the argument, what LibMTL's ``Trainer`` takes and a run of ``mtsl_plugin.Trainer``
    cannot use: ``multi_input=True``; an optimizer or scheduler LibMTL does not build (or one that cannot be built
    with the given arguments); a weighting method with the ``rep_grad`` setting it refuses at its first step;
    ``bilevel_param`` (later LibMTL versions) other than None; a keyword argument LibMTL does not take (LibMTL
    ignores it: a misspelt ``weight_args`` would silently run with the defaults)."""
    if multi_input:
        raise ValueError("multi_input=True (a DataLoader per task, as in LibMTL's Office-31 and Office-Home examples) "
                         "is not supported: this Trainer trains every task on each batch of one DataLoader whose "
                         "samples hold all the tasks' targets")
    unknown = sorted(set(kwargs) - {"weight_args", "arch_args", "bilevel_param"})
    if unknown:
        raise ValueError(f"Trainer got unexpected keyword argument(s) {unknown}; LibMTL's keyword arguments are "
                         "weight_args and arch_args")
    if kwargs.get("bilevel_param") is not None:
        raise ValueError("bilevel_param (later LibMTL versions' bilevel methods) is not supported: pass "
                         "bilevel_param=None")
    if weighting in REPRESENTATION_WEIGHTINGS and not rep_grad:
        raise ValueError(f"weighting {weighting} combines the gradients of the shared representation: pass "
                         "rep_grad=True")
    if weighting in PARAMETER_WEIGHTINGS and rep_grad:
        raise ValueError(f"weighting {weighting} combines the gradients of the shared parameters, not of the "
                         "representation: pass rep_grad=False")
    if optim_param is not None:
        if "optim" not in optim_param:
            raise ValueError(f"optim_param names no 'optim' (one of {', '.join(LIBMTL_OPTIMIZERS)}), got "
                             f"{dict(optim_param)}")
        if optim_param["optim"] not in LIBMTL_OPTIMIZERS:
            raise ValueError(f"optim_param['optim'] {optim_param['optim']!r} is not an optimizer LibMTL builds; "
                             f"choose from {', '.join(LIBMTL_OPTIMIZERS)}")
    if scheduler_param is not None:
        name = scheduler_param.get("scheduler")
        if name not in (*LIBMTL_SCHEDULERS, "multistep"):  # multistep: added by mtsl_plugin.trainer.MTLTrainer
            raise ValueError(f"scheduler_param['scheduler'] {name!r} is not a scheduler LibMTL 1.1.5 builds; choose "
                             f"from {', '.join(LIBMTL_SCHEDULERS)} (or multistep)")
        schedulers = {"exp": torch.optim.lr_scheduler.ExponentialLR, "step": torch.optim.lr_scheduler.StepLR,
                      "cos": torch.optim.lr_scheduler.CosineAnnealingLR,
                      "multistep": torch.optim.lr_scheduler.MultiStepLR}
        if name in schedulers:  # built once over a stand-in, so a missing argument is named before the model is
            stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            try:
                schedulers[name](stand_in, **{k: v for k, v in scheduler_param.items() if k != "scheduler"})
            except (TypeError, ValueError) as exc:
                raise ValueError(f"scheduler_param {dict(scheduler_param)} cannot be built: {exc}") from None


#: LibMTL ``Trainer`` methods a LibMTL user may override that ``mtsl_plugin.Trainer``'s loop never calls (it draws
#: the batches and computes the losses itself), and what to override instead.
UNCALLED_HOOKS = {"_process_data": "process_preds (predictions) or a Dataset that returns the batches' tensors",
                  "_compute_loss": "task_losses (preds, gts -> (T,) losses) or the task dict's loss_fn",
                  "_prepare_dataloaders": "nothing: pass the DataLoaders to train() and test()"}


def check_trainer_hooks(trainer_class: type, base: type) -> None:
    """Refuse, in one line, a subclass ``trainer_class`` of ``base`` that overrides one of :data:`UNCALLED_HOOKS`
    (its override would be silently ignored)."""
    for hook, instead in UNCALLED_HOOKS.items():
        if getattr(trainer_class, hook) is not getattr(base, hook):
            raise ValueError(f"{trainer_class.__name__} overrides LibMTL's {hook}, which this Trainer never calls (it "
                             f"draws (inputs, {{task: target}}) batches itself): override {instead} instead")


def read_bare_state_dict(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The state dict in ``path`` if it is a bare one (``torch.save(model.state_dict(), path)``, what LibMTL's
    ``save_path`` writes as ``best.pt``); None for any other file (e.g. this package's checkpoints, which
    :func:`mtsl_plugin.checkpoint.load_checkpoint` reads and judges)."""
    try:  # memory-mapped: a checkpoint of this package is not read twice
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable (or of torch's legacy format): load_checkpoint names it
        return None
    if isinstance(data, Mapping) and data and "format" not in data and \
            all(isinstance(k, str) and torch.is_tensor(v) for k, v in data.items()):
        return dict(data)
    return None
