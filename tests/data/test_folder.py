"""A user's own data in the folder layout: every target layout read, resized and mirrored; mistakes named."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_folder_data
from mtsl_plugin.data import TargetFiles, build_dataset
from mtsl_plugin.data.real import augment_sample

TARGETS = {"parts": TargetFiles("labels", "parts", 3), "flow": TargetFiles("dense", "flow", 2),
           "heat": TargetFiles("dense", "heat", 1), "rgb": TargetFiles("image", "", 3)}


@pytest.fixture
def root(tmp_path):
    return write_folder_data(tmp_path / "data", n_train=6, n_val=2, size=(16, 20))


def test_every_target_is_read_in_its_layout(root):
    data = build_dataset("folder", "train", root=str(root), targets=TARGETS)
    assert len(data) == 6 and data.tasks == ("parts", "flow", "heat", "rgb") and (data.height, data.width) == (16, 20)
    image, targets = data[0]
    stored = np.asarray(Image.open(root / "train" / "image" / "s000.png"), dtype=np.float32) / 255
    assert torch.allclose(image, torch.from_numpy(stored).permute(2, 0, 1))
    labels = np.asarray(Image.open(root / "train" / "parts" / "s000.png")).astype(np.int64)
    assert targets["parts"].dtype == torch.int64 and (targets["parts"][0] == -1).all()  # 255 in the PNG = ignore
    assert torch.equal(targets["parts"][1:], torch.from_numpy(labels[1:]))
    flow = np.load(root / "train" / "flow" / "s000.npy")
    assert targets["flow"].shape == (2, 16, 20)
    assert torch.equal(torch.isnan(targets["flow"]), torch.from_numpy(np.isnan(flow)).permute(2, 0, 1))
    assert targets["heat"].shape == (1, 16, 20) and torch.equal(targets["rgb"], image)


def test_resize_keeps_nan_out_of_the_valid_values(root):
    data = build_dataset("folder", "train", root=str(root), targets=TARGETS, height=8, width=10)
    image, targets = data[1]
    assert image.shape == (3, 8, 10) and targets["parts"].shape == (8, 10) and targets["flow"].shape == (2, 8, 10)
    valid = torch.isfinite(targets["flow"])
    assert valid.any() and (~valid).any()
    assert targets["flow"][valid].abs().max() <= 0.5  # offsets inside the rectangle only, never blended with NaN


def test_the_test_split_reads_test_when_it_exists_else_val(root):
    assert len(build_dataset("folder", "test", root=str(root), targets=TARGETS)) == 2
    write_folder_data(root.parent / "other", n_train=1, n_val=3, size=(16, 20))
    (root.parent / "other" / "val").rename(root / "test")
    assert len(build_dataset("folder", "test", root=str(root), targets=TARGETS)) == 3


def test_mirroring_flips_every_layout_and_negates_normals_x_only():
    image = torch.rand(3, 4, 6)
    targets = {"lab": torch.arange(24).view(4, 6), "val": torch.rand(2, 4, 6),
               "bin": (torch.rand(1, 4, 6) > 0.5).float(),
               "nrm": torch.nn.functional.normalize(torch.randn(3, 4, 6), dim=0)}
    layouts = {"lab": "labels", "val": "dense", "bin": "binary", "nrm": "normals"}
    out_image, out = augment_sample(image, targets, 1.0, 0, 0, True, layouts=layouts)
    assert torch.equal(out_image, image.flip(-1))
    for name in ("lab", "val", "bin"):
        assert torch.equal(out[name], targets[name].flip(-1)), name
    assert torch.allclose(out["nrm"], targets["nrm"].flip(-1) * torch.tensor([-1.0, 1, 1]).view(3, 1, 1))


@pytest.mark.parametrize("damage, culprit", [
    (lambda root: (root / "train" / "flow" / "s002.npy").unlink(), "s002"),
    (lambda root: np.save(root / "train" / "flow" / "s001.npy", np.zeros((16, 20, 3))), "s001.npy"),
    (lambda root: Image.fromarray(np.full((16, 20), 7, np.uint8)).save(root / "train" / "parts" / "s001.png"),
     "s001.png"),
    (lambda root: np.save(root / "train" / "heat" / "s001.npy", np.zeros((8, 8))), "s001.npy"),
])
def test_a_bad_file_is_named(root, damage, culprit):
    damage(root)
    with pytest.raises((ValueError, FileNotFoundError)) as caught:
        data = build_dataset("folder", "train", root=str(root), targets=TARGETS)
        for i in range(len(data)):
            data[i]
    assert culprit in str(caught.value) and len(str(caught.value).splitlines()) == 1
