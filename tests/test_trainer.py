"""MTSL inside LibMTL: name lookup, weighting methods, device-agnostic trainer, checkpoints and resume."""
import pytest
import torch

import mtsl_plugin
from mtsl_plugin.checkpoint import CheckpointError, load_checkpoint
from mtsl_plugin.experiment import build_data, build_trainer, seed_everything
from mtsl_plugin.libmtl_compat import import_libmtl
from mtsl_plugin.learner.structural import StructuralLearner
from mtsl_plugin.network.stages import ResNetStages
from mtsl_plugin.plan import BranchingPlan
from mtsl_plugin.tasks import build_tasks


def make(config, learner=False, plan=None):
    seed_everything(config.seed)
    data, dataset = build_data(config)
    tasks = build_tasks(config.tasks, dataset.num_classes)
    plan = plan or BranchingPlan.single_task(config.tasks, 10)
    trainer = build_trainer(config, tasks, plan, ResNetStages(config.backbone),
                            StructuralLearner(config.mtsl) if learner else None)
    return trainer, data


def test_libmtl_finds_mtsl_by_name():
    libmtl = import_libmtl()
    assert libmtl.architecture.MTSL is mtsl_plugin.MTSL
    assert issubclass(mtsl_plugin.MTSL, libmtl.architecture.AbsArchitecture)


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


def test_libmtl_gradient_surgery_sees_shared_parameters(smoke):
    config = smoke().replace(weighting="PCGrad")
    trainer, data = make(config, plan=BranchingPlan.single_task("SDE", 10).merge(0, ["SDE"]))
    shared = list(trainer.model.get_share_params())
    assert shared and all(any(p is q for q in trainer.network.node(0, ("S", "D", "E")).parameters())
                          for p in shared)
    images, gts = next(iter(data.batches(data.train)))
    losses, _ = trainer.train_step(images, gts)
    assert torch.isfinite(losses).all()


def test_resume_continues_exactly(smoke, tmp_path):
    """Two epochs in one go equal one epoch, a checkpoint, a fresh process state, and one more epoch,
    across a structural phase."""
    config = smoke()
    straight, data = make(config, learner=True)
    straight.fit(data, 2, progress=False)

    first, data = make(config, learner=True)
    first.fit(data, 1, checkpoint=tmp_path / "ckpt.pt", progress=False)
    torch.manual_seed(1234)  # disturb the global RNG: the checkpoint must restore it
    plan = first.checkpoint_plan(tmp_path / "ckpt.pt")
    assert plan != BranchingPlan.single_task("SDE", 10) or first.learner.records[0].merged == []
    resumed, data = make(config, learner=True, plan=plan)
    resumed.load(tmp_path / "ckpt.pt")
    assert resumed.learner.phases_done == 1 and resumed.epochs_done == 1
    resumed.fit(data, 2, progress=False)
    assert resumed.network.plan == straight.network.plan
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


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
