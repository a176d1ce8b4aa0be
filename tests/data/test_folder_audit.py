"""Folder data as a new user stores it: image modes, odd files and declarations that must be read right or refused
in one line naming the culprit."""
import numpy as np
import pytest
import torch
from PIL import Image

from mtsl_plugin.data import FolderDataset, TargetFiles, build_dataset
from mtsl_plugin.task_kinds import declare_task

GREY = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)


def _sample(root, image_name, image, files):
    """A train/ split with one image ``image_name`` (PIL image or array) and the target files ``{"<folder>/<name>":
    array or PIL image}``."""
    (root / "train" / "image").mkdir(parents=True)
    for name, content in {f"image/{image_name}": image, **files}.items():
        path = root / "train" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, np.ndarray):
            with open(path, "wb") as file:  # np.save would append .npy to an upper-case .NPY
                np.save(file, content)
        else:
            content.save(path)
    return root


def _rgb(size=(8, 8)):
    return Image.fromarray(np.full((*size, 3), 100, np.uint8))


def _one_line_error(root, targets, culprit, **kwargs):
    with pytest.raises((ValueError, FileNotFoundError)) as caught:
        data = build_dataset("folder", "train", root=str(root), targets=targets, **kwargs)
        for i in range(len(data)):
            data[i]
    message = str(caught.value)
    assert culprit in message and len(message.splitlines()) == 1, message
    return message


@pytest.mark.parametrize("mode", ["L", "P", "I;16"])
def test_grey_palette_and_16_bit_image_files_are_read_as_rgb(tmp_path, mode):
    if mode == "L":
        png, expected = Image.fromarray(GREY), np.stack([GREY / 255] * 3, -1)
    elif mode == "P":  # a palette PNG (what PNG optimisers write) is a colour image
        colour = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        png = Image.fromarray(colour).convert("P", palette=Image.ADAPTIVE, colors=8)
        expected = np.asarray(png.convert("RGB")) / 255
    else:  # PIL's own conversion would clip every value above 255 to white
        grey16 = GREY.astype(np.uint16) * 257
        png, expected = Image.fromarray(grey16), np.stack([grey16 / 65535] * 3, -1)
    assert png.mode == mode
    root = _sample(tmp_path, "a.png", png, {"m/a.npy": np.eye(8)})
    image, _ = build_dataset("folder", "train", root=str(root), targets={"m": TargetFiles("binary", "m", 1)})[0]
    assert torch.allclose(image, torch.from_numpy(expected).float().permute(2, 0, 1), atol=1e-6)


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_a_normals_file_of_other_than_three_channels_is_named(tmp_path, channels):
    normals = np.random.default_rng(0).normal(size=(8, 8, channels)).astype(np.float32)
    root = _sample(tmp_path, "a.png", _rgb(), {"N/a.npy": normals})
    _one_line_error(root, {"N": TargetFiles("normals", "N", 3)}, "N/a.npy")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_an_unsigned_normal_map_is_refused_not_read_as_all_positive_normals(tmp_path, dtype):
    encoded = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(dtype)  # (n + 1) / 2 * 255, as in PNGs
    root = _sample(tmp_path, "a.png", _rgb(), {"N/a.npy": encoded})
    _one_line_error(root, {"N": TargetFiles("normals", "N", 3)}, "N/a.npy")


