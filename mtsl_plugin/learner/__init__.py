"""MTSL's structural learner, its schedule, and the optimizer surgery structural edits need."""
from mtsl_plugin.learner.schedule import MTSLConfig, scale_schedule
from mtsl_plugin.learner.structural import PhaseRecord, StructuralLearner

__all__ = ["MTSLConfig", "PhaseRecord", "StructuralLearner", "scale_schedule"]
