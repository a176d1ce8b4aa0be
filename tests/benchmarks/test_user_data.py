"""A user's own data set and tasks through compare.py: a config file declares two tasks that are not S D E N A."""
import json
import shutil
import textwrap

import pytest
import yaml

from benchmarks import compare
from conftest import FOLDER_TASKS, table_row, write_folder_data
from mtsl_plugin.config import load_config_file, load_preset
from mtsl_plugin.plugins import reset_plugin_manager

ARGS = ["--preset", "smoke", "--no-progress"]


def write_config(path, root, tasks):
    path.write_text(yaml.safe_dump({"dataset": {"name": "folder", "root": str(root), "height": 32, "width": 32,
                                                "holdout": 8}, "tasks": tasks}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_folder_data(tmp_path_factory.mktemp("user") / "data")


def test_declared_tasks_train_through_compare_and_the_written_config_runs_again(data_root, tmp_path):
    config = write_config(tmp_path / "mine.yaml", data_root, FOLDER_TASKS)
    out = tmp_path / "out"
    assert compare.main(["--config", str(config), "--methods", "mtsl", "--out", str(out), *ARGS]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results] == ["stn", "onenet", "mtsl"]
    for r in results:
        assert list(r["metrics"]) == ["parts", "flow"] and r["metric_names"] == {"parts": "mIoU", "flow": "RMSE"}
        assert 0 < r["metrics"]["parts"] <= 1 and 0 < r["metrics"]["flow"] < 1
    assert json.loads((out / "mtsl" / "seed0" / "plan.json").read_text())["tasks"] == ["parts", "flow"]
    row = table_row((out / "table.md").read_text(), "mtsl")
    assert "parts mIoU ↑" in row and "flow RMSE ↓" in row
    written = load_config_file(out / "config.yaml", base=load_preset("smoke"))
    assert written == load_config_file(config, base=load_preset("smoke"))
    assert written.task_specs == FOLDER_TASKS and written.data.name == "folder"


def test_a_task_kind_from_a_plugin_trains_through_compare(data_root, tmp_path, monkeypatch):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "blob_kind.py").write_text(textwrap.dedent('''
        from functools import partial

        import torch
        import torch.nn.functional as F

        from mtsl_plugin.plugins import hookimpl
        from mtsl_plugin.task_kinds import RegressionError
        from mtsl_plugin.tasks import Task

        def soft_bce(pred, target):
            return F.binary_cross_entropy_with_logits(pred, target)

        def blob(name, *, title="blob"):
            """A soft mask in [0, 1]: BCE on logits, scored by the mean absolute error of the sigmoid."""
            return Task(name, title, 1, "MAE", False, soft_bce, partial(RegressionError, 1, False),
                        postprocess_fn=torch.sigmoid, target="dense")

        @hookimpl
        def mtsl_task_kinds():
            return {"blob": blob}
    '''))
    monkeypatch.syspath_prepend(str(plugins))
    config = write_config(tmp_path / "mine.yaml", data_root, {"parts": FOLDER_TASKS["parts"],
                                                              "heat": {"kind": "blob"}})
    out = tmp_path / "out"
    try:
        code = compare.main(["--config", str(config), "--plugin", "blob_kind", "--methods", "onenet", "--out",
                             str(out), *ARGS])
    finally:
        reset_plugin_manager()
    assert code == 0
    row = table_row((out / "table.md").read_text(), "onenet")
    assert 0 < float(row["heat MAE ↓"]) < 1


@pytest.mark.parametrize("tasks, culprit", [
    ({"parts": {"kind": "segmentation", "classes": 3}, "flow": {"kind": "regression", "chanels": 2}}, "chanels"),
    ({"parts": {"kind": "segmentation", "classes": 2}}, "class 2"),  # the files hold classes 0-2
    ({"parts": {"kind": "segmentation", "classes": 3, "folder": "segs"}}, "segs"),
    ({"S": None}, "declare it"),
])
def test_a_declaration_the_data_cannot_serve_is_refused_before_training(data_root, tmp_path, capsys, tasks,
                                                                        culprit, monkeypatch):
    monkeypatch.setattr("benchmarks.harness.run_method", lambda *a, **k: pytest.fail("training started"))
    config = write_config(tmp_path / "mine.yaml", data_root, tasks)
    assert compare.main(["--config", str(config), "--methods", "mtsl", "--out", str(tmp_path / "out"), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and culprit in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, culprit", [
    (shutil.rmtree, "data folder {root} does not exist."),  # a mistyped root
    (lambda root: shutil.rmtree(root / "val"), "data folder {root} has no test/ or val/ folder for the test split."),
    (lambda root: shutil.copy(root / "train/parts/s003.png", root / "train/parts/s003.npy"),
     "{root}/train/parts holds two files for sample 's003': s003.npy and s003.png."),
])
def test_a_data_folder_that_cannot_be_read_is_one_line_before_training(tmp_path, capsys, monkeypatch, damage,
                                                                       culprit):
    monkeypatch.setattr("benchmarks.harness.run_method", lambda *a, **k: pytest.fail("training started"))
    root = write_folder_data(tmp_path / "data", n_train=16, n_val=4)
    damage(root)
    config = write_config(tmp_path / "mine.yaml", root, FOLDER_TASKS)
    assert compare.main(["--config", str(config), "--methods", "mtsl", "--out", str(tmp_path / "out"), *ARGS]) == 2
    assert capsys.readouterr().err.strip() == f"error: {culprit.format(root=root)}"
    assert not (tmp_path / "out").exists()


def test_a_weight_on_a_declared_task_passes_the_preflight_check(data_root, tmp_path):
    """task_weights may name declared tasks as well as built-in ones; only names that are neither are refused."""
    from mtsl_plugin.preflight import check_config

    path = write_config(tmp_path / "mine.yaml", data_root, FOLDER_TASKS)
    path.write_text(path.read_text() + "task_weights: {flow: 2}\n")
    config = load_config_file(path, base=load_preset("smoke"))
    assert config.task_weights == {"flow": 2} and "flow" in config.tasks
    check_config(config, scan=False, progress=False)
    with pytest.raises(ValueError, match=r"task_weights names task\(s\) \['blob'\]"):
        check_config(config.replace(task_weights={"blob": 2}), scan=False, progress=False)
