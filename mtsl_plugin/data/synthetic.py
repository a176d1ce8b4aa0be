"""Procedural ray-cast room scenes with five dense targets: the embedded default dataset.

Each scene is a closed box room (floor, walls; the ceiling counts as wall) holding 3-6 primitives
(sphere, box, cylinder, cone) of one of two materials, lit by one point light with ambient light,
seen by a pinhole camera. Classes are ``floor``, ``wall`` and every ``<kind>_<material>`` pair, so
the class is not a function of geometry: the material shows only in colour and texture
(``ceramic``: cool-hued checker; ``wood``: warm-hued, noise-warped stripes).

World frame: x right, y up (floor at y = 0), z away from the camera, in metres.
Camera frame (for normals): x right, y down, z forward (OpenCV convention).
Scene parameters of sample ``i`` come from ``numpy.random.default_rng([seed, stream, i])`` only, and are
drawn before the per-pixel image noise, so the same scene is rendered at every resolution.
"""
from __future__ import annotations

import colorsys
import functools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from mtsl_plugin.data import raycast
from mtsl_plugin.data.common import semantic_edges

MATERIALS: tuple[str, ...] = ("ceramic", "wood")
CLASS_NAMES: tuple[str, ...] = ("floor", "wall") + tuple(f"{k}_{m}" for k in raycast.KINDS for m in MATERIALS)
SPLIT_STREAMS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
"""Independent random streams per split, so the splits never share a scene."""

# Texture pattern of a surface: 0 = checker over the masked axes, 1 = soft stripes along ``axis``.
_CHECKER, _STRIPES = 0, 1


@dataclass(frozen=True)
class Primitive:
    """One object: ``kind`` in ``raycast.KINDS``, ``dims`` as its hit function takes them.

    Pose: ``x_world = rotation @ x_local + center``.
    """

    kind: str
    material: int
    center: np.ndarray  # (3,)
    rotation: np.ndarray  # (3, 3)
    dims: tuple[float, ...]


@dataclass(frozen=True)
class Scene:
    """All parameters of one scene; ``surfaces`` rows are floor, wall, then one row per object."""

    cam_pos: np.ndarray  # (3,)
    cam_rot: np.ndarray  # (3, 3), columns: camera right, down, forward in world coordinates
    vfov: float  # vertical field of view, radians
    room_lo: np.ndarray  # (3,)
    room_hi: np.ndarray  # (3,)
    light_pos: np.ndarray  # (3,)
    light_rgb: np.ndarray  # (3,)
    ambient: float
    objects: tuple[Primitive, ...]
    surfaces: dict[str, np.ndarray]  # each (2 + len(objects), ...)
    noise_freq: np.ndarray  # (K, 3) rad/m, shared smooth noise field
    noise_phase: np.ndarray  # (K,)
    pixel_noise: float  # std of additive image noise


def _hsv(rng: np.random.Generator, h: tuple[float, float], s: tuple[float, float],
         v: tuple[float, float]) -> np.ndarray:
    """A random RGB colour ``(3,)`` with hue, saturation and value drawn uniformly from the given ranges."""
    return np.array(colorsys.hsv_to_rgb(rng.uniform(*h) % 1.0, rng.uniform(*s), rng.uniform(*v)))


