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

    def run_job(job, out, results, progress, keep_checkpoints, wait=True):
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


def test_delta_sd_needs_both_s_and_d_and_a_failed_stn_run_is_no_reference():
    """Δ_SD is the mean over S and D only, so a run without D has none (its Δ_MTL is still computed); a failed
    STN run (a record without metrics or reference key, as ``run_jobs`` writes it) is no reference."""
    from conftest import hand_delta

    def without_d(method, s, e):
        return {"method": method, "label": method, "seed": 0, "status": "ok", "reference_key": "k",
                "metrics": {"S": s, "E": e}, "higher_is_better": {"S": True, "E": True}}

    results = [without_d("stn", 0.5, 0.2), without_d("mtsl", 0.6, 0.1)]
    add_deltas(results)
    assert results[1]["delta_sd"] is None
    assert results[1]["delta_mtl"] == pytest.approx(hand_delta(results[1], results[0]))
    failed = {"method": "stn", "label": "stn", "seed": 0, "status": "failed", "error": "boom"}
    results = [failed, run("onenet", 0, 0.44, 0.9)]
    add_deltas(results)
    assert results[1]["delta_mtl"] is None and results[1]["delta_sd"] is None


def test_sources_come_first_folders_of_other_runs_are_refused_and_rows_keep_their_first_plan(tmp_path, smoke):
    """A "-R" method's source is inserted right before it (the other methods keep their order); a run folder
    holding another fingerprint is refused, never reused; a row's plan is that of its first finished seed."""
    import json

    from benchmarks.harness import final_plans, saved_run, with_sources
    from mtsl_plugin.plan import BranchingPlan

    assert with_sources(["onenet", "mtsl_r", "mtsl"], smoke()) == ["onenet", "mtsl", "mtsl_r"]
    assert saved_run(tmp_path, "a") is None
    (tmp_path / "result.json").write_text(json.dumps({"fingerprint": "a", "status": "ok"}))
    assert saved_run(tmp_path, "a")["status"] == "ok"
    with pytest.raises(ValueError, match="holds a run of another configuration"):
        saved_run(tmp_path, "b")
    first, second = BranchingPlan.single_task("SD", 2), BranchingPlan.one_net("SD", 2)
    records = [{"method": "mtsl", "status": "failed"}, {"method": "mtsl", "status": "ok", "plan": first.to_dict()},
               {"method": "mtsl", "status": "ok", "plan": second.to_dict()}]
    assert final_plans(records) == {"mtsl": first}


def test_a_disk_without_room_for_the_runs_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """A run that fills the disk fails at its next checkpoint, after hours on a large preset: the command refuses
    first, in one line with the sizes, and makes no folder."""
    import shutil

    from benchmarks import compare, harness

    monkeypatch.setattr(harness.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 * 2**30, 0, 2**20))
    monkeypatch.setattr(harness, "run_method", lambda *a, **k: pytest.fail("training started"))
    out = tmp_path / "cmp"
    argv = ["--preset", "smoke", "--tasks", "S,D", "--methods", "mtsl", "--out", str(out), "--no-progress"]
    assert compare.main(argv) == 2
    line = capsys.readouterr().err
    assert re.fullmatch(rf"error: --out {re.escape(str(out))}: the runs to train may write up to [0-9.]+ MiB \(their "
                        r"weights, and the checkpoints with the optimizer's state\), but the disk holding it has "
                        r"1\.0 MiB free; free some space or choose another --out\n", line)
    assert not out.exists()


def test_the_disk_need_bounds_what_every_method_writes(tmp_path, smoke):
    """Every method's weights fit the bound per run (the single-task networks' size with its margin), its
    checkpoint three times it, and the bound is no loose guess: STN's weights take most of it."""
    import baselines  # noqa: F401  (registers the baselines)
    from benchmarks.harness import SIZE_MARGIN, disk_need, method_jobs, run_jobs
    from mtsl_plugin.experiment import single_task_bytes

    config = smoke(tasks=("S", "D"))
    methods = ["stn", "onenet", "mtsl", "cross_stitch", "mtan", "ltb", "bmtas"]
    jobs = method_jobs(methods, config, [0])
    bound = SIZE_MARGIN * single_task_bytes(config)
    # every run's weights and kept checkpoint (Adam: three times the weights), and two checkpoints while one trains
    assert disk_need(jobs, tmp_path, keep_checkpoints=True) == int(len(methods) * bound * 4 + 2 * 3 * bound)
    results = run_jobs(jobs, tmp_path, progress=False, keep_checkpoints=True)
    assert all(r["status"] == "ok" for r in results)
    for method in methods:
        run = tmp_path / method / "seed0"
        assert (run / "model.pt").stat().st_size <= bound, method
        assert (run / "checkpoint.pt").stat().st_size <= 3 * bound, method
    assert (tmp_path / "stn" / "seed0" / "model.pt").stat().st_size > 0.8 * bound
    assert disk_need(jobs, tmp_path, keep_checkpoints=True) == 0  # all finished: nothing more to write


