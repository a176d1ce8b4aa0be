"""Preflight (mtsl_plugin.preflight): what only building things finds, refused in one line before any training."""
import dataclasses

import numpy as np
import pytest

from mtsl_plugin.preflight import LIBMTL_OPTIMIZERS, check_optimizer

@pytest.mark.parametrize("optimizer, culprit", [
    ({"optim": "sgdx"}, "'sgdx'"),
    ({"lr": -1}, "'optim'"),  # a file's optimizer replaces the preset's whole
    ({"optim": "adam", "lr": -1}, "learning rate"),
    ({"optim": "adam", "momentum": 0.9}, "momentum"),
])
def test_an_optimizer_libmtl_cannot_build_is_named(optimizer, culprit):
    with pytest.raises(ValueError) as caught:
        check_optimizer(optimizer)
    assert culprit in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_every_optimizer_libmtl_builds_passes():
    for name in LIBMTL_OPTIMIZERS:
        check_optimizer({"optim": name, "lr": 1e-3, "weight_decay": 5e-5})


def _masks(root, values, n=3):
    """A folder data set whose ``fg`` labels (PNG) hold ``values`` (a 4 x 4 square of each, on 0) in every sample."""
    import numpy as np
    from PIL import Image

    for split in ("train", "val"):
        for folder in ("image", "fg"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            mask = np.zeros((16, 16), np.uint8)
            for k, value in enumerate(values):
                mask[4 * k:4 * k + 4, :4] = value
            Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(root / split / "image" / f"{i}.png")
            Image.fromarray(mask).save(root / split / "fg" / f"{i}.png")
    return root


@pytest.mark.parametrize("values, classes", [((255,), 2), ((255, 0), 3), ((), 2)])
def test_segmentation_labels_with_one_class_only_are_refused(tmp_path, values, classes):
    from mtsl_plugin.data import TargetFiles, build_dataset
    from mtsl_plugin.preflight import read_every_sample

    root = _masks(tmp_path, values)  # a 0/255 mask: 255 is "ignore", so class 1 never occurs
    targets = {"fg": TargetFiles("labels", "fg", classes)}
    read_every_sample(build_dataset("folder", "test", root=str(root), targets=targets), "test split", False)
    with pytest.raises(ValueError) as caught:
        read_every_sample(build_dataset("folder", "train", root=str(root), targets=targets), "train split", False)
    message = str(caught.value)
    assert "'fg'" in message and str(root / "train" / "fg") in message and "255" in message
    assert len(message.splitlines()) == 1


def test_a_two_class_mask_of_background_0_and_foreground_1_passes(tmp_path):
    from mtsl_plugin.data import TargetFiles, build_dataset
    from mtsl_plugin.preflight import read_every_sample

    root = _masks(tmp_path, (1,))  # class 0 (background) counts as a class like any other
    data = build_dataset("folder", "train", root=str(root), targets={"fg": TargetFiles("labels", "fg", 2)})
    read_every_sample(data, "train split", False)


@pytest.mark.parametrize("tasks", [2, 4, 5])
def test_cagrad_on_other_than_three_tasks_is_refused(tasks):
    from mtsl_plugin.preflight import check_weighting

    check_weighting("CAGrad", 3)
    with pytest.raises(ValueError, match=f"exactly 3 tasks .*got {tasks}$"):
        check_weighting("CAGrad", tasks)


def test_segmentation_labels_missing_some_classes_pass(tmp_path):
    from mtsl_plugin.data import TargetFiles, build_dataset
    from mtsl_plugin.preflight import read_every_sample

    root = _masks(tmp_path, (1, 3))  # classes 0, 1 and 3 of 5: a small subset of a data set may lack some
    data = build_dataset("folder", "train", root=str(root), targets={"fg": TargetFiles("labels", "fg", 5)})
    read_every_sample(data, "train split", False)


def _dense(root, values):
    """A folder data set of 3 samples in each split folder of ``values`` (folder -> value): images and ``v``
    targets (.npy (8, 8)) holding that value in every pixel; ``None``: the first sample's hold 1, the others' NaN."""
    from PIL import Image

    for split, value in values.items():
        for folder in ("image", "v"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(root / split / "image" / f"{i}.png")
            fill = (1.0 if i == 0 else np.nan) if value is None else value
            np.save(root / split / "v" / f"{i}.npy", np.full((8, 8), fill))
    return root


@pytest.mark.parametrize("split, valid, value", [("train", "finite", np.nan), ("test", "finite", np.inf),
                                                 ("train", "positive", 0.0), ("test", "positive", -2.0)])
def test_a_task_whose_targets_in_a_split_hold_no_valid_pixel_is_refused(tmp_path, split, valid, value):
    """All-NaN flow maps (or, under ``positive``, all-zero depth maps) trained on nothing and scored NaN, which the
    table showed only after training; one sample holding a value is enough."""
    from mtsl_plugin.data import TargetFiles, build_dataset
    from mtsl_plugin.preflight import read_every_sample

    folders = {"train": "train", "test": "val"}
    root = _dense(tmp_path, {"train": None, "val": None, folders[split]: value})
    targets = {"v": TargetFiles("dense", "v", 1, valid)}
    other = "test" if split == "train" else "train"
    read_every_sample(build_dataset("folder", other, root=str(root), targets=targets), f"{other} split", False)
    with pytest.raises(ValueError) as caught:
        read_every_sample(build_dataset("folder", split, root=str(root), targets=targets), f"{split} split", False)
    message = str(caught.value)
    assert message.startswith("task 'v': no target of the") and str(root / folders[split] / "v") in message
    assert len(message.splitlines()) == 1


def _normals(root, normals):
    """A folder data set of one split (train) whose samples' ``nrm`` targets are ``normals`` ((H, W, 3) arrays)."""
    from PIL import Image

    for folder in ("image", "nrm"):
        (root / "train" / folder).mkdir(parents=True, exist_ok=True)
    for i, target in enumerate(normals):
        Image.fromarray(np.full((*target.shape[:2], 3), 90, np.uint8)).save(root / "train" / "image" / f"{i}.png")
        np.save(root / "train" / "nrm" / f"{i}.npy", target.astype(np.float32))
    return root


@pytest.mark.parametrize("scene, refused", [("encoded", True), ("encoded sphere", True), ("plane", False),
                                            ("true", False)])
def test_normals_stored_as_an_image_encoding_in_0_1_are_refused(tmp_path, scene, refused):
    """Normals stored as an image encodes them, (n + 1) / 2 in [0, 1], were re-normalised and trained on silently
    as normals that all point one way. A split none of whose valid normals has a negative component and most of
    whose normals are not unit vectors (an encoded one's length is sqrt(1 + (nx + ny + nz) / 2)) is refused,
    naming the folder: normals facing the camera, or spread over the whole sphere (whose median length is 1). A
    true split passes, even one plane facing the camera, (0, 0, 1), which has no negative component."""
    from mtsl_plugin.data import TargetFiles, build_dataset
    from mtsl_plugin.preflight import read_every_sample

    rng = np.random.default_rng(0)
    normals = rng.normal(size=(3, 8, 8, 3)) * (1.0 if scene == "encoded sphere" else 0.5)
    normals += 0.0 if scene == "encoded sphere" else np.array([0.0, 0.0, 1.0])
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    assert (normals < 0).any()
    if scene.startswith("encoded"):
        normals = (normals + 1) / 2
    elif scene == "plane":
        normals = np.broadcast_to(np.array([0.0, 0.0, 1.0]), normals.shape).copy()
    normals[:, 0, 0] = 0.0  # a pixel without a normal: not counted
    normals[:, 0, 1] = np.nan
    root = _normals(tmp_path / "data", normals)
    data = build_dataset("folder", "train", root=str(root), targets={"nrm": TargetFiles("normals", "nrm", 3)})
    if not refused:
        read_every_sample(data, "folder train split", False)
        return
    with pytest.raises(ValueError, match=r"^task 'nrm': no normal of the folder train split in .*nrm has a negative "
                                         r"component and \d+ of 186 are not unit vectors \(length not within 0.05 "
                                         r"of 1\): they look like a normal map's image encoding \(n \+ 1\) / 2 in "
                                         r"\[0, 1\], not normals; map them to normals with 2 \* value - 1$") as caught:
        read_every_sample(data, "folder train split", False)
    assert str(root / "train" / "nrm") in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_nyuv2_depth_without_a_valid_pixel_is_refused(tmp_path):
    from mtsl_plugin.data import NYUv2
    from mtsl_plugin.preflight import read_every_sample

    from conftest import write_nyuv2

    root = write_nyuv2(tmp_path / "nyu", n_train=4, n_val=2, size=(8, 8))
    read_every_sample(NYUv2(root, "train"), "nyuv2 train split", False)
    for path in (root / "train" / "depth").iterdir():
        np.save(path, np.zeros((8, 8, 1), np.float32))  # 0 = no depth
    with pytest.raises(ValueError, match=r"^task 'D': no target of the nyuv2 train split in .*train/depth holds"):
        read_every_sample(NYUv2(root, "train"), "nyuv2 train split", False)


@pytest.mark.parametrize("batch_size, train, smallest", [(3, 24, 3), (16, 18, 2), (16, 31, 15), (16, 20, 4)])
def test_a_training_batch_under_4_images_is_refused_for_aligning_mtsl_only(smoke, tmp_path, batch_size, train,
                                                                          smallest):
    """MTSL's alignment loss measures CKA on every training batch (at least 4 images); a batch_size under 4, or a
    set under two batches whose last batch is that small, crashed MTSL in its first epoch. Other methods train."""
    from mtsl_plugin.experiment import run_method
    from mtsl_plugin.preflight import check_config

    config = smoke(tasks=("S", "D"))
    config = config.replace(batch_size=batch_size, data=dataclasses.replace(config.data, train=train))
    check_config(config)
    check_config(config, learner=dataclasses.replace(config.mtsl, align=False))
    if smallest >= 4:
        check_config(config, learner=config.mtsl)
        return
    with pytest.raises(ValueError, match=f"gives a batch of {smallest}: use a batch_size of at least 4") as caught:
        run_method(config, "mtsl", tmp_path / "mtsl", progress=False)
    assert len(str(caught.value).splitlines()) == 1 and not (tmp_path / "mtsl").exists()


def test_an_alignment_similarity_without_gradient_is_refused_before_training(smoke):
    """RSA may decide groupings but cannot drive the alignment loss: refused by the preflight check, in one line,
    not at the first training step (after the run's folder exists)."""
    from mtsl_plugin.preflight import check_mtsl

    check_mtsl(smoke(tasks="SD", similarity="rsa").mtsl)
    check_mtsl(dataclasses.replace(smoke(tasks="SD", align_similarity="rsa").mtsl, align=False))
    check_mtsl(dataclasses.replace(smoke(tasks="SD", align_similarity="rsa").mtsl, align_weight=0.0))  # off too
    with pytest.raises(ValueError, match="^similarity 'rsa' returns no gradient, so it cannot drive the alignment"):
        check_mtsl(smoke(tasks="SD", align_similarity="rsa").mtsl)


@pytest.mark.parametrize("train, size, setting, refused", [(9, 32, "encoder-decoder", True),
                                                           (10, 32, "encoder-decoder", False),
                                                           (9, 64, "encoder-decoder", False),
                                                           (9, 64, "encoder", True)])
def test_a_training_batch_of_one_image_batchnorm_cannot_train_on_is_refused(smoke, train, size, setting, refused):
    """9 training samples in batches of 8 leave a last batch of one image; on 32x32 images ResNet18's last stage
    is 1x1 there and BatchNorm failed at that step, after the run had started ("Expected more than 1 value per
    channel"); the DeepLab head's image pooling is 1x1 at any size. A larger image, or a batch of 2, trains."""
    from mtsl_plugin.preflight import check_config

    config = smoke(tasks=("S", "D"))
    config = config.replace(setting=setting, data=dataclasses.replace(config.data, train=train, height=size,
                                                                      width=size))
    if not refused:
        check_config(config)
        return
    with pytest.raises(ValueError, match=f"^batch_size 8 over {train} training samples gives a batch of 1 image, "
                                         f"and backbone 'resnet18' cannot train on a batch of one {size}x{size} "
                                         "image: .*Expected more than 1 value per channel") as caught:
        check_config(config)
    assert len(str(caught.value).splitlines()) == 1


@pytest.mark.parametrize("train, learner, refused", [(9, False, False), (10, False, True), (9, True, True)])
def test_the_batch_of_one_check_counts_each_process_share_under_torchrun(smoke, monkeypatch, train, learner, refused):
    """Under torchrun a last batch of one image is cut away (to a multiple of the processes: 9 samples in batches
    of 8 train 4 + 4), so only MTSL's amalgamation, which reads whole batches, meets it; 10 samples give each of 2
    processes a last batch of 1 image, where BatchNorm on ResNet18's 1x1 last stage fails."""
    from mtsl_plugin import distributed
    from mtsl_plugin.preflight import check_config

    config = smoke(tasks=("S", "D"))
    config = config.replace(data=dataclasses.replace(config.data, train=train, height=32, width=32))
    mtsl = dataclasses.replace(config.mtsl, align=False) if learner else None
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    if not refused:
        check_config(config, learner=mtsl)
        return
    gives = "a batch of 1 image" if learner else "each of 2 processes 1 image"
    with pytest.raises(ValueError, match=f"^batch_size 8 over {train} training samples gives {gives}, and backbone "
                                         "'resnet18' cannot train on a batch of one 32x32 image"):
        check_config(config, learner=mtsl)


@pytest.mark.parametrize("changes, culprit", [
    ({"batch_size": 5}, "the batch of 5 cannot be split evenly over 2 processes"),
    ({"data": {"train": 1, "grouping_data": "train"}}, "batch_size 8 over 1 training samples gives each of 2 processes "
                                                       "no image in a step"),
])
def test_a_batch_the_processes_cannot_share_is_refused_before_any_training(smoke, monkeypatch, changes, culprit):
    """Under torchrun: a batch the processes do not divide, or too few samples for every process to get one, was
    found at the first step (after the run's folder was made) or not at all (epochs without a step)."""
    from mtsl_plugin import distributed
    from mtsl_plugin.preflight import check_config

    config = smoke(tasks=("S", "D"))
    data = dataclasses.replace(config.data, **changes.pop("data", {}))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ValueError, match=f"^{culprit}"):
        check_config(config.replace(data=data, **changes))


@pytest.mark.parametrize("train, part, refused", [(11, "weights", True), (5, "architecture", True),
                                                  (12, None, False)])
def test_the_batch_of_one_check_counts_the_batches_of_each_part_of_bmtas_search_split(smoke, tmp_path, train, part,
                                                                                    refused):
    """BMTAS trains its weights on 80 % of the training samples and its architecture on the rest, each part in
    batches of its own: 11 samples in batches of 8 (8 + 3) split 9 (8 + 1) and 2, 5 samples split 4 and 1. The
    whole set's batches passed the check and BatchNorm failed on ResNet18's 1x1 last stage during the search;
    the run is refused before its folder is made, by run_method and by the benchmark commands' check."""
    import baselines.bmtas  # noqa: F401  (registers bmtas)
    from benchmarks import harness
    from mtsl_plugin.experiment import run_method
    from mtsl_plugin.preflight import check_config

    config = smoke(tasks=("S", "D"))
    config = config.replace(data=dataclasses.replace(config.data, train=train, height=32, width=32))
    check_config(config)  # the whole set's batches hold 2 images or more
    job = harness.Job("bmtas", "bmtas", config)
    if not refused:
        check_config(config, architecture=baselines.bmtas.BMTAS)
        harness.check_jobs([job], progress=False)
        return
    n = 9 if part == "weights" else 1
    message = (f"^batch_size 8 over the {n} of {train} training samples BMTAS trains its {part} on gives a batch "
               "of 1 image, and backbone 'resnet18' cannot train on a batch of one 32x32 image")
    with pytest.raises(ValueError, match=message) as caught:
        run_method(config, "bmtas", tmp_path / "bmtas", progress=False)
    assert len(str(caught.value).splitlines()) == 1 and not (tmp_path / "bmtas").exists()
    with pytest.raises(ValueError, match=message):  # also after a job of its configuration whose batches pass
        harness.check_jobs([harness.Job("stn", "stn", config), job], progress=False)


@pytest.mark.parametrize("grouping_data", ["holdout", "train"])
def test_sample_counts_larger_than_a_split_are_used_as_they_are_and_said_once(tmp_path, capsys, monkeypatch,
                                                                            grouping_data):
    """``dataset: {train: 1000}`` on a folder of 12 training samples trained on what there is without a word (the
    smoke preset's counts on a small data set rely on using what there is); now the check that scans the data
    says so in one line per count, once (not again where the same data was scanned already, nor on another rank
    than 0 under torchrun)."""
    from benchmarks import harness
    from conftest import FOLDER_TASKS, write_folder_data
    from mtsl_plugin import distributed
    from mtsl_plugin.config import config_from_mapping, load_preset
    from mtsl_plugin.preflight import check_config

    root = write_folder_data(tmp_path / "data", n_train=12, n_val=4)
    holdout = 4 if grouping_data == "holdout" else 20
    config = config_from_mapping({"dataset": {"name": "folder", "root": str(root), "height": 32, "width": 32,
                                              "train": 1000, "holdout": holdout, "test": 8,
                                              "grouping_data": grouping_data}, "tasks": FOLDER_TASKS},
                                 load_preset("smoke"))
    harness.check_jobs([harness.Job("stn", "stn", config), harness.Job("mtsl", "mtsl", config)], progress=False)
    if grouping_data == "holdout":
        said = [f"data: train asks for 1000 samples (besides 4 held out for grouping decisions), {root / 'train'} "
                "holds 12: using 8"]
    else:
        said = [f"data: train asks for 1000 samples, {root / 'train'} holds 12: using 12",
                f"data: holdout asks for 20 samples, {root / 'train'} holds 12: using 12"]
    said.append(f"data: test asks for 8 samples, {root / 'val'} holds 4: using 4")
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if line.startswith("data:")] == said
    assert "data:" not in captured.out
    within = config.replace(data=dataclasses.replace(config.data, train=12 - holdout * (grouping_data == "holdout"),
                                                     holdout=4, test=4))
    check_config(within, progress=False)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    check_config(config, progress=False)
    assert "data:" not in capsys.readouterr().err


