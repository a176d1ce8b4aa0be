"""A user's own data in the folder layout: every target layout read, resized and mirrored; mistakes named."""
import re

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


def _tiny(root, files, size=(8, 8)):
    """A train/ split with one sample ``a``: an image of ``size`` and the target files ``{"<folder>/a.<ext>": array
    or PIL image}``."""
    (root / "train" / "image").mkdir(parents=True)
    Image.fromarray(np.full((*size, 3), 100, np.uint8)).save(root / "train" / "image" / "a.png")
    for name, content in files.items():
        (root / "train" / name).parent.mkdir(exist_ok=True)
        np.save(root / "train" / name, content) if name.endswith(".npy") else content.save(root / "train" / name)
    return root


@pytest.mark.parametrize("size", [(24, 24), (64, 64)])
def test_positive_targets_resize_and_augment_without_blending_in_their_zeros(tmp_path, size):
    sparse = np.where(np.random.default_rng(0).random((32, 32)) < 0.05, 10.0, 0.0).astype(np.float32)  # LiDAR-like
    half = np.zeros((32, 32), np.float32)
    half[:, 16:] = 8.0
    root = _tiny(tmp_path, {"D/a.npy": sparse, "range/a.npy": half[..., None]}, size=(32, 32))
    targets = {"D": TargetFiles("dense", "D", 1, valid="positive"),
               "range": TargetFiles("dense", "range", 1, "positive")}
    for augment in (False, True):
        torch.manual_seed(1)
        _, t = build_dataset("folder", "train", root=str(root), targets=targets, height=size[0], width=size[1],
                             augment=augment)[0]
        valid = t["D"] > 0  # the D loss and metric: NaN and 0 are no depth
        assert (~valid).any() and valid.float().mean() < 0.1, augment
        assert torch.allclose(t["D"][valid], torch.tensor(10.0)), augment  # never blended with the zeros
        valid = t["range"] > 0
        assert valid.any() and (~valid).any() and set(t["range"][valid].unique().tolist()) == {8.0}, augment
    finite = build_dataset("folder", "train", root=str(root), targets={"D": TargetFiles("dense", "D", 1)},
                           height=24, width=24)[0][1]["D"]
    assert (finite > 0).float().mean() > 0.2  # without the rule a 0 is a value and is averaged in
    with pytest.raises(ValueError, match="'sometimes'"):
        TargetFiles("dense", "D", 1, valid="sometimes")


def test_each_dense_channel_keeps_its_own_values_when_resized_or_zoomed(tmp_path):
    """Losses and metrics count each channel's value on its own, so a resize must not drop a channel's values
    where another channel has none (the two channels here hold values on opposite halves)."""
    two = np.full((32, 32, 2), np.nan, np.float32)
    two[:16, :, 0], two[16:, :, 1] = 1.0, 2.0
    root = _tiny(tmp_path, {"two/a.npy": two}, size=(32, 32))
    targets = {"two": TargetFiles("dense", "two", 2)}
    for size in ((32, 32), (16, 16), (64, 64)):  # as stored, shrunk, enlarged
        t = build_dataset("folder", "train", root=str(root), targets=targets, height=size[0], width=size[1])[0][1]
        valid = torch.isfinite(t["two"])
        assert valid.float().mean(dim=(1, 2)).tolist() == [0.5, 0.5], size
        assert set(t["two"][0][valid[0]].tolist()) == {1.0} and set(t["two"][1][valid[1]].tolist()) == {2.0}
    _, zoomed = augment_sample(torch.rand(3, 32, 32), {"two": torch.from_numpy(two).permute(2, 0, 1)}, 1.5, 0, 0,
                               False, layouts={"two": "dense"})
    assert 0.4 < torch.isfinite(zoomed["two"][0]).float().mean() < 0.8 and torch.isfinite(zoomed["two"][1]).any()


