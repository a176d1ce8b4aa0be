"""Input that would make every run fail is refused before any training, in one line, with no results folder."""
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import ablation, cli, compare, harness, robustness, sensitivity
from mtsl_plugin.config import load_preset
from mtsl_plugin.plan import BranchingPlan
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
    (["--seeds=-1"], "--seeds: -1 is not in 0..4294967295"),
    (["--seeds", "4294967296"], "--seeds: 4294967296 is not in 0..4294967295"),
    (["--seeds", "99999999999999999999"], "--seeds: 99999999999999999999 is not in"),
    (["--seeds", "0,1,0"], "--seeds: 0 is given twice"),  # one run counted as two samples
    (["--tasks", ""], "--tasks is empty"),
    (["--tasks", ","], "--tasks has an empty item"),
    (["--tasks", "S,,D"], "--tasks has an empty item"),
    (["--seeds", "0,1,"], "--seeds has an empty item: '0,1,'"),  # a trailing comma: was one seed fewer, silently
    (["--task-weights", "E=10,"], "--task-weights has an empty item"),
    (["--task-weights", "S=2,S=3"], "--task-weights: S is given twice"),
    (["--weight-args", "T=2"], "EW has no hyperparameter 'T'"),  # the default weighting takes none
    (["--weighting", "MGDA", "--weight-args", "mgda_gn=l3"], "mgda_gn must be one of none, l2, loss, loss+"),
    (["--weighting", "CAGrad", "--weight-args", "rescale=0.5"], "rescale must be a whole number, got '0.5'"),
    (["--weighting", "DWA", "--weight-args", "T"], "--weight-args takes KEY=VALUE pairs"),
    (["--weighting", "GradDrop"], "GradDrop"),  # LibMTL's needs a shared representation's gradients
    (["--weighting", "CAGrad", "--tasks", "S,D"], "exactly 3 tasks"),  # LibMTL 1.1.5's solver: shapes (1, 3)
    (["--data-root", "/nonexistent/nyu"], "--data-root /nonexistent/nyu: the data set is synthetic"),
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


def test_an_amalgamator_whose_loss_has_no_gradient_is_named_before_training(tmp_path, capsys, no_training,
                                                                             plugin_dir):
    (plugin_dir / "detached_amalgamator_plugin.py").write_text(textwrap.dedent("""
        import torch
        from mtsl_plugin.plugins import hookimpl

        class Detached(torch.nn.Module):
            def forward(self, group_out, task_outs):
                return torch.tensor(float(group_out.detach().pow(2).mean()))

        @hookimpl
        def mtsl_amalgamators():
            return {"detached": lambda channels, tasks: Detached()}
    """))
    argv = ["--plugin", "detached_amalgamator_plugin", "--amalgamator", "detached", "--out", str(tmp_path / "out"),
            *ARGS]
    assert compare.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "detached_amalgamator_plugin" in err and "no gradient" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


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


def test_out_that_cannot_be_created_is_one_line_for_every_command(tmp_path, capsys, no_training):
    """An --out below a file: refused once, before any training (not one failure line per job)."""
    file = tmp_path / "results.txt"
    file.write_text("my notes")
    out = file / "sub" / "out"
    for main, extra in ((compare.main, []), (ablation.main, []), (sensitivity.main, ["--sweep", "threshold"])):
        assert main([*extra, "--out", str(out), *ARGS]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: --out {out} cannot be created: {file} is a file", err
    assert file.read_text() == "my notes"


def test_out_holding_other_files_is_refused_and_left_as_it_is(tmp_path, capsys, no_training):
    """compare.py extends a folder only when it holds a comparison (its config.json); a folder of the user's other
    files is refused in one line and not written into."""
    out = tmp_path / "paper-draft"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    assert compare.main(["--methods", "mtsl", "--out", str(out), *ARGS]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --out {out} already holds files but no config.json, so it is "
                                               "not a compare.py results folder; choose a new folder")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "my notes"


def test_out_in_a_read_only_folder_is_one_line(tmp_path, capsys, no_training, monkeypatch):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o500)  # what the check asks the system (root may write anyway, so it is asked as a user would be)
    monkeypatch.setattr(cli.os, "access", lambda path, mode: Path(path) != parent)
    try:
        assert ablation.main(["--out", str(parent / "out"), *ARGS]) == 2
        err = capsys.readouterr().err.strip()
        assert f"{parent} is not writable" in err and len(err.splitlines()) == 1, err
        assert not (parent / "out").exists()
    finally:
        parent.chmod(0o700)


