"""Baseline methods, registered in :mod:`mtsl_plugin.methods` on import."""
from baselines import plans  # noqa: F401  (registers stn, onenet)