def _rot_y(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_x(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _sample_object(rng: np.random.Generator) -> tuple[Primitive, float]:
    """Draw an object resting on the floor at the origin; returns it and its footprint radius in metres."""
    kind = raycast.KINDS[rng.integers(len(raycast.KINDS))]
    material = int(rng.integers(len(MATERIALS)))
    yaw = rng.uniform(0.0, 2.0 * np.pi)
    rot = _rot_y(yaw)
    if kind == "sphere":
        r = rng.uniform(0.35, 0.8)
        rot, dims, lift, foot = rot @ _rot_x(rng.uniform(0.0, np.pi)), (r,), r, r
    elif kind == "box":
        half = rng.uniform(0.25, 0.7, size=3)
        dims, lift, foot = tuple(half), half[1], float(np.hypot(half[0], half[2]))
    elif kind == "cylinder":
        r, hh = rng.uniform(0.25, 0.5), rng.uniform(0.35, 0.9)
        lying = rng.uniform() < 0.35
        rot = rot @ _rot_x(np.pi / 2) if lying else rot
        dims, lift, foot = (r, hh), (r if lying else hh), (float(np.hypot(r, hh)) if lying else r)
    else:
        r = rng.uniform(0.35, 0.7)
        dims, lift, foot = (r, rng.uniform(0.8, 1.8)), 0.0, r
    center = np.array([0.0, lift, 0.0])
    return Primitive(kind, material, center, rot, tuple(float(x) for x in dims)), foot


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw every parameter of one scene from ``rng`` (resolution-independent)."""
    half_width, depth, height = rng.uniform(2.5, 4.0), rng.uniform(8.0, 11.0), rng.uniform(2.8, 3.8)
    room_lo, room_hi = np.array([-half_width, 0.0, -1.5]), np.array([half_width, height, depth])
    cam_pos = np.array([rng.uniform(-0.6, 0.6), rng.uniform(1.1, 1.8), room_lo[2] + rng.uniform(0.3, 1.0)])
    target = np.array([rng.uniform(-0.8, 0.8), rng.uniform(0.0, 0.6), rng.uniform(3.5, 5.5)])
    forward = (target - cam_pos) / np.linalg.norm(target - cam_pos)
    right = np.cross([0.0, 1.0, 0.0], forward)
    right /= np.linalg.norm(right)
    cam_rot = np.stack([right, np.cross(right, forward), forward], axis=1)
    vfov = np.deg2rad(rng.uniform(45.0, 60.0))

    objects, placed = [], []  # placed: (x, z, footprint radius)
    for _ in range(int(rng.integers(3, 7))):
        obj, foot = _sample_object(rng)
        for _attempt in range(20):
            z = rng.uniform(2.0, min(room_hi[2] - 1.0, 7.0))
            x_lim = min(0.45 * (z - cam_pos[2]), half_width - foot - 0.1)
            x = cam_pos[0] + rng.uniform(-x_lim, x_lim)
            x = float(np.clip(x, -half_width + foot + 0.1, half_width - foot - 0.1))
            if all(np.hypot(x - px, z - pz) > foot + pf + 0.05 for px, pz, pf in placed):
                placed.append((x, z, foot))
                objects.append(Primitive(obj.kind, obj.material, obj.center + [x, 0.0, z], obj.rotation, obj.dims))
                break

    fields = ("pattern", "color_a", "color_b", "scale", "axis", "warp", "contrast", "noise")
    rows: dict[str, list] = {k: [] for k in fields}

    def add(pattern, color_a, color_b, scale, axis, warp, contrast, noise) -> None:
        for key, value in zip(rows, (pattern, color_a, color_b, scale, axis, warp, contrast, noise)):
            rows[key].append(value)

    floor_a = _hsv(rng, (0.0, 1.0), (0.0, 0.25), (0.35, 0.6))
    add(_CHECKER, floor_a, np.clip(floor_a + rng.uniform(0.15, 0.3), 0, 1), rng.uniform(0.5, 1.0),
        np.array([1.0, 0.0, 1.0]), 0.0, 1.0, rng.uniform(0.05, 0.15))
    wall_a = _hsv(rng, (0.0, 1.0), (0.05, 0.3), (0.7, 0.95))
    add(_STRIPES, wall_a, wall_a * rng.uniform(0.75, 0.9), rng.uniform(0.3, 0.8),
        np.array([1.0, 0.0, 1.0]), 0.0, 4.0, rng.uniform(0.03, 0.1))
    for obj in objects:
        if MATERIALS[obj.material] == "ceramic":
            base = _hsv(rng, (0.5, 0.72), (0.5, 0.85), (0.6, 0.95))
            light = np.clip(0.35 * base + 0.65 * rng.uniform(0.85, 1.0), 0, 1)
            add(_CHECKER, base, light, rng.uniform(0.12, 0.25), np.ones(3), 0.0, 1.0, rng.uniform(0.02, 0.08))
        else:
            base = _hsv(rng, (0.03, 0.11), (0.55, 0.85), (0.5, 0.8))
            add(_STRIPES, base, base * rng.uniform(0.45, 0.65), rng.uniform(0.08, 0.2),
                np.array([0.0, 1.0, 0.0]), rng.uniform(0.03, 0.1), 1.0, rng.uniform(0.1, 0.2))
    surfaces = {k: np.array(v, dtype=np.float64) for k, v in rows.items()}
    surfaces["pattern"] = surfaces["pattern"].astype(np.int64)

    freq_dir = rng.normal(size=(4, 3))
    noise_freq = freq_dir / np.linalg.norm(freq_dir, axis=1, keepdims=True) * rng.uniform(3.0, 12.0, size=(4, 1))
    light_pos = np.array([rng.uniform(-0.8, 0.8) * half_width, height - rng.uniform(0.2, 0.6), rng.uniform(0.5, 5.0)])
    return Scene(cam_pos, cam_rot, float(vfov), room_lo, room_hi, light_pos,
                 rng.uniform(0.9, 1.0, size=3) * rng.uniform(0.9, 1.3), float(rng.uniform(0.18, 0.32)),
                 tuple(objects), surfaces, noise_freq, rng.uniform(0, 2 * np.pi, size=4),
                 float(rng.uniform(0.005, 0.025)))


def _object_class(obj: Primitive) -> int:
    return 2 + raycast.KINDS.index(obj.kind) * len(MATERIALS) + obj.material


def _albedo(scene: Scene, sid: np.ndarray, tex: np.ndarray) -> np.ndarray:
    """Per-pixel albedo ``(3, P)`` from surface ids ``(P,)`` and texture coordinates ``tex`` ``(3, P)``."""
    s = {k: v[sid] for k, v in scene.surfaces.items()}
    f = scene.noise_freq
    noise = np.mean([np.sin(f[k, 0] * tex[0] + f[k, 1] * tex[1] + f[k, 2] * tex[2] + scene.noise_phase[k])
                     for k in range(len(f))], axis=0)  # (P,) in [-1, 1]
    cells = np.floor(tex * s["axis"].T / s["scale"]).sum(0)
    checker = np.mod(cells, 2.0)
    along = (tex * s["axis"].T).sum(0) + s["warp"] * noise
    stripes = np.clip((0.5 + 0.5 * np.sin(2 * np.pi * along / s["scale"]) - 0.5) * s["contrast"] + 0.5, 0.0, 1.0)
    mix = np.where(s["pattern"] == _CHECKER, checker, stripes)
    albedo = s["color_a"].T * (1 - mix) + s["color_b"].T * mix
    return np.clip(albedo * (1.0 + s["noise"] * noise), 0.0, 1.0)


def _may_hit(obj: Primitive, o: np.ndarray, d: np.ndarray, t_max: float = np.inf) -> np.ndarray:
    """Conservative mask ``(P,)`` of world rays ``o + t d`` (``t <= t_max``) that can reach ``obj``."""
    local_center, radius = raycast.bounding_sphere(obj.kind, obj.dims)
    return raycast.may_hit_sphere(o, d, obj.rotation @ local_center + obj.center, radius, t_max)


def _object_hit(obj: Primitive, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Hit distances ``(P,)`` of world rays (origin ``(3, 1)`` or ``(3, P)``, directions ``(3, P)``) with ``obj``."""
    rt = obj.rotation.T
    return raycast.hit(obj.kind, raycast.rotate(rt, o - obj.center[:, None]), raycast.rotate(rt, d), obj.dims)


def render_scene(scene: Scene, height: int, width: int) -> dict[str, np.ndarray]:
    """Ray-cast ``scene`` at ``height x width``, one ray through each pixel centre.

    Returns numpy arrays: ``image`` float32 ``(3, H, W)`` noise-free in [0, 1], ``labels`` int64 ``(H, W)``,
    ``depth`` float32 ``(1, H, W)`` z-depth in metres, ``normals`` float32 ``(3, H, W)`` unit, camera frame.
    """
    focal = 0.5 * height / np.tan(0.5 * scene.vfov)
    u = (np.arange(width) + 0.5 - 0.5 * width) / focal
    v = (np.arange(height) + 0.5 - 0.5 * height) / focal
    d_cam = np.stack([np.broadcast_to(u[None, :], (height, width)), np.broadcast_to(v[:, None], (height, width)),
                      np.ones((height, width))]).reshape(3, -1)
    d = raycast.rotate(scene.cam_rot, d_cam)  # (3, P), optical-axis component 1, so hit distance = z-depth
    o = scene.cam_pos[:, None]

    t, axis, normal = raycast.room_hit(o, d, scene.room_lo, scene.room_hi)
    sid = np.where((axis == 1) & (d[1] < 0), 0, 1)
    for j, obj in enumerate(scene.objects):
        idx = np.flatnonzero(_may_hit(obj, o, d))
        t_obj = _object_hit(obj, o, d[:, idx])
        closer = t_obj < t[idx]
        t[idx[closer]] = t_obj[closer]
        sid[idx[closer]] = 2 + j
    point = o + t * d
    tex = point.copy()
    for j, obj in enumerate(scene.objects):
        mask = sid == 2 + j
        if mask.any():
            local = raycast.rotate(obj.rotation.T, point[:, mask] - obj.center[:, None])
            normal[:, mask] = raycast.rotate(obj.rotation, raycast.surface_normal(obj.kind, local, obj.dims))
            tex[:, mask] = local
    normal = np.where((normal * d).sum(0) > 0, -normal, normal)  # face the camera

    to_light = scene.light_pos[:, None] - point
    dist = np.sqrt((to_light * to_light).sum(0))
    lit = np.ones_like(t, dtype=bool)
    start = point + 1e-4 * normal
    shadow_d = scene.light_pos[:, None] - start
    for obj in scene.objects:
        idx = np.flatnonzero(_may_hit(obj, start, shadow_d, t_max=1.0))
        blocked = _object_hit(obj, start[:, idx], shadow_d[:, idx]) < 1.0
        lit[idx[blocked]] = False
    lambert = np.maximum((normal * to_light).sum(0) / dist, 0.0) / (1.0 + (dist / 6.0) ** 2)
    shade = scene.ambient + lambert * lit
    image = _albedo(scene, sid, tex) * shade * scene.light_rgb[:, None]

    classes = np.array([0, 1] + [_object_class(ob) for ob in scene.objects], dtype=np.int64)
    return {
        "image": np.clip(image, 0.0, 1.0).reshape(3, height, width).astype(np.float32),
        "labels": classes[sid].reshape(height, width),
        "depth": t.reshape(1, height, width).astype(np.float32),
        "normals": raycast.rotate(scene.cam_rot.T, normal).reshape(3, height, width).astype(np.float32),
    }


PARALLEL_PIXELS = 2 ** 24
"""Data sets of more pixels than this (about 128 scenes at 256 x 512, 9 s on one core) render in worker processes."""


def render_workers(n: int, height: int, width: int) -> int:
    """How many processes render ``n`` scenes by default: one below :data:`PARALLEL_PIXELS`, else the CPUs this
    process may use (shared among the local ranks under torchrun, which each render their own copy), at most 16
    and at least 8 scenes each."""
    if n * height * width <= PARALLEL_PIXELS:
        return 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # not on macOS
    cpus = usable // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(1, min(cpus, 16, n // 8))


def render_sample(seed: int, stream: int, index: int, height: int, width: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sample ``index`` of a split: noisy image (3, H, W) in [0, 1], labels uint8 (H, W), depth (1, H, W) and
    normals (3, H, W), all from ``default_rng([seed, stream, index])`` (the same in any process)."""
    rng = np.random.default_rng([seed, stream, index])
    scene = sample_scene(rng)
    out = render_scene(scene, height, width)
    noise = rng.standard_normal(out["image"].shape, dtype=np.float32)
    noisy = np.clip(out["image"] + np.float32(scene.pixel_noise) * noise, 0.0, 1.0)
    return noisy, out["labels"].astype(np.uint8), out["depth"], out["normals"]


class SyntheticScenes(Dataset):
    """``n`` procedural room scenes with targets S, D, E, N, A, all rendered eagerly at construction.

    Sample ``i`` depends only on ``(seed, split, i)``: datasets with different ``n`` share a prefix, and
    one scene looks the same (up to pixel sampling and image noise) at every resolution.

    Args:
        n: number of samples, >= 0.
        height, width: image size in pixels, >= 2 each.
        seed: non-negative base seed.
        split: random stream, one of ``SPLIT_STREAMS`` ("train", "val", "test"); different splits never share scenes.
        edge_radius: neighbourhood radius of the semantic edge target.
        progress: show a progress bar while rendering (only when stderr is a terminal).
        workers: processes that render (default :func:`render_workers`); the samples do not depend on it.
    """

    tasks: tuple[str, ...] = ("S", "D", "E", "N", "A")
    num_classes: int = len(CLASS_NAMES)
    class_names: tuple[str, ...] = CLASS_NAMES

    def __init__(self, n: int, height: int = 64, width: int = 64, seed: int = 0, *, split: str = "train",
                 edge_radius: int = 1, progress: bool = True, workers: int | None = None) -> None:
        if n < 0:
            raise ValueError(f"SyntheticScenes needs n >= 0 samples, got {n}.")
        if height < 2 or width < 2:
            raise ValueError(f"SyntheticScenes needs height and width >= 2, got {height}x{width}.")
        if not 0 <= seed < 2**32:  # numpy splits a larger seed into 32-bit words: seeds 2**32 apart share scenes
            raise ValueError(f"SyntheticScenes needs a seed in 0..2**32 - 1, got {seed}.")
        if split not in SPLIT_STREAMS:
            raise ValueError(f"Unknown synthetic split {split!r}; choose from {tuple(SPLIT_STREAMS)}.")
        self.height, self.width, self.seed, self.split = height, width, seed, split
        self.images = torch.empty(n, 3, height, width)
        self.labels = torch.empty(n, height, width, dtype=torch.uint8)
        self.depth = torch.empty(n, 1, height, width)
        self.normals = torch.empty(n, 3, height, width)
        workers = render_workers(n, height, width) if workers is None else workers
        render = functools.partial(render_sample, seed, SPLIT_STREAMS[split], height=height, width=width)
        bar = functools.partial(tqdm, total=n, desc=f"rendering {split} scenes", leave=False,
                                disable=None if progress else True)
        if workers > 1:  # forked, as DataLoader workers are on Linux: nothing to re-import, numpy work only
            fork = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(fork)) as pool:
                self._store(bar(pool.map(render, range(n), chunksize=max(1, n // (4 * workers)))))
        else:
            self._store(bar(map(render, range(n))))
        self.edges = semantic_edges(self.labels.long(), edge_radius).to(torch.bool)

    def _store(self, samples) -> None:
        for i, (image, labels, depth, normals) in enumerate(samples):
            self.images[i] = torch.from_numpy(image)
            self.labels[i] = torch.from_numpy(labels)
            self.depth[i] = torch.from_numpy(depth)
            self.normals[i] = torch.from_numpy(normals)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(image (3, H, W), targets)``.

        Targets: ``S`` (H, W) int64, ``D`` (1, H, W), ``E`` (1, H, W), ``N`` (3, H, W), ``A`` (3, H, W).
        """
        image = self.images[index]
        targets = {
            "S": self.labels[index].long(),
            "D": self.depth[index].clone(),
            "E": self.edges[index].float(),
            "N": self.normals[index].clone(),
            "A": image.clone(),
        }
        return image.clone(), targets