def test_the_checkpoint_an_unfinished_run_left_counts_as_written(tmp_path, smoke):
    """Resuming on a tight disk: the last checkpoint of the run to continue is on the disk already (free space
    does not count it), so it is not asked for twice; but another run's leftover frees nothing for the run in
    training (it stays until its own run finishes), so the leftovers of a killed job array are not added up."""
    from benchmarks.harness import disk_need, method_jobs

    config = smoke(tasks=("S", "D"))
    jobs = method_jobs(["stn", "mtsl"], config, [0])
    fresh, fresh_mtsl = disk_need(jobs, tmp_path), disk_need(jobs[1:], tmp_path)
    (tmp_path / "mtsl" / "seed0").mkdir(parents=True)
    (tmp_path / "mtsl" / "seed0" / "checkpoint.pt").write_bytes(bytes(12345))
    assert disk_need(jobs[1:], tmp_path) == fresh_mtsl - 12345
    assert disk_need(jobs, tmp_path) == fresh  # STN trains first and writes two whole checkpoints
    assert disk_need(jobs, tmp_path, keep_checkpoints=True) == disk_need(jobs, tmp_path / "empty", True) - 12345
    seeds = method_jobs(["stn"], config, [0, 1, 2])
    weights = disk_need(seeds[:1], tmp_path) // 7  # one run: its weights and two checkpoints, each 3x the weights
    for job in seeds:  # a killed array left a whole checkpoint in each folder
        job.run_dir(tmp_path).mkdir(parents=True)
        with open(job.run_dir(tmp_path) / "checkpoint.pt", "wb") as handle:
            handle.truncate(3 * weights)  # sparse: no disk used
    assert disk_need(seeds, tmp_path) >= 3 * weights  # each continued run writes one more beside its own


@pytest.mark.parametrize("optimizer", [{"optim": "adam", "lr": 1e-3, "amsgrad": True},
                                       {"optim": "rmsprop", "lr": 1e-3, "momentum": 0.9, "centered": True}])
def test_the_disk_need_counts_the_state_of_optimizers_that_keep_three_copies_of_the_weights(tmp_path, smoke,
                                                                                             optimizer):
    """Adam with amsgrad, and RMSprop with momentum and centred, keep three tensors per parameter, not Adam's
    two: their checkpoints are four times the weights, which the bound must still cover."""
    from benchmarks.harness import disk_need, method_jobs, run_jobs

    config = smoke(tasks=("S", "D")).replace(optimizer=optimizer)
    jobs = method_jobs(["stn"], config, [0])
    need, kept = disk_need(jobs, tmp_path), disk_need(jobs, tmp_path, keep_checkpoints=True)
    assert run_jobs(jobs, tmp_path, progress=False, keep_checkpoints=True)[0]["status"] == "ok"
    run = tmp_path / "stn" / "seed0"
    checkpoint, weights = (run / "checkpoint.pt").stat().st_size, (run / "model.pt").stat().st_size
    assert checkpoint <= kept - need  # the kept checkpoint's share
    assert 2 * checkpoint + weights <= need  # while a checkpoint is written beside the last


def test_a_failed_run_that_later_finishes_keeps_no_error_file(tmp_path, smoke, monkeypatch, capsys):
    """A run that failed (here a full disk at its first write) leaves error.txt, its traceback; once a later command
    finishes it, error.txt went on saying the run had failed beside its result.json. Now it is removed."""
    import errno

    from benchmarks import harness

    job = harness.Job("onenet", "onenet", smoke())
    real = harness.run_method

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(harness, "run_method", full_disk)
    assert harness.run_jobs([job], tmp_path, progress=False)[0]["status"] == "failed"
    assert (job.run_dir(tmp_path) / "error.txt").is_file()
    monkeypatch.setattr(harness, "run_method", real)
    assert harness.run_jobs([job], tmp_path, progress=False)[0]["status"] == "ok"
    assert (job.run_dir(tmp_path) / "result.json").is_file()
    assert not (job.run_dir(tmp_path) / "error.txt").exists()


