"""``run_method``, the README's Python entry point, checks its configuration before any training, as the benchmark
commands do (they check every job first and then call it with ``check=False``)."""
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

import baselines  # noqa: F401  (registers the baselines' methods)
from conftest import FOLDER_TASKS, write_folder_data
from mtsl_plugin import experiment
from mtsl_plugin.config import config_from_mapping, load_preset
from mtsl_plugin.experiment import run_method
from mtsl_plugin.plan import BranchingPlan


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


def test_twenty_tasks_group_by_local_search_and_an_exact_solver_is_refused_before_training(tmp_path, monkeypatch):
    """Twenty declared tasks (all reading one target folder): the default exact solver is refused in one line
    before any training, naming the local-search solvers; other methods are not held to it; with
    ``authors_local`` MTSL runs its structural phase over all twenty task nodes."""
    root = write_folder_data(tmp_path / "data", n_train=16, n_val=8)
    tasks = {f"heat{i}": {"kind": "regression", "folder": "heat"} for i in range(20)}
    config = config_from_mapping({"dataset": {"name": "folder", "root": str(root), "height": 32, "width": 32,
                                              "holdout": 8}, "tasks": tasks, "mtsl": {"phases": 1}},
                                 load_preset("smoke"))

    class Started(Exception):
        pass

    def build_trainer(*args, **kwargs):
        raise Started

    with monkeypatch.context() as patch:
        patch.setattr(experiment, "build_trainer", build_trainer)
        with pytest.raises(ValueError, match=r"at most 16 tasks .*got 20; the local-search solvers \(authors_local"):
            run_method(config, "mtsl", tmp_path / "exact", progress=False)
        with pytest.raises(Started):  # STN groups nothing: the exact solver's limit is not its concern
            run_method(config, "stn", tmp_path / "stn", progress=False)
    local = config.replace(mtsl=dataclasses.replace(config.mtsl, grouping="authors_local"))
    result = run_method(local, "mtsl", tmp_path / "local", progress=False)
    assert list(BranchingPlan.from_dict(result["plan"]).tasks) == list(tasks)
    record = json.loads((tmp_path / "local" / "phase_0.json").read_text())
    measured = record["similarities"][0]
    assert len(measured["matrix"]) == 20 and sorted(t for g in measured["partition"] for t in g) == sorted(tasks)


def test_a_baseline_named_before_baselines_is_imported_says_how_to_register_it(tmp_path, monkeypatch):
    """``import mtsl_plugin`` registers MTSL's methods only: ``run_method(..., "stn", ...)`` without ``import
    baselines`` names the import that registers it; once registered, an unknown name gets no such hint."""
    from mtsl_plugin import methods

    only_mtsl = {name: builder for name, builder in methods._METHODS.items() if name.startswith("mtsl")}
    monkeypatch.setattr(methods, "_METHODS", only_mtsl)
    with pytest.raises(ValueError, match=r"^unknown method 'stn'; registered: mtsl, mtsl_noalign, mtsl_r, mtsl_rsa "
                                         r"\(stn, onenet and the other baselines register on `import baselines`\)$"):
        run_method(load_preset("smoke"), "stn", tmp_path / "stn")
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"^unknown method 'stm'; registered: .*stn$"):
        run_method(load_preset("smoke"), "stm", tmp_path / "stm")
    assert not (tmp_path / "stn").exists() and not (tmp_path / "stm").exists()


def test_an_unfinished_run_is_continued_with_resume_and_never_started_afresh_over(tmp_path):
    """A folder holding a checkpoint (an unfinished run; here the one a finished run kept) is refused without
    ``resume``, which would have trained from scratch and overwritten it at its first save; ``resume`` continues
    it."""
    config = load_preset("smoke").replace(tasks=("S", "D"))
    run_dir = tmp_path / "onenet"
    first = run_method(config, "onenet", run_dir, progress=False, keep_checkpoint=True)
    checkpoint = (run_dir / experiment.CHECKPOINT).read_bytes()
    with pytest.raises(ValueError, match=r"checkpoint\.pt holds the finished run of its result\.json \(kept by "
                                         r"keep_checkpoint\), which starting afresh would overwrite; it is kept: "
                                         r"continue it \(resume=True\) or choose another"):
        run_method(config, "onenet", run_dir, progress=False)
    (run_dir / "result.json").rename(run_dir / "result.json.bak")  # as if stopped before its result was written
    with pytest.raises(ValueError, match=r"checkpoint\.pt holds an unfinished run, which starting afresh would "):
        run_method(config, "onenet", run_dir, progress=False)
    (run_dir / "result.json.bak").rename(run_dir / "result.json")
    assert (run_dir / experiment.CHECKPOINT).read_bytes() == checkpoint
    again = run_method(config, "onenet", run_dir, progress=False, resume=True)
    assert again["metrics"] == first["metrics"]
