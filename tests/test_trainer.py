"""MTSL inside LibMTL: name lookup, weighting methods, device-agnostic trainer, checkpoints and resume."""
import errno
import shutil
import math

import pytest
import torch

import mtsl_plugin
from mtsl_plugin.checkpoint import CheckpointError, load_checkpoint
from mtsl_plugin.experiment import build_data, build_stages, build_trainer, load_run, run_method, seed_everything
from mtsl_plugin.libmtl_compat import import_libmtl
from mtsl_plugin.learner.structural import StructuralLearner
from mtsl_plugin.plan import BranchingPlan
from mtsl_plugin.tasks import build_tasks
from mtsl_plugin.trainer import MTLTrainer, NonFiniteLossError


def make(config, learner=False, plan=None):
    seed_everything(config.seed)
    data, dataset = build_data(config)
    tasks = build_tasks(config.tasks, dataset.num_classes)
    plan = plan or BranchingPlan.single_task(config.tasks, 10)
    trainer = build_trainer(config, tasks, plan, build_stages(config),
                            StructuralLearner(config.mtsl) if learner else None)
    return trainer, data


def test_libmtl_finds_mtsl_by_name():
    libmtl = import_libmtl()
    assert libmtl.architecture.MTSL is mtsl_plugin.MTSL
    assert issubclass(mtsl_plugin.MTSL, libmtl.architecture.AbsArchitecture)


def test_libmtls_own_train_loop_reads_every_batch_once(smoke):
    """``MTLTrainer.train`` is LibMTL's inherited loop; its batch reader calls ``iterator.next()``, which Python 3
    iterators lack (an AttributeError on the first batch), so ``MTLTrainer._process_data`` reads with ``next``:
    one epoch reads each training sample once and ends with LibMTL's test over the test loader."""
    trainer, data = make(smoke(tasks=("S", "D")), plan=BranchingPlan.one_net("SD", 10))
    read = []

    class Watched(torch.utils.data.Dataset):
        def __len__(self):
            return len(data.train)

        def __getitem__(self, i):
            read.append(i)
            return data.train[i]

    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train(torch.utils.data.DataLoader(Watched(), batch_size=8), data.batches(data.test), 1)
    assert sorted(read) == list(range(len(data.train)))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


@pytest.mark.parametrize("weighting", ["EW", "UW"])
def test_train_step_with_libmtl_weighting(smoke, weighting):
    config = smoke().replace(weighting=weighting)
    trainer, data = make(config, learner=True)
    libmtl = import_libmtl()
    assert isinstance(trainer.model, mtsl_plugin.MTSL)  # MTLmodel(MTSL, weighting), as LibMTL composes them
    assert isinstance(trainer.model, getattr(libmtl.weighting, weighting))
    images, gts = next(iter(data.batches(data.train)))
    modules = [*trainer.network.nodes.values(), *trainer.network.heads.values()]
    before = [[p.detach().clone() for p in m.parameters()] for m in modules]
    losses, align = trainer.train_step(images, gts)
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    assert align == pytest.approx(0.0, abs=1e-5)  # identical starting branches: CKA 1, nothing to align yet
    assert all(p.grad is not None for p in trainer.model.parameters())
    for old, module in zip(before, modules):  # every node of every branch, and every head, took a step
        assert any(not torch.equal(a, b) for a, b in zip(old, module.parameters()))
    if weighting == "UW":
        assert not torch.equal(trainer.model.loss_scale.detach(), torch.full((3,), -0.5))


