"""Fixed plans: STN (every task its own network), One-Net (everything shared) and One-Net-L (One-Net trained
longer by the amalgamation epochs of MTSL's schedule in the same preset, all of them: a run whose phases merge
fewer times spends fewer)."""
from __future__ import annotations

from mtsl_plugin.methods import MethodSpec, register_method
from mtsl_plugin.plan import BranchingPlan


@register_method("stn")
def stn(config, num_locations: int) -> MethodSpec:
    """Single-task networks: the reference every Δ_MTL is measured against."""
    return MethodSpec(BranchingPlan.single_task(config.tasks, num_locations))


@register_method("onenet")
def onenet(config, num_locations: int) -> MethodSpec:
    """One network shared by all tasks up to the task heads."""
    return MethodSpec(BranchingPlan.one_net(config.tasks, num_locations))


@register_method("onenet_l", settings=("encoder-decoder",))
def onenet_l(config, num_locations: int) -> MethodSpec:
    """One-Net with MTSL's amalgamation epochs added to its budget."""
    return MethodSpec(BranchingPlan.one_net(config.tasks, num_locations),
                      extra_epochs=sum(config.mtsl.amalgamation_epochs))
