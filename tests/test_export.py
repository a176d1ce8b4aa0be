"""Export of a finished run's network: ONNX (checked with onnxruntime) and torch.export, equal to the model."""
import pytest
import torch

from benchmarks import compare, export as export_cli
from mtsl_plugin.experiment import load_run
from mtsl_plugin.export import StaticNetwork, export, static_network


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "out"
    assert compare.main(["--methods", "mtsl,ltb,mtan", "--preset", "smoke", "--tasks", "S,D", "--out", str(out),
                         "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("method", ["mtsl", "ltb", "mtan"])
@pytest.mark.parametrize("fmt", ["onnx", "exported"])
def test_exported_files_compute_what_the_trained_model_computes(runs, tmp_path, method, fmt):
    trainer, data, config = load_run(runs / method / "seed0", device="cpu")
    static = static_network(trainer.model, config.tasks)
    assert isinstance(static, StaticNetwork) and not hasattr(static.network, "learner")
    images, _ = next(iter(data.batches(data.test)))
    with torch.no_grad():
        trained = trainer.model(images)  # the trainer's own forward, in eval mode
        mine = static(images)
    for task, prediction in zip(config.tasks, mine):
        torch.testing.assert_close(prediction, trained[task])
    difference = export(static, fmt, tmp_path / f"{method}.{fmt}", images[:2])
    assert difference < 1e-4


def test_the_command_writes_the_file_and_refuses_a_missing_run(runs, tmp_path, capsys):
    target = tmp_path / "net.onnx"
    assert export_cli.main([str(runs / "mtsl" / "seed0"), "--format", "onnx", "--out", str(target)]) == 0
    assert target.stat().st_size > 0 and "largest difference" in capsys.readouterr().out
    assert export_cli.main([str(tmp_path / "nowhere"), "--format", "onnx", "--out", str(target)]) == 2
    assert "nowhere" in capsys.readouterr().err
