"""``run_method``, the README's Python entry point, checks its configuration before any training, as the benchmark
commands do (they check every job first and then call it with ``check=False``)."""
import numpy as np
import pytest
from PIL import Image

from conftest import FOLDER_TASKS, write_folder_data
from mtsl_plugin import experiment
from mtsl_plugin.config import config_from_mapping, load_preset
from mtsl_plugin.experiment import run_method


@pytest.fixture
def bad_test_label(tmp_path):
    """Folder data whose test split holds class 7 in one label of a 3-class task."""
    root = write_folder_data(tmp_path / "data", n_train=16, n_val=8)
    label = root / "val" / "parts" / "s007.png"
    array = np.asarray(Image.open(label)).copy()
    array[5, 5] = 7
    Image.fromarray(array).save(label)
    return config_from_mapping({"dataset": {"name": "folder", "root": str(root), "height": 32, "width": 32,
                                            "holdout": 8}, "tasks": FOLDER_TASKS}, load_preset("smoke"))


def test_run_method_refuses_bad_data_before_training(bad_test_label, tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "build_trainer", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ValueError, match=r"^Label file .*val/parts/s007\.png holds class 7, but task 'parts' has 3 "
                                         r"classes"):
        run_method(bad_test_label, "mtsl", tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # nothing written


def test_run_method_skips_the_check_for_callers_that_made_it(bad_test_label, tmp_path, monkeypatch):
    """``check=False`` (the benchmark harness, after ``check_jobs``): no second check; here the trainer is never
    built, so the run stops where training would start."""
    monkeypatch.setattr("mtsl_plugin.preflight.check_config", lambda *a, **k: pytest.fail("checked twice"))

    class Started(Exception):
        pass

    def build_trainer(*args, **kwargs):
        raise Started

    monkeypatch.setattr(experiment, "build_trainer", build_trainer)
    with pytest.raises(Started):
        run_method(bad_test_label, "mtsl", tmp_path / "run", progress=False, check=False)