def test_a_folder_of_another_run_gets_no_error_file_and_failures_every_rank_computes_alike_are_rows(
        tmp_path, smoke, monkeypatch, capsys):
    """A folder holding another configuration's finished run is refused and kept as it is: no error.txt written
    into it, which made that run look failed. Under torchrun, that refusal and a "-R" job whose source did not
    finish are every rank's failure (each rank reads the same records), so they are failed rows and the sweep
    goes on, as in one process, rather than stopping the command as a failure of one rank."""
    import contextlib

    from benchmarks import harness

    config = smoke(tasks=("S", "D"))
    foreign = harness.Job("onenet", "onenet", config)
    foreign.run_dir(tmp_path).mkdir(parents=True)
    (foreign.run_dir(tmp_path) / "result.json").write_text('{"fingerprint": "another", "status": "ok"}')
    assert harness.run_jobs([foreign], tmp_path, progress=False)[0]["status"] == "failed"
    assert sorted(p.name for p in foreign.run_dir(tmp_path).iterdir()) == [".lock", "result.json"]

    as_rank_1_of_2(monkeypatch)
    monkeypatch.setattr(harness.folder_lock, "holding", lambda *args, **kwargs: contextlib.nullcontext())
    monkeypatch.setattr(harness, "run_method", lambda config, method, run_dir, **kwargs: {
        "method": method, "seed": config.seed, "status": "ok"})
    jobs = [harness.Job("mtsl_r", "mtsl_r", config), foreign, harness.Job("stn", "stn", config)]
    assert [r["status"] for r in harness.run_jobs(jobs, tmp_path, progress=False)] == ["failed", "failed", "ok"]
    assert "[mtsl_r seed 0] failed: mtsl_r retrains the plan of mtsl" in capsys.readouterr().err


@pytest.mark.parametrize("optimizer, copies", [({"optim": "adam"}, 2), ({"optim": "adam", "amsgrad": True}, 3),
                                               ({"optim": "rmsprop"}, 2), ({"optim": "rmsprop", "momentum": 0.9}, 2),
                                               ({"optim": "rmsprop", "momentum": 0.9, "centered": True}, 3),
                                               ({"optim": "sgd", "momentum": 0.9}, 2)])
def test_the_optimizer_copies_of_the_weights_are_at_least_adams_two(optimizer, copies):
    """A checkpoint's optimizer state is bounded by Adam's two moments, or three tensors per parameter where the
    optimizer keeps them (amsgrad; RMSprop with momentum and centred): never fewer than two, which a plain
    RMSprop's one square average would give."""
    from benchmarks.harness import optimizer_copies

    assert optimizer_copies(optimizer) == copies


def test_finished_runs_ask_no_room_and_a_new_out_folder_is_measured_on_its_nearest_parent(tmp_path, smoke):
    """Each run to train asks for its weights (and with --keep-checkpoints its checkpoint, Adam: three times the
    weights) and the command for two checkpoints of the run in training; a finished run is reused and asks for
    nothing. The disk of an --out that does not exist yet is that of its nearest existing parent."""
    from benchmarks.harness import SIZE_MARGIN, check_disk, disk_need, method_jobs
    from mtsl_plugin.experiment import single_task_bytes

    config = smoke(tasks=("S", "D"))
    bound = SIZE_MARGIN * single_task_bytes(config)
    jobs = method_jobs(["stn", "mtsl"], config, [0])
    out = tmp_path / "new" / "out"
    assert check_disk(jobs, out) == disk_need(jobs, out) == int(2 * bound + 2 * 3 * bound) and not out.exists()
    assert disk_need(jobs, out, keep_checkpoints=True) == int(2 * 4 * bound + 2 * 3 * bound)
    jobs[0].run_dir(out).mkdir(parents=True)
    (jobs[0].run_dir(out) / "result.json").write_text("{}")
    assert disk_need(jobs, out) == int(bound + 2 * 3 * bound)


def test_the_single_task_size_is_that_of_the_stn_network_weights_and_buffers(smoke):
    """The disk bound's unit is the size of the single-task networks, one per task: the STN network's weights and
    buffers (BatchNorm statistics included), counted exactly."""
    from mtsl_plugin.experiment import build_run_tasks, build_split, build_stages, run_heads, single_task_bytes
    from mtsl_plugin.network.branched import BranchedNetwork
    from mtsl_plugin.plan import BranchingPlan

    config = smoke(tasks=("S", "D", "N"))
    stages = build_stages(config)
    tasks = build_run_tasks(config, build_split(config, "train", n=1, progress=False).num_classes)
    stn = BranchedNetwork(BranchingPlan.single_task(list(tasks), stages.num_locations), stages,
                          run_heads(config, tasks, stages))
    assert single_task_bytes(config) == sum(t.numel() * t.element_size() for t in stn.state_dict().values())
