"""Behaviour of the procedural synthetic scenes and of the semantic-edge helper they share."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mtsl_plugin.data import DATASETS, SyntheticScenes, build_dataset, semantic_edges
from mtsl_plugin.data.raycast import KINDS
from mtsl_plugin.data.synthetic import CLASS_NAMES, PARALLEL_PIXELS, SPLIT_STREAMS, render_workers, sample_scene


def _all_tensors(ds: SyntheticScenes) -> list[torch.Tensor]:
    return [ds.images, ds.labels, ds.depth, ds.normals, ds.edges]


def _edges_reference(labels: np.ndarray, radius: int) -> np.ndarray:
    """Loop-based edge definition: valid pixel with a different valid label in its square neighbourhood."""
    h, w = labels.shape
    out = np.zeros((h, w), dtype=np.float32)
    for y in range(h):
        for x in range(w):
            if labels[y, x] < 0:
                continue
            win = labels[max(0, y - radius):y + radius + 1, max(0, x - radius):x + radius + 1]
            out[y, x] = float(((win >= 0) & (win != labels[y, x])).any())
    return out


@pytest.fixture(scope="module")
def scenes() -> SyntheticScenes:
    return SyntheticScenes(64, 32, 32, seed=0)


def test_same_seed_is_bit_identical_and_other_seed_differs() -> None:
    a, b = SyntheticScenes(3, 16, 24, seed=5), SyntheticScenes(3, 16, 24, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(_all_tensors(a), _all_tensors(b)))
    c = SyntheticScenes(3, 16, 24, seed=6)
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.labels, c.labels)
    with pytest.raises(ValueError, match=r"seed in 0\.\.2\*\*32 - 1"):  # seed 2**33's train scene 0 is seed 0's test 0
        SyntheticScenes(1, 8, 8, seed=2**33)


def test_rendering_in_worker_processes_gives_the_same_samples(monkeypatch) -> None:
    serial = SyntheticScenes(7, 16, 24, seed=4, split="val", workers=1)
    parallel = SyntheticScenes(7, 16, 24, seed=4, split="val", workers=3)
    assert all(torch.equal(x, y) for x, y in zip(_all_tensors(serial), _all_tensors(parallel)))
    assert render_workers(304, 48, 64) == 1  # the quick preset renders in the process itself
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(32)))
    assert render_workers(2200, 256, 512) == 16  # the paper preset: at most 16
    assert 15 * 1024 * 1200 > PARALLEL_PIXELS
    assert (render_workers(15, 1024, 1200), render_workers(16, 1024, 1200)) == (1, 2)  # >= 8 scenes each
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert render_workers(2200, 256, 512) == 8  # torchrun: the CPUs are shared by the local ranks


def test_datasets_of_different_length_share_a_prefix() -> None:
    short, long = SyntheticScenes(2, 16, 24, seed=1), SyntheticScenes(5, 16, 24, seed=1)
    for x, y in zip(_all_tensors(short), _all_tensors(long)):
        assert torch.equal(x, y[:2])


def test_sample_shapes_dtypes_and_ranges(scenes: SyntheticScenes) -> None:
    assert scenes.tasks == ("S", "D", "E", "N", "A")
    assert (scenes.height, scenes.width) == (32, 32)
    assert scenes.num_classes == len(scenes.class_names) == len(CLASS_NAMES) >= 7
    image, t = scenes[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert set(t) == set(scenes.tasks)
    assert t["S"].shape == (32, 32) and t["S"].dtype == torch.int64
    assert 0 <= t["S"].min() and t["S"].max() < scenes.num_classes  # every pixel hits something labelled
    assert t["D"].shape == (1, 32, 32) and t["D"].dtype == torch.float32
    assert t["E"].shape == (1, 32, 32) and set(t["E"].unique().tolist()) <= {0.0, 1.0}
    assert t["N"].shape == (3, 32, 32) and t["N"].dtype == torch.float32
    assert torch.equal(t["A"], image)


def test_default_collate_batches_samples(scenes: SyntheticScenes) -> None:
    image, t = next(iter(DataLoader(scenes, batch_size=4)))
    assert image.shape == (4, 3, 32, 32)
    assert t["S"].shape == (4, 32, 32) and t["N"].shape == (4, 3, 32, 32) and t["E"].shape == (4, 1, 32, 32)


def test_depth_positive_and_normals_unit_facing_camera(scenes: SyntheticScenes) -> None:
    assert torch.isfinite(scenes.depth).all() and (scenes.depth > 0).all()
    assert scenes.depth.max() < 20.0  # metres: the room is about 10 m deep
    norms = scenes.normals.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    # A visible surface faces the camera: normal . (pixel ray) < 0, with rays from each scene's own focal length.
    for i in range(8):
        scene = sample_scene(np.random.default_rng([0, SPLIT_STREAMS["train"], i]))
        focal = 0.5 * 32 / np.tan(0.5 * scene.vfov)
        u = (torch.arange(32) + 0.5 - 16) / focal
        ray = torch.stack([u[None, :].expand(32, 32), u[:, None].expand(32, 32), torch.ones(32, 32)])
        assert ((scenes.normals[i] * ray).sum(0) < 0).all()


def test_depth_is_z_depth_that_back_projects_onto_the_floor(scenes: SyntheticScenes) -> None:
    """Depth is the distance along the optical axis (z-depth), not along the ray: a floor pixel's depth times its
    pixel ray (x, y, 1) / focal lands on the floor (y = 0 in the world)."""
    for i in range(4):
        scene = sample_scene(np.random.default_rng([0, SPLIT_STREAMS["train"], i]))
        focal = 0.5 * 32 / np.tan(0.5 * scene.vfov)
        u = (np.arange(32) + 0.5 - 16) / focal
        ray = np.stack([np.broadcast_to(u[None, :], (32, 32)), np.broadcast_to(u[:, None], (32, 32)),
                        np.ones((32, 32))])
        point = scene.cam_pos[:, None, None] + np.einsum("ij,jhw->ihw", scene.cam_rot, ray * scenes.depth[i].numpy())
        floor = scenes.labels[i].numpy() == CLASS_NAMES.index("floor")
        assert floor.any()
        assert np.abs(point[1][floor]).max() < 1e-3


def test_all_classes_appear_and_class_is_not_a_function_of_geometry(scenes: SyntheticScenes) -> None:
    present = {scenes.class_names[c] for c in scenes.labels.unique().tolist()}
    assert len(present) >= 7
    assert present == set(CLASS_NAMES)
    for kind in KINDS:  # every object kind shows up under two classes, one per material
        assert {f"{kind}_ceramic", f"{kind}_wood"} <= present


def test_material_shows_in_appearance(scenes: SyntheticScenes) -> None:
    labels = scenes.labels.long()
    blue_minus_red = scenes.images[:, 2] - scenes.images[:, 0]
    ceramic = torch.tensor([n.endswith("ceramic") for n in CLASS_NAMES])[labels]
    wood = torch.tensor([n.endswith("wood") for n in CLASS_NAMES])[labels]
    assert blue_minus_red[ceramic].mean() > blue_minus_red[wood].mean() + 0.1


def test_edges_coincide_with_label_changes(scenes: SyntheticScenes) -> None:
    for i in range(4):
        _, t = scenes[i]
        assert np.array_equal(t["E"][0].numpy(), _edges_reference(t["S"].numpy(), 1))


@pytest.mark.parametrize("radius", [1, 2])
def test_semantic_edges_match_loop_reference_with_ignore(radius: int) -> None:
    gen = torch.Generator().manual_seed(radius)
    labels = torch.randint(-1, 3, (3, 9, 11), generator=gen)
    edges = semantic_edges(labels, radius)
    assert edges.shape == (3, 1, 9, 11)
    for lab, edge in zip(labels, edges):
        assert np.array_equal(edge[0].numpy(), _edges_reference(lab.numpy(), radius))
    assert torch.equal(semantic_edges(labels[0], radius), edges[0])


def test_non_square_resolution_renders_the_same_scene() -> None:
    small, large = SyntheticScenes(3, 8, 12, seed=2), SyntheticScenes(3, 24, 36, seed=2)
    assert small.images.shape == (3, 3, 8, 12) and large[0][1]["S"].shape == (24, 36)
    # Pixel centres of the small image are exactly every third pixel centre of the 3x larger one.
    sub_labels, sub_depth = large.labels[:, 1::3, 1::3], large.depth[:, :, 1::3, 1::3]
    assert (sub_labels == small.labels).float().mean() > 0.99
    assert torch.allclose(sub_depth, small.depth, rtol=1e-3)


def test_odd_aspect_24x40() -> None:
    ds = SyntheticScenes(2, 24, 40)
    image, t = ds[1]
    assert image.shape == (3, 24, 40) and t["N"].shape == (3, 24, 40) and t["E"].shape == (1, 24, 40)


def test_build_dataset_synthetic_splits_are_disjoint_streams() -> None:
    assert "synthetic" in DATASETS
    train = build_dataset("synthetic", "train", n=2, height=16, width=16, seed=3)
    val = build_dataset("synthetic", "val", n=2, height=16, width=16, seed=3)
    test = build_dataset("synthetic", "test", n=2, height=16, width=16, seed=3)
    assert not torch.equal(train.images, val.images) and not torch.equal(val.images, test.images)
    assert torch.equal(train.images, SyntheticScenes(2, 16, 16, seed=3).images)
    assert build_dataset("synthetic", "train", n=1).images.shape == (1, 3, 64, 64)


def test_build_dataset_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="needs n"):
        build_dataset("synthetic", "train")
    with pytest.raises(ValueError, match="'imagenet'.*synthetic"):
        build_dataset("imagenet", "train", n=1)
    with pytest.raises(ValueError, match="'dev'.*train"):
        build_dataset("synthetic", "dev", n=1)
    with pytest.raises(ValueError, match="seed"):
        SyntheticScenes(1, seed=-1)
