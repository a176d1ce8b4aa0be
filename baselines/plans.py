"""The two extreme fixed plans: STN (every task its own network) and One-Net (everything shared)."""
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
