"""Interrupt and resume, for every method: a run stopped at an awkward moment and continued with ``resume=True``
ends with the uninterrupted run's weights, optimizer state, metrics, history and plan, bit for bit; a checkpoint of
another kind of run is refused in one line; execution options may change on resume.

Checkpoints are written after every epoch here (``checkpoint_every=0``), so an interruption lands right after one:
after a structural merge, after an LTB gate update, after BMTAS's architecture step. The run is stopped after its
k-th optimizer step of any optimizer (weights, BMTAS's architecture, MTSL's amalgamation), and the resumed run is
stopped again in its final evaluation, after its last checkpoint; a third call finishes it.
"""
import json

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import baselines  # noqa: F401  (registers the baselines' methods)
from mtsl_plugin.checkpoint import CheckpointError, load_checkpoint
from mtsl_plugin.experiment import (build_data, build_run_tasks, build_stages, build_trainer, method_spec,
                                    run_method)
from mtsl_plugin.methods import method_names
from mtsl_plugin.network.branched import BranchedNetwork
from mtsl_plugin.plan import BranchingPlan
from mtsl_plugin.trainer import MTLTrainer

TASKS = ("S", "D")
RETRAINED = BranchingPlan(TASKS, [[TASKS]] * 3 + [[("S",), ("D",)]] * 7)  # what a "-R" method retrains

# smoke preset: 3 weight steps an epoch; MTSL amalgamates 3 steps after epochs 1 and 2 (steps 4-6, 10-12); BMTAS
# takes 1 architecture step before the 2 weight steps of every epoch; LTB's gates learn from epoch 2 (step 4)
CASES = [  # method, weighting, interrupted after step k, which optimizer took that step
    ("mtsl", "EW", 7, "weights"),  # the first step after phase 1's merge
    ("mtsl", "EW", 11, "amalgamation"),  # inside phase 2's amalgamation
    ("mtsl_noalign", "EW", 11, "amalgamation"),
    ("mtsl_rsa", "EW", 11, "amalgamation"),
    ("mtsl_r", "EW", 5, "weights"),
    ("stn", "EW", 5, "weights"),
    ("onenet", "EW", 5, "weights"),
    ("onenet", "GradVac", 5, "weights"),  # GradVac keeps a moving average outside the model's state dict
    ("onenet_l", "EW", 11, "weights"),  # in its added epochs
    ("cross_stitch", "EW", 5, "weights"),
    ("mtan", "EW", 5, "weights"),
    ("ltb", "EW", 4, "weights"),  # its first gate update
    ("ltb_r", "EW", 5, "weights"),
    ("bmtas", "EW", 4, "architecture"),  # between the architecture step and the weight steps
    ("bmtas", "EW", 8, "weights"),
    ("bmtas_r", "EW", 5, "weights"),
]


class Interrupted(Exception):
    """Stands for Ctrl-C, a kill or a power cut."""


@pytest.fixture
def trainers(monkeypatch):
    """Checkpoints after every epoch; collects the trainers that run, newest last."""
    built = []
    fit = MTLTrainer.fit

    def fit_every_epoch(self, *args, **kwargs):
        built.append(self)
        return fit(self, *args, **{**kwargs, "checkpoint_every": 0.0})

    monkeypatch.setattr(MTLTrainer, "fit", fit_every_epoch)
    return built


def run(config, method, run_dir, trainers, stop_after=None, stop_in_evaluation=False, resume=False):
    """``run_method``, interrupted after its ``stop_after``-th optimizer step or in its final evaluation; returns
    the result, or which optimizer took the interrupted step ("evaluation" for the evaluation)."""
    steps = []

    def count(optimizer, args, kwargs):
        trainer = trainers[-1]
        steps.append("weights" if optimizer is trainer.optimizer else
                     "architecture" if optimizer is trainer.arch_optimizer else "amalgamation")
        if len(steps) == stop_after:
            raise Interrupted(steps[-1])

    def evaluate(*args):
        raise Interrupted("evaluation")

    hook = register_optimizer_step_post_hook(count)
    try:
        with pytest.MonkeyPatch.context() as patch:
            if stop_in_evaluation:
                patch.setattr(MTLTrainer, "evaluate", evaluate)
            return run_method(config, method, run_dir, resume=resume, progress=False, keep_checkpoint=True,
                              plan=RETRAINED if method.endswith("_r") else None, check=False)
    except Interrupted as moment:
        return str(moment)
    finally:
        hook.remove()