@pytest.mark.parametrize("weighting", ["DWA", "GradNorm", "MGDA", "GradVac", "CAGrad", "RLW", "IMTL", "GLS"])
def test_every_libmtl_weighting_trains_mtsl_from_its_single_task_start(smoke, weighting):
    """LibMTL's weighting methods read their hyperparameters from weight_args (DWA, GradNorm, MGDA, GradVac, CAGrad
    and RLW raised a KeyError at their first step without them: they get LibMTL's command-line defaults) and DWA
    and GradNorm read the epochs' mean losses (train_loss_buffer); the gradient methods act on shared parameters,
    of which MTSL has none before its first merge (IMTL's matrix was singular). The smoke preset: 3 epochs, phases
    after the first two."""
    config = smoke(tasks=("S", "D", "E"), threshold=0.0).replace(weighting=weighting)  # CAGrad: 3 tasks only
    trainer, data = make(config, learner=True)
    history = trainer.fit(data, config.epochs, progress=False)
    assert len(history) == 3 and all(math.isfinite(entry[t]) for entry in history for t in config.tasks)
    assert trainer.network.plan.partitions[0] == (("S", "D", "E"),)  # merged after epoch 1: then shared nodes
    assert trainer.model.train_loss_buffer[:, 0].tolist() == [history[0][t] for t in config.tasks]


def test_an_epochs_mean_losses_weigh_every_sample_alike(smoke):
    """The history's (and so DWA's and GradNorm's ``train_loss_buffer``'s) mean loss of an epoch is LibMTL's, over
    samples: a last, shorter batch (24 samples in batches of 16 and 8) weighed as much as a full one before."""
    config = smoke(tasks=("S", "D")).replace(batch_size=16)
    trainer, data = make(config, plan=BranchingPlan.one_net("SD", 10))
    steps, queue_step = [], trainer.queue_step

    def recording(images, gts):
        losses, align = queue_step(images, gts)
        steps.append((losses.clone(), images.shape[0]))
        return losses, align

    trainer.queue_step = recording
    history = trainer.fit(data, 1, progress=False)
    assert [n for _, n in steps] == [16, 8]
    by_sample = sum(losses * n for losses, n in steps) / 24
    by_step = sum(losses for losses, _ in steps) / 2
    for t, expected, other in zip(config.tasks, by_sample.tolist(), by_step.tolist()):
        assert history[0][t] == pytest.approx(expected, rel=1e-6) and history[0][t] != pytest.approx(other, rel=1e-4)


def test_weight_args_reach_the_weighting_method(smoke):
    trainer, _ = make(smoke().replace(weighting="CAGrad", weight_args={"calpha": 0.25}))
    assert trainer.kwargs["weight_args"] == {"calpha": 0.25, "rescale": 1}  # LibMTL's default for the other


def gradients_of_one_step(trainer, images, gts):
    """The gradients a train step leaves (the optimizer step itself is skipped), by parameter name."""
    trainer.optimizer.step = lambda: None
    trainer.train_step(images, gts)
    return {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}


