"""How a benchmark command ends: on SIGTERM and on a rank's own failure under torchrun, in one line; the
configuration the shared run options give."""
import argparse
import io
import re
import sys

import numpy as np
import pytest

from benchmarks import cli
from mtsl_plugin.config import load_preset


def run_config(*argv):
    """The configuration of the shared run options ``argv``."""
    parser = argparse.ArgumentParser()
    cli.add_run_args(parser)
    return cli.config_from_args(parser.parse_args(list(argv)))


def test_a_rank_failure_and_sigterm_end_the_command_in_one_line(tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's preemption) unwinds like Ctrl-C: exit code 143 and one line on how to go on; the
    handler before is restored. A rank's own failure under torchrun: exit code 1, one line."""
    import os
    import signal
    import time

    args = argparse.Namespace(plugin=[], results_folder=tmp_path, continue_with="the command")

    def terminated():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        return 0

    before = signal.getsignal(signal.SIGTERM)
    assert cli.run_main(terminated, args) == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    assert capsys.readouterr().err == (f"terminated; finished runs and the last checkpoint are kept in {tmp_path}: "
                                       "the command continues\n")

    def failed():
        raise cli.RankFailure("[mtsl seed 0] failed on rank 1: out of memory")

    assert cli.run_main(failed, args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: [mtsl seed 0] failed on rank 1: out of memory; finished runs") and \
        len(err.splitlines()) == 1


def test_real_data_augments_unless_told_not_and_reads_whole_splits_beyond_the_smoke_preset():
    """--dataset nyuv2: the quick preset trains and tests on every sample of the splits (its synthetic counts do not
    apply), the smoke preset keeps its small counts; --no-augment turns the zoom and flip off."""
    quick = run_config("--preset", "quick", "--dataset", "nyuv2", "--data-root", "/data/nyu")
    assert (quick.data.train, quick.data.test, quick.data.augments) == (None, None, True)
    smoke = load_preset("smoke").data
    plain = run_config("--preset", "smoke", "--dataset", "nyuv2", "--data-root", "/data/nyu", "--no-augment")
    assert (plain.data.train, plain.data.test, plain.data.augments) == (smoke.train, smoke.test, False)


def test_the_largest_seed_numpy_takes_is_accepted():
    np.random.RandomState(cli.MAX_SEED)  # numpy takes it, and refuses one more
    with pytest.raises(ValueError):
        np.random.RandomState(cli.MAX_SEED + 1)
    assert cli.parse_seeds(f"0,{cli.MAX_SEED}") == [0, cli.MAX_SEED]


def test_task_weights_on_the_command_line_go_over_those_of_the_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task_weights: {E: 10, D: 2}\n")
    config = run_config("--preset", "smoke", "--config", str(path), "--task-weights", "D=3,A=100")
    assert config.task_weights == {"E": 10, "D": 3.0, "A": 100.0}


@pytest.mark.parametrize("stop, code, line", [(KeyboardInterrupt, 130, "interrupted"),
                                              (cli.Terminated, 143, "terminated")])
@pytest.mark.parametrize("command, inside, argv", [
    ("speed", "create_stages", ["--steps", "0"]),
    ("scaling", "launch", ["--nproc", "1", "--steps", "1"]),
    ("grouping_speed", "time_solver", ["--tasks", "4", "--repeats", "1"]),
    ("export", "load_run", ["RUN", "--format", "onnx", "--out", "OUT"]),
])
def test_commands_without_a_results_folder_end_a_ctrl_c_or_sigterm_in_one_line(tmp_path, monkeypatch, capsys, stop,
                                                                              code, line, command, inside, argv):
    """speed, scaling, grouping_speed and export keep no results, so Ctrl-C or SIGTERM ends them with one line and
    nothing on how to go on (they printed Python's traceback)."""
    import importlib

    module = importlib.import_module(f"benchmarks.{command}")

    def stopped(*args, **kwargs):
        raise stop

    monkeypatch.setattr(module, inside, stopped)
    argv = [str(tmp_path / "run") if a == "RUN" else str(tmp_path / "x.onnx") if a == "OUT" else a for a in argv]
    try:
        assert module.main(argv) == code
    except KeyboardInterrupt:  # escaping, it would stop the test session instead of failing this test
        pytest.fail(f"{command} let {stop.__name__} through")
    assert capsys.readouterr().err == f"{line}\n"


@pytest.mark.parametrize("command, argv", [
    ("ablation", []),
    ("sensitivity", ["--sweep", "threshold", "--values", "0.5", "--seeds", "0"]),
    ("robustness", ["--methods", "onenet", "--corruptions", "none", "--epsilons", "1"]),
    ("alignment", ["--locations", "1"]),
])
def test_every_command_that_trains_stops_after_its_checks_on_a_dry_run(tmp_path, monkeypatch, capsys, command, argv):
    import importlib

    from benchmarks import harness

    module = importlib.import_module(f"benchmarks.{command}")
    monkeypatch.setattr(harness, "run_method", lambda *a, **k: pytest.fail("a run started"))
    if command == "alignment":  # its probe trains no run: it must not get past its checks
        monkeypatch.setattr(module, "probe", lambda *a, **k: pytest.fail("the probe started"))
    out = tmp_path / "out"
    common = ["--preset", "smoke", "--tasks", "S,D", "--no-progress", "--out", str(out), "--dry-run"]
    assert module.main([*argv, *common]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("dry run: every check passed") and lines[-1].endswith("nothing was trained or written")
    assert all(" would train in " in line for line in lines[:-1]) and (len(lines) > 1) == (command != "alignment")
    assert not out.exists()


class Terminal(io.StringIO):
    """A standard error that says it is a terminal, where tqdm draws its bars."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_no_progress_draws_no_bar_on_a_terminal(tmp_path, monkeypatch, quiet):
    """``--no-progress`` hides every bar of a comparison, the synthetic scenes' rendering included (it drew on a
    terminal); without it, a terminal shows them."""
    from benchmarks import compare

    monkeypatch.setattr(sys, "stderr", Terminal())
    argv = ["--preset", "smoke", "--tasks", "S,D", "--methods", "mtsl", "--out", str(tmp_path)]
    assert compare.main(argv + ["--no-progress"] * quiet) == 0
    bars = [line for line in re.split(r"[\r\n]", sys.stderr.getvalue()) if "it/s]" in line or "s/it]" in line]
    if quiet:
        assert bars == []
    else:
        assert any(line.lstrip().startswith("rendering train scenes") for line in bars)


def test_a_backbone_of_another_family_drops_the_presets_backbone_args_and_one_of_the_same_keeps_them():
    """The smoke preset's ``channels`` are a ResNet's: ``--backbone resnet34`` keeps them (a ResNet of the preset's
    width), ``--backbone convnext_atto`` drops them (they are no argument of a ConvNeXt)."""
    assert run_config("--preset", "smoke").backbone_args == {"channels": [16, 32, 64, 128]}
    assert run_config("--preset", "smoke", "--backbone", "resnet34").backbone_args == {"channels": [16, 32, 64, 128]}
    assert run_config("--preset", "smoke", "--backbone", "convnext_atto").backbone_args == {}


def test_compares_ablation_flags_the_loss_set_and_the_switches_reach_the_configuration():
    """compare.py's ``--no-align``, ``--no-average-init`` and ``--no-amalgamation`` switch MTSL's options off,
    ``--losses`` picks the loss set and ``--pretrained``, ``--fused``, ``--channels-last``, ``--compile`` switch
    their fields on, in the configuration every run trains under."""
    from benchmarks import compare

    args = compare.parse_args(["--preset", "smoke", "--no-align", "--no-average-init", "--no-amalgamation",
                               "--losses", "authors"])
    config = cli.config_from_args(args)
    assert (config.mtsl.align, config.mtsl.average_init, config.mtsl.amalgamate) == (False, False, False)
    assert config.losses == "authors" and run_config("--preset", "smoke").losses != "authors"
    flags = run_config("--preset", "smoke", "--pretrained", "--fused", "--channels-last", "--compile")
    assert (flags.pretrained, flags.fused, flags.channels_last, flags.compile) == (True, True, True, True)