def test_data_root_applies_to_the_real_data_set_of_a_config_file(tmp_path, capsys, no_training):
    """--data-root overrides the root a --config gives its real data set (it was ignored)."""
    config = tmp_path / "nyu.yaml"
    config.write_text("dataset: {name: nyuv2, root: /nonexistent/from-config}\n")
    out = tmp_path / "out"
    argv = ["--config", str(config), "--data-root", "/nonexistent/from-option", "--out", str(out), *ARGS]
    assert compare.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "/nonexistent/from-option" in err and "from-config" not in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_dataset_option_keeps_the_root_a_config_file_gives_that_data_set(tmp_path, capsys, no_training):
    """``--dataset nyuv2`` repeating a config's data set keeps its root (it was dropped: "needs a root")."""
    config = tmp_path / "nyu.yaml"
    config.write_text("dataset: {name: nyuv2, root: /nonexistent/from-config}\n")
    out = tmp_path / "out"
    assert compare.main(["--config", str(config), "--dataset", "nyuv2", "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert "/nonexistent/from-config" in err and len(err.splitlines()) == 1, err
    assert compare.main(["--config", str(config), "--dataset", "cityscapes", "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err.strip()  # another data set: the config's root is not its folder
    assert "from-config" not in err and "root" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("argv, culprit", [
    (["--sweep", "threshold", "--values", "0.5,0.7,0.5"], "--values: 0.5 is given twice"),
    (["--sweep", "bmtas-lambda", "--values", "0.05,nan"], "λ must be a finite number ≥ 0, got nan"),
    (["--sweep", "bmtas-lambda", "--values=-1"], "λ must be a finite number ≥ 0, got -1"),
    (["--sweep", "seeds", "--inits", "random,random"], "--inits: random is given twice"),
    (["--sweep", "seeds", "--seeds", "2,2"], "--seeds: 2 is given twice"),
    (["--sweep", "seeds", "--inits", "{a}/w.pth,{b}/w.pth"], "share the folder mtsl_w/seed0"),
])
def test_bad_sweep_input_is_refused_before_any_training(tmp_path, capsys, no_training, argv, culprit):
    for name in ("a", "b"):  # two weights files of one name: their runs would share a label
        (tmp_path / name).mkdir()
        (tmp_path / name / "w.pth").write_bytes(b"")
    argv = [a.format(a=tmp_path / "a", b=tmp_path / "b") for a in argv]
    out = tmp_path / "out"
    assert sensitivity.main([*argv, "--out", str(out), "--tasks", "S,D", *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and culprit in err and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("record", ["config.json", "result.json"])
def test_a_folder_holding_a_run_of_other_settings_is_refused_before_any_training(tmp_path, capsys, no_training,
                                                                                 record):
    """Found up front, not when that job's turn comes after others have trained."""
    out = tmp_path / "out"
    run = out / "mtsl_avg" / "seed0"  # ablation's fourth row; STN comes first and would train
    run.mkdir(parents=True)
    (run / record).write_text(json.dumps({"fingerprint": "0123456789ab", "status": "ok"}))
    assert ablation.main(["--out", str(out), "--tasks", "S,D", *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {run} holds a run of another configuration; it is kept: choose another --out", err
    assert sorted(p.name for p in out.iterdir()) == ["mtsl_avg"] and [p.name for p in run.iterdir()] == [record]


def test_a_run_from_before_the_heads_were_drawn_per_task_is_not_reused(tmp_path):
    """Every run's fingerprint names how its networks were first drawn: a finished run of the same configuration
    whose heads were drawn per width (its fingerprint has no such entry) is another run, refused up front rather
    than reused beside runs of this code."""
    from mtsl_plugin.experiment import INITIALISATION, run_fingerprint
    from mtsl_plugin.methods import build_method

    config = load_preset("smoke").replace(tasks=("S", "D"))
    spec = build_method("stn", config, 10)
    extra = {"method": "stn", "extra_epochs": spec.extra_epochs, "retrained_plan": None}  # what it hashed before
    before = config.fingerprint(exclude=("device", "mtsl"), extra=extra)
    assert before != run_fingerprint("stn", config, spec) == config.fingerprint(
        exclude=("device", "mtsl"), extra={**extra, "initialisation": INITIALISATION})
    run = tmp_path / "stn" / "seed0"
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"fingerprint": before, "status": "ok"}))
    with pytest.raises(ValueError, match="holds a run of another configuration"):
        harness.check_run_folders([harness.Job("stn", "stn", config)], tmp_path)


def test_a_run_of_the_authors_network_drawn_before_its_batchnorm_fix_is_not_reused():
    """Until 2026-12-08 the authors' network started each residual block's last BatchNorm scale at 0 (timm's
    default): its runs' fingerprints name the new drawing, while the compact network's, which did not change,
    keep theirs (their finished runs are still reused)."""
    from mtsl_plugin.experiment import AUTHORS_INITIALISATION, INITIALISATION, run_fingerprint
    from mtsl_plugin.methods import build_method

    compact = load_preset("smoke").replace(tasks=("S", "D"))
    for config, drawn in ((compact, INITIALISATION), (compact.replace(network="authors"), AUTHORS_INITIALISATION)):
        spec = build_method("stn", config, 10)
        extra = {"method": "stn", "extra_epochs": spec.extra_epochs, "retrained_plan": None}
        assert run_fingerprint("stn", config, spec) == config.fingerprint(
            exclude=("device", "mtsl"), extra={**extra, "initialisation": drawn})
    assert AUTHORS_INITIALISATION != INITIALISATION


def test_a_weights_file_counts_by_its_contents_not_its_path(tmp_path, monkeypatch):
    """A run's fingerprint held the weights file's path as written: other weights saved to the same path reused
    the runs of the old ones, and ``./w.pth`` was refused as another configuration beside ``w.pth``."""
    from mtsl_plugin.experiment import run_fingerprint
    from mtsl_plugin.methods import build_method

    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.zeros(3)}, "w.pth")
    config = load_preset("smoke").replace(tasks=("S", "D"))
    spec = build_method("stn", config, 10)

    def fingerprint(weights):
        return run_fingerprint("stn", config.replace(weights=weights), spec)

    first = fingerprint("w.pth")
    assert fingerprint("./w.pth") == fingerprint(str(tmp_path / "w.pth")) == first != fingerprint(None)
    torch.save({"w": torch.ones(3)}, "w.pth")
    assert fingerprint("w.pth") != first


def test_a_retrained_plan_is_checked_up_front_only_when_known(tmp_path):
    """A "-R" job retraining a plan given to it is checked against its folder; one retraining the plan of a
    source run in the same job list cannot be (the plan is known once that run finishes) and is skipped."""
    config = load_preset("smoke").replace(tasks=("S", "D"))
    run = tmp_path / "mtsl_r" / "seed0"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"fingerprint": "0123456789ab"}))
    harness.check_run_folders([harness.Job("mtsl_r", "mtsl_r", config)], tmp_path)
    plan = BranchingPlan.single_task(("S", "D"), 10)
    with pytest.raises(ValueError, match="holds a run of another configuration"):
        harness.check_run_folders([harness.Job("mtsl_r", "mtsl_r", config, plan)], tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["--setting", "encoder", "--tasks", "S,D"], "the mtsl plan has 10 locations, this run's network has 6 (setting "
                                                 "encoder)"),
    (["--tasks", "S,E"], "the mtsl plan has tasks ['S', 'D'], this run has ['S', 'E']")])
