"""--config FILE: configuration fields from YAML over the preset, CLI options on top, unknown keys refused, and
the effective configuration a results folder keeps readable again."""
import json

import pytest

from benchmarks import cli, compare
from mtsl_plugin.config import config_from_mapping, load_config_file, load_preset

ARGS = ["--methods", "mtsl", "--preset", "smoke", "--tasks", "S,D", "--no-progress"]


def test_a_file_overrides_the_preset_field_by_field_and_rescales_the_schedule(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 40\nlr_steps: [30, 35]\ndata: {height: 128, width: 256}\nmtsl: {phases: 6}\n")
    base = load_preset("quick")
    config = load_config_file(path, base)
    assert config.epochs == 40 and config.data.height == 128 and config.data.width == 256
    assert config.data.train == base.data.train and config.backbone_args == base.backbone_args  # kept
    assert len(config.mtsl.task_epochs) == 6 and config.mtsl.total_epochs == 40
    assert config.mtsl.threshold == base.mtsl.threshold


@pytest.mark.parametrize("preset, counts", [("quick", (None, None)), ("paper", (None, None)), ("smoke", (24, 8))])
def test_a_file_naming_a_real_data_set_reads_its_whole_splits_as_dataset_does(tmp_path, preset, counts):
    """``dataset: {name: folder, root: ...}`` over a preset reads the user's whole training and test splits: the
    preset's numbers of synthetic scenes do not carry over (they did: a folder of 1,000 images trained on 192 of
    them and was tested on 64 under the quick preset), as with ``--dataset``; the smoke preset keeps its small
    counts on any data; counts the file gives are kept; a switch back to synthetic keeps the preset's."""
    path = tmp_path / "mine.yaml"
    path.write_text("dataset: {name: folder, root: my_data, height: 32, width: 32}\n")
    base = load_preset(preset)
    data = load_config_file(path, base).data
    assert (data.name, data.root, (data.train, data.test), data.holdout) == ("folder", "my_data", counts,
                                                                              base.data.holdout)
    assert cli_config(preset, "--dataset", "folder").data.train == counts[0]  # the option: the same rule
    path.write_text("dataset: {name: folder, root: my_data, train: 100, test: 20}\n")
    given = load_config_file(path, base).data
    assert (given.train, given.test) == (100, 20)
    assert cli_config(preset, "--config", str(path), "--dataset", "folder").data.train == 100  # the same data set
    path.write_text("dataset: {name: synthetic}\n")
    assert load_config_file(path, base).data == base.data


def cli_config(preset, *argv):
    """The configuration compare.py's options give."""
    return cli.config_from_args(compare.parse_args(["--preset", preset, "--methods", "mtsl", *argv]))


def test_the_presets_are_their_files_read_the_same_way():
    for name in ("smoke", "quick", "paper"):
        config = load_preset(name)
        assert config_from_mapping(config.to_dict()) == config  # to_dict's form reads back to the same run


@pytest.mark.parametrize("text, culprit", [("epochs: 4\nepoch_budget: 9\n", "epoch_budget"),
                                           ("data: {heigth: 32}\n", "heigth"),
                                           ("mtsl: {treshold: 0.5}\n", "treshold"),
                                           ("- 1\n- 2\n", "no mapping"),
                                           ("mtsl: {phases: 5}\n", "5 task-learning epochs"),
                                           ("epochs: 0\n", "epochs"),
                                           ("data: {test: 0}\n", "data.test"),
                                           ("mtsl: {threshold: high}\n", "mtsl.threshold"),
                                           ("lr_steps: 5\n", "lr_steps"),
                                           ("preset: foo\n", "'foo'"),
                                           # values read well but refused by the checks before training:
                                           ("optimizer: {optim: sgdx}\n", "sgdx"),
                                           ("optimizer: {lr: -1}\n", "'optim'"),
                                           ("tasks: SD\n", "'SD'"),
                                           # a declared task's mistake names the file too (it did not):
                                           ("tasks:\n  S: {}\n  flow: {kind: regression, colour: red}\n",
                                            "unknown option 'colour'"),
                                           ("tasks:\n  S: {}\n  flow: {kind: regresion}\n", "'regresion'"),
                                           # PyYAML keeps a repeated key's last value without a word:
                                           ("epochs: 4\nepochs: 6\n", "key 'epochs' is given twice in one mapping "
                                                                       "(lines 1 and 2)"),
                                           ("tasks:\n  p: {kind: segmentation, classes: 3}\n  p: {kind: binary}\n",
                                            "key 'p' is given twice"),
                                           ("data: {height: 32, height: 64}\n", "(both on line 1)"),
                                           # values of the wrong type failed in a traceback (AttributeError or
                                           # TypeError, in timm or in the data set's reader):
                                           ("backbone: null\n", "backbone must be a string"),
                                           ("backbone: 18\n", "backbone must be a string"),
                                           ("weights: 5\n", "weights must be a string or null"),
                                           ("data: {name: nyuv2, root: 5}\n", "data.root must be a string"),
                                           ("data: {name: folder, root: [a]}\n", "data.root must be a string"),
                                           # a root for generated scenes was ignored: it trained on them
                                           ("data: {root: /nonexistent/nyuv2}\n", "data.root '/nonexistent/nyuv2': "
                                                                                 "the data set is synthetic"),
                                           ("lr_steps: [2, 2]\n", "lr_steps must be strictly increasing"),
                                           ("lr_steps: [2, 1]\n", "lr_steps must be strictly increasing"),
                                           ("mtsl: {phases: 3, task_epochs: [1, 1], amalgamation_epochs: [1, 1]}\n",
                                            "mtsl.phases (3) and mtsl.task_epochs (2 phases) disagree"),
                                           # YAML 1.1 read these as 8 and 80 without a word
                                           ("seed: 010\n", "'010' is read as an octal or base-60 number"),
                                           ("epochs: 1:20\n", "'1:20' is read as an octal or base-60 number")])
def test_bad_files_are_refused_in_one_line_before_training(tmp_path, capsys, text, culprit):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    argv = [a for a in ARGS if a not in ("--tasks", "S,D")]  # the file's own tasks
    assert compare.main([*argv, "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and culprit in err and len(err.splitlines()) == 1, err
    assert str(path) in err or culprit in ("sgdx", "'optim'", "'SD'")  # a file's own errors name it
    assert not (tmp_path / "out").exists()


def test_a_number_in_exponent_notation_without_a_dot_is_a_number(tmp_path):
    """YAML 1.1 (PyYAML) reads ``1e-4`` as a string: the optimizer then failed comparing it with a number, and the
    alignment weight was "not a finite number, got '2e-1'"; the files read it as YAML 1.2 and JSON do."""
    path = tmp_path / "run.yaml"
    path.write_text("optimizer: {optim: adam, lr: 1e-4, weight_decay: 5E-5}\nmtsl: {align_weight: 2e-1}\n")
    config = load_config_file(path, load_preset("smoke"))
    assert config.optimizer == {"optim": "adam", "lr": 1e-4, "weight_decay": 5e-5}
    assert config.mtsl.align_weight == 0.2


def test_options_on_top_of_a_file_replace_what_belongs_to_the_files_choice(tmp_path):
    """``--dataset synthetic`` over a file of a real data set generates the preset's numbers of scenes (it said
    "synthetic data needs data.train and data.test"); ``--weighting`` over a file's weighting drops the file's
    ``weight_args`` (another method's: "EW has no hyperparameter 'T'"); a file's ``backbone`` of another family
    than the preset's drops the preset's ``backbone_args`` (a ResNet's ``channels`` failed ConvNeXt), as
    ``--backbone`` does."""
    path = tmp_path / "run.yaml"
    path.write_text("dataset: {name: nyuv2, root: /tmp/x}\nweighting: DWA\nweight_args: {T: 3.0}\n")
    config = cli_config("quick", "--config", str(path), "--dataset", "synthetic", "--weighting", "EW")
    quick = load_preset("quick")
    assert (config.data.name, config.data.root, config.data.train, config.data.test) == (
        "synthetic", None, quick.data.train, quick.data.test)
    assert (config.weighting, config.weight_args) == ("EW", {})
    assert cli_config("quick", "--config", str(path)).weight_args == {"T": 3.0}
    assert cli_config("quick", "--config", str(path), "--weight-args", "T=4").weight_args == {"T": 4.0}
    path.write_text("backbone: convnext_atto\n")
    assert load_config_file(path, quick).backbone_args == {} and quick.backbone_args
    path.write_text("backbone: resnet34\n")
    assert load_config_file(path, quick).backbone_args == quick.backbone_args  # the same family keeps them


def test_a_key_a_merge_brings_in_may_be_overridden(tmp_path):
    """Only a key written twice is refused (above), not one that overrides a merged mapping's (``<<``)."""
    path = tmp_path / "run.yaml"
    path.write_text("data: {<<: {height: 32, width: 48}, width: 64}\n")
    data = load_config_file(path).data
    assert (data.height, data.width) == (32, 64)


def test_a_leading_tilde_in_a_files_paths_is_the_home_folder(tmp_path, monkeypatch):
    """A shell expands ``~`` in ``--data-root ~/nyuv2``; YAML does not, and ``root: ~/nyuv2`` said the folder
    ``~/nyuv2`` does not exist."""
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "run.yaml"
    path.write_text("data: {name: folder, root: ~/data}\nweights: ~/r18.pth\n")
    config = load_config_file(path)
    assert (config.data.root, config.weights) == (str(tmp_path / "data"), str(tmp_path / "r18.pth"))


def test_compare_runs_a_file_and_keeps_a_config_that_reads_back(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 4\nlr_steps: [3]\ndata: {height: 32, width: 48}\nbatch_size: 8\nmtsl: {phases: 2}\n")
    out = tmp_path / "out"
    assert compare.main([*ARGS, "--config", str(path), "--threshold", "0.5", "--out", str(out)]) == 0
    saved = json.loads((out / "mtsl" / "seed0" / "config.json").read_text())["config"]
    assert saved["epochs"] == 4 and saved["data"]["width"] == 48 and saved["batch_size"] == 8
    assert saved["mtsl"]["threshold"] == 0.5  # the option on top of the file
    assert saved["mtsl"]["task_epochs"] == [1, 1] and saved["tasks"] == ["S", "D"]
    effective = load_config_file(out / "config.yaml", load_preset("quick"))  # whatever the base, the same run
    assert effective.to_dict() == saved
    again = tmp_path / "again"
    assert compare.main(["--methods", "mtsl", "--config", str(out / "config.yaml"), "--no-progress",
                         "--out", str(again)]) == 0
    first = json.loads((out / "mtsl" / "seed0" / "result.json").read_text())
    second = json.loads((again / "mtsl" / "seed0" / "result.json").read_text())
    assert first["fingerprint"] == second["fingerprint"] and first["plan"] == second["plan"]
