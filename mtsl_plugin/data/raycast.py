"""Analytic ray casting against the primitives of the synthetic scenes (pure numpy, float64).

Every primitive lives in its own *local* frame (see each function); callers move rays into that
frame with the primitive's rotation and centre. Arrays are laid out component-first: points and
directions are ``(3, P)`` (or ``(3, 1)`` for a shared origin), hit distances are ``(P,)``.
Directions need not be unit length: a returned ``t`` is in units of the direction vector, so a
camera ray whose direction has optical-axis component 1 yields z-depth directly.
"""
from __future__ import annotations

import numpy as np

EPS = 1e-6
"""Smallest accepted hit distance, to skip self-intersections at a ray's origin."""

KINDS: tuple[str, ...] = ("sphere", "box", "cylinder", "cone")
"""Primitive kinds, in the order used for class indices."""


def rotate(rotation: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``rotation @ v`` for ``(3, 3)`` and ``(3, P)``, written elementwise so results never depend on BLAS."""
    r = rotation
    return np.stack([r[i, 0] * v[0] + r[i, 1] * v[1] + r[i, 2] * v[2] for i in range(3)])


def bounding_sphere(kind: str, dims: tuple[float, ...]) -> tuple[np.ndarray, float]:
    """Local centre ``(3,)`` and radius of a sphere enclosing primitive ``kind`` with ``dims``."""
    if kind == "sphere":
        return np.zeros(3), dims[0]
    if kind == "box":
        return np.zeros(3), float(np.linalg.norm(dims))
    if kind == "cylinder":
        return np.zeros(3), float(np.hypot(dims[0], dims[1]))
    if kind == "cone":
        return np.array([0.0, 0.5 * dims[1], 0.0]), float(np.hypot(dims[0], 0.5 * dims[1]))
    raise ValueError(f"Unknown primitive kind {kind!r}; choose from {KINDS}.")


def may_hit_sphere(o: np.ndarray, d: np.ndarray, center: np.ndarray, radius: float,
                   t_max: float = np.inf) -> np.ndarray:
    """Conservative mask ``(P,)`` of segments ``o + t d``, ``0 <= t <= t_max``, within ``radius`` of ``center``."""
    oc = center[:, None] - o
    dd = (d * d).sum(0)
    t = np.clip((oc * d).sum(0) / dd, 0.0, t_max)
    gap = oc - t * d
    return (gap * gap).sum(0) <= radius * radius * (1.0 + 1e-9) + 1e-12


def _nearest(*candidates: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Smallest valid hit distance over ``(t, valid)`` candidates ``(P,)``; ``inf`` where none is valid."""
    best = None
    for t, valid in candidates:
        t = np.where(valid & np.isfinite(t) & (t > EPS), t, np.inf)
        best = t if best is None else np.minimum(best, t)
    return best


def _roots(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both roots of ``a t^2 + 2 b t + c = 0`` in a form stable when ``a`` is tiny, and ``disc >= 0``."""
    disc = b * b - a * c
    s = np.sqrt(np.maximum(disc, 0.0))
    q = -(b + np.where(b >= 0, s, -s))
    return q / a, c / q, disc >= 0


def sphere_hit(o: np.ndarray, d: np.ndarray, radius: float) -> np.ndarray:
    """Hit distance ``(P,)`` with the sphere of ``radius`` centred at the local origin."""
    a = (d * d).sum(0)
    b = (o * d).sum(0)
    c = (o * o).sum(0) - radius * radius
    t0, t1, real = _roots(a, b, c)
    return _nearest((t0, real), (t1, real))


def box_hit(o: np.ndarray, d: np.ndarray, half: tuple[float, float, float]) -> np.ndarray:
    """Hit distance ``(P,)`` with the axis-aligned box ``|x| <= half[0], |y| <= half[1], |z| <= half[2]``."""
    e = np.asarray(half, dtype=np.float64)[:, None]
    inv = 1.0 / np.where(np.abs(d) < 1e-12, 1e-12, d)
    t1, t2 = (-e - o) * inv, (e - o) * inv
    t_near = np.minimum(t1, t2).max(0)
    t_far = np.maximum(t1, t2).min(0)
    overlap = t_near <= t_far
    return _nearest((t_near, overlap), (t_far, overlap & (t_near <= EPS)))


def cylinder_hit(o: np.ndarray, d: np.ndarray, radius: float, half_height: float) -> np.ndarray:
    """Hit distance ``(P,)`` with the capped cylinder of axis y: ``x^2 + z^2 <= r^2``, ``|y| <= half_height``."""
    a = d[0] * d[0] + d[2] * d[2]
    b = o[0] * d[0] + o[2] * d[2]
    c = o[0] * o[0] + o[2] * o[2] - radius * radius
    t0, t1, real = _roots(a, b, c)
    cands = [(t, real & (np.abs(o[1] + t * d[1]) <= half_height)) for t in (t0, t1)]
    dy = np.where(np.abs(d[1]) < 1e-12, 1e-12, d[1])
    for y_cap in (half_height, -half_height):
        t = (y_cap - o[1]) / dy
        x, z = o[0] + t * d[0], o[2] + t * d[2]
        cands.append((t, x * x + z * z <= radius * radius))
    return _nearest(*cands)


def cone_hit(o: np.ndarray, d: np.ndarray, radius: float, height: float) -> np.ndarray:
    """Hit distance ``(P,)`` with the capped cone of axis y: base disc of ``radius`` at y=0, apex at y=``height``."""
    k2 = (radius / height) ** 2
    q = height - o[1]
    a = d[0] * d[0] + d[2] * d[2] - k2 * d[1] * d[1]
    b = o[0] * d[0] + o[2] * d[2] + k2 * q * d[1]
    c = o[0] * o[0] + o[2] * o[2] - k2 * q * q
    t0, t1, real = _roots(a, b, c)
    cands = []
    for t in (t0, t1):
        y = o[1] + t * d[1]
        cands.append((t, real & (y >= 0.0) & (y <= height)))
    dy = np.where(np.abs(d[1]) < 1e-12, 1e-12, d[1])
    t = -o[1] / dy
    x, z = o[0] + t * d[0], o[2] + t * d[2]
    cands.append((t, x * x + z * z <= radius * radius))
    return _nearest(*cands)


def hit(kind: str, o: np.ndarray, d: np.ndarray, dims: tuple[float, ...]) -> np.ndarray:
    """Dispatch to the hit function of ``kind`` (one of :data:`KINDS`) with its ``dims``."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if kind == "sphere":
            return sphere_hit(o, d, *dims)
        if kind == "box":
            return box_hit(o, d, dims)
        if kind == "cylinder":
            return cylinder_hit(o, d, *dims)
        if kind == "cone":
            return cone_hit(o, d, *dims)
    raise ValueError(f"Unknown primitive kind {kind!r}; choose from {KINDS}.")


def surface_normal(kind: str, p: np.ndarray, dims: tuple[float, ...]) -> np.ndarray:
    """Outward unit normals ``(3, M)`` of ``kind`` at local surface points ``p`` ``(3, M)``.

    On primitives with several faces, each point takes the normal of the face it lies closest to.
    """
    n = np.zeros_like(p)
    if kind == "sphere":
        n = p.copy()
    elif kind == "box":
        e = np.asarray(dims, dtype=np.float64)[:, None]
        face = np.argmin(e - np.abs(p), axis=0)
        cols = np.arange(p.shape[1])
        n[face, cols] = np.sign(p[face, cols])
    elif kind == "cylinder":
        radius, half_height = dims
        rad = np.hypot(p[0], p[2])
        side = np.abs(rad - radius) < np.abs(np.abs(p[1]) - half_height)
        safe = np.maximum(rad, 1e-12)
        n[0] = np.where(side, p[0] / safe, 0.0)
        n[2] = np.where(side, p[2] / safe, 0.0)
        n[1] = np.where(side, 0.0, np.sign(p[1]))
    elif kind == "cone":
        radius, height = dims
        rad = np.hypot(p[0], p[2])
        slant = np.hypot(radius, height)
        side_dist = np.abs(rad - radius / height * (height - p[1])) * height / slant
        side = side_dist < np.abs(p[1])
        safe = np.maximum(rad, 1e-12)
        n[0] = np.where(side, p[0] / safe, 0.0)
        n[2] = np.where(side, p[2] / safe, 0.0)
        n[1] = np.where(side, radius / height, -1.0)
    else:
        raise ValueError(f"Unknown primitive kind {kind!r}; choose from {KINDS}.")
    return n / np.linalg.norm(n, axis=0, keepdims=True)


def room_hit(o: np.ndarray, d: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exit of rays ``d`` ``(3, P)`` from an origin ``o`` ``(3, 1)`` inside the box ``[lo, hi]``.

    Returns the hit distance ``(P,)``, the axis hit ``(P,)`` (0 = x wall, 1 = floor/ceiling, 2 = z wall)
    and the inward unit normal ``(3, P)``.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = np.where(d > 0, hi[:, None], lo[:, None])
        t_axis = np.where(d != 0, (bound - o) / d, np.inf)
    axis = np.argmin(t_axis, axis=0)
    cols = np.arange(d.shape[1])
    t = t_axis[axis, cols]
    n = np.zeros_like(d)
    n[axis, cols] = -np.sign(d[axis, cols])
    return t, axis, n