def test_build_split_marks_depth_and_positive_regressions(tmp_path):
    from mtsl_plugin.config import config_from_mapping, load_preset
    from mtsl_plugin.experiment import build_split

    root = _tiny(tmp_path, {f"{t}/a.npy": np.ones((8, 8), np.float32) for t in ("D", "range", "height")})
    config = config_from_mapping({"dataset": {"name": "folder", "root": str(root)}, "tasks": {
        "D": {}, "range": {"kind": "regression", "valid": "positive"}, "height": {"kind": "regression"}}},
        load_preset("smoke"))
    data = build_split(config, "train")
    assert {t: spec.valid for t, spec in data.targets.items()} == {"D": "positive", "range": "positive",
                                                                   "height": "finite"}


@pytest.mark.parametrize("files, targets, culprit", [
    ({"seg/a.npy": np.array([[1.5, 0.4] * 4] * 8, np.float32)}, {"seg": TargetFiles("labels", "seg", 3)},
     "seg/a.npy"),  # a soft or bilinearly resized label map is not classes
    ({"m/a.npy": np.full((8, 8), np.nan, np.float32)}, {"m": TargetFiles("binary", "m", 1)}, "m/a.npy"),
    ({"seg/a.npy": np.zeros((0, 0), np.int64)}, {"seg": TargetFiles("labels", "seg", 3)}, "image/a.npy"),
])
def test_a_value_the_layout_cannot_hold_is_named(tmp_path, files, targets, culprit):
    root = _tiny(tmp_path, files)
    if culprit == "image/a.npy":  # a 0 x 0 image
        (root / "train" / "image" / "a.png").unlink()
        np.save(root / "train" / "image" / "a.npy", np.zeros((0, 0, 3), np.float32))
    with pytest.raises(ValueError) as caught:
        build_dataset("folder", "train", root=str(root), targets=targets)[0]
    assert culprit in str(caught.value) and len(str(caught.value).splitlines()) == 1


@pytest.mark.parametrize("mode", ["1", "LA"])
def test_one_bit_and_alpha_png_masks_are_read_as_their_single_channel(tmp_path, mode):
    mask = np.eye(8, dtype=np.uint8)
    if mode == "1":
        png = Image.fromarray(mask.astype(bool))  # what PIL writes for a boolean array
    else:
        png = Image.fromarray(np.stack([mask, np.full_like(mask, 255)], -1), "LA")
    assert png.mode == mode
    root = _tiny(tmp_path, {"m/a.png": png, "seg/a.png": png})
    targets = {"m": TargetFiles("binary", "m", 1), "seg": TargetFiles("labels", "seg", 2)}
    _, t = build_dataset("folder", "train", root=str(root), targets=targets)[0]
    assert torch.equal(t["m"], torch.from_numpy(mask).float()[None])
    assert torch.equal(t["seg"], torch.from_numpy(mask).long())


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_an_image_with_an_exif_orientation_is_refused_naming_it(root, suffix):
    """A phone photo stored sideways with EXIF orientation 6 (shown rotated 90 degrees clockwise): PIL reads its
    stored pixels, annotation tools and OpenCV show, and label, the rotated image. It read silently (a square one
    misaligned with its labels, another failing the size check without saying why); now it is refused in one line
    naming the file, before training. Orientation 1 (stored upright) reads."""
    from mtsl_plugin.data.folder import EXIF_ORIENTATION
    from mtsl_plugin.preflight import read_every_sample

    stored = root / "train" / "image" / "s001.png"
    pixels = np.asarray(Image.open(stored))
    stored.unlink()
    path = stored.with_suffix(suffix)
    for orientation in (1, 6):
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        Image.fromarray(pixels).save(path, exif=exif)
        assert Image.open(path).getexif()[EXIF_ORIENTATION] == orientation
        data = build_dataset("folder", "train", root=str(root), targets=TARGETS)
        if orientation == 1:
            assert data[1][0].shape == (3, 16, 20)
            continue
        message = (rf"^File {re.escape(str(path))} carries EXIF orientation 6: viewers, annotation tools and "
                   r"OpenCV show it rotated 90 degrees clockwise, .* save it upright without the tag \(e.g. with "
                   r"PIL.ImageOps.exif_transpose\) after checking that its labels match the upright image.$")
        with pytest.raises(ValueError, match=message) as caught:
            read_every_sample(data, "folder train split", False)
        assert len(str(caught.value).splitlines()) == 1
