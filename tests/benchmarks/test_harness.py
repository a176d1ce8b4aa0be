"""The harness: Δs (each run against the STN run of its own configuration, never a lost table), and how its jobs
fail under torchrun (a failure of every rank, a rank's own failure, what DDP cannot train)."""
import re

import pytest

from benchmarks.cli import RankFailure, UsageError
from benchmarks.harness import add_deltas

HIGHER = {"S": True, "D": False}


def run(method, seed, s, d, key=None, status="ok"):
    return {"method": method, "label": method, "seed": seed, "status": status, "reference_key": key or f"k{seed}",
            "metrics": {"S": s, "D": d}, "higher_is_better": HIGHER}


def test_deltas_are_against_the_stn_run_of_the_same_configuration():
    results = [run("stn", 0, 0.40, 1.0), run("stn", 1, 0.50, 2.0), run("onenet", 0, 0.44, 0.9),
               run("onenet", 1, 0.44, 0.9), run("mtsl", 2, 0.4, 1.0)]
    add_deltas(results)
    assert results[2]["delta_mtl"] == pytest.approx(10.0) and results[2]["delta_sd"] == pytest.approx(10.0)
    assert results[3]["delta_mtl"] == pytest.approx((-12.0 + 55.0) / 2)
    assert results[0]["delta_mtl"] == 0.0
    assert results[4]["delta_mtl"] is None  # no STN run of seed 2


def test_a_zero_stn_metric_gives_no_delta_instead_of_losing_the_table(capsys):
    """An STN metric of 0 makes the relative change undefined: that run's Δ is None, one line says why, and the
    other runs keep theirs (it raised after all the training, so no table was written)."""
    results = [run("stn", 0, 0.0, 1.0), run("onenet", 0, 0.1, 0.9), run("stn", 1, 0.5, 1.0), run("onenet", 1, 0.5, 1.0)]
    add_deltas(results)
    assert results[1]["delta_mtl"] is None and results[1]["delta_sd"] is None
    assert results[3]["delta_mtl"] == 0.0
    err = capsys.readouterr().err
    assert "[onenet seed 0] no Δ" in err and "zero single-task reference" in err


def as_rank_1_of_2(monkeypatch):
    from mtsl_plugin import distributed

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)


def test_under_torchrun_only_failures_of_every_rank_let_the_sweep_go_on(tmp_path, monkeypatch, capsys):
    """A failure every rank raised together (a NaN in the global batch, rank 0's failed write) is a failed row and
    the next run starts on every rank alike; a failure of this rank alone stops the command, its traceback kept
    in ``error<rank>.txt`` (the other ranks may wait in a collective of the failed run)."""
    from benchmarks import harness
    from conftest import smoke_config
    from mtsl_plugin import distributed

    outcomes = {"together": distributed.on_every_rank(ArithmeticError("loss is nan")), "fine": None,
                "alone": OSError("cannot read image 7")}

    def run_job(job, out, results, progress, keep_checkpoints):
        if outcomes[job.label] is not None:
            raise outcomes[job.label]
        return {"method": job.method, "label": job.label, "status": "ok"}

    monkeypatch.setattr(harness, "run_job", run_job)
    as_rank_1_of_2(monkeypatch)
    jobs = [harness.Job(label, "stn", smoke_config()) for label in outcomes]
    with pytest.raises(RankFailure, match=r"\[alone seed 0\] failed on rank 1: cannot read image 7"):
        harness.run_jobs(jobs, tmp_path, progress=False)
    assert "[together seed 0] failed: loss is nan" in capsys.readouterr().err
    assert not (tmp_path / "together" / "seed0" / "error.txt").exists()  # rank 0 writes that one
    assert "cannot read image 7" in (tmp_path / "alone" / "seed0" / "error1.txt").read_text()

    outcomes["alone"] = None
    rows = harness.run_jobs(jobs, tmp_path, progress=False)
    assert [r["status"] for r in rows] == ["failed", "ok", "ok"]


@pytest.mark.parametrize("method, changes, culprit", [
    ("bmtas", {}, "bmtas: bilevel architecture search (BMTAS) runs in one process"),
    ("stn", {"weighting": "PCGrad"}, "stn: weighting PCGrad backpropagates each task separately"),
    ("mtsl", {"compile": True}, "mtsl: compiled training (--compile) runs in one process"),
])
def test_under_torchrun_what_ddp_cannot_train_is_refused_before_any_training(monkeypatch, method, changes, culprit):
    from benchmarks import harness
    from conftest import smoke_config

    as_rank_1_of_2(monkeypatch)
    job = harness.Job(method, method, smoke_config().replace(**changes))
    monkeypatch.setattr(harness, "check_config", lambda *a, **k: pytest.fail("refused after the configuration check"))
    with pytest.raises(UsageError, match=re.escape(culprit)):
        harness.check_jobs([job])
    monkeypatch.setattr(harness.distributed, "active", lambda: False)  # one process: all three train
    monkeypatch.setattr(harness, "check_config", lambda *a, **k: None)
    harness.check_jobs([job])


def test_under_torchrun_a_method_that_cannot_be_built_is_left_to_fail_in_its_own_row(monkeypatch):
    """As in one process: ``run_job`` reports its failure in the method's row on every rank and the sweep goes on
    (the check used to raise it from ``check_jobs``, stopping the whole command)."""
    from benchmarks import harness
    from conftest import smoke_config

    def spec(method, config, arch_args):
        raise ValueError(f"{method} cannot be built")

    as_rank_1_of_2(monkeypatch)
    monkeypatch.setattr(harness, "method_spec", spec)
    checked = []
    monkeypatch.setattr(harness, "check_config", lambda config, **k: checked.append(k["learner"]))
    harness.check_jobs([harness.Job("mtsl", "mtsl", smoke_config())])
    assert checked == [None]
