"""Export of a finished run's network: ONNX (checked with onnxruntime) and torch.export, equal to the model."""
import math
import shutil
import stat
import sys
from pathlib import Path

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
    static = static_network(trainer.model.train(), config.tasks)
    assert isinstance(static, StaticNetwork) and not hasattr(static.network, "learner")
    assert trainer.model.training  # the export's copy is in eval mode, the trainer's modules are as they were
    trainer.model.eval()
    images, _ = next(iter(data.batches(data.test)))
    with torch.no_grad():
        trained = trainer.model(images)  # the trainer's own forward, in eval mode
        mine = static(images)
    for task, prediction in zip(config.tasks, mine):
        torch.testing.assert_close(prediction, trained[task])
    difference = export(static, fmt, tmp_path / f"{method}.{fmt}", images[:2])
    assert difference < 1e-4
    assert export(static, fmt, tmp_path / f"one.{fmt}", images[:1]) < 1e-4  # a run with one test image
    for batch in (images[:3], images[:1]):  # the batch size is dynamic in both formats, not the sample's two
        with torch.no_grad():
            expected = static(batch)
        for name in (method, "one"):  # a program traced on one image took batches of one only
            if fmt == "onnx":
                import onnxruntime

                session = onnxruntime.InferenceSession(str(tmp_path / f"{name}.{fmt}"),
                                                       providers=["CPUExecutionProvider"])
                got = [torch.from_numpy(a) for a in session.run(None, {"image": batch.numpy()})]
            else:
                with torch.no_grad():
                    got = torch.export.load(tmp_path / f"{name}.{fmt}").module()(batch)
            for a, b in zip(got, expected, strict=True):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_the_command_writes_the_file_and_refuses_a_missing_run(runs, tmp_path, capsys):
    target = tmp_path / "net.onnx"
    assert export_cli.main([str(runs / "mtsl" / "seed0"), "--format", "onnx", "--out", str(target)]) == 0
    assert target.stat().st_size > 0 and "largest difference" in capsys.readouterr().out
    assert export_cli.main([str(tmp_path / "nowhere"), "--format", "onnx", "--out", str(target)]) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["onnx", "exported"])
def test_the_exported_file_carries_the_runs_method_plan_and_trained_by(runs, tmp_path, fmt):
    """A file that leaves its results folder keeps what made it: the method, the plan and who trained it."""
    import json

    record = json.loads((runs / "mtsl" / "seed0" / "result.json").read_text())
    target = tmp_path / f"net.{fmt}"
    assert export_cli.main([str(runs / "mtsl" / "seed0"), "--format", fmt, "--out", str(target)]) == 0
    keys = ("mtsl_plugin.method", "mtsl_plugin.plan_text", "mtsl_plugin.trained_by")
    if fmt == "onnx":
        import onnx

        saved = {p.key: p.value for p in onnx.load(str(target)).metadata_props}
    else:
        saved = {key: "" for key in keys}
        torch.export.load(target, extra_files=saved)
    assert {key: json.loads(saved[key]) for key in keys} == {
        "mtsl_plugin.method": "mtsl", "mtsl_plugin.plan_text": record["plan_text"],
        "mtsl_plugin.trained_by": record["trained_by"]}


class Tiny(torch.nn.Module):
    tasks = ("S",)

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return (self.conv(x),)


class TwoHeads(torch.nn.Module):
    """Two tasks of the given names; the head of output ``nan`` (0 or 1), if given, computes NaN."""

    def __init__(self, tasks, nan=None):
        super().__init__()
        self.tasks = tasks
        self.a, self.b = torch.nn.Conv2d(3, 2, 1), torch.nn.Conv2d(3, 1, 1)
        if nan is not None:
            torch.nn.init.constant_((self.a, self.b)[nan].weight, float("nan"))

    def forward(self, x):
        return self.a(x), self.b(x)


def test_a_task_called_image_exports_to_onnx_with_the_input_called_input(tmp_path):
    """The ONNX input was called ``image`` whatever the tasks: with a task (an output) of that name the exporter
    renamed the input ``image.1`` and onnxruntime refused the check's feed."""
    import onnx

    pytest.importorskip("onnxruntime")
    for tasks, called in ((("image", "b"), "input"), (("image", "input"), "input_0")):
        assert export(TwoHeads(tasks), "onnx", tmp_path / "net.onnx", torch.rand(2, 3, 8, 8)) < 1e-5
        graph = onnx.load(tmp_path / "net.onnx").graph
        assert [i.name for i in graph.input] == [called] and [o.name for o in graph.output] == list(tasks)


