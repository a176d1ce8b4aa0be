"""Baseline methods, registered in :mod:`mtsl_plugin.methods` on import."""
from baselines import cross_stitch, mtan, plans  # noqa: F401  (register stn, onenet, onenet_l, cross_stitch, mtan)
