"""``arch_args`` an architecture does not take are refused in one line naming it, before anything is built: by the
architecture itself, by ``run_method`` before any folder and by the benchmark commands before the first run trains
(a typo such as ``candidate`` used to run with the default and a different fingerprint)."""
import math

import pytest

import baselines  # noqa: F401  (registers the baseline methods)
from baselines.bmtas import BMTAS
from baselines.cross_stitch import CrossStitch
from baselines.ltb import LTB
from baselines.mtan import MTAN
from benchmarks import harness
from benchmarks.cli import UsageError
from conftest import smoke_config
from mtsl_plugin.architecture import MTSL, check_arch_args
from mtsl_plugin.experiment import run_method
from mtsl_plugin.plan import BranchingPlan


@pytest.mark.parametrize("architecture, label", [
    (MTSL, "MTSL"), (CrossStitch, "cross-stitch"), (MTAN, "MTAN"), (LTB, "LTB"), (BMTAS, "BMTAS")])
def test_a_name_the_architecture_does_not_take_is_refused(architecture, label):
    with pytest.raises(ValueError, match=rf"^{label} got unknown arch_args \['candidate'\]; known: \[") as caught:
        check_arch_args(architecture, 3, 10, {"candidate": "identical"})
    assert "\n" not in str(caught.value)
    check_arch_args(architecture, 3, 10, {"plan": None})  # every one takes (a missing) plan


@pytest.mark.parametrize("architecture, arch_args, culprit", [
    (MTSL, {"fused": "no"}, "MTSL fused must be true or false, got 'no'"),
    (MTSL, {"plan": "0-9: SD"}, "MTSL plan must be a BranchingPlan or None, got str"),
    (CrossStitch, {"unit_lr_multiplier": math.inf}, "cross-stitch unit_lr_multiplier must be a finite number > 0, got inf"),
    (CrossStitch, {"unit_lr_multiplier": "fast"}, "cross-stitch unit_lr_multiplier must be a finite number > 0"),
    (CrossStitch, {"self_weight": "high"}, "cross-stitch self_weight must be a finite number or null, got 'high'"),
    (CrossStitch, {"candidates": "same"}, "cross-stitch candidates must be one of ('independent', 'identical')"),
    (MTAN, {"attention_reduction": 0}, "MTAN attention_reduction must be an integer >= 1, got 0"),
    (MTAN, {"attention_reduction": 2.5}, "MTAN attention_reduction must be an integer >= 1, got 2.5"),
    (LTB, {"gate_lr_multiplier": math.nan}, "LTB gate_lr_multiplier must be a finite number > 0, got nan"),
    (LTB, {"search_space": "every"}, "LTB search_space must be one of ('reference', 'all'), got 'every'"),
    (LTB, {"warmup_epochs": -1}, "LTB warmup_epochs must be an integer >= 0 or null, got -1"),
    (LTB, {"candidates": "same"}, "LTB candidates must be one of"),
    (BMTAS, {"resource_weight": -1.0}, "BMTAS resource_weight must be a finite number >= 0, got -1.0"),
    (BMTAS, {"resource_weight": "0.05"}, "BMTAS resource_weight must be a finite number >= 0, got '0.05'"),
    (BMTAS, {"resource": "rough"}, "BMTAS resource must be one of ('exact', 'brdav'), got 'rough'"),
    (BMTAS, {"cost_size": 512}, "BMTAS cost_size (height, width) must be a list of integers >= 1, got 512"),
    (BMTAS, {"cost_size": (512, 512, 3)}, "BMTAS cost_size must be (height, width) in pixels"),
    (BMTAS, {"stage_gflops": [1.0] * 9}, "BMTAS stage_gflops must give one cost per location (10)"),
    (BMTAS, {"stage_gflops": [1.0] * 9 + [-1.0]}, "BMTAS stage_gflops must be a finite number >= 0, got -1.0"),
    (BMTAS, {"warmup_epochs": 1.5}, "BMTAS warmup_epochs must be an integer >= 0 or null, got 1.5"),
])
def test_a_value_the_architecture_cannot_use_is_refused(architecture, arch_args, culprit):
    with pytest.raises(ValueError) as caught:
        check_arch_args(architecture, 3, 10, arch_args)
    assert str(caught.value).startswith(culprit) and "\n" not in str(caught.value), caught.value


