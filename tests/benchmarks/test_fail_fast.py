"""Input that would make every run fail is refused before any training, in one line, with no results folder."""
import json
import textwrap

import numpy as np
import pytest
import torch

from benchmarks import ablation, compare, robustness, sensitivity
from mtsl_plugin.plugins import reset_plugin_manager
from conftest import write_nyuv2

ARGS = ["--preset", "smoke", "--no-progress"]


@pytest.fixture
def no_training(monkeypatch):
    """Any training started fails the test: the input must be refused before."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr("benchmarks.harness.run_method", refuse)


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A folder on sys.path for plugin modules; the plugin manager forgets them afterwards."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    reset_plugin_manager()


def nyuv2_with(tmp_path, damage):
    root = write_nyuv2(tmp_path / "nyu", n_train=12, n_val=4)
    damage(root)
    return ["--dataset", "nyuv2", "--data-root", str(root)]


def corrupt(root):
    (root / "train" / "depth" / "7.npy").write_bytes(b"\x93NUMPY\x09\x00garbage")


def misshaped(root):
    np.save(root / "val" / "label" / "2.npy", np.zeros((16, 16), np.float32))


def nan_image(root):
    image = np.load(root / "train" / "image" / "5.npy")
    image[3, 4, 0] = np.nan
    np.save(root / "train" / "image" / "5.npy", image)


def missing_file(root):
    (root / "train" / "normal" / "9.npy").unlink()


BAD = [
    (["--tasks", "S,Q"], "'Q'"),
    (["--tasks", "S,D,S"], "'S'"),
    (["--dataset", "imagenet"], "imagenet"),
    (["--dataset", "nyuv2"], "root"),
    (["--dataset", "nyuv2", "--data-root", "/nonexistent/nyu"], "/nonexistent/nyu"),
    (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "cuda"),
    (["--device", "gpu0"], "gpu0"),
    (["--weighting", "XYZ"], "XYZ"),
    (["--threshold", "nan"], "threshold"),
    (["--backbone", "resnet_nope"], "resnet_nope"),
    (["--tasks", "S,D,N", "--dataset", "cityscapes", "--data-root", "{city}"], "['N']"),
]


def cityscapes_root(folder):
    """A tiny Cityscapes layout (no normals): the NYUv2 fixture with ``label`` renamed ``label_7``."""
    root = write_nyuv2(folder, 12, 2)
    for split in ("train", "val"):
        for label in (root / split / "label").iterdir():
            np.save(label, np.clip(np.load(label), -1, 6))
        (root / split / "label").rename(root / split / "label_7")
    return root


@pytest.mark.parametrize("argv, culprit", BAD)
def test_bad_run_options_are_refused_before_any_training(tmp_path, capsys, no_training, argv, culprit):
    argv = [str(cityscapes_root(tmp_path / "city")) if a == "{city}" else a for a in argv]
    out = tmp_path / "out"
    assert compare.main(["--methods", "mtsl", *argv, "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and culprit in err and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("damage, culprit", [(corrupt, "train/depth/7.npy"), (misshaped, "val/label/2.npy"),
                                             (nan_image, "train/image/5.npy"), (missing_file, "train/normal/9.npy")])
def test_every_file_of_the_data_is_checked_and_a_bad_one_named(tmp_path, capsys, no_training, damage, culprit):
    out = tmp_path / "out"
    assert compare.main(["--methods", "stn", *nyuv2_with(tmp_path, damage), "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and culprit in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_unreadable_weights_file_is_named(tmp_path, capsys, no_training):
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"not a torch file")
    assert compare.main(["--weights", str(weights), "--out", str(tmp_path / "out"), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert str(weights) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_plugin_returning_nan_is_named_before_training(tmp_path, capsys, no_training, plugin_dir):
    (plugin_dir / "nan_metric_plugin.py").write_text(textwrap.dedent("""
        import torch
        from mtsl_plugin.plugins import hookimpl

        @hookimpl
        def mtsl_similarity_metrics():
            return {"always_nan": lambda x, y: torch.tensor(float("nan"))}
    """))
    argv = ["--plugin", "nan_metric_plugin", "--similarity", "always_nan", "--out", str(tmp_path / "out"), *ARGS]
    assert compare.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "nan_metric_plugin" in err and "always_nan" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_out_naming_a_file_is_refused_by_every_command(tmp_path, capsys, no_training):
    file = tmp_path / "results.txt"
    file.write_text("my notes")
    for main, extra in ((compare.main, []), (ablation.main, []), (sensitivity.main, ["--sweep", "threshold"]),
                        (robustness.main, [])):
        assert main([*extra, "--out", str(file), *ARGS]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --out") and str(file) in err and len(err.splitlines()) == 1, err
    assert file.read_text() == "my notes"


def test_every_row_of_a_sweep_is_checked_before_the_first_trains(tmp_path, capsys, no_training):
    """A sweep value that cannot train (a NaN threshold) stops the command before its first, valid, row."""
    out = tmp_path / "out"
    argv = ["--sweep", "threshold", "--values", "0.5,nan", "--out", str(out), *ARGS]
    assert sensitivity.main(argv) == 2
    assert "threshold" in capsys.readouterr().err
    assert not out.exists()


def test_a_plugin_named_on_the_command_line_decides_the_grouping(tmp_path, plugin_dir):
    """``--plugin M --similarity NAME`` end to end: the plugin's metric makes the grouping decisions."""
    (plugin_dir / "constant_metric_plugin.py").write_text(textwrap.dedent("""
        import torch
        from mtsl_plugin.plugins import hookimpl

        @hookimpl
        def mtsl_similarity_metrics():
            return {"always_0_25": lambda x, y: (x.sum() + y.sum()) * 0 + 0.25}
    """))
    out = tmp_path / "out"
    argv = ["--methods", "mtsl", "--tasks", "S,D", "--plugin", "constant_metric_plugin", "--similarity",
            "always_0_25", "--out", str(out), *ARGS]
    assert compare.main(argv) == 0
    phase = json.loads((out / "mtsl" / "seed0" / "phase_0.json").read_text())
    assert phase["similarities"][0]["matrix"] == [[1.0, 0.25], [0.25, 1.0]]
    assert phase["merged"] == []  # 0.25 < γ 0.8: kept apart, whatever CKA says
