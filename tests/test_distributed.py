"""Data-parallel MTSL on CPU: two gloo processes train the smoke preset through its structural phases."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import smoke_config
from mtsl_plugin import distributed
from mtsl_plugin.experiment import build_data, build_stages, build_trainer, seed_everything
from mtsl_plugin.methods import build_method
from mtsl_plugin.tasks import build_tasks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank, world, port, init=True):
    """Describe this spawned process as torchrun would (one thread: two ranks share two cores) and join."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if init:
        distributed.init_from_env("cpu")


def train_mtsl(out_file, weighting="EW"):
    """The smoke MTSL run of S and D; saves the final plan, weights and phase records."""
    config = smoke_config(tasks=("S", "D")).replace(weighting=weighting)
    seed_everything(0)
    data, dataset = build_data(config)
    tasks = build_tasks(config.tasks, dataset.num_classes)
    spec = build_method("mtsl", config, 10)
    trainer = build_trainer(config, tasks, spec.plan, build_stages(config), spec.learner)
    trainer.fit(data, config.mtsl.total_epochs, progress=False)
    torch.save({"plan": trainer.model.plan.to_json(), "state": trainer.model.state_dict(),
                "merged": [r.merged for r in spec.learner.records],
                "similarities": [r.similarities for r in spec.learner.records]}, out_file)


def worker(rank, world, port, folder, weighting):
    join_group(rank, world, port)
    try:
        train_mtsl(os.path.join(folder, f"rank{rank}.pt"), weighting)
    except ValueError as exc:
        with open(os.path.join(folder, f"rank{rank}.err"), "w") as handle:
            handle.write(str(exc))
    finally:
        dist.destroy_process_group()


def test_two_processes_take_the_same_decisions_and_end_identical(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path), "EW"), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["plan"] == ranks[1]["plan"] and ranks[0]["merged"] == ranks[1]["merged"]
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in ranks[0]["state"])
    assert any(ranks[0]["merged"])  # the phases did edit the network under DDP

    # one process with the same global batch: the same grouping decisions; its weights differ only as batch
    # norm over half batches and the order of gradient sums make them (similarities agree to 0.02)
    train_mtsl(tmp_path / "single.pt")
    single = torch.load(tmp_path / "single.pt", weights_only=False)
    assert single["plan"] == ranks[0]["plan"] and single["merged"] == ranks[0]["merged"]
    for phase_a, phase_b in zip(single["similarities"], ranks[0]["similarities"]):
        for a, b in zip(phase_a, phase_b):
            assert torch.allclose(torch.tensor(a["matrix"]), torch.tensor(b["matrix"]), atol=0.02)


def test_gradient_surgery_is_refused_under_ddp(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path), "PCGrad"), nprocs=2, join=True)
    message = (tmp_path / "rank0.err").read_text()
    assert "PCGrad backpropagates each task separately" in message and "\n" not in message