def test_good_values_pass():
    check_arch_args(MTSL, 3, 10, {"fused": True, "plan": BranchingPlan.one_net("SDE", 10)})
    check_arch_args(CrossStitch, 3, 10, {"unit_lr_multiplier": 1, "self_weight": 0.9, "candidates": "identical"})
    check_arch_args(MTAN, 3, 10, {"attention_reduction": 1})
    check_arch_args(LTB, 3, 10, {"gate_lr_multiplier": 100, "search_space": "all", "warmup_epochs": 0})
    check_arch_args(BMTAS, 3, 10, {"resource_weight": 0, "resource": "brdav", "cost_size": [256, 512],
                                   "stage_gflops": [0.0] * 10, "warmup_epochs": None})
    check_arch_args(object, 3, 10, {"anything": 1})  # no known_args (LibMTL's own, a user's): not ours to check


def test_mtsl_refuses_a_name_it_does_not_take_when_built():
    from mtsl_plugin.experiment import build_stages

    stages = build_stages(smoke_config())
    with pytest.raises(ValueError, match=r"^MTSL got unknown arch_args \['fuse'\]"):
        MTSL(["S"], lambda: stages, {"S": stages.build_head(1)}, False, False, "cpu", fuse=True)


def test_run_method_refuses_before_any_folder(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^cross-stitch got unknown arch_args \['candidate'\]"):
        run_method(smoke_config(), "cross_stitch", run, arch_args={"candidate": "identical"})
    assert not run.exists()


def test_the_commands_refuse_before_the_first_run_trains(monkeypatch):
    """The STN job comes first and would train; the cross-stitch job's typo is found before it."""
    monkeypatch.setattr(harness, "check_config", lambda *a, **k: None)
    jobs = [harness.Job("stn", "stn", smoke_config()),
            harness.Job("cs", "cross_stitch", smoke_config(), arch_args=(("unit_lr_multiplier", -1.0),))]
    with pytest.raises(UsageError, match=r"^cs: cross-stitch unit_lr_multiplier must be a finite number > 0, got -1.0"):
        harness.check_jobs(jobs)


@pytest.mark.parametrize("architecture", [LTB, BMTAS])
def test_a_warmup_that_leaves_no_search_epoch_is_refused(architecture, tmp_path, monkeypatch):
    """The plan would be read off gates that never trained: refused with the epochs known, by the check, by
    ``run_method`` before any folder, by the commands before the first run, and by the trainer before training."""
    label = architecture.label
    culprit = rf"^{label} warmup_epochs 3 leaves no search epoch of the 3 trained; give fewer than 3$"
    with pytest.raises(ValueError, match=culprit):
        check_arch_args(architecture, 3, 10, {"warmup_epochs": 3}, epochs=3)
    check_arch_args(architecture, 3, 10, {"warmup_epochs": 2}, epochs=3)
    check_arch_args(architecture, 3, 10, {"warmup_epochs": 3})  # the epochs unknown: the trainer checks
    config = smoke_config()  # 3 epochs
    method = label.lower()
    with pytest.raises(ValueError, match=culprit):
        run_method(config, method, tmp_path / "run", arch_args={"warmup_epochs": 3})
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(harness, "check_config", lambda *a, **k: None)
    with pytest.raises(UsageError, match=rf"^{method}: {culprit[1:]}"):
        harness.check_jobs([harness.Job(method, method, config, arch_args=(("warmup_epochs", 3),))])

    from mtsl_plugin.experiment import build_data, build_stages, build_trainer
    from mtsl_plugin.tasks import build_tasks
    data, dataset = build_data(config, progress=False)
    stages = build_stages(config)
    trainer = build_trainer(config, build_tasks(config.tasks, dataset.num_classes), None, stages,
                            architecture=architecture, arch_args={"warmup_epochs": 3})
    with pytest.raises(ValueError, match=culprit):
        trainer.fit(data, 3, progress=False)
    assert trainer.epochs_done == 0 and trainer.history == []


def test_ltb_with_one_epoch_is_refused_as_its_warm_up_takes_it():
    """LTB's own warm-up (LibMTL's ``epoch < epochs / 100``) always takes the first epoch: with one epoch its gates
    never trained and the plan was STN's tie break, unsaid. BMTAS's (``epochs // 20``) leaves epochs to search."""
    with pytest.raises(ValueError, match=r"^LTB's warm-up takes all 1 epoch\(s\), leaving none to search; train more "
                                         r"epochs or give a shorter warmup_epochs$"):
        check_arch_args(LTB, 3, 10, {}, epochs=1)
    check_arch_args(LTB, 3, 10, {"warmup_epochs": 0}, epochs=1)  # a search from the first epoch
    check_arch_args(LTB, 3, 10, {}, epochs=2)
    for epochs in (1, 19, 20, 80):
        check_arch_args(BMTAS, 3, 10, {}, epochs=epochs)
