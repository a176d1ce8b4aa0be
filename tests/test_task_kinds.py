"""Declared tasks: the built-in kinds' losses and metrics by hand, declarations refused with the culprit named,
task kinds from a plugin."""
import math
import pickle

import pytest
import torch

from mtsl_plugin.plugins import PluginContractError, hookimpl, plugin_manager, reset_plugin_manager
from mtsl_plugin.task_kinds import build_task_set, declare_task
from mtsl_plugin.tasks import Task


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


@pytest.mark.parametrize("declaration, culprit", [
    ({"kind": "regression", "chanels": 2}, "chanels"),
    ({"kind": "segmentation"}, "classes"),
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