def test_a_training_count_that_fits_the_split_only_without_the_held_out_slice_is_said(tmp_path, capsys):
    """``train: 10`` besides a grouping slice of 4 on a split of 12 trains 8: the count plus the slice is what the
    split must hold, so the line is said though 10 alone fits."""
    from conftest import FOLDER_TASKS, write_folder_data
    from mtsl_plugin.config import config_from_mapping, load_preset
    from mtsl_plugin.preflight import check_config

    root = write_folder_data(tmp_path / "data", n_train=12, n_val=4)
    config = config_from_mapping({"dataset": {"name": "folder", "root": str(root), "height": 32, "width": 32,
                                              "train": 10, "holdout": 4, "test": 4, "grouping_data": "holdout"},
                                  "tasks": FOLDER_TASKS}, load_preset("smoke"))
    check_config(config, progress=False)
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("data:")] == [
        f"data: train asks for 10 samples (besides 4 held out for grouping decisions), {root / 'train'} holds 12: "
        "using 8"]


def test_reading_samples_for_a_check_leaves_every_global_random_stream_where_it_was():
    """What runs inside ``rng_untouched`` (a transform or a plugin drawing from torch, numpy or Python's
    ``random``) leaves the three global streams as it found them: a seeded run or script draws afterwards what it
    would without the check."""
    import random

    import torch

    from mtsl_plugin.preflight import rng_untouched

    def draws() -> tuple:
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()

    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    expected = draws()
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    with rng_untouched():
        draws()
    assert draws() == expected


def test_signed_integer_normals_without_a_negative_component_pass(tmp_path):
    """Normals stored as signed integers are directions of any length (re-normalised on load): a split of one plane
    facing the camera, ``(0, 0, 127)`` as int8, has no negative component and no unit vector, and is no image
    encoding; only float normals are measured for it."""
    from mtsl_plugin.data import TargetFiles, build_dataset
    from mtsl_plugin.preflight import read_every_sample

    root = _normals(tmp_path / "data", np.zeros((2, 8, 8, 3)))
    for i in range(2):
        np.save(root / "train" / "nrm" / f"{i}.npy", np.broadcast_to(np.array([0, 0, 127], np.int8), (8, 8, 3)))
    data = build_dataset("folder", "train", root=str(root), targets={"nrm": TargetFiles("normals", "nrm", 3)})
    read_every_sample(data, "folder train split", False)