def test_signed_integer_normals_are_re_normalised(tmp_path):
    stored = np.array([[[-127, 0, 0], [0, 127, 0]] * 4] * 8, np.int8)
    root = _sample(tmp_path, "a.png", _rgb(), {"N/a.npy": stored})
    _, t = build_dataset("folder", "train", root=str(root), targets={"N": TargetFiles("normals", "N", 3)})[0]
    assert torch.equal(t["N"][:, 0, :2], torch.tensor([[-1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))


def test_255_in_a_npy_label_file_is_a_class_not_the_pngs_ignore_value(tmp_path):
    """Only a PNG stores "ignore" as 255; a .npy file stores it as a negative value or NaN, so its 255 is a class
    (refused for 3 classes) and is never dropped silently."""
    labels = np.zeros((8, 8), np.int64)
    labels[0, 0] = 255
    root = _sample(tmp_path, "a.png", _rgb(), {"seg/a.npy": labels})
    _one_line_error(root, {"seg": TargetFiles("labels", "seg", 3)}, "holds class 255")


def test_a_target_file_without_an_image_is_named(tmp_path):
    root = _sample(tmp_path, "a.png", _rgb(), {"seg/a.png": Image.fromarray(np.ones((8, 8), np.uint8)),
                                                "seg/b.png": Image.fromarray(np.ones((8, 8), np.uint8))})
    _one_line_error(root, {"seg": TargetFiles("labels", "seg", 3)}, "b.png")


def test_a_target_stored_with_a_suffix_its_layout_does_not_read_is_named(tmp_path):
    depth_mm = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 100)
    root = _sample(tmp_path, "a.png", _rgb(), {"D/a.png": Image.fromarray(depth_mm)})
    message = _one_line_error(root, {"D": TargetFiles("dense", "D", 1, "positive")}, "a.png")
    assert ".npy" in message


@pytest.mark.parametrize("content", [np.zeros((8, 8), [("a", "f4"), ("b", "f4")]), np.full((8, 8), "x"),
                                     np.ones((8, 8), complex)])
def test_a_npy_file_of_no_real_number_type_is_named(tmp_path, content):
    for folder, layout in (("f", "dense"), ("seg", "labels"), ("m", "binary")):
        root = _sample(tmp_path / folder, "a.png", _rgb(), {f"{folder}/a.npy": content})
        _one_line_error(root, {folder: TargetFiles(layout, folder, 3 if layout == "labels" else 1)}, "a.npy")
    root = _sample(tmp_path / "image", "a.npy", np.stack([content] * 3, -1), {"m/a.npy": np.eye(8)})
    _one_line_error(root, {"m": TargetFiles("binary", "m", 1)}, "image/a.npy")


@pytest.mark.parametrize("folder", [3, None, ["masks"], "", "/abs/masks", "../val/masks"])
def test_a_folder_that_is_no_relative_folder_name_is_refused_naming_the_task(folder):
    with pytest.raises(ValueError, match="task 'mask'.*folder") as caught:
        declare_task("mask", {"kind": "binary", "folder": folder})
    assert len(str(caught.value).splitlines()) == 1
    with pytest.raises(ValueError, match="folder"):
        TargetFiles("binary", folder, 1)


@pytest.mark.parametrize("name", ["/abs/mask", "../mask"])
def test_a_task_name_that_is_no_folder_name_is_refused_naming_the_task(name):
    """Without ``folder:`` a task reads the folder of its name: the refusal named ``TargetFiles``, not the task."""
    with pytest.raises(ValueError, match=f"^task '{name}': its folder, by default its name, must be") as caught:
        declare_task(name, {"kind": "binary"})
    assert len(str(caught.value).splitlines()) == 1
    declare_task(name, {"kind": "binary", "folder": "mask"})


def test_a_sub_folder_is_a_valid_folder(tmp_path):
    declare_task("mask", {"kind": "binary", "folder": "masks/v2"})
    root = _sample(tmp_path, "a.png", _rgb(), {"masks/v2/a.npy": np.eye(8)})
    _, t = build_dataset("folder", "train", root=str(root), targets={"m": TargetFiles("binary", "masks/v2", 1)})[0]
    assert torch.equal(t["m"][0], torch.eye(8))


@pytest.mark.parametrize("kwargs, culprit", [({"n": 0}, None), ({"n": -1}, "n must be an integer >= 0"),
                                             ({"height": 0, "width": 8}, "height must be an integer >= 1")])
def test_sample_count_and_size_are_checked_like_the_other_real_data_sets(tmp_path, kwargs, culprit):
    root = _sample(tmp_path, "a.png", _rgb((8, 10)), {"m/a.npy": np.ones((8, 10))})
    targets = {"m": TargetFiles("binary", "m", 1)}
    if culprit is None:  # an empty slice still knows the stored size
        data = FolderDataset(root, "train", targets, **kwargs)
        assert len(data) == 0 and (data.height, data.width) == (8, 10)
    else:
        with pytest.raises(ValueError, match=culprit):
            FolderDataset(root, "train", targets, **kwargs)


def test_upper_case_suffixes_and_ids_with_dots_and_spaces_are_read(tmp_path):
    labels = np.array([[0, 1, 2, 255] * 2] * 8, np.uint8)
    root = _sample(tmp_path, "scan 1.v2.JPG", _rgb(), {"seg/scan 1.v2.PNG": Image.fromarray(labels),
                                                        "f/scan 1.v2.NPY": np.full((8, 8), 2.5)})
    data = build_dataset("folder", "train", root=str(root),
                         targets={"seg": TargetFiles("labels", "seg", 3), "f": TargetFiles("dense", "f", 1)})
    _, t = data[0]
    assert data.ids == ["scan 1.v2"] and t["seg"][0].tolist() == [0, 1, 2, -1] * 2 and (t["f"] == 2.5).all()


@pytest.mark.parametrize("kind", [["segmentation"], {"name": "binary"}, None, 3])
def test_a_kind_that_is_no_name_is_refused_naming_the_task(kind):
    with pytest.raises(ValueError, match="task 'parts'.*kind") as caught:
        declare_task("parts", {"kind": kind, "classes": 3})
    assert len(str(caught.value).splitlines()) == 1


def test_hidden_files_such_as_macos_metadata_are_not_samples(tmp_path):
    root = _sample(tmp_path, "a.png", _rgb(), {"seg/a.png": Image.fromarray(GREY % 3),
                                              "seg/._a.png": Image.fromarray(GREY % 3)})
    (root / "train" / "image" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # not an image
    data = build_dataset("folder", "train", root=str(root), targets={"seg": TargetFiles("labels", "seg", 3)})
    assert data.ids == ["a"] and data[0][1]["seg"].shape == (8, 8)


def test_an_image_file_pil_refuses_as_too_large_is_named(tmp_path, monkeypatch):
    """PIL refuses an image of over twice ``MAX_IMAGE_PIXELS`` (178 million pixels by default, e.g. 15000 x 15000)
    with DecompressionBombError, not an OSError: a traceback from the commands. Lowered here, an 8 x 8 one."""
    root = _sample(tmp_path, "a.png", _rgb(), {"m/a.png": Image.fromarray(np.eye(8, dtype=np.uint8))})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)
    message = _one_line_error(root, {"m": TargetFiles("binary", "m", 1)}, "image/a.png")
    assert "cannot be read as an image" in message


@pytest.mark.parametrize("kwargs, error, culprit", [
    ({"height": 8.5, "width": 8}, ValueError, "height must be an integer"),  # failed in torch's resize, at sample 1
    ({"n": 2.0}, ValueError, "n must be an integer"),  # failed slicing the sample list
    ({"targets": {"m": ("binary", "m")}}, TypeError, "task 'm'"),  # AttributeError: 'tuple' object has no 'layout'
    ({"root": "file"}, FileNotFoundError, "is a file"),  # said "does not exist"
])
def test_python_callers_mistakes_are_named_in_one_line(tmp_path, kwargs, error, culprit):
    root = _sample(tmp_path, "a.png", _rgb(), {"m/a.png": Image.fromarray(np.eye(8, dtype=np.uint8))})
    (tmp_path / "file").write_text("not a folder")
    args = {"root": root, "split": "train", "targets": {"m": TargetFiles("binary", "m", 1)}, **kwargs}
    if "root" in kwargs:
        args["root"] = tmp_path / kwargs["root"]
    with pytest.raises(error) as caught:
        FolderDataset(**args)[0]
    assert culprit in str(caught.value) and len(str(caught.value).splitlines()) == 1, caught.value


@pytest.mark.parametrize("channels", [0, "2", True, 1.0])
def test_target_files_channels_that_are_no_count_are_refused(channels):
    """``channels="2"`` read on, and a two-channel file was refused as having "2 channel(s), the task has 2"."""
    with pytest.raises(ValueError, match="TargetFiles channels must be an integer >= 1"):
        TargetFiles("dense", "flow", channels)
