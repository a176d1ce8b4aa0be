"""Any kill survived: a real compare.py process is SIGKILLed inside a task-learning epoch, inside amalgamation and
while a checkpoint is being written, then SIGTERMed while one is being written (it unwinds: the write's temporary
file goes, the last checkpoint stays); ``--resume`` then ends with the uninterrupted run's table and plans,
exactly."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from mtsl_plugin.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("kill_driver.py")
ARGS = ["--methods", "mtsl", "--preset", "smoke", "--tasks", "S,D", "--no-progress"]


def compare_process(moment, *argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}  # the same arithmetic in every process
    return subprocess.run([sys.executable, str(DRIVER), moment, "--", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def without_times(out):
    """results.json and table.md of ``out`` without wall-clock figures and the processes that trained each run (the
    only things a kill may change)."""
    runs = json.loads((out / "results.json").read_text())
    for run in runs:
        for key in ("train_seconds", "wall_seconds", "train_s", "trained_by"):
            run.pop(key, None)
        for entry in run.get("history") or []:
            entry.pop("seconds", None)
    table = [line.rsplit("|", 2)[0] for line in (out / "table.md").read_text().splitlines()]  # Train (s) last
    return runs, table


def test_a_run_killed_at_any_moment_resumes_to_the_uninterrupted_result(tmp_path):
    reference = tmp_path / "reference"
    done = compare_process("none", *ARGS, "--out", str(reference))
    assert done.returncode == 0, done.stderr

    out = tmp_path / "killed"
    killed = compare_process("epoch", *ARGS, "--out", str(out))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = out / "mtsl" / "seed0"
    assert not (run / "result.json").exists()
    assert load_checkpoint(run / "checkpoint.pt")["epochs_done"] == 1  # the one after the first phase
    for moment in ("amalgamation", "checkpoint"):
        killed = compare_process(moment, "--resume", str(out), "--no-progress")
        assert killed.returncode == -signal.SIGKILL, (moment, killed.stderr)
        assert "[mtsl seed 0] training" in killed.stdout, moment  # killed in the run, not in the checks before it
        assert not (run / "result.json").exists()
        assert load_checkpoint(run / "checkpoint.pt")["epochs_done"] == 1  # intact, whatever was cut short
    assert list(run.glob("checkpoint.pt.*.tmp"))  # the write that was cut short; the old checkpoint is intact
    terminated = compare_process("checkpoint-term", "--resume", str(out), "--no-progress")  # SIGTERM: unwinds
    assert terminated.returncode == 128 + signal.SIGTERM, terminated.stderr
    assert terminated.stderr.strip().splitlines()[-1] == (f"terminated; finished runs and the last checkpoint are "
                                                          f"kept in {out}: python benchmarks/compare.py --resume "
                                                          f"{out} continues")
    assert not list(run.glob("*.tmp")) and load_checkpoint(run / "checkpoint.pt")["epochs_done"] == 1
    finished = compare_process("none", "--resume", str(out), "--no-progress")
    assert finished.returncode == 0, finished.stderr

    assert without_times(out) == without_times(reference)  # the table has no note: one software, one machine
    trained_by = {r["method"]: r["trained_by"] for r in json.loads((out / "results.json").read_text())}
    # mtsl: the first process and the one that finished; the three stopped before their first checkpoint trained
    # nothing the checkpoint keeps
    assert [len(trained_by[m]) for m in ("stn", "onenet", "mtsl")] == [1, 1, 2]
    assert (run / "plan.json").read_text() == (reference / "mtsl" / "seed0" / "plan.json").read_text()
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in (reference / "mtsl" / "seed0").iterdir())
