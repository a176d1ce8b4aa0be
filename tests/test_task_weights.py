"""Fixed task weights: a factor on each task's loss before the weighting method (``task_weights``)."""
import pytest
import torch

from benchmarks import compare
from mtsl_plugin.config import load_config_file, load_preset
from tests.test_trainer import make


def test_the_loss_vector_is_scaled_task_by_task(smoke):
    config = smoke(tasks=("S", "D", "E"))
    plain, data = make(config)
    weighted, _ = make(config.replace(task_weights={"E": 10, "D": 0.5, "A": 3}))  # A does not run: ignored
    images, gts = next(iter(data.batches(data.train)))
    with torch.no_grad():
        preds = plain.model(images)
        ratio = weighted.task_losses(preds, gts) / plain.task_losses(preds, gts)
    torch.testing.assert_close(ratio, torch.tensor([1.0, 0.5, 10.0]))


def test_only_weights_of_running_tasks_other_than_one_change_the_fingerprint(tmp_path):
    config = load_preset("quick").replace(tasks=("S", "D"))
    same = [config.replace(task_weights=w) for w in ({}, {"S": 1}, {"A": 100})]
    assert {c.fingerprint() for c in same} == {config.fingerprint()}
    assert config.replace(task_weights={"D": 2}).fingerprint() != config.fingerprint()
    path = tmp_path / "weights.yaml"
    path.write_text("task_weights: {E: 10, A: 100}\n")
    assert load_config_file(path, base=config).task_weights == {"E": 10, "A": 100}


@pytest.mark.parametrize("weights, message", [("E=10,X=3", "task(s) ['X']"), ("E=ten", "task E must be a number, got 'ten'"), ("E", "got 'E'"),
                                              ("E=0", "task 'E' must be a positive number")])
def test_bad_task_weights_are_refused_in_one_line_before_training(tmp_path, capsys, weights, message):
    out = tmp_path / "out"
    assert compare.main(["--preset", "smoke", "--methods", "onenet", "--task-weights", weights, "--no-progress",
                         "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (out / "onenet").exists()


def test_loss_set_and_grouping_data_options_reach_the_run(tmp_path):
    """``--losses authors --grouping-data train`` train One-Net with the authors' losses on every training image;
    both are saved with the run and change its fingerprint (its folder is not reused by a default run)."""
    out = tmp_path / "out"
    argv = ["--preset", "smoke", "--methods", "onenet", "--no-progress", "--out", str(out)]
    assert compare.main([*argv, "--losses", "authors", "--grouping-data", "train"]) == 0
    saved = load_config_file(out / "config.yaml", base=load_preset("smoke"))
    assert (saved.losses, saved.data.grouping_data) == ("authors", "train")
    assert saved.fingerprint() != load_preset("smoke").fingerprint()