def test_libmtl_gradient_surgery_sees_shared_parameters(smoke):
    """PCGrad changes exactly the shared node's gradients (projecting conflicting task gradients); every
    task-specific parameter gets the same gradient as with EW."""
    plan = BranchingPlan.single_task("SDE", 10).merge(0, ["SDE"])
    trainer, data = make(smoke().replace(weighting="PCGrad"), plan=plan)
    shared_node = list(trainer.network.node(0, ("S", "D", "E")).parameters())
    shared = list(trainer.model.get_share_params())
    assert len(shared) == len(shared_node) and all(any(p is q for q in shared_node) for p in shared)
    images, gts = next(iter(data.batches(data.train)))
    surgery = gradients_of_one_step(trainer, images, gts)
    plain = gradients_of_one_step(make(smoke(), plan=plan)[0], images, gts)
    shared_names = {name for name, p in trainer.model.named_parameters() if any(p is q for q in shared)}
    assert surgery.keys() == plain.keys() and shared_names < surgery.keys()
    assert any(not torch.allclose(surgery[n], plain[n]) for n in shared_names)
    for name in surgery.keys() - shared_names:
        torch.testing.assert_close(surgery[name], plain[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("weighting", ["MGDA", "IMTL", "CAGrad"])
def test_a_node_of_some_tasks_only_gets_their_summed_gradient_under_a_gradient_weighting(smoke, weighting):
    """LibMTL's gradient weightings combine the tasks' gradients of the parameters every task uses. A node of
    some tasks (S and D, after MTSL merged them but not E) counted as shared: E's gradient there is zero, so MGDA
    and CAGrad put their weight on E (the node got 1e-5 of its gradient) and IMTL's gradients were NaN. The node
    now gets its tasks' summed gradient, as under EW; with a node of every task below it, that node alone is
    combined."""
    below_all = BranchingPlan(("S", "D", "E"), [[["S", "D", "E"]], [["S", "D"], ["E"]]] + [[["S"], ["D"], ["E"]]] * 8)
    for plan, combined in ((BranchingPlan.single_task("SDE", 10).merge(0, ["SD"]), None), (below_all, 0)):
        trainer, data = make(smoke().replace(weighting=weighting), plan=plan)
        images, gts = next(iter(data.batches(data.train)))
        weighted = gradients_of_one_step(trainer, images, gts)
        plain = gradients_of_one_step(make(smoke(), plan=plan)[0], images, gts)
        shared = {name for name, p in trainer.model.named_parameters()
                  if any(p is q for q in trainer.model.get_share_params())}
        of_all = [] if combined is None else list(trainer.network.node(combined, ("S", "D", "E")).parameters())
        assert shared == {name for name, p in trainer.model.named_parameters() if any(p is q for q in of_all)}
        assert bool(shared) == (combined is not None)
        assert all(torch.isfinite(g).all() for g in weighted.values())
        assert plain.keys() <= weighted.keys()  # and IMTL's own loss_scale
        for name in plain.keys() - shared:
            torch.testing.assert_close(weighted[name], plain[name], rtol=1e-4, atol=1e-6)


def test_the_alignment_gradient_is_added_to_what_a_gradient_weighting_combines(smoke):
    """MGDA, as every gradient-combining method, reads the shared parameters' ``.grad`` after each task's backward:
    the alignment's gradient, put there first, was counted as the first task's (MGDA weighed and then overwrote it:
    1.3 % of it reached the shared node). With MGDA as with EW, the shared node's gradient with alignment is now the
    one without it plus the alignment's own (EW adds the two exactly)."""
    plan = BranchingPlan.single_task("SDE", 10).merge(0, ["SDE"])  # siblings S, D, E at location 1, below shared 0

    def step(weighting, align_weight):
        trainer, data = make(smoke(align_weight=align_weight).replace(weighting=weighting), learner=True, plan=plan)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # siblings that differ (identical ones have CKA 1: no alignment gradient)
            for task in "SDE":
                for p in trainer.network.node(1, (task,)).parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=generator))
        shared = {name for name, p in trainer.model.named_parameters()
                  if any(p is q for q in trainer.model.get_share_params())}
        grads = gradients_of_one_step(trainer, *next(iter(data.batches(data.train))))
        return {name: grads[name] for name in shared}

    with_ew, without_ew = step("EW", 0.2), step("EW", 0.0)
    alignment = {name: g - without_ew[name] for name, g in with_ew.items()}
    assert sum(g.norm() for g in alignment.values()) > 0.01
    with_alignment, without = step("MGDA", 0.2), step("MGDA", 0.0)
    for name, grad in alignment.items():
        torch.testing.assert_close(with_alignment[name] - without[name], grad, rtol=1e-4, atol=1e-6)


def test_checkpoints_are_written_after_each_phase_and_at_the_end(smoke, tmp_path, monkeypatch):
    """Phases end after epochs 1 and 2 (smoke); a 4-epoch run writes then and at the end, not after epoch 3,
    unless a checkpoint is due by time (``checkpoint_every``); after a phase that merges nothing too (γ 1.5)."""
    for changes, every, expected in (({}, 1e9, [1, 2, 4]), ({}, 0.0, [1, 2, 3, 4]),
                                     ({"threshold": 1.5}, 1e9, [1, 2, 4])):
        trainer, data = make(smoke(**changes), learner=True)
        written = []
        monkeypatch.setattr(trainer, "save", lambda path: written.append(trainer.epochs_done))
        trainer.fit(data, 4, checkpoint=tmp_path / "ckpt.pt", progress=False, checkpoint_every=every)
        assert written == expected