@pytest.mark.parametrize("fmt", ["onnx", "exported"])
@pytest.mark.parametrize("nan", [0, 1])
def test_a_nan_output_is_the_difference_whichever_task_it_is(tmp_path, fmt, nan):
    """Python's ``max`` over floats keeps the first of 1e-7 and NaN: a NaN head after the first task was hidden
    behind a tiny difference."""
    pytest.importorskip("onnxruntime")
    assert math.isnan(export(TwoHeads(("a", "b"), nan), fmt, tmp_path / f"net.{fmt}", torch.rand(2, 3, 8, 8)))


def weights_outside(monkeypatch, fail: bool = False) -> None:
    """Make torch.onnx.export write the weights as it does above 2 GiB (protobuf's limit): one file per weight,
    named after it, in the model file's folder; then fail if ``fail``."""
    import onnx

    real = torch.onnx.export

    def outside(model, args, f, **kwargs):
        real(model, args, f, **kwargs)
        onnx.save_model(onnx.load(f), f, save_as_external_data=True, all_tensors_to_one_file=False,
                        size_threshold=0)
        if fail:
            raise RuntimeError("exporter trouble")

    monkeypatch.setattr(torch.onnx, "export", outside)


def test_weights_outside_the_model_become_one_file_named_after_it(tmp_path, monkeypatch, umask):
    """A model whose weights the exporter writes outside gets them as ``<name>.data`` beside it, with its
    metadata; a second export into the same folder leaves the first one's weights alone (the exporter's per-weight
    files, named after the weights, would be overwritten)."""
    import onnx
    import onnxruntime

    weights_outside(monkeypatch)
    first, second = Tiny(), Tiny()
    sample = torch.rand(2, 3, 8, 8)
    assert export(first, "onnx", tmp_path / "net.onnx", sample, {"mtsl_plugin.method": '"x"'}) < 1e-5
    assert export(second, "onnx", tmp_path / "other.onnx", sample) < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "net.onnx.data", "other.onnx",
                                                         "other.onnx.data"]
    assert stat.S_IMODE((tmp_path / "net.onnx.data").stat().st_mode) == 0o666 & ~umask
    model = onnx.load(tmp_path / "net.onnx", load_external_data=False)
    assert [p.key for p in model.metadata_props] == ["mtsl_plugin.method"]
    assert {t.data_location for t in model.graph.initializer} == {onnx.TensorProto.EXTERNAL}
    assert {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"} == {
        "net.onnx.data"}
    session = onnxruntime.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"image": sample.numpy()})[0])
    with torch.no_grad():
        assert torch.allclose(got, first(sample)[0], atol=1e-5)
    monkeypatch.undo()  # a model small enough for one file, written over the first: its weights file goes
    assert export(second, "onnx", tmp_path / "net.onnx", sample) < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "other.onnx", "other.onnx.data"]
    with pytest.raises(ValueError, match="is a folder; name the file to write"):
        export(second, "onnx", tmp_path, sample)


