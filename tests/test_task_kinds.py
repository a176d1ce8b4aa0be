"""Declared tasks: the built-in kinds' losses and metrics by hand, declarations refused with the culprit named,
task kinds from a plugin."""
import math
import pickle
from functools import partial

import pytest
import torch
from torchmetrics import Metric

from mtsl_plugin.plugins import PluginContractError, hookimpl, plugin_manager, reset_plugin_manager
from mtsl_plugin.task_kinds import RegressionError, build_task_set, declare_task
from mtsl_plugin.tasks import TASKS, Task, build_tasks


def test_regression_loss_and_rmse_skip_non_finite_targets_and_keep_gradients_finite():
    task = declare_task("flow", {"kind": "regression", "channels": 2})
    target = torch.tensor([1.0, float("nan"), 3.0, float("inf")]).view(1, 2, 1, 2)
    pred = torch.tensor([2.0, 5.0, 1.0, 0.0]).view(1, 2, 1, 2).requires_grad_()
    loss = task.loss(pred, target)
    assert loss.item() == pytest.approx((1 + 2) / 2)  # L1 over the two finite values
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.view(-1)[1] == 0 and pred.grad.view(-1)[3] == 0
    metric = task.make_metric()
    metric.update(task.postprocess(pred.detach()), target)
    metric.update(torch.zeros(1, 2, 1, 2), torch.full((1, 2, 1, 2), 2.0))  # a second batch: pixel-weighted
    assert metric.compute().item() == pytest.approx(math.sqrt((1 + 4 + 4 * 4) / 6))
    assert (task.metric_name, task.higher_is_better, task.target, task.out_channels) == ("RMSE", False, "dense", 2)


def test_regression_options_mae_mse_and_the_positive_rule():
    pred, target = torch.tensor([1.0, 1.0, 4.0]).view(1, 1, 1, 3), torch.tensor([0.0, 3.0, 2.0]).view(1, 1, 1, 3)
    for metric, expected in (("mae", 2.0), ("mse", 4.0), ("rmse", 2.0)):
        task = declare_task("d", {"kind": "regression", "metric": metric, "valid": "positive", "loss": "mse"})
        assert task.loss(pred, target).item() == pytest.approx(4.0)  # 0 is no value under "positive"
        m = task.make_metric()
        m.update(pred, target)
        assert m.compute().item() == pytest.approx(expected)


def test_segmentation_accuracy_and_miou_ignore_minus_one():
    logits = torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [0, 9.0, 0], [0, 0, 9.0]]).T.reshape(1, 3, 1, 4)
    target = torch.tensor([0, 1, 2, -1]).view(1, 1, 4)
    accuracy = declare_task("parts", {"kind": "segmentation", "classes": 3, "metric": "accuracy"})
    m = accuracy.make_metric()
    m.update(accuracy.postprocess(logits), target)
    assert m.compute().item() == pytest.approx(2 / 3)
    miou = declare_task("parts", {"kind": "segmentation", "classes": 3})
    m = miou.make_metric()
    m.update(logits, target)
    assert m.compute().item() == pytest.approx((1 + 0.5 + 0) / 3)  # class 2: predicted nowhere, 1 pixel missed
    assert miou.target == "labels" and miou.higher_is_better


def test_binary_iou_by_hand_and_direction_override():
    task = declare_task("mask", {"kind": "binary", "metric": "iou", "loss": "bce"})
    logits = torch.tensor([3.0, 3.0, -3.0, -3.0]).view(1, 1, 1, 4)
    target = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 1, 4)
    m = task.make_metric()
    m.update(logits, target)
    assert m.compute().item() == pytest.approx(1 / 3)
    assert task.loss(logits, target).item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(logits, target).item())
    assert task.higher_is_better and task.metric_name == "IoU"
    flipped = declare_task("mask", {"kind": "binary", "metric": "iou", "higher_is_better": False})
    assert not flipped.higher_is_better