def test_resume_continues_exactly(smoke, tmp_path):
    """Three epochs in one go equal one epoch, a checkpoint, a fresh process state, and two more epochs,
    across a structural phase and the learning-rate step (smoke: after epoch 2)."""
    config = smoke()
    straight, data = make(config, learner=True)
    straight.fit(data, 3, progress=False)
    assert straight.optimizer.param_groups[0]["lr"] == pytest.approx(config.optimizer["lr"] * 0.1)

    first, data = make(config, learner=True)
    first.fit(data, 1, checkpoint=tmp_path / "ckpt.pt", progress=False)
    torch.manual_seed(1234)  # disturb the global RNG: the checkpoint must restore it
    plan = first.checkpoint_plan(tmp_path / "ckpt.pt")
    assert plan != BranchingPlan.single_task("SDE", 10) or first.learner.records[0].merged == []
    resumed, data = make(config, learner=True, plan=plan)
    resumed.load(tmp_path / "ckpt.pt")
    assert resumed.learner.phases_done == 1 and resumed.epochs_done == 1
    resumed.fit(data, 3, progress=False)
    assert resumed.network.plan == straight.network.plan
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_each_epoch_draws_its_own_batch_order_fixed_by_seed_and_epoch():
    """fit's batches of epoch e are ``data.batches(train, key=(0, e))``: the same for the same seed and epoch (a
    resumed run sees the same data), another for every other epoch or seed (not one order repeated every epoch)."""
    from torch.utils.data import TensorDataset

    from mtsl_plugin.data.run_data import RunData

    def order(seed, *key):
        data = RunData(train=TensorDataset(torch.arange(64)), holdout=None, test=None, batch_size=8, seed=seed)
        return [int(i) for (batch,) in data.batches(data.train, key=key) for i in batch]

    assert order(0, 0, 1) == order(0, 0, 1) and sorted(order(0, 0, 1)) == list(range(64))
    assert len({tuple(order(0, 0, e)) for e in range(4)} | {tuple(order(1, 0, 1)), tuple(order(0, 2, 1))}) == 6


def test_weight_args_defaults_are_libmtls_command_line_defaults():
    """A weighting method built here without weight_args behaves as under LibMTL's own command line."""
    import importlib

    from mtsl_plugin.libmtl_compat import WEIGHT_ARG_DEFAULTS

    import_libmtl()
    libmtl_defaults = importlib.import_module("LibMTL.config").LibMTL_args.parse_args([])
    for method, defaults in WEIGHT_ARG_DEFAULTS.items():
        for key, value in defaults.items():
            expected = getattr(libmtl_defaults, key)
            assert (value, type(value)) == (expected, type(expected)), (method, key)


def test_the_learning_rate_steps_once_the_epochs_named_by_lr_steps_are_done(smoke):
    """``lr_steps: [2]`` (the paper's 60 and 70 alike): epochs 1 and 2 train at the run's rate, epoch 3 at a
    tenth of it."""
    config = smoke()
    assert config.lr_steps == (2,)
    trainer, data = make(config)
    seen, step = {}, trainer.queue_step

    def recording_step(*args):
        seen.setdefault(trainer.epochs_done + 1, trainer.optimizer.param_groups[0]["lr"])
        return step(*args)

    trainer.queue_step = recording_step
    trainer.fit(data, 3, progress=False)
    lr = config.optimizer["lr"]
    assert seen == pytest.approx({1: lr, 2: lr, 3: lr * 0.1})


def test_architectures_read_the_0_based_epoch_they_train(smoke):
    """LibMTL's convention, which LTB's warm-up (epoch < E/100: the first epoch of a short run) and the LTB and
    BMTAS temperatures read: ``model.epoch`` is the 0-based epoch being trained, ``model.total_epochs`` the run's."""
    trainer, data = make(smoke())
    seen, step = set(), trainer.queue_step

    def recording_step(*args):
        seen.add((trainer.epochs_done, trainer.model.epoch, trainer.model.total_epochs))
        return step(*args)

    trainer.queue_step = recording_step
    trainer.fit(data, 3, progress=False)
    assert sorted(seen) == [(0, 0, 3), (1, 1, 3), (2, 2, 3)]