def test_a_plan_from_another_network_is_refused_before_any_training(tmp_path, capsys, no_training, argv, message):
    """--plan-from a 10-location plan for the encoder setting's 6 locations, or a plan of other tasks: refused
    before STN and One-Net."""
    source = tmp_path / "source"
    (source / "mtsl" / "seed0").mkdir(parents=True)
    plan = BranchingPlan.single_task(("S", "D"), 10).to_dict()
    (source / "mtsl" / "seed0" / "result.json").write_text(json.dumps({"plan": plan}))
    out = tmp_path / "out"
    assert compare.main(["--methods", "mtsl_r", *argv, "--plan-from", str(source), "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --plan-from {source}: {message}", err
    assert not out.exists()


def test_a_plan_from_file_holding_no_plan_is_refused_naming_the_file(tmp_path, capsys, no_training):
    source = tmp_path / "source"
    (source / "mtsl" / "seed0").mkdir(parents=True)
    remerging = {"tasks": ["S", "D"], "partitions": [[["S"], ["D"]], [["S", "D"]]] + [[["S", "D"]]] * 8}
    result = source / "mtsl" / "seed0" / "result.json"
    result.write_text(json.dumps({"plan": remerging}))
    out = tmp_path / "out"
    assert compare.main(["--methods", "mtsl_r", "--plan-from", str(source), "--out", str(out), *ARGS]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --plan-from {source}: {result}: location 1 groups ['S', "
                                               "'D'] together although they are split at location 0; tasks never "
                                               "re-merge deeper down")
    assert not out.exists()


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
