"""Networks built from a branching plan: the stage table of a timm ResNet and the branched network."""
from mtsl_plugin.network.branched import BranchedNetwork
from mtsl_plugin.network.stages import ResNetStages, StageSpec

__all__ = ["BranchedNetwork", "ResNetStages", "StageSpec"]