def test_a_batch_the_processes_do_not_divide_is_refused(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(ValueError, match="batch of 16 cannot be split evenly over 3 processes"):
        distributed.per_rank_batch(16)


def test_each_process_trains_an_equal_share_of_the_global_batch(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    assert distributed.per_rank_batch(16) == 4  # what the scaling benchmark's ranks each run per step


def test_shards_of_a_global_batch_make_it_up(monkeypatch):
    batches = [[5, 1, 4, 0], [2, 3, 7, 6]]
    parts = []
    for me in range(2):
        monkeypatch.setattr(distributed, "rank", lambda me=me: me)
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        parts.append(distributed.shard_batches(batches))
    assert [sorted(a + b) for a, b in zip(*parts)] == [sorted(b) for b in batches]


def compare_worker(rank, world, port, out):
    join_group(rank, world, port, init=False)  # compare.py joins the group itself
    from benchmarks import compare

    code = compare.main(["--methods", "mtsl", "--preset", "smoke", "--tasks", "S,D", "--out", out, "--no-progress"])
    with open(f"{out}.rank{rank}", "w") as handle:
        handle.write(str(code))
    dist.destroy_process_group()


def test_compare_under_two_processes_writes_one_result_like_one_process(tmp_path):
    """What ``torchrun --nproc_per_node=2 benchmarks/compare.py ...`` runs: both ranks train, rank 0 writes;
    the converged plan is the single process's."""
    from benchmarks import compare

    out = tmp_path / "two"
    mp.spawn(compare_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    assert [(tmp_path / f"two.rank{r}").read_text() for r in range(2)] == ["0", "0"]
    runs = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    assert all(r["status"] == "ok" for r in runs.values()) and not list(out.rglob("*.tmp"))
    assert compare.main(["--methods", "mtsl", "--preset", "smoke", "--tasks", "S,D", "--out", str(tmp_path / "one"),
                         "--no-progress"]) == 0
    single = {r["method"]: r for r in json.loads((tmp_path / "one" / "results.json").read_text())}
    assert runs["mtsl"]["plan"] == single["mtsl"]["plan"]


@pytest.mark.parametrize("command, argv", [
    ("alignment", ["--preset", "smoke", "--no-progress"]), ("speed", ["--steps", "0"]),
    ("export", ["nowhere", "--format", "onnx", "--out", "x.onnx"]), ("grouping_speed", ["--tasks", "4"]),
    ("sensitivity", ["--sweep", "bmtas-lambda", "--preset", "smoke", "--no-progress"]),  # after joining the group
])
def test_commands_without_a_distributed_path_refuse_torchrun(monkeypatch, capsys, command, argv):
    import importlib

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "init_from_env", lambda device: device)  # no process group to join here
    assert importlib.import_module(f"benchmarks.{command}").main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "runs in one process" in err and "without torchrun" in err and len(err.splitlines()) == 1


def test_under_torchrun_the_group_is_joined_on_the_device_the_configuration_names(tmp_path, monkeypatch, capsys):
    """The device of a --config file reaches the process group (it was joined on --device, else cpu, before the
    file was read, and the file's cuda was replaced by cpu: a GPU run trained on the CPU without a word)."""
    from benchmarks import compare

    monkeypatch.setenv("WORLD_SIZE", "2")
    joined = []
    monkeypatch.setattr(distributed, "init_from_env", lambda device: joined.append(device) or device)
    (tmp_path / "gpu.yaml").write_text("device: cuda\n")
    argv = ["--preset", "smoke", "--methods", "stn", "--dry-run", "--no-progress", "--out", str(tmp_path / "out")]
    compare.main([*argv, "--config", str(tmp_path / "gpu.yaml")])
    compare.main(argv)
    assert joined == ["cuda", "cpu"]


def smoke_trainer():
    config = smoke_config(tasks=("S", "D"))
    seed_everything(0)
    data, dataset = build_data(config)
    spec = build_method("mtsl", config, 10)
    return config, data, spec, build_tasks(config.tasks, dataset.num_classes), build_stages(config)


def resume_worker(rank, world, port, folder):
    join_group(rank, world, port)
    from mtsl_plugin.trainer import MTLTrainer

    config, data, spec, tasks, stages = smoke_trainer()
    checkpoint = os.path.join(folder, "checkpoint.pt")
    trainer = build_trainer(config, tasks, MTLTrainer.checkpoint_plan(checkpoint), stages, spec.learner)
    trainer.load(checkpoint)
    trainer.fit(data, config.mtsl.total_epochs, progress=False)
    torch.save({"plan": trainer.model.plan.to_json()}, os.path.join(folder, f"resumed{rank}.pt"))
    dist.destroy_process_group()


def test_a_run_of_one_process_resumes_with_two(tmp_path):
    """One process trains up to the first structural phase and checkpoints; two processes continue from that
    checkpoint (the global batches do not depend on the number of processes) to the uninterrupted plan."""
    config, data, spec, tasks, stages = smoke_trainer()
    trainer = build_trainer(config, tasks, spec.plan, stages, spec.learner)
    first_phase = config.mtsl.phase_ends()[0]
    trainer.fit(data, first_phase, checkpoint=tmp_path / "checkpoint.pt", progress=False)
    assert spec.learner.phases_done == 1 and (tmp_path / "checkpoint.pt").is_file()
    mp.spawn(resume_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    train_mtsl(tmp_path / "single.pt")
    expected = torch.load(tmp_path / "single.pt", weights_only=False)["plan"]
    assert [torch.load(tmp_path / f"resumed{r}.pt", weights_only=False)["plan"] for r in range(2)] == [expected] * 2


def test_torchrun_with_a_killed_rank_stops_and_resumes(tmp_path):
    """A real ``torchrun`` of compare.py: one rank SIGKILLed during MTSL's training stops the job with
    torchrun's report naming the failed rank; ``--resume`` under torchrun finishes with the uninterrupted plan."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    config = tmp_path / "long.yaml"
    config.write_text("epochs: 8\nlr_steps: [6]\nmtsl: {phases: 2}\n")
    out = tmp_path / "out"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    script = str(Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py")
    args = ["--methods", "mtsl", "--preset", "smoke", "--tasks", "S,D", "--config", str(config), "--no-progress"]
    scratch = tmp_path / "tmp"  # torchrun's log folders (torchelastic_*) go there, not to the system's
    scratch.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)}
    job = subprocess.Popen([*launcher, script, *args, "--out", str(out)], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    started = out / "mtsl" / "seed0" / "checkpoint.pt"
    deadline = time.time() + 300
    while not started.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert started.exists(), "MTSL never wrote a checkpoint"
    ranks = subprocess.run(["ps", "-o", "pid=", "--ppid", str(job.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2
    os.kill(int(ranks[1]), signal.SIGKILL)
    output, _ = job.communicate(timeout=300)
    assert job.returncode != 0
    assert "exitcode  : -9" in output and "Signal 9 (SIGKILL)" in output  # torchrun names the killed rank
    assert not (out / "mtsl" / "seed0" / "result.json").exists()

    resumed = subprocess.run([*launcher, script, "--resume", str(out), "--no-progress"], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    runs = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    assert runs["mtsl"]["status"] == "ok"
    from benchmarks import compare

    single = tmp_path / "single"
    assert compare.main([*args, "--out", str(single)]) == 0
    assert runs["mtsl"]["plan"] == json.loads((single / "mtsl" / "seed0" / "result.json").read_text())["plan"]


def evaluation_worker(rank, world, port, folder):
    join_group(rank, world, port)
    config, data, spec, tasks, stages = smoke_trainer()
    trainer = build_trainer(config, tasks, spec.plan, stages, spec.learner)
    test = torch.utils.data.Subset(data.test, range(7))  # shares of 4 and 3 samples
    share = distributed.shard_samples(test)
    metrics = trainer.evaluate(data.batches(share))
    torch.save({"metrics": metrics, "share": list(share.indices)}, os.path.join(folder, f"eval{rank}.pt"))
    dist.destroy_process_group()


def test_each_rank_evaluates_its_share_and_gets_the_metric_of_the_whole_test_set(tmp_path):
    mp.spawn(evaluation_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"eval{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["share"] == [0, 2, 4, 6] and ranks[1]["share"] == [1, 3, 5]
    config, data, spec, tasks, stages = smoke_trainer()
    trainer = build_trainer(config, tasks, spec.plan, stages, spec.learner)
    whole = trainer.evaluate(data.batches(torch.utils.data.Subset(data.test, range(7))))
    for r in ranks:
        assert r["metrics"].keys() == whole.keys()
        for task, value in whole.items():
            assert r["metrics"][task] == pytest.approx(value, rel=1e-6), task


def cka_gradient(rows, gather):
    """1 − CKA between two linear maps of ``rows`` (the same weights on every rank), as the trainer's alignment
    term; returns the loss and the gradients of both maps, averaged across the ranks as the trainer does."""
    from mtsl_plugin.plugins.builtin_similarity import linear_cka

    torch.manual_seed(0)
    maps = [torch.nn.Linear(6, 5), torch.nn.Linear(6, 4)]
    features = [gather(m(rows)) for m in maps]
    loss = 1 - linear_cka(*features)
    params = [p for m in maps for p in m.parameters()]
    return float(loss.detach()), [g.clone() for g in distributed.mean_all(torch.autograd.grad(loss, params))]


def mean_all_worker(rank, world, port, folder):
    join_group(rank, world, port)
    tensors = [torch.tensor([1 + rank * 2.0 ** -40], dtype=torch.float64), torch.full((2, 2), 3.0 * rank),
               torch.tensor([rank], dtype=torch.bfloat16)]
    torch.save(distributed.mean_all(tensors), os.path.join(folder, f"mean{rank}.pt"))
    dist.destroy_process_group()


def test_gradients_are_averaged_across_ranks_in_their_own_precision(tmp_path):
    """float64 gradients are summed in float64 (float32 would round 1 + 2^-40 to 1), each tensor keeps its dtype."""
    mp.spawn(mean_all_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        wide, full, half = torch.load(tmp_path / f"mean{rank}.pt")
        assert wide.dtype == torch.float64 and wide.item() == 1 + 2.0 ** -41
        assert full.dtype == torch.float32 and torch.equal(full, torch.full((2, 2), 1.5))
        assert half.dtype == torch.bfloat16 and half.item() == 0.5


def alignment_worker(rank, world, port, folder):
    join_group(rank, world, port)
    rows = torch.randn(9, 6, generator=torch.Generator().manual_seed(1))
    mine = rows[:5] if rank == 0 else rows[5:]  # shares of unequal size: 5 and 4 rows
    gathered = distributed.gather_rows(mine)
    loss, grads = cka_gradient(mine, distributed.gather_rows)
    torch.save({"gathered": gathered, "loss": loss, "grads": grads}, os.path.join(folder, f"align{rank}.pt"))
    dist.destroy_process_group()


def test_the_alignment_cka_is_that_of_the_global_batch_with_its_single_process_gradient(tmp_path):
    """Under DDP every rank computes the alignment's CKA on the pooled features of all ranks (a differentiable
    gather); the averaged gradients equal one process's on the whole batch. Per-rank CKA would be another, noisier
    objective and fails below 4 samples a rank (e.g. batch 16 on 8 GPUs)."""
    mp.spawn(alignment_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"align{r}.pt", weights_only=False) for r in range(2)]
    rows = torch.randn(9, 6, generator=torch.Generator().manual_seed(1))
    loss, grads = cka_gradient(rows, lambda x: x)
    for r in ranks:
        assert torch.equal(r["gathered"], rows)
        assert r["loss"] == pytest.approx(loss, rel=1e-6)
        for got, expected in zip(r["grads"], grads):
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)


def robustness_worker(rank, world, port, out, config_file):
    join_group(rank, world, port)
    from benchmarks import robustness

    code = robustness.main(["--methods", "onenet", "--preset", "smoke", "--tasks", "S,D", "--no-progress",
                            "--corruptions", "noise", "--epsilons", "2", "--attack-tasks", "D", "--config", config_file,
                            "--out", out])
    with open(f"{out}.rank{rank}", "w") as handle:
        handle.write(str(code))
    dist.destroy_process_group()


def test_robustness_under_two_processes_evaluates_shares_of_whole_batches_like_one_process(tmp_path):
    """``torchrun ... robustness.py``: every rank trains, evaluates its test batch (0 on rank 0, 1 on rank 1) with
    the corruption seeds of its index in the whole loader, and rank 0 reports metrics of the whole set: those one
    process computes for the same trained model."""
    from benchmarks import robustness

    config = tmp_path / "two_batches.yaml"
    config.write_text("dataset: {test: 16}\n")  # two test batches of 8
    out = tmp_path / "two"
    mp.spawn(robustness_worker, args=(2, free_port(), str(out), str(config)), nprocs=2, join=True)
    assert [(tmp_path / f"two.rank{r}").read_text() for r in range(2)] == ["0", "0"]
    (two,) = json.loads((out / "robustness" / "robustness.json").read_text())["runs"]
    assert robustness.main(["--methods", "onenet", "--preset", "smoke", "--tasks", "S,D", "--no-progress",
                            "--corruptions", "noise", "--epsilons", "2", "--attack-tasks", "D", "--config", str(config),
                            "--out", str(out)]) == 0  # one process, the same trained run
    (one,) = json.loads((out / "robustness" / "robustness.json").read_text())["runs"]
    for key in ("clean", "categories"):
        for task, value in one[key].items() if key == "clean" else one[key]["noise"].items():
            got = two[key][task] if key == "clean" else two[key]["noise"][task]
            assert got == pytest.approx(value, rel=1e-5), (key, task)
    for task, value in one["pgd"]["D"]["2"].items():
        assert two["pgd"]["D"]["2"][task] == pytest.approx(value, rel=1e-5), task


@pytest.mark.parametrize("world, me, count, expected", [
    (2, 0, 3, [0, 2]), (2, 1, 3, [1]), (3, 2, 7, [2, 5]), (1, 0, 3, [0, 1, 2]),
    (2, 1, 2, [1]),  # as many batches as ranks: one each
    (4, 1, 3, [0, 1, 2]),  # fewer batches than ranks: not split (every rank evaluates all; ratios of sums hold)
])
def test_each_rank_owns_every_nth_whole_batch_with_its_index(monkeypatch, world, me, count, expected):
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    monkeypatch.setattr(distributed, "rank", lambda: me)
    batches = [f"batch{i}" for i in range(count)]
    assert list(distributed.own_batches(batches, count)) == [(i, f"batch{i}") for i in expected]


def sweep_worker(rank, world, port, out):
    join_group(rank, world, port)
    from benchmarks import ablation, sensitivity

    common = ["--preset", "smoke", "--tasks", "S,D", "--no-progress", "--out", out]
    codes = [sensitivity.main(["--sweep", "threshold", "--values", "0.8", *common])]
    ablation.ROWS = ablation.ROWS[-1:]  # MTSL itself: the run the threshold sweep trained at the default γ
    codes.append(ablation.main(common))
    with open(f"{out}.rank{rank}", "w") as handle:
        handle.write(json.dumps(codes))
    dist.destroy_process_group()


def test_sensitivity_and_ablation_under_two_processes_train_on_both_and_report_on_rank_0(tmp_path):
    out = tmp_path / "sweeps"
    mp.spawn(sweep_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"sweeps.rank{r}").read_text()) for r in range(2)] == [[0, 0]] * 2
    sweep = json.loads((out / "sensitivity-threshold" / "results.json").read_text())
    assert {r["label"] for r in sweep} == {"stn", "mtsl"} and all(r["status"] == "ok" for r in sweep)
    assert "| 0.8 |" in (out / "sensitivity-threshold" / "sensitivity.md").read_text()
    assert "| ✓ | ✓ | ✓ |" in (out / "ablation" / "ablation.md").read_text()


# ---------------------------------------------------------------------------------------- consistency across ranks
def join_with_timeout(rank, world, port, seconds=60):
    """As :func:`join_group`, with collectives that give up after ``seconds`` (a rank left alone must not hang
    the test for gloo's default 30 minutes)."""
    import datetime

    join_group(rank, world, port, init=False)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=seconds))


def leave_group(trainer=None):
    """Leave the process group after a failure: drop the DDP wrapper first (its reducer holds the group), then
    destroy the group if a peer has not already broken it."""
    if trainer is not None:
        trainer.ddp = None
    import gc

    gc.collect()
    try:
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001  a peer that has gone
        pass


def tie_worker(rank, world, port, folder):
    join_group(rank, world, port)
    config, data, spec, tasks, stages = smoke_trainer()
    trainer = build_trainer(config, tasks, spec.plan, stages, spec.learner)
    learner = spec.learner
    threshold = learner.config.threshold
    # S and D measured at the threshold, noise putting rank 0 just above it and rank 1 just below
    learner.similarity = lambda a, b: torch.tensor(threshold + (1e-9 if rank == 0 else -1e-9), dtype=torch.float64)
    record = learner.structural_phase(trainer.network, trainer.model, trainer.optimizer,
                                      lambda: data.batches(data.train, key=(1, 0, 0), shard=False),
                                      lambda: data.batches(data.holdout), trainer.device)
    torch.save({"plan": trainer.network.plan.to_json(), "merged": record.merged,
                "matrix": record.similarities[0]["matrix"]}, os.path.join(folder, f"tie{rank}.pt"))
    dist.destroy_process_group()


def test_every_rank_decides_on_rank_0s_similarities_when_noise_splits_a_tie(tmp_path):
    """Similarities at the threshold that floating-point noise puts on either side of it on different ranks must
    not give the ranks different plans: rank 0's matrices decide for every rank."""
    mp.spawn(tie_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"tie{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["merged"] == [["S", "D"]]
    assert ranks[1]["merged"] == ranks[0]["merged"] and ranks[1]["plan"] == ranks[0]["plan"]
    assert ranks[1]["matrix"] == ranks[0]["matrix"]


def write_outcome(path, action, done, whole=()):
    """Run ``action`` and write to ``path`` ``done``, or how it failed: the message of an exception of the types
    ``whole``, the type and first line of any other (e.g. a collective whose peer has gone), then `` [every rank]``
    when it is marked as raised by every rank together (so a sweep may go on with its next run)."""
    try:
        action()
        outcome = done
    except Exception as exc:  # noqa: BLE001
        outcome = str(exc) if isinstance(exc, whole) else \
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        outcome += " [every rank]" if distributed.raised_on_every_rank(exc) else ""
    with open(path, "w") as handle:
        handle.write(outcome)


def nonfinite_worker(rank, world, port, folder):
    from mtsl_plugin.trainer import NonFiniteLossError

    join_with_timeout(rank, world, port)
    config, data, spec, tasks, stages = smoke_trainer()
    trainer = build_trainer(config, tasks, spec.plan, stages, spec.learner)
    compute, calls = trainer.task_losses, []

    def task_losses(preds, gts):  # rank 1's share of the second global batch gives a NaN loss
        calls.append(None)
        losses = compute(preds, gts)
        return losses * float("nan") if rank == 1 and len(calls) == 2 else losses

    trainer.task_losses = task_losses
    write_outcome(os.path.join(folder, f"nonfinite{rank}.txt"), lambda: trainer.fit(data, 1, progress=False),
                  "finished", NonFiniteLossError)
    leave_group(trainer)


def test_a_nan_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """A NaN on one rank's share stops all ranks together with the one-line error (a rank that went on alone would
    wait in the next all-reduce for a rank that has left); every rank logs the global batch's losses."""
    mp.spawn(nonfinite_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    outcomes = [(tmp_path / f"nonfinite{r}.txt").read_text() for r in range(2)]
    assert outcomes[0] == outcomes[1], outcomes
    assert "loss is nan at epoch 1 (step 2;" in outcomes[0] and outcomes[0].endswith(" [every rank]")


def test_a_partial_last_batch_is_cut_to_a_multiple_of_the_processes(monkeypatch):
    """A set of under two batches keeps its last, partial batch; under two processes each rank gets an equal
    share of it (never an empty batch, which fails in collation on that rank alone)."""
    from torch.utils.data import TensorDataset

    from mtsl_plugin.data.run_data import RunData

    for size, expected in ((17, [16]), (21, [16, 4]), (20, [16, 4])):
        data = RunData(train=TensorDataset(torch.arange(size)), holdout=None, test=None, batch_size=16)
        shards = []
        for me in range(2):
            monkeypatch.setattr(distributed, "rank", lambda me=me: me)
            monkeypatch.setattr(distributed, "world_size", lambda: 2)
            shards.append([batch[0].tolist() for batch in data.batches(data.train, key=(0, 0))])
        assert [len(a) + len(b) for a, b in zip(*shards)] == expected
        assert all(len(a) == len(b) for a, b in zip(*shards))
        seen = [i for rank in shards for batch in rank for i in batch]
        assert len(seen) == len(set(seen)) == sum(expected)


def structure_worker(rank, world, port, folder):
    from mtsl_plugin.plan import BranchingPlan

    join_with_timeout(rank, world, port)
    config, data, spec, tasks, stages = smoke_trainer()
    plan = spec.plan if rank == 0 else BranchingPlan.one_net(spec.plan.tasks, spec.plan.num_locations)
    trainer = build_trainer(config, tasks, plan, stages)
    write_outcome(os.path.join(folder, f"structure{rank}.txt"), trainer.wrap_distributed, "wrapped")
    leave_group(trainer)


def test_ranks_holding_different_networks_fail_alike_before_any_broadcast(tmp_path):
    mp.spawn(structure_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    outcomes = [(tmp_path / f"structure{r}.txt").read_text() for r in range(2)]
    assert outcomes[0] == outcomes[1] == ("RuntimeError: the processes' networks differ before training: rank(s) "
                                          "[1] hold other parameters than rank 0 [every rank]"), outcomes


def failed_write_worker(rank, world, port, folder):
    join_with_timeout(rank, world, port)
    config, data, spec, tasks, stages = smoke_trainer()
    trainer = build_trainer(config, tasks, spec.plan, stages, spec.learner)
    blocker = os.path.join(folder, "not-a-folder")  # a file where the checkpoint's folder should be
    write_outcome(os.path.join(folder, f"write{rank}.txt"),
                  lambda: trainer.fit(data, 1, checkpoint=os.path.join(blocker, "checkpoint.pt"), progress=False),
                  "finished")
    leave_group(trainer)


def test_a_checkpoint_rank_0_cannot_write_stops_every_rank_with_its_message(tmp_path):
    """Rank 0 alone writes checkpoints; when that fails every rank raises the same WriteError, a CheckpointError (a
    rank left waiting, or going on to the next run of a sweep, would pair its collectives with unrelated ones)."""
    (tmp_path / "not-a-folder").write_text("")
    mp.spawn(failed_write_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    outcomes = [(tmp_path / f"write{r}.txt").read_text() for r in range(2)]
    assert outcomes[0] == outcomes[1], outcomes
    assert outcomes[0].startswith("WriteError: could not write") and "not-a-folder" in outcomes[0]
    assert outcomes[0].endswith(" [every rank]")


def lock_failure_worker(rank, world, port, folder):
    from mtsl_plugin import folder_lock

    join_with_timeout(rank, world, port, seconds=20)

    def hold():
        with folder_lock.holding(os.path.join(folder, "not-a-folder", "run")):
            pass

    write_outcome(os.path.join(folder, f"lock{rank}.txt"), hold, "held")
    leave_group()


def test_a_run_folder_rank_0_cannot_lock_stops_every_rank_with_its_message(tmp_path):
    """Rank 0 alone creates and locks a run folder; when that fails (a file where the folder should be, a lock
    file it may not write) every rank raises its error, none waits for rank 0's answer."""
    (tmp_path / "not-a-folder").write_text("")
    mp.spawn(lock_failure_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    outcomes = [(tmp_path / f"lock{r}.txt").read_text() for r in range(2)]
    assert outcomes[0] == outcomes[1], outcomes
    assert outcomes[0].startswith("NotADirectoryError: ") and outcomes[0].endswith(" [every rank]")