def assert_same_run(expected_dir, expected, got_dir, got):
    """Equal final checkpoints (every tensor, bit for bit) and results (but for wall-clock seconds)."""
    a, b = load_checkpoint(expected_dir / "checkpoint.pt"), load_checkpoint(got_dir / "checkpoint.pt")
    assert a.keys() == b.keys()
    for state in (a, b):  # the structural phases' records, less their seconds (the history and the processes
        records = json.loads(state.pop("learner") or '{"records": []}')["records"]  # are in the result)
        state["phases"] = [{k: v for k, v in r.items() if k != "seconds"} for r in records]
        del state["history"], state["trained_by"]
    for key in a:
        assert_equal(a[key], b[key], key)
    for record in (expected, got):
        del record["train_seconds"], record["wall_seconds"], record["trained_by"]
        for entry in record["history"]:
            del entry["seconds"]
    assert got == expected


def assert_equal(a, b, where):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_every_method_is_covered():
    assert {case[0] for case in CASES} == set(method_names("encoder-decoder"))


@pytest.mark.parametrize("method,weighting,step,optimizer", CASES,
                         ids=[f"{m}-{w}-step{k}" for m, w, k, _ in CASES])
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(smoke, tmp_path, trainers, method, weighting, step,
                                                                optimizer):
    config = smoke(tasks=TASKS).replace(weighting=weighting)
    expected = run(config, method, tmp_path / "straight", trainers)
    out = tmp_path / "interrupted"
    assert run(config, method, out, trainers, stop_after=step) == optimizer
    assert load_checkpoint(out / "checkpoint.pt")["epochs_done"] >= 1  # it continues, not starts afresh
    assert run(config, method, out, trainers, stop_in_evaluation=True, resume=True) == "evaluation"
    assert load_checkpoint(out / "checkpoint.pt")["epochs_done"] == len(expected["history"])  # all trained
    got = run(config, method, out, trainers, resume=True)
    assert len(expected["trained_by"]) == 1 and len(got["trained_by"]) == 3  # one entry per process that trained
    assert_same_run(tmp_path / "straight", expected, out, got)


@pytest.mark.parametrize("first,then", [("mtsl", "stn"), ("cross_stitch", "mtan"), ("ltb", "bmtas"),
                                        ("onenet", "onenet-UW")])
def test_a_checkpoint_of_another_kind_of_run_is_refused_in_one_line(smoke, tmp_path, trainers, first, then):
    """A folder's ``config.json`` refuses another method or configuration in one line, and a checkpoint without
    one (copied into a fresh folder) is refused too. A trainer (a LibMTL script's, on its save_path) refuses a
    checkpoint of another kind of run in one line naming it; before, an MTSL checkpoint was continued as STN, and
    other architectures or weightings failed in torch's many-line state-dict error."""
    config = smoke(tasks=TASKS)
    out = tmp_path / "run"
    run(config, first, out, trainers, stop_after=8)
    method, _, weighting = then.partition("-")
    other = config.replace(weighting=weighting or config.weighting)
    for changed_method, changed_config in ((method, other), (first, config.replace(seed=1))):
        with pytest.raises(ValueError, match=r"holds a run of another configuration; it is kept: choose another "
                                             r"folder$"):
            run_method(changed_config, changed_method, out, resume=True, progress=False, check=False)
    (out / "config.json").unlink()
    with pytest.raises(ValueError, match=r"checkpoint.pt has no config.json beside it to say which run wrote it; it "
                                         r"is kept: choose another folder$"):
        run_method(other, method, out, resume=True, progress=False, check=False)
    spec = method_spec(method, other)  # the trainer run_method would build, as a LibMTL script's Trainer loads
    plan = MTLTrainer.checkpoint_plan(out / "checkpoint.pt") if spec.plan is not None else None
    trainer = build_trainer(other, build_run_tasks(other, build_data(other)[1].num_classes), plan,
                            build_stages(other), spec.learner, spec.architecture, spec.arch_args)
    with pytest.raises(CheckpointError) as info:
        trainer.load(out / "checkpoint.pt")
    message = str(info.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"checkpoint {out / 'checkpoint.pt'} was written "
                                                                 "by a run of ")
    assert message.endswith("continue it with the method and settings that wrote it")