@pytest.mark.parametrize("declaration, label, higher", [
    ({"kind": "segmentation", "classes": 3}, "mIoU", True),
    ({"kind": "segmentation", "classes": 3, "metric": "accuracy"}, "acc", True),
    ({"kind": "regression"}, "RMSE", False),
    ({"kind": "regression", "metric": "mae"}, "MAE", False),
    ({"kind": "regression", "metric": "mse"}, "MSE", False),
    ({"kind": "binary"}, "BCE", False),
    ({"kind": "binary", "metric": "iou"}, "IoU", True),
    ({"kind": "normals"}, "cos", True),
    ({"kind": "reconstruction"}, "MSE", False),
])
def test_every_built_in_metric_has_its_documented_direction(declaration, label, higher):
    """The direction Δ_MTL signs each task's change with: ↑ for mIoU, accuracy, IoU and cosine, ↓ for the errors
    (the module's table)."""
    task = declare_task("t", declaration)
    assert (task.metric_name, task.higher_is_better) == (label, higher)


@pytest.mark.parametrize("declaration, culprit", [
    ({"kind": "regression", "chanels": 2}, "chanels"),
    ({"kind": "segmentation"}, "classes"),
    ({"kind": "segmentation", "clases": 3}, "unknown option 'clases' (did you mean 'classes'?)"),  # not "missing"
    ({"kind": "segmentation", "classes": 1}, "classes"),
    ({"kind": "regression", "loss": "huber"}, "huber"),
    ({"kind": "regression", "valid": "nonzero"}, "nonzero"),
    ({"kind": "no_such_kind"}, "no_such_kind"),
    ({"channels": 2}, "kind"),
    ("regression", "mapping"),
    ({"kind": "regression", "higher_is_better": "false"}, "higher_is_better"),  # bool("false") is True
    ({"kind": "binary", "higher_is_better": 1}, "higher_is_better"),
])
def test_a_bad_declaration_names_the_task_and_the_culprit(declaration, culprit):
    with pytest.raises(ValueError) as caught:
        declare_task("flow", declaration)
    assert "'flow'" in str(caught.value) and culprit in str(caught.value)


def test_build_task_set_mixes_declared_and_built_in_tasks_in_order():
    tasks = build_task_set(("flow", "S", "E"), {"flow": {"kind": "regression", "channels": 2}}, num_classes=5)
    assert list(tasks) == ["flow", "S", "E"] and tasks["S"].out_channels == 5 and tasks["E"].target == "binary"
    with pytest.raises(ValueError, match="'heat' is neither declared"):
        build_task_set(("heat",), {}, num_classes=5)
    with pytest.raises(ValueError, match="declare it"):
        build_task_set(("S",), {}, num_classes=0)  # folder data: S's classes are unknown



def test_a_declared_task_with_a_built_in_letter_gets_the_plain_head_on_the_authors_network():
    """On the authors' network a built-in task's head takes its own form (D: a ReLU output); a task the user
    declares under a built-in letter (D as a regression of their own) keeps the plain head, as every run's
    network builds it."""
    from conftest import smoke_config
    from mtsl_plugin.experiment import build_stages, run_heads

    config = smoke_config(tasks=("S", "D")).replace(network="authors",
                                                    task_specs={"D": {"kind": "regression", "channels": 1}})
    stages = build_stages(config)
    heads = run_heads(config, build_task_set(config.tasks, config.task_specs, num_classes=13), stages)
    assert repr(heads["D"]) == repr(stages.build_head(1)) != repr(stages.build_head(1, task="D"))
    assert repr(heads["S"]) == repr(stages.build_head(13, task="S"))

def test_declared_tasks_pickle_and_keep_their_behaviour():
    task = declare_task("flow", {"kind": "regression", "channels": 2, "metric": "mae"})
    again = pickle.loads(pickle.dumps(task))
    pred, target = torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 3)
    assert again.loss(pred, target).item() == task.loss(pred, target).item()


