"""One registry of methods: name -> builder. The CLI, the tests and the harness all build methods through it.

A builder takes the run configuration and the number of merge locations and returns a :class:`MethodSpec`:
the plan the network starts from and the structural learner that edits it (``None`` for a fixed plan), or the
architecture of a method that is not plan-based, or the method whose plan it retrains.
``mtsl`` and its variants (``mtsl_r``, ``mtsl_noalign``, ``mtsl_rsa``) are registered here; ``baselines``
registers the others (``stn``, ``onenet``, ...) when imported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from mtsl_plugin.learner.structural import StructuralLearner
from mtsl_plugin.plan import BranchingPlan


@dataclass
class MethodSpec:
    """How to train one method.

    Attributes:
        plan: the plan a branched network starts from (``None`` for architectures that are not plan-based).
        learner: the structural learner that edits the plan during training (MTSL), or ``None``.
        architecture: the LibMTL architecture class (``None``: :class:`~mtsl_plugin.architecture.MTSL`, the
            branched network; baselines bring their own, e.g. cross-stitch).
        arch_args: extra keyword arguments for the architecture (LibMTL's ``arch_args``).
        extra_epochs: epochs added to the preset's budget (One-Net-L).
        retrains: name of a method whose final plan (same seed) this method retrains from scratch ("-R").
        final_plan: for architectures that search a plan (LTB, BMTAS): ``model -> BranchingPlan``.
    """

    plan: BranchingPlan | None = None
    learner: StructuralLearner | None = None
    architecture: type | None = None
    arch_args: dict = field(default_factory=dict)
    extra_epochs: int = 0
    retrains: str | None = None
    final_plan: Callable[[Any], BranchingPlan] | None = None


Builder = Callable[["RunConfig", int], MethodSpec]  # noqa: F821  (RunConfig: mtsl_plugin.config)
SETTINGS = ("encoder-decoder", "encoder")
_METHODS: dict[str, Builder] = {}
_SETTINGS: dict[str, tuple[str, ...]] = {}


def register_method(name: str, settings: tuple[str, ...] = SETTINGS) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder`` under ``name`` for the given settings (a name may be registered once)."""

    def decorate(builder: Builder) -> Builder:
        if name in _METHODS and _METHODS[name] is not builder:
            raise ValueError(f"method {name!r} is already registered")
        _METHODS[name] = builder
        _SETTINGS[name] = tuple(settings)
        return builder

    return decorate


def method_names(setting: str | None = None) -> list[str]:
    """Registered method names (in registration order), optionally only those meant for ``setting``."""
    return [m for m in _METHODS if setting is None or setting in _SETTINGS.get(m, SETTINGS)]


def build_method(name: str, config, num_locations: int) -> MethodSpec:
    """The :class:`MethodSpec` of method ``name`` for ``config``."""
    if name not in _METHODS:
        hint = "" if "stn" in _METHODS else " (stn, onenet and the other baselines register on `import baselines`)"
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(sorted(_METHODS))}{hint}")
    return _METHODS[name](config, num_locations)


@register_method("mtsl")
def _mtsl(config, num_locations: int) -> MethodSpec:
    """MTSL: start from the single-task plan, learn the branching with the structural learner."""
    return MethodSpec(BranchingPlan.single_task(config.tasks, num_locations), StructuralLearner(config.mtsl))


@register_method("mtsl_r")
def _mtsl_r(config, num_locations: int) -> MethodSpec:
    """MTSL-R: the plan MTSL converged to (same seed), retrained from a fresh initialisation."""
    return MethodSpec(retrains="mtsl")


@register_method("mtsl_noalign")
def _mtsl_noalign(config, num_locations: int) -> MethodSpec:
    """MTSL without the alignment loss (the paper's ablation; the harness draws Fig. 4 from it and ``mtsl``)."""
    mtsl = config.mtsl.from_dict({**config.mtsl.to_dict(), "align": False})
    return MethodSpec(BranchingPlan.single_task(config.tasks, num_locations), StructuralLearner(mtsl))


@register_method("mtsl_rsa")
def _mtsl_rsa(config, num_locations: int) -> MethodSpec:
    """MTSL-RSA: grouping decisions on RSA instead of CKA (the alignment loss stays CKA: RSA has no gradient)."""
    mtsl = config.mtsl.from_dict({**config.mtsl.to_dict(), "similarity": "rsa"})
    return MethodSpec(BranchingPlan.single_task(config.tasks, num_locations), StructuralLearner(mtsl))