def test_bad_checkpoints_are_refused_and_never_overwritten(smoke, tmp_path):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    trainer, _ = make(smoke())
    trainer.save(tmp_path / "good.pt")
    other, _ = make(smoke(), plan=BranchingPlan.one_net("SDE", 10))
    with pytest.raises(ValueError, match="different plan"):
        other.load(tmp_path / "good.pt")
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")])
def test_a_write_failing_midway_names_the_path_and_keeps_the_previous_checkpoint(smoke, tmp_path, monkeypatch,
                                                                                failure):
    """A full disk while a checkpoint is written: one sentence naming the file; the old checkpoint stays whole."""
    trainer, data = make(smoke(), learner=True)
    path = tmp_path / "ckpt.pt"
    trainer.save(path)
    before = path.read_bytes()
    trainer.fit(data, 1, progress=False)
    save = torch.save

    def save_half_then_fail(obj, handle, *args, **kwargs):
        save(obj, handle, *args, **kwargs)
        handle.truncate(100)  # what was written before the disk filled up
        raise failure

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(CheckpointError) as info:
        trainer.save(path)
    message = str(info.value)
    assert str(path) in message and "previous file is kept" in message and len(message.splitlines()) == 1
    assert ("no space left" in message) if isinstance(failure, OSError) else ("full" in message)
    assert path.read_bytes() == before and load_checkpoint(path)["epochs_done"] == 0
    assert not list(tmp_path.glob("*.tmp"))


def test_a_non_finite_loss_stops_the_run_naming_task_and_epoch_and_keeps_the_last_checkpoint(smoke, tmp_path,
                                                                                              monkeypatch):
    config = smoke()
    task_losses = MTLTrainer.task_losses

    spoilt_steps = []

    def nan_depth_from_epoch_2(self, preds, gts):
        losses = task_losses(self, preds, gts)
        spoilt_steps.extend([None] if self.epochs_done >= 2 else [])
        return losses * torch.tensor([1.0, float("nan") if self.epochs_done >= 2 else 1.0, 1.0])

    monkeypatch.setattr(MTLTrainer, "task_losses", nan_depth_from_epoch_2)
    with pytest.raises(NonFiniteLossError) as info:
        run_method(config, "mtsl", tmp_path / "run", progress=False)
    assert len(spoilt_steps) == 1  # fit waits for a step's losses before it queues the next step
    message = str(info.value)
    assert "task D loss is nan at epoch 3 (step 1" in message and str(tmp_path / "run" / "checkpoint.pt") in message
    kept = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert kept["epochs_done"] == 2 and all(torch.isfinite(v).all() for v in kept["model"].values()
                                            if v.is_floating_point())
    assert not (tmp_path / "run" / "result.json").exists()


def test_a_non_finite_alignment_loss_stops_the_run_naming_it_and_the_epoch(smoke):
    """The task losses stay finite; the alignment term turns NaN in epoch 2: the run stops at its first step there,
    naming the alignment loss (a NaN alignment gradient spoils the weights as surely as a task loss's)."""
    trainer, data = make(smoke(), learner=True)
    alignment_loss = trainer.learner.alignment_loss

    def nan_from_epoch_2(plan, features):
        loss = alignment_loss(plan, features)
        return loss * float("nan") if trainer.epochs_done >= 1 and loss is not None else loss

    trainer.learner.alignment_loss = nan_from_epoch_2
    with pytest.raises(NonFiniteLossError, match=r"^alignment loss is nan at epoch 2 \(step 1;"):
        trainer.fit(data, 3, progress=False)
    assert trainer.epochs_done == 1