class _KindPlugin:
    """A plugin with one good kind and one that breaks the contract."""

    @hookimpl
    def mtsl_task_kinds(self):
        def halves(name, *, scale=1.0):
            base = declare_task(name, {"kind": "regression"})
            return Task(name, "halves", 1, "RMSE", False, base.loss_fn, base.metric_factory, target="dense")

        return {"halves": halves, "broken": lambda name: "not a task"}


def test_a_task_kind_from_a_plugin_is_declared_like_a_built_in_one():
    plugin_manager().register(_KindPlugin())
    try:
        assert declare_task("h", {"kind": "halves", "scale": 2.0, "folder": "hh"}).title == "halves"
        with pytest.raises(PluginContractError, match="broken"):
            declare_task("h", {"kind": "broken"})
        with pytest.raises(ValueError, match="'h' of kind 'halves'.*size"):
            declare_task("h", {"kind": "halves", "size": 2})
    finally:
        reset_plugin_manager()


# ------------------------------------------------------------------------------ plugin kinds checked when declared
def _l1(pred, target):
    return (pred - target).abs().mean()


def _per_pixel_l1(pred, target):
    return (pred - target).abs()  # not reduced: (N, C, H, W)


def _detached_l1(pred, target):
    return (pred.detach() - target).abs().mean()


def _not_a_metric():
    return "not a metric"


def _a_module():
    return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())


class _FailingMetric(Metric):
    def __init__(self):
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, pred, target):
        raise RuntimeError("update needs a mask")

    def compute(self):
        return self.total


def _mae():
    return RegressionError(1, False)


def _plugin_task(name, *, channels=1, higher_is_better=False, loss=_l1, metric=_mae, target="dense"):
    return Task(name, "plugin task", channels, "MAE", higher_is_better, loss, metric, target=target)


class _CheckedKinds:
    """Kinds of a plugin that each break one rule a Task of a target layout must keep."""

    @hookimpl
    def mtsl_task_kinds(self):
        return {
            "strdir": partial(_plugin_task, higher_is_better="false"),  # bool("false") is True: Δ_MTL flips
            "gray": partial(_plugin_task, target="image"),  # 1 channel against the 3-channel image
            "mask3": partial(_plugin_task, channels=3, target="binary"),
            "vecloss": partial(_plugin_task, loss=_per_pixel_l1),
            "nograd": partial(_plugin_task, loss=_detached_l1),
            "badmetric": partial(_plugin_task, metric=_not_a_metric),
            "modulemetric": partial(_plugin_task, metric=_a_module),  # not a Metric, and its repr spans lines
            "failingmetric": partial(_plugin_task, metric=_FailingMetric),
            "raising": _raising_kind,
            "renamed": _renamed_kind,
            "good": partial(_plugin_task, channels=2),
        }


def _raising_kind(name, *, size=1):
    raise TypeError(f"size must be str, got {size}")


def _renamed_kind(name):
    return _plugin_task(f"{name}_2")  # a task under another name than the one declared


@pytest.fixture
def checked_kinds():
    reset_plugin_manager()
    plugin_manager().register(_CheckedKinds(), name="kinds_plugin")
    yield
    reset_plugin_manager()


@pytest.mark.parametrize("kind, culprit", [
    ("strdir", "higher_is_better must be True or False, got 'false'"),
    ("gray", "an image target has 3 channels, but the task has 1 output channel"),
    ("mask3", "a binary target has 1 channel, but the task has 3 output channels"),
])
def test_a_plugin_task_breaking_its_layout_or_direction_is_refused_naming_task_kind_and_plugin(
        checked_kinds, kind, culprit):
    with pytest.raises(ValueError) as caught:
        declare_task("heat", {"kind": kind})
    message = str(caught.value)
    assert "'heat'" in message and culprit in message and f"'{kind}'" in message and "'kinds_plugin'" in message
    assert "\n" not in message


