"""Networks built from a branching plan: the stage table of a timm CNN (:func:`create_stages`) and the branched
network."""
from mtsl_plugin.network.backbones import TimmStages, create_stages
from mtsl_plugin.network.branched import BranchedNetwork
from mtsl_plugin.network.stages import ResNetStages, StageFactory, StageSpec

__all__ = ["BranchedNetwork", "ResNetStages", "StageFactory", "StageSpec", "TimmStages", "create_stages"]
