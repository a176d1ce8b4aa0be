"""benchmarks/scaling.py: training steps with 1 and N torchrun processes, ours against plain DDP."""
import argparse
import json
import subprocess
from pathlib import Path

import pytest

from benchmarks import scaling


def test_two_gloo_processes_time_every_row_and_write_the_numbers(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # torchrun's log folders (torchelastic_*) go there, not to /tmp
    out = tmp_path / "scaling.json"
    assert scaling.main(["--nproc", "2", "--steps", "1", "--batch", "4", "--height", "32", "--width", "32",
                         "--backbone", "resnet10t", "--tasks", "S,D", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert run["nproc"] == 2 and set(run["seconds"]) == set(scaling.ROWS)  # MTSL: CKA on 2 + 2 gathered rows
    assert all(s > 0 for s in run["seconds"].values())
    printed = capsys.readouterr().out
    assert all(f"| {row} |" in printed for row in scaling.ROWS)


def test_speedups_are_throughput_ratios_to_the_first_count_and_to_the_anchors():
    runs = [{"nproc": 1, "seconds": {"plain DDP One-Net": 1.0, "One-Net": 1.2, "STN": 4.0, "MTSL phase 1": 4.4}},
            {"nproc": 4, "seconds": {"plain DDP One-Net": 0.5, "One-Net": 0.4, "STN": 1.0, "MTSL phase 1": 2.2}}]
    table, numbers = scaling.report(runs, batch=16)
    assert numbers["One-Net"]["1"] == {"seconds": 1.2, "images_per_s": pytest.approx(16 / 1.2)}
    assert numbers["plain DDP One-Net"]["4"]["speedup"] == pytest.approx(2.0)
    assert "speedup_over_anchor" not in numbers["plain DDP One-Net"]["4"]
    assert numbers["One-Net"]["4"]["speedup"] == pytest.approx(3.0)
    assert numbers["One-Net"]["4"]["speedup_over_anchor"] == pytest.approx(1.5)
    assert numbers["MTSL phase 1"]["4"]["speedup_over_anchor"] == pytest.approx(1.0)
    assert "| STN | 4.0000 | 4.0 | 1.0000 | 16.0 | n=4: 4.00× (2.00) |" in table.splitlines()


@pytest.mark.parametrize("argv, culprit", [
    (["--nproc", "1,3", "--batch", "16"], "3"),
    (["--nproc", "0"], "at least 1"),
    (["--nproc", "1,x"], "1,x"),
    (["--tasks", "S,Q"], "S,Q"),
    (["--tasks", "S,S"], "S,S"),
    (["--steps", "0"], "--steps"),
    (["--backbone", "nope"], "nope"),
    (["--device", "cuda", "--nproc", "1,64", "--batch", "64"], "cuda"),  # no GPU, or fewer than 64 GPUs
    (["--nproc", "1,4", "--batch", "4", "--height", "32", "--width", "32"], "--nproc 4 gives each process one image"),
    (["--json", "/nowhere/x.json"], "--json /nowhere/x.json"),
])
def test_bad_input_is_refused_in_one_line_before_any_launch(capsys, launches, argv, culprit):
    assert scaling.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert culprit in err and len(err.splitlines()) == 1
    assert not launches


@pytest.fixture
def launches(monkeypatch):
    """The (command, environment) of every torchrun launch, none of which runs: each writes an empty result."""
    calls = []

    def run(command, env, **kwargs):
        calls.append((command, env))
        Path(command[command.index("--json") + 1]).write_text("{}")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(scaling.subprocess, "run", run)
    return calls


def nproc(command):
    return int(next(a for a in command if a.startswith("--nproc_per_node=")).split("=")[1])


def test_every_process_count_gets_all_the_cores(monkeypatch, tmp_path, launches):
    """torchrun gives each of n > 1 processes one thread but leaves one process all the cores: each count must get
    the same cores in total, or a CPU speed-up compares n threads with all of them."""
    monkeypatch.setattr(scaling.os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    args = argparse.Namespace(device="cpu", batch=16, height=32, width=32, steps=1, network="compact",
                              backbone="resnet18", tasks="S,D", fused=False)
    for n in (1, 2, 4, 16):
        scaling.launch(args, n, tmp_path / f"n{n}.json")
    threads = {nproc(command): env.get("OMP_NUM_THREADS") for command, env in launches}
    assert threads == {1: "8", 2: "4", 4: "2", 16: "1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice is kept
    scaling.launch(args, 1, tmp_path / "again.json")
    assert nproc(launches[-1][0]) == 1 and launches[-1][1].get("OMP_NUM_THREADS") == "3"


def test_a_failed_launch_shows_the_workers_own_error(tmp_path, monkeypatch):
    """torchrun's output ends in its own summary of the failure, which leaves out the worker's exception."""
    def failing(command, env, **kwargs):
        with pytest.raises(ValueError, match="nope"):
            scaling.main([*command[command.index("--worker"):], "--backbone", "nope"])  # the worker fails
        return subprocess.CompletedProcess(command, 1, "", "torchrun's summary\n" * 20)

    monkeypatch.setattr(scaling.subprocess, "run", failing)
    args = argparse.Namespace(device="cpu", batch=4, height=32, width=32, steps=1, network="compact",
                              backbone="resnet10t", tasks="S,D", fused=False)
    with pytest.raises(RuntimeError, match="(?s)failed \\(exit 1\\):.*nope") as caught:
        scaling.launch(args, 1, tmp_path / "n1.json")
    assert "torchrun's summary" not in str(caught.value)


def test_the_launch_forwards_every_option_to_the_workers(tmp_path, launches):
    options = {"device": "cpu", "batch": 12, "height": 40, "width": 56, "steps": 3, "network": "authors",
               "backbone": "resnet34", "tasks": "S,E,D"}
    for fused in (True, False):
        scaling.launch(argparse.Namespace(**options, fused=fused), 2, tmp_path / "n2.json")
    for (command, _), fused in zip(launches, (True, False)):
        forwarded = command[command.index("--worker"):]
        assert all(forwarded[forwarded.index(f"--{key}") + 1] == str(value) for key, value in options.items())
        assert ("--fused" in forwarded) == fused


def test_each_rank_times_its_share_of_the_global_batch(monkeypatch):
    """Under n processes every rank's step trains batch / n images (the global batch is the same for every n)."""
    from mtsl_plugin import distributed

    class Stop(Exception):
        pass

    batches = []

    def synthetic_batch(plan, device, batch, height, width):
        batches.append(batch)
        raise Stop  # the batch is what this test checks: no step runs

    monkeypatch.setattr(distributed, "init_from_env", lambda device: device)
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    monkeypatch.setattr(scaling, "synthetic_batch", synthetic_batch)
    args = argparse.Namespace(device="cpu", batch=16, height=32, width=32, steps=1, network="compact",
                              backbone="resnet18", tasks="S,D", fused=False, json=None)
    with pytest.raises(Stop):
        scaling.worker(args)
    assert batches == [16 // 4]


def test_a_process_count_given_twice_is_refused():
    with pytest.raises(ValueError, match="distinct process counts.*'1,2,1'"):
        scaling.parse_counts("1,2,1")