def test_fit_reads_the_next_batch_before_it_waits_for_a_steps_losses(smoke, monkeypatch):
    """On a GPU the device runs a step while the host reads the next batch: ``fit`` queues step k, reads batch k+1,
    and only then waits for step k's losses (``_settle``), before it queues step k+1. The losses logged are the
    steps' own, as ``train_step`` returns them."""
    trainer, data = make(smoke(tasks=("S", "D")), plan=BranchingPlan.one_net(("S", "D"), 10))
    events, returned = [], []
    batches, queue_step, settle = data.batches, trainer.queue_step, trainer._settle

    def read(*args, **kwargs):
        for batch in batches(*args, **kwargs):
            events.append("read")
            yield batch

    def queued(images, gts):
        events.append("step")
        losses, align = queue_step(images, gts)
        returned.append(losses.clone())
        return losses, align

    def settled(*args):
        events.append("wait")
        return settle(*args)

    monkeypatch.setattr(data, "batches", read)
    monkeypatch.setattr(trainer, "queue_step", queued)
    monkeypatch.setattr(trainer, "_settle", settled)
    trainer.fit(data, 1, progress=False)
    assert len(returned) == 3 and events == ["read", "step", "read", "wait", "step", "read", "wait", "step", "wait"]
    logged = trainer.history[0]
    assert [logged[t] for t in ("S", "D")] == pytest.approx((sum(returned) / 3).tolist())


def test_each_evaluation_scores_only_its_own_loader(smoke):
    """The metrics start afresh at every call: scoring the held-out data in between changes no test score."""
    trainer, data = make(smoke())
    test_only = trainer.scores(data.batches(data.test))
    assert trainer.scores(data.batches(data.holdout)) != test_only
    assert trainer.evaluate(data.batches(data.test)) == pytest.approx({t: v[0] for t, v in test_only.items()})


def test_a_finished_run_keeps_its_weights_not_its_resume_checkpoint(smoke, tmp_path):
    config = smoke(tasks=("S", "D"))
    result = run_method(config, "mtsl", tmp_path / "lean", progress=False)
    assert not (tmp_path / "lean" / "checkpoint.pt").exists()
    weights = load_checkpoint(tmp_path / "lean" / "model.pt")
    assert weights["kind"] == "weights" and "optimizer" not in weights and "rng" not in weights
    assert BranchingPlan.from_json(weights["plan"]).to_dict() == result["plan"]
    trainer, data, _ = load_run(tmp_path / "lean")
    assert trainer.evaluate(data.batches(data.test)) == result["metrics"]

    run_method(config, "mtsl", tmp_path / "kept", progress=False, keep_checkpoint=True)
    kept = tmp_path / "kept" / "checkpoint.pt"
    assert load_checkpoint(kept)["kind"] == "checkpoint"
    assert kept.stat().st_size > 2 * (tmp_path / "kept" / "model.pt").stat().st_size  # Adam's two moments


def test_channels_last_keeps_results_and_formats_new_nodes(smoke):
    """``channels_last``: weights and images in NHWC through a structural phase (the group nodes it creates are
    converted too), the same fingerprint, and the same predictions as the contiguous network with those weights."""
    from mtsl_plugin.experiment import build_data, build_stages, build_trainer, seed_everything
    from mtsl_plugin.methods import build_method
    from mtsl_plugin.tasks import build_tasks

    config = smoke(tasks=("S", "D"))
    assert config.replace(channels_last=True).fingerprint() == config.fingerprint()
    seed_everything(0)
    data, dataset = build_data(config)
    tasks, stages = build_tasks(config.tasks, dataset.num_classes), build_stages(config)
    spec = build_method("mtsl", config, 10)
    nhwc = build_trainer(config.replace(channels_last=True), tasks, spec.plan, stages, spec.learner)
    nhwc.fit(data, config.mtsl.phase_ends()[0], progress=False)  # through the first structural phase
    assert any(r.merged for r in spec.learner.records)
    convs = [p for p in nhwc.model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    plain = build_trainer(config, tasks, nhwc.model.plan, stages)
    plain.model.load_state_dict(nhwc.model.state_dict())
    assert not any(p.is_contiguous(memory_format=torch.channels_last) for p in plain.model.parameters()
                   if p.dim() == 4 and p.shape[-1] > 1)
    images, _ = next(iter(data.batches(data.test)))
    with torch.no_grad():
        got = nhwc.model.eval()(nhwc.images_to_device(images))
        expected = plain.model.eval()(images)
    for task in ("S", "D"):
        torch.testing.assert_close(got[task], expected[task], rtol=1e-4, atol=1e-5)


def test_compile_trains_like_eager_and_compiles_again_after_a_structural_edit(smoke, monkeypatch):
    """``compile``: the compiled forward gives the eager gradients (one task, One-Net: the smallest graph that
    trains); a structural phase clears dynamo's caches and compiles again; torchrun is refused in one line."""
    config = smoke(tasks=("S",))
    plan = BranchingPlan.one_net(("S",), 10)
    assert config.replace(compile=True).fingerprint() == config.fingerprint()
    eager, data = make(config, plan=plan)
    compiled, _ = make(config.replace(compile=True), plan=plan)
    images, gts = next(iter(data.batches(data.train)))
    expected, got = gradients_of_one_step(eager, images, gts), gradients_of_one_step(compiled, images, gts)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-5, msg=name)

    calls = []
    monkeypatch.setattr(MTLTrainer, "compile_model", lambda self: calls.append(self.epochs_done))
    config = smoke(tasks=("S", "D"))
    trainer, data = make(config.replace(compile=True), learner=True)
    trainer.fit(data, config.mtsl.phase_ends()[0], progress=False)  # through the first structural phase
    assert calls == [0, config.mtsl.phase_ends()[0]]
    calls.clear()  # a phase that merges nothing leaves the compiled graphs alone
    trainer, data = make(smoke(tasks=("S", "D"), threshold=1.5).replace(compile=True), learner=True)
    trainer.fit(data, config.mtsl.phase_ends()[0], progress=False)
    assert calls == [0] and trainer.learner.records[0].merged == []
    monkeypatch.setattr("mtsl_plugin.distributed.active", lambda: True)
    with pytest.raises(ValueError, match="--compile.*without torchrun"):
        trainer.wrap_distributed()