def test_a_failed_export_with_weights_outside_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    weights_outside(monkeypatch, fail=True)
    (tmp_path / "net.onnx").write_bytes(b"the previous export")
    with pytest.raises(RuntimeError, match="exporter trouble"):
        export(Tiny(), "onnx", tmp_path / "net.onnx", torch.rand(2, 3, 8, 8))
    assert [p.name for p in tmp_path.iterdir()] == ["net.onnx"]
    assert (tmp_path / "net.onnx").read_bytes() == b"the previous export"


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_onnx_without_the_export_extra_is_one_line_before_the_run_is_read(tmp_path, capsys, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed: find_spec gives None
    target = tmp_path / "net.onnx"
    assert export_cli.main([str(tmp_path / "nowhere"), "--format", "onnx", "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"needs {missing} (not installed)" in err and "[export]" in err and len(err.splitlines()) == 1
    assert not target.exists()


def test_a_run_whose_stored_schedule_is_shorter_than_its_epochs_stays_readable(smoke, tmp_path):
    """Configuration files and options refuse an ``mtsl.total_epochs`` below ``epochs`` (since 2026-12-08); a run
    trained before with one (its STN does not read it) is still loaded and exported, not refused."""
    from mtsl_plugin.config import RunConfig, config_from_mapping
    from mtsl_plugin.experiment import run_method

    stored = smoke(tasks=("S", "D")).to_dict()
    stored["epochs"] = 4  # with mtsl.total_epochs still the smoke preset's 3
    config = RunConfig.from_dict(stored)
    with pytest.raises(ValueError, match=r"mtsl.total_epochs \(3\) must equal epochs \(4\)"):
        config_from_mapping(stored)
    run_method(config, "stn", tmp_path / "run", progress=False)
    assert export_cli.main([str(tmp_path / "run"), "--format", "exported", "--out", str(tmp_path / "x.pt2")]) == 0


def test_the_command_never_writes_into_the_run_folder_nor_reads_a_damaged_run(runs, tmp_path, capsys):
    run = runs / "mtsl" / "seed0"
    weights = (run / "model.pt").read_bytes()
    for inside in ("model.pt", "result.json", "new.onnx"):
        assert export_cli.main([str(run), "--format", "onnx", "--out", str(run / inside)]) == 2
        err = capsys.readouterr().err.strip()
        assert "lies in the run folder" in err and len(err.splitlines()) == 1
    assert (run / "model.pt").read_bytes() == weights and not (run / "new.onnx").exists()
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    (damaged / "model.pt").write_bytes(b"not a checkpoint")
    assert export_cli.main([str(damaged), "--format", "onnx", "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.pt" in err and len(err.splitlines()) == 1
    (damaged / "model.pt").unlink()  # the message named checkpoint.pt, which a finished run never keeps
    assert export_cli.main([str(damaged), "--format", "onnx", "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{damaged} holds no trained weights (model.pt, or the checkpoint.pt of a run finished "
                        "before weights files existed)") and len(err.splitlines()) == 1


def test_a_failed_export_keeps_the_previous_file_and_leaves_no_scratch(runs, tmp_path, monkeypatch):
    trainer, data, config = load_run(runs / "mtsl" / "seed0", device="cpu")
    static = static_network(trainer.model, config.tasks)
    images, _ = next(iter(data.batches(data.test)))
    target = tmp_path / "net.pt2"
    target.write_bytes(b"the previous export")

    def broken_save(program, f, extra_files=None):
        Path(f).write_bytes(b"half a program")
        raise RuntimeError("disk trouble")

    monkeypatch.setattr(torch.export, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk trouble"):
        export(static, "exported", target, images[:2])
    assert target.read_bytes() == b"the previous export" and sorted(p.name for p in tmp_path.iterdir()) == ["net.pt2"]


def test_a_run_trained_with_fused_siblings_exports_unfused(tmp_path):
    """``--fused`` runs a location's nodes as one vmapped call, which ONNX cannot trace; the exported file runs
    them one by one and computes what the fused model computes; the trainer itself stays fused."""
    out = tmp_path / "fused"
    assert compare.main(["--methods", "mtsl", "--preset", "smoke", "--tasks", "S,D", "--fused", "--out", str(out),
                         "--no-progress"]) == 0
    trainer, data, config = load_run(out / "mtsl" / "seed0", device="cpu")
    assert trainer.network.fused
    static = static_network(trainer.model, config.tasks)
    assert not static.network.fused and trainer.network.fused
    images, _ = next(iter(data.batches(data.test)))
    assert export(static, "onnx", tmp_path / "fused.onnx", images[:2]) < 1e-4
    with torch.no_grad():
        fused, plain = trainer.model(images[:2]), static(images[:2])
    for task, prediction in zip(config.tasks, plain):
        torch.testing.assert_close(prediction, fused[task], rtol=1e-4, atol=1e-5)


class _Drifting(torch.nn.Module):
    """Predictions scaled by how often it has run: an exported graph freezes the count of its tracing, so the
    written file computes something else than the module's first (eager) call."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, image):
        self.calls += 1
        return {"S": image * self.calls, "D": image[:, :1] + 1.0}


def test_export_reports_the_files_difference_from_the_module_and_refuses_unknown_formats(tmp_path, umask):
    """The number ``export`` returns is the file's largest deviation from the module on the sample (here the
    module's first call, x, against the traced file's k x): a check that compares the right outputs. The file
    has the mode a new file gets under the user's umask (it was private, 0o600, as its scratch file was)."""
    sample = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    difference = export(StaticNetwork(_Drifting(), ("S", "D")), "exported", tmp_path / "net.pt2", sample)
    with torch.no_grad():
        s, d = torch.export.load(tmp_path / "net.pt2").module()(sample)
    expected = max(float((s - sample).abs().max()), float((d - sample[:, :1] - 1.0).abs().max()))
    assert difference > 0 and difference == pytest.approx(expected)
    assert stat.S_IMODE((tmp_path / "net.pt2").stat().st_mode) == 0o666 & ~umask
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export(StaticNetwork(_Drifting(), ("S", "D")), "tflite", tmp_path / "net.tflite", sample)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt2"]
