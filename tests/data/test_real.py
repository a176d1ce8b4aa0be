"""NYUv2 and Cityscapes loaders on tiny fixture folders written in the MTAN / LibMTL ``.npy`` layouts."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mtsl_plugin.data import Cityscapes, NYUv2, build_dataset, semantic_edges
from mtsl_plugin.data.common import resize_depth
from mtsl_plugin.data.real import augment_sample
from mtsl_plugin.experiment import build_data

H, W = 12, 16
INDICES = (3, 7, 10)  # non-contiguous; "10" sorts before "3" as text


def _sample(rng: np.random.Generator, num_classes: int) -> dict[str, np.ndarray]:
    label = rng.integers(0, num_classes, size=(H, W)).astype(np.float32)
    label[:2, :3] = -1.0
    depth = rng.uniform(1.0, 8.0, size=(H, W, 1)).astype(np.float32)
    depth[-3:, -4:] = 0.0
    normal = rng.normal(size=(H, W, 3)).astype(np.float32) * 0.7  # not unit length on purpose
    normal[0, -1] = 0.0
    normal[1, -1, 0] = np.nan  # a NaN x beside finite y, z: no normal, not (0, y, z)
    return {"image": rng.uniform(0, 1, size=(H, W, 3)).astype(np.float32), "label": label, "depth": depth,
            "normal": normal}


def _write(root: Path, folders: dict[str, str], num_classes: int, seed: int) -> dict[str, dict[int, dict]]:
    """Write train/ and val/ with ``INDICES`` samples; returns split -> index -> arrays by file key."""
    rng = np.random.default_rng(seed)
    written: dict[str, dict[int, dict]] = {}
    for split in ("train", "val"):
        written[split] = {}
        for i in INDICES:
            sample = _sample(rng, num_classes)
            written[split][i] = sample
            for key, folder in folders.items():
                (root / split / folder).mkdir(parents=True, exist_ok=True)
                np.save(root / split / folder / f"{i}.npy", sample[key])
    return written


@pytest.fixture()
def nyu(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "nyuv2"
    data = _write(root, {"image": "image", "label": "label", "depth": "depth", "normal": "normal"}, 13, 0)
    return root, data


@pytest.fixture()
def city(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "cityscapes"
    data = _write(root, {"image": "image", "label": "label_7", "depth": "depth"}, 7, 1)
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        (root / split / "label_19").mkdir()
        for i in INDICES:
            np.save(root / split / "label_19" / f"{i}.npy", rng.integers(-1, 19, size=(H, W)).astype(np.float32))
    return root, data


def test_nyuv2_reads_samples_in_numeric_order_with_all_targets(nyu: tuple[Path, dict]) -> None:
    root, data = nyu
    ds = NYUv2(root, "train")
    assert len(ds) == 3 and ds.indices == [3, 7, 10]
    assert ds.tasks == ("S", "D", "E", "N", "A") and ds.num_classes == 13 and len(ds.class_names) == 13
    assert (ds.height, ds.width) == (H, W)
    for item, index in enumerate(INDICES):
        image, t = ds[item]
        ref = data["train"][index]
        assert image.shape == (3, H, W) and image.dtype == torch.float32
        assert torch.equal(image, torch.from_numpy(ref["image"]).permute(2, 0, 1))
        assert torch.equal(t["A"], image)
        assert t["S"].dtype == torch.int64 and torch.equal(t["S"], torch.from_numpy(ref["label"]).long())
        assert (t["S"][:2, :3] == -1).all()
        assert torch.equal(t["E"], semantic_edges(t["S"]))
        assert (t["E"][0][:2, :3] == 0).all()  # ignore pixels are never edges
        assert t["D"].shape == (1, H, W) and torch.equal(t["D"][0], torch.from_numpy(ref["depth"][..., 0]))
        norms = t["N"].norm(dim=0)
        assert norms[0, -1] == 0 and norms[1, -1] == 0  # invalid (zero or NaN component) is the zero vector
        valid = torch.ones(H, W, dtype=torch.bool)
        valid[0, -1] = valid[1, -1] = False
        assert torch.allclose(norms[valid], torch.ones(int(valid.sum())), atol=1e-5)
        direction = torch.from_numpy(ref["normal"]).permute(2, 0, 1)[:, valid]
        assert torch.allclose(t["N"][:, valid], direction / direction.norm(dim=0), atol=1e-5)


def test_the_edge_target_has_the_asked_radius(nyu: tuple[Path, dict]) -> None:
    root, _ = nyu
    halves = np.where(np.arange(W) < W // 2, 1, 2).astype(np.float32)[None].repeat(H, 0)  # one boundary
    np.save(root / "train" / "label" / "3.npy", halves)
    _, t = NYUv2(root, "train", edge_radius=2)[0]
    assert torch.equal(t["E"], semantic_edges(t["S"], 2)) and not torch.equal(t["E"], semantic_edges(t["S"], 1))


@pytest.mark.parametrize("radius", [0, 1.5, True])
def test_a_bad_edge_radius_is_refused_when_the_data_set_is_made(nyu: tuple[Path, dict], radius) -> None:
    """It was checked at the first sample read (0), or failed there in max_pool2d (1.5, True)."""
    with pytest.raises(ValueError, match=r"^NYUv2 edge_radius must be an integer >= 1, got"):
        NYUv2(nyu[0], edge_radius=radius)


def test_a_zoom_of_an_image_one_pixel_high_keeps_one_row() -> None:
    """``int(1 / 1.2)`` is 0: the window was empty and the resize failed."""
    image, labels = torch.rand(3, 1, 16), torch.zeros(1, 16, dtype=torch.long)
    zoomed, targets = augment_sample(image, {"S": labels}, 1.5, 0, 2, False)
    assert zoomed.shape == (3, 1, 16) and targets["S"].shape == (1, 16)


def test_test_split_reads_the_val_folder(nyu: tuple[Path, dict]) -> None:
    root, data = nyu
    image, _ = NYUv2(root, "test")[0]
    assert torch.equal(image, torch.from_numpy(data["val"][3]["image"]).permute(2, 0, 1))
    assert torch.equal(image, NYUv2(root, "val")[0][0])


@pytest.mark.parametrize("size", [(6, 8), (24, 40)])
def test_resize_keeps_labels_depth_and_normals_valid(nyu: tuple[Path, dict], size: tuple[int, int]) -> None:
    root, data = nyu
    h, w = size
    ds = NYUv2(root, "train", height=h, width=w)
    assert (ds.height, ds.width) == (h, w)
    image, t = ds[0]
    ref = data["train"][3]
    assert image.shape == (3, h, w) and 0 <= image.min() and image.max() <= 1
    assert t["S"].shape == (h, w) and set(t["S"].unique().tolist()) <= set(np.unique(ref["label"]).astype(int).tolist())
    assert torch.equal(t["E"], semantic_edges(t["S"]))
    valid_ref = ref["depth"][ref["depth"] > 0]
    depth = t["D"][t["D"] > 0]
    assert t["D"].shape == (1, h, w) and (t["D"] == 0).any()
    assert depth.min() >= valid_ref.min() - 1e-4 and depth.max() <= valid_ref.max() + 1e-4
    norms = t["N"].norm(dim=0)
    assert t["N"].shape == (3, h, w)
    assert torch.all(((norms - 1).abs() < 1e-5) | (norms == 0))


@pytest.mark.parametrize("size", [(6, 8), (24, 40), (9, 11)])
def test_resized_labels_are_nearest_source_labels_never_blends(nyu: tuple[Path, dict], size: tuple[int, int]) -> None:
    """Labels resize by nearest neighbour: each pixel takes one source pixel's class (or -1), never a rounded mean
    of neighbouring classes (between class 0 and 2, not class 1; beside an ignored pixel, not class 0)."""
    root, data = nyu
    h, w = size
    _, t = NYUv2(root, "train", height=h, width=w)[0]
    label = torch.from_numpy(data["train"][3]["label"]).long()
    rows = ((torch.arange(h) + 0.5) * H / h).floor().long().clamp_max(H - 1)
    cols = ((torch.arange(w) + 0.5) * W / w).floor().long().clamp_max(W - 1)
    assert torch.equal(t["S"], label[rows][:, cols])


def test_depth_resize_does_not_blend_invalid_zeros(tmp_path: Path) -> None:
    root = tmp_path / "nyu"
    _write(root, {"image": "image", "label": "label", "depth": "depth", "normal": "normal"}, 13, 3)
    depth = np.zeros((H, W, 1), dtype=np.float32)
    depth[:, W // 2:] = 5.0
    np.save(root / "train" / "depth" / "3.npy", depth)
    _, t = NYUv2(root, "train", height=5, width=7)[0]
    valid = t["D"] > 0
    assert valid.any() and (~valid).any()
    assert torch.allclose(t["D"][valid], torch.full_like(t["D"][valid], 5.0), atol=1e-5)


def test_cityscapes_7_and_19_classes(city: tuple[Path, dict]) -> None:
    root, data = city
    ds = Cityscapes(root, "val")
    assert ds.tasks == ("S", "D", "E", "A") and ds.num_classes == 7 and len(ds.class_names) == 7
    image, t = ds[2]
    ref = data["val"][10]
    assert set(t) == {"S", "D", "E", "A"}
    assert torch.equal(t["S"], torch.from_numpy(ref["label"]).long())
    assert torch.equal(t["D"][0], torch.from_numpy(ref["depth"][..., 0]))
    ds19 = Cityscapes(root, "train", num_classes=19, height=6, width=8)
    assert ds19.num_classes == 19 and ds19[0][1]["S"].shape == (6, 8)
    assert ds19[0][1]["S"].max() < 19 and ds19[0][1]["S"].min() >= -1
    with pytest.raises(ValueError, match="num_classes"):
        Cityscapes(root, "train", num_classes=8)


def test_default_collate_and_build_dataset(nyu: tuple[Path, dict], city: tuple[Path, dict]) -> None:
    image, t = next(iter(DataLoader(NYUv2(nyu[0], "train"), batch_size=2)))
    assert image.shape == (2, 3, H, W) and t["N"].shape == (2, 3, H, W) and t["S"].shape == (2, H, W)
    ds = build_dataset("nyuv2", "train", root=str(nyu[0]), n=2, height=6, width=8)
    assert isinstance(ds, NYUv2) and len(ds) == 2 and ds.indices == [3, 7] and ds[1][0].shape == (3, 6, 8)
    ds = build_dataset("cityscapes", "test", root=str(city[0]))
    assert isinstance(ds, Cityscapes) and ds.split_dir.name == "val" and len(ds) == 3
    for name in ("nyuv2", "cityscapes"):
        with pytest.raises(ValueError, match=name):
            build_dataset(name, "train")


def test_missing_root_split_and_empty_folder_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        NYUv2(missing, "train")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(FileNotFoundError, match="file is a file"):
        NYUv2(tmp_path / "file", "train")
    (tmp_path / "empty" / "train" / "image").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="val"):
        NYUv2(tmp_path / "empty", "val")
    with pytest.raises(FileNotFoundError, match="image.*no files"):
        NYUv2(tmp_path / "empty", "train")
    with pytest.raises(ValueError, match="'dev'"):
        NYUv2(tmp_path / "empty", "dev")


def test_missing_subfolder_or_file_names_it(nyu: tuple[Path, dict]) -> None:
    root, _ = nyu
    (root / "train" / "depth" / "7.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"depth[/\\]7\.npy"):
        NYUv2(root, "train")
    for f in (root / "val" / "normal").iterdir():
        f.unlink()
    (root / "val" / "normal").rmdir()
    with pytest.raises(FileNotFoundError, match=r"val[/\\]normal"):
        NYUv2(root, "val")


def test_a_target_file_without_an_image_is_named(nyu: tuple[Path, dict]) -> None:
    # a half-copied image folder: its samples' targets were dropped without a word (folder data refuses this too)
    root, _ = nyu
    (root / "train" / "image" / "7.npy").unlink()
    with pytest.raises(FileNotFoundError) as caught:
        NYUv2(root, "train")
    message = str(caught.value)
    assert re.search(r"label[/\\]7\.npy has no image", message) and len(message.splitlines()) == 1


def test_shape_mismatch_and_bad_values_name_the_file(nyu: tuple[Path, dict]) -> None:
    root, _ = nyu
    np.save(root / "train" / "depth" / "10.npy", np.ones((H, W - 1, 1), dtype=np.float32))
    ds = NYUv2(root, "train")
    ds[0]  # other samples still load
    with pytest.raises(ValueError, match=r"depth[/\\]10\.npy"):
        ds[2]
    np.save(root / "train" / "label" / "7.npy", np.full((H, W), 13.0, dtype=np.float32))
    with pytest.raises(ValueError, match=r"label[/\\]7\.npy"):
        ds[1]
    np.save(root / "train" / "image" / "3.npy", np.full((H, W, 3), 255.0, dtype=np.float32))
    with pytest.raises(ValueError, match=r"image[/\\]3\.npy"):
        ds[0]


def test_an_npz_archive_named_npy_is_named(nyu: tuple[Path, dict]) -> None:
    """np.load opens an .npz archive whatever its name: it went on as an array and failed with AttributeError."""
    root, _ = nyu
    path = root / "train" / "depth" / "7.npy"
    with open(path, "wb") as file:  # np.savez would append .npz to the name
        np.savez(file, depth=np.ones((H, W, 1), np.float32))
    with pytest.raises(ValueError, match=r"depth[/\\]7\.npy cannot be read as a \.npy array: it is an \.npz archive"):
        NYUv2(root, "train")[1]


def test_augmentation_zooms_flips_and_keeps_targets_consistent(nyu: tuple[Path, dict]) -> None:
    root, _ = nyu
    plain = NYUv2(root, "train")
    image, targets = plain[0]
    maps = {t: targets[t] for t in ("S", "D", "N")}
    same_image, same = augment_sample(image, maps, 1.0, 0, 0, flip=False)
    assert torch.equal(same_image, image) and all(torch.equal(same[t], maps[t]) for t in maps)
    flipped_image, flipped = augment_sample(image, maps, 1.0, 0, 0, flip=True)
    assert torch.equal(flipped_image, image.flip(-1)) and torch.equal(flipped["S"], maps["S"].flip(-1))
    assert torch.equal(flipped["D"], maps["D"].flip(-1))
    # a mirrored surface faces the other way: x of the normal changes sign, y and z are only mirrored
    assert torch.equal(flipped["N"][0], -maps["N"][0].flip(-1)) and torch.equal(flipped["N"][1:], maps["N"][1:].flip(-1))
    zoomed_image, zoomed = augment_sample(image, maps, 1.5, 2, 3, flip=False)
    assert zoomed_image.shape == image.shape and all(zoomed[t].shape == maps[t].shape for t in maps)
    window = maps["D"][:, 2:2 + int(H / 1.5), 3:3 + int(W / 1.5)]
    torch.testing.assert_close(zoomed["D"], resize_depth(window, H, W) / 1.5)  # zooming in brings things closer
    assert set(zoomed["S"].unique().tolist()) <= set(maps["S"][2:10, 3:13].unique().tolist())


@pytest.mark.parametrize("dataset, depth_factor", [(NYUv2, 1 / 1.5), (Cityscapes, 1.5)])
def test_a_zoom_brings_metric_depth_and_inverse_depth_nearer(dataset, depth_factor, nyu, city, monkeypatch) -> None:
    """Zooming in by 1.5 brings the scene 1.5 times nearer: NYUv2's metres are divided by it, Cityscapes' inverse
    depth is multiplied (it was divided too, which moved a zoomed scene 2.25 times farther than its image)."""
    root = (nyu if dataset is NYUv2 else city)[0]
    plain = dataset(root, "train")[0][1]["D"]
    monkeypatch.setattr("mtsl_plugin.data.real.random_window", lambda hw: (1.5, 2, 3, False))
    zoomed = dataset(root, "train", augment=True)[0][1]["D"]
    window = plain[:, 2:2 + int(H / 1.5), 3:3 + int(W / 1.5)]
    torch.testing.assert_close(zoomed, resize_depth(window, H, W) * depth_factor)


def test_augmented_training_data_varies_while_held_out_and_test_data_do_not(nyuv2_root: Path, smoke) -> None:
    config = smoke(tasks=("S", "D", "N")).replace(
        data=dataclasses.replace(smoke().data, name="nyuv2", root=str(nyuv2_root), train=None, test=None))
    assert config.data.augments
    torch.manual_seed(0)
    data, full = build_data(config)
    draws = [data.train[0] for _ in range(8)]
    assert any(not torch.equal(draws[0][0], d[0]) for d in draws)  # zoom and flip drawn anew
    for image, targets in draws:
        assert image.shape == full[0][0].shape and targets["S"].max() < full.num_classes
        norms = targets["N"].norm(dim=0)
        assert torch.all(((norms - 1).abs() < 1e-4) | (norms == 0))
    for index in range(len(data.holdout)):  # grouping decisions see the held-out images as they are
        assert torch.equal(data.holdout[index][0], full[len(data.train) + index][0])
    assert all(torch.equal(data.test[0][0], data.test[0][0]) for _ in range(6))  # never augmented
    plain, _ = build_data(config.replace(data=dataclasses.replace(config.data, augment=False)))
    assert torch.equal(plain.train[0][0], full[0][0]) and not smoke().data.augments  # synthetic: never


def test_grouping_data_from_the_training_split_as_the_authors_measure(nyuv2_root: Path, smoke) -> None:
    """``grouping_data: train``: every training image is trained on and grouping measures the first ``holdout``
    of them, not augmented; the default cuts a slice no method trains on."""
    config = smoke(tasks=("S", "D", "N")).replace(
        data=dataclasses.replace(smoke().data, name="nyuv2", root=str(nyuv2_root), train=None, test=None))
    cut, full = build_data(config)
    assert len(cut.train) + len(cut.holdout) == len(full) and len(cut.holdout) == config.data.holdout
    authors_config = config.replace(data=dataclasses.replace(config.data, grouping_data="train"))
    assert authors_config.fingerprint() != config.fingerprint()
    authors, full = build_data(authors_config)
    assert len(authors.train) == len(full) and len(authors.holdout) == config.data.holdout
    for index in range(len(authors.holdout)):
        assert torch.equal(authors.holdout[index][0], full[index][0])
    capped, full = build_data(authors_config.replace(data=dataclasses.replace(authors_config.data, holdout=800)))
    assert len(capped.holdout) == len(capped.train) == len(full) < 800  # the first up to 800, as the authors'
    synthetic = smoke().replace(data=dataclasses.replace(smoke().data, grouping_data="train"))
    data, full = build_data(synthetic)  # synthetic: the scenes generated are the training ones only
    assert len(data.train) == len(full) == smoke().data.train
    with pytest.raises(ValueError, match="data.grouping_data must be one of holdout, train, got 'test'"):
        dataclasses.replace(smoke().data, grouping_data="test")


def test_names_are_read_as_they_are_in_numeric_order(nyu: tuple[Path, dict]) -> None:
    root, data = nyu
    for folder in ("image", "label", "depth", "normal"):
        for path in (root / "train" / folder).iterdir():
            path.rename(path.with_name(f"{int(path.stem):04d}.npy"))  # 0003.npy, 0007.npy, 0010.npy
    ds = NYUv2(root, "train")
    assert ds.indices == [3, 7, 10]
    assert torch.equal(ds[2][0], torch.from_numpy(data["train"][10]["image"]).permute(2, 0, 1))


def test_two_names_of_one_number_are_refused(nyu: tuple[Path, dict]) -> None:
    root, _ = nyu
    np.save(root / "train" / "label" / "07.npy", np.load(root / "train" / "label" / "7.npy"))
    with pytest.raises(ValueError) as caught:
        NYUv2(root, "train")
    message = str(caught.value)
    assert "label" in message and "07.npy and 7.npy" in message and len(message.splitlines()) == 1


def test_a_non_integer_label_is_named(nyu: tuple[Path, dict]) -> None:
    root, _ = nyu
    np.save(root / "train" / "label" / "7.npy", np.full((H, W), 2.4, dtype=np.float32))  # a soft label map
    ds = NYUv2(root, "train")
    ds[0]
    with pytest.raises(ValueError, match=r"label[/\\]7\.npy.*non-integer"):
        ds[1]


def test_a_target_stored_under_another_name_of_its_number_is_named(nyu: tuple[Path, dict]) -> None:
    """``depth/07.npy`` beside ``image/7.npy``: the sample's own file is missing (names are read as they are), named
    when the data set is built, not when a read reaches it."""
    root, _ = nyu
    (root / "train" / "depth" / "7.npy").rename(root / "train" / "depth" / "07.npy")
    with pytest.raises(FileNotFoundError, match=r"depth[/\\]7\.npy does not exist"):
        NYUv2(root, "train")


@pytest.mark.parametrize("kwargs, culprit", [({"height": True, "width": 8}, "height must be an integer >= 1"),
                                             ({"height": 8}, "needs both height and width"),
                                             ({"height": 8, "width": 0}, "width must be an integer >= 1 or null, "
                                                                         "got 0")])
def test_a_size_given_wrongly_is_refused_naming_it(tmp_path: Path, kwargs: dict, culprit: str) -> None:
    with pytest.raises(ValueError, match=f"^NYUv2 {culprit}"):
        NYUv2(tmp_path, "train", **kwargs)