@pytest.mark.parametrize("method, option, saved", [("ltb", "gate_lr_multiplier", 10.0),
                                                   ("cross_stitch", "unit_lr_multiplier", 100.0)])
def test_a_checkpoint_of_other_learning_rate_multiples_is_refused_in_one_line(smoke, tmp_path, method, option, saved):
    """A trainer (a LibMTL script's, on its save_path) refuses a checkpoint whose architecture kept its parameter
    groups at other multiples of the learning rate: the optimizer state used to restore the saved rate silently (10x
    resumed as 100x ran at 10x) or fail in torch's message on another number of groups (1x has no group of its
    own). ``run_method`` refuses it earlier, by the fingerprint."""
    config = smoke(tasks=TASKS)
    spec = method_spec(method, config)
    tasks = build_run_tasks(config, build_data(config)[1].num_classes)

    def trainer(multiple):
        return build_trainer(config, tasks, None, build_stages(config), spec.learner, spec.architecture,
                             {**spec.arch_args, option: multiple})

    trainer(saved).save(tmp_path / "checkpoint.pt")
    trainer(saved).load(tmp_path / "checkpoint.pt")
    for other in (saved * 10, 1.0):
        with pytest.raises(CheckpointError) as info:
            trainer(other).load(tmp_path / "checkpoint.pt")
        message = str(info.value)
        assert len(message.splitlines()) == 1 and f"parameter groups at {saved:g}x the learning rate, not" in message


def test_a_checkpoint_of_another_learning_rate_schedule_is_refused_in_one_line(smoke, tmp_path):
    """A trainer refuses a checkpoint written under another scheduler, or none: torch's ``load_state_dict`` of a
    MultiStepLR took the saved milestones over the new ones, and a checkpoint written without a scheduler (``{}``)
    left a new one at epoch 0 after the epochs already done, so the rate decayed late. ``run_method`` refuses these
    earlier, by the fingerprint; a LibMTL script's Trainer on its save_path met them."""
    config = smoke(tasks=TASKS)
    tasks = build_run_tasks(config, build_data(config)[1].num_classes)

    def trainer(steps):
        built = build_trainer(config, tasks, None, build_stages(config))
        if steps is None:
            built.scheduler = None
        else:
            built.scheduler = torch.optim.lr_scheduler.MultiStepLR(built.optimizer, steps)
        return built

    for saved, other, words in (([2], [1], "MultiStepLR(gamma=0.1, milestones=[2]) learning-rate scheduler, not"),
                                (None, [2], "no learning-rate scheduler, not"),
                                ([2], None, "milestones=[2]) learning-rate scheduler, not")):
        trainer(saved).save(tmp_path / "checkpoint.pt")
        trainer(saved).load(tmp_path / "checkpoint.pt")
        with pytest.raises(CheckpointError) as info:
            trainer(other).load(tmp_path / "checkpoint.pt")
        message = str(info.value)
        assert len(message.splitlines()) == 1 and words in message


@pytest.mark.parametrize("option", ["fused", "channels_last"])
@pytest.mark.parametrize("before", [False, True], ids=["turned-on", "turned-off"])
def test_execution_options_may_change_on_resume(smoke, tmp_path, trainers, monkeypatch, option, before):
    """``--fused`` and ``--channels-last`` are not part of the fingerprint: a run interrupted after its first
    structural phase continues with the option turned on or off, and runs as now asked (float rounding differs, so
    the result is not compared bit for bit)."""
    config = smoke(tasks=TASKS)
    out = tmp_path / "run"
    run(config.replace(**{option: before}), "mtsl", out, trainers, stop_after=7)
    fingerprint = json.loads((out / "config.json").read_text())["fingerprint"]
    fused_calls = []
    run_fused = BranchedNetwork.run_fused
    monkeypatch.setattr(BranchedNetwork, "run_fused", lambda *a, **k: fused_calls.append(1) or run_fused(*a, **k))
    result = run(config.replace(**{option: not before}), "mtsl", out, trainers, resume=True)
    assert result["fingerprint"] == fingerprint and len(result["history"]) == config.mtsl.total_epochs
    if option == "fused":
        assert bool(fused_calls) is not before
    else:
        convs = [p for p in trainers[-1].model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) is not before for p in convs)
