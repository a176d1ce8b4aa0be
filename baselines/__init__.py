"""Baseline methods, registered in :mod:`mtsl_plugin.methods` on import."""
# registers stn, onenet, onenet_l, cross_stitch, mtan, ltb, ltb_r, bmtas, bmtas_r
from baselines import bmtas, cross_stitch, ltb, mtan, plans  # noqa: F401