def test_compiled_mtsl_step_under_bf16_autocast_with_fused_siblings_follows_eager(smoke, monkeypatch):
    """MTSL's first step on a GPU with ``--compile --fused`` (bf16 autocast, here on the CPU), five tasks: the
    alignment term is backpropagated before the weighting's backward through the same (retained) graph, which a
    compiled backward that donates its buffers refuses, so ``compile_model`` turns donation off. The compiled
    gradients point where the eager ones do (cosine > 0.98 over all parameters; bf16 rounding differs: measured
    0.989 and 0.992 for seeds 0 and 1 on 2026-12-07, where eager bf16 against eager float32 gave 0.84 and 0.93)."""
    monkeypatch.setattr(MTLTrainer, "autocast", lambda self: torch.autocast("cpu", dtype=torch.bfloat16))
    config = smoke(tasks=tuple("SDENA")).replace(fused=True)
    grads = []
    for compiled in (False, True):
        trainer, data = make(config.replace(compile=compiled), learner=True)
        images, gts = next(iter(data.batches(data.train)))
        grads.append(gradients_of_one_step(trainer, images, gts))
    expected, got = grads
    assert got.keys() == expected.keys()
    flat = [torch.cat([g[name].flatten() for name in expected]) for g in (expected, got)]
    assert torch.isfinite(flat[1]).all()
    assert torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0) > 0.98


def test_every_method_trains_under_bf16_autocast_fused_and_channels_last(tmp_path, monkeypatch):
    """What a GPU run does (bf16 autocast, here on the CPU), with fused siblings and NHWC, for MTSL and every
    baseline on all five tasks: every run finishes with finite metrics. (Caught: autocast does not reach inside
    torch.vmap, and torchmetrics' MSE flattens the NHWC reconstruction with ``view``.)"""
    import json

    from benchmarks import compare

    monkeypatch.setattr(MTLTrainer, "autocast", lambda self: torch.autocast("cpu", dtype=torch.bfloat16))
    out = tmp_path / "bf16"
    code = compare.main(["--preset", "smoke", "--methods", "mtsl,cross_stitch,mtan,ltb,bmtas", "--fused",
                         "--channels-last", "--no-progress", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in results} == {"stn", "onenet", "mtsl", "cross_stitch", "mtan", "ltb", "bmtas"}
    for r in results:  # a failed run's own error, before the exit code that only says one failed
        assert r["status"] == "ok" and r["error"] is None, (r["method"], r["error"])
        assert set(r["metrics"]) == set("SDENA") and all(math.isfinite(v) for v in r["metrics"].values())
    assert code == 0