@pytest.mark.parametrize("kind, culprit", [
    ("vecloss", r"loss .* returned a tensor of shape \(2, 1, 4, 4\).*expected a finite 0-d float tensor"),
    ("nograd", "loss .* has no gradient"),
    ("badmetric", "metric_factory returned 'not a metric', expected a torchmetrics Metric"),
    ("modulemetric", r"metric_factory returned Sequential\( \(0\): Linear.*\), expected a torchmetrics Metric"),
    ("failingmetric", "metric .* raised RuntimeError: update needs a mask"),
    ("raising", "raised TypeError: size must be str, got 1"),
    ("renamed", r"returned Task\(name='heat_2'.*expected a mtsl_plugin.tasks.Task named 'heat'"),
])
def test_a_plugin_task_whose_loss_or_metric_fails_is_refused_when_declared(checked_kinds, kind, culprit):
    with pytest.raises(PluginContractError, match=culprit) as caught:
        build_task_set(("parts", "heat"), {"parts": {"kind": "segmentation", "classes": 3},
                                           "heat": {"kind": kind}}, num_classes=0)
    message = str(caught.value)
    assert "'heat'" in message and f"'{kind}'" in message and "'kinds_plugin'" in message and "\n" not in message


def test_a_good_plugin_task_and_every_built_in_option_pass_the_declaration_checks(checked_kinds):
    state = torch.random.get_rng_state()
    assert declare_task("heat", {"kind": "good"}).out_channels == 2
    with torch.no_grad():
        declare_task("heat", {"kind": "good"})  # the probe makes its own graph
    with torch.inference_mode():
        declare_task("heat", {"kind": "good"})
    declarations = [{"kind": "segmentation", "classes": 3, "metric": metric} for metric in ("miou", "accuracy")]
    declarations += [{"kind": "regression", "channels": 2, "loss": loss, "metric": metric, "valid": valid}
                     for loss in ("l1", "mse") for metric in ("rmse", "mae", "mse") for valid in ("finite", "positive")]
    declarations += [{"kind": "binary", "loss": loss, "metric": metric}
                     for loss in ("balanced_bce", "bce") for metric in ("bce", "iou")]
    declarations += [{"kind": "normals"}, {"kind": "reconstruction"}]
    for declaration in declarations:
        declare_task("t", declaration)
    assert torch.equal(torch.random.get_rng_state(), state)  # the checks draw from their own generator


def test_the_five_built_in_tasks_under_both_loss_sets_pass_the_task_probe():
    from mtsl_plugin.task_kinds import probe_task

    for losses in ("standard", "authors"):
        for task in build_tasks(TASKS, num_classes=4, losses=losses).values():
            probe_task(task)


def test_reconstruction_mse_is_the_mean_squared_error_not_its_root():
    task = declare_task("img", {"kind": "reconstruction"})
    metric = task.make_metric()
    metric.update(torch.full((1, 3, 2, 2), 3.0), torch.ones(1, 3, 2, 2))
    assert (task.metric_name, task.higher_is_better, metric.compute().item()) == ("MSE", False, pytest.approx(4.0))


def test_the_libmtl_metric_reads_the_postprocessed_prediction_of_any_task():
    """A task's ``postprocess_fn`` maps the raw head output to what its metric reads, in every run's evaluation
    (the LibMTL task dict's metric), not only for the built-in normals, whose cosine metric ignores the scale."""
    from mtsl_plugin.tasks import libmtl_task_dict

    task = Task("p", "probability", 1, "MAE", False, _l1, _mae, postprocess_fn=torch.sigmoid)
    metrics = libmtl_task_dict({"p": task})["p"]["metrics_fn"]
    metrics.update_fun(torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 0.5))  # sigmoid(0) = 0.5: no error
    assert metrics.score_fun() == [pytest.approx(0.0)]
