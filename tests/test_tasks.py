"""The five dense tasks: losses, metrics, directions and the LibMTL adapters."""
from __future__ import annotations

import math
import pickle
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from mtsl_plugin.metrics import MaskedRMSE, MeanBCE, MeanCosine
from mtsl_plugin.tasks import TASKS, Task, build_tasks, libmtl_task_dict

N, H, W = 2, 4, 5


@pytest.fixture(scope="module")
def tasks():
    return build_tasks(TASKS, num_classes=4)


def _one_hot_logits(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits (N, C, H, W) whose argmax is ``classes`` (N, H, W)."""
    return F.one_hot(classes.clamp_min(0), num_classes).permute(0, 3, 1, 2).float() * 10.0


def _random_batch(num_classes: int = 4, seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(N, 3, H, W, generator=g)
    normals = F.normalize(torch.randn(N, 3, H, W, generator=g), dim=1)
    targets = {
        "S": torch.randint(-1, num_classes, (N, H, W), generator=g),
        "D": torch.rand(N, 1, H, W, generator=g) * 5 * (torch.rand(N, 1, H, W, generator=g) > 0.3),
        "E": (torch.rand(N, 1, H, W, generator=g) > 0.8).float(),
        "N": normals * (torch.rand(N, 1, H, W, generator=g) > 0.3),
        "A": image,
    }
    preds = {
        "S": torch.randn(N, num_classes, H, W, generator=g),
        "D": torch.rand(N, 1, H, W, generator=g) * 5,
        "E": torch.randn(N, 1, H, W, generator=g),
        "N": torch.randn(N, 3, H, W, generator=g),
        "A": torch.rand(N, 3, H, W, generator=g),
    }
    return preds, targets


# ------------------------------------------------------------------------------------------ building
def test_build_tasks_keeps_order_and_describes_each_task(tasks):
    assert list(build_tasks(["N", "S"], num_classes=3)) == ["N", "S"]
    assert {t: (tasks[t].out_channels, tasks[t].metric_name, tasks[t].higher_is_better) for t in TASKS} == {
        "S": (4, "mIoU", True), "D": (1, "RMSE", False), "E": (1, "BCE", False),
        "N": (3, "cos", True), "A": (3, "MSE", False),
    }
    assert tasks["S"].title == "semantic segmentation"


def test_build_tasks_rejects_unknown_duplicate_and_too_few_classes():
    with pytest.raises(ValueError, match=r"'X'.*\['S', 'D', 'E', 'N', 'A'\]"):
        build_tasks(["S", "X"], num_classes=3)
    with pytest.raises(ValueError, match="'D' is requested twice"):
        build_tasks(["D", "D"], num_classes=3)
    with pytest.raises(ValueError, match="num_classes >= 2"):
        build_tasks(["S"], num_classes=1)
    assert list(build_tasks(["D"], num_classes=0)) == ["D"]  # num_classes only matters for S


def test_loss_rejects_wrong_shapes_naming_the_task(tasks):
    with pytest.raises(ValueError, match="task N expects predictions"):
        tasks["N"].loss(torch.zeros(N, 1, H, W), torch.zeros(N, 3, H, W))
    with pytest.raises(ValueError, match="task D got prediction"):
        tasks["D"].loss(torch.zeros(N, 1, H, W), torch.zeros(N, 1, H, W + 1))


def test_every_loss_is_differentiable_and_finite(tasks):
    preds, targets = _random_batch()
    for name, task in tasks.items():
        pred = preds[name].clone().requires_grad_(True)
        loss = task.loss(pred, targets[name])
        assert loss.dim() == 0 and torch.isfinite(loss), name
        loss.backward()
        assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0, name


@pytest.mark.parametrize("name, target", [
    ("S", torch.full((N, H, W), -1)),
    ("D", torch.zeros(N, 1, H, W)),
    ("N", torch.zeros(N, 3, H, W)),
])
def test_loss_without_valid_pixels_is_zero_with_a_graph(tasks, name, target):
    pred = torch.randn(N, tasks[name].out_channels, H, W, requires_grad=True)
    loss = tasks[name].loss(pred, target)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(pred.grad == 0)


# ------------------------------------------------------------------------------------------ S
def test_segmentation_miou_perfect_and_hand_example(tasks):
    target = torch.tensor([[[0, 1], [1, -1]]])
    metric = tasks["S"].make_metric()
    metric.update(_one_hot_logits(target, 4), target)
    assert metric.compute().item() == pytest.approx(1.0)

    # pred [[0, 0], [1, 2]]: class 0 IoU 1/2, class 1 IoU 1/2; the 2 falls on an ignored pixel, and classes 2, 3
    # appear in neither prediction nor target, so they are left out of the mean (not counted as 0 or 1).
    metric = tasks["S"].make_metric()
    metric.update(_one_hot_logits(torch.tensor([[[0, 0], [1, 2]]]), 4), target)
    assert metric.compute().item() == pytest.approx(0.5)


def test_segmentation_miou_counts_a_predicted_class_missing_from_the_target(tasks):
    target = torch.tensor([[[0, 0], [0, 0]]])
    metric = tasks["S"].make_metric()
    metric.update(_one_hot_logits(torch.tensor([[[0, 0], [0, 3]]]), 4), target)
    assert metric.compute().item() == pytest.approx((3 / 4 + 0.0) / 2)


def test_segmentation_loss_is_cross_entropy_over_labelled_pixels(tasks):
    preds, targets = _random_batch()
    valid = targets["S"] != -1
    expected = F.cross_entropy(preds["S"].permute(0, 2, 3, 1)[valid], targets["S"][valid])
    assert tasks["S"].loss(preds["S"], targets["S"]).item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------ D
def test_depth_rmse_ignores_invalid_pixels_and_accumulates_exactly(tasks):
    metric = tasks["D"].make_metric()
    target1 = torch.tensor([2.0, 0.0, 1.0]).view(1, 1, 1, 3)
    pred1 = torch.tensor([3.0, 100.0, 1.0]).view(1, 1, 1, 3)  # errors 1, (invalid), 0
    target2 = torch.tensor([4.0, 4.0]).view(1, 1, 1, 2)
    pred2 = torch.tensor([1.0, 7.0]).view(1, 1, 1, 2)  # errors 3, 3
    metric.update(pred1, target1)
    metric.update(pred2, target2)
    exact = math.sqrt((1 + 0 + 9 + 9) / 4)
    mean_of_batches = (math.sqrt(1 / 2) + 3) / 2
    assert metric.compute().item() == pytest.approx(exact)
    assert abs(exact - mean_of_batches) > 0.1  # the two readings differ, so the test can tell them apart
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(metric.compute().item())  # no valid pixel seen: undefined, not 0


def test_depth_rmse_weighs_batches_by_their_valid_pixels(tasks):
    """The data set's RMSE weighs each batch by its valid pixels: not a mean of batch MSEs (nor of batch RMSEs)."""
    metric = tasks["D"].make_metric()
    metric.update(torch.tensor([3.0, 0.5, 9.0]).view(1, 1, 1, 3), torch.tensor([2.0, 0.5, 0.0]).view(1, 1, 1, 3))
    metric.update(torch.tensor([5.0]).view(1, 1, 1, 1), torch.tensor([2.0]).view(1, 1, 1, 1))  # errors 1, 0 | 3
    exact = math.sqrt((1 + 0 + 9) / 3)
    mean_of_batch_mse = math.sqrt((1 / 2 + 9) / 2)
    assert metric.compute().item() == pytest.approx(exact)
    assert abs(exact - mean_of_batch_mse) > 0.1


def test_depth_and_normal_metrics_skip_non_finite_targets(tasks):
    """D's valid rule is ``positive`` (finite and > 0) and a normal with a non-finite component holds no value: a
    target an own loader hands over with inf there (e.g. through the LibMTL Trainer) must not make the data set's
    RMSE inf or its mean cosine NaN."""
    depth = tasks["D"].make_metric()
    target = torch.tensor([2.0, math.inf, 0.0, 1.0, math.nan]).view(1, 1, 1, 5)
    pred = torch.tensor([2.5, 3.0, 9.0, 1.0, 4.0]).view(1, 1, 1, 5)  # errors 0.5, (inf), (0), 0, (NaN)
    depth.update(pred, target)
    assert depth.compute().item() == pytest.approx(math.sqrt(0.25 / 2))

    cosine = tasks["N"].make_metric()
    target = torch.tensor([[0.0, 0.0, 1.0], [math.inf, 0.0, 0.0], [0.0, math.nan, 1.0], [0.0, 0.0, 0.0]])
    target = target.T.reshape(1, 3, 1, 4)
    pred = torch.tensor([[0.0, 0.0, 2.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 4)
    cosine.update(tasks["N"].postprocess(pred), target)
    assert cosine.compute().item() == pytest.approx(1.0)  # only the first pixel holds a normal


@pytest.mark.parametrize("losses", ["standard", "authors"])
def test_depth_and_normal_losses_skip_non_finite_targets(losses):
    """The losses use the metrics' rules (D: finite and > 0; N: every component finite, not all zero): an inf depth
    or a NaN normal component from an own loader gives neither an inf loss nor a NaN gradient."""
    tasks = build_tasks(("D", "N"), num_classes=4, losses=losses)
    depth_pred = torch.tensor([2.5, 3.0, 9.0, 1.0]).view(1, 1, 1, 4).requires_grad_()
    depth_target = torch.tensor([2.0, math.inf, 0.0, 1.0]).view(1, 1, 1, 4)
    normal_pred = torch.tensor([[0.0, 0.0, 2.0], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 2).requires_grad_()
    normal_target = torch.tensor([[0.0, 0.0, 1.0], [0.0, math.nan, 1.0]]).T.reshape(1, 3, 1, 2)
    depth = tasks["D"].loss(depth_pred, depth_target)
    normal = tasks["N"].loss(normal_pred, normal_target)
    (depth + normal).backward()
    assert torch.isfinite(depth) and torch.isfinite(normal)
    assert torch.isfinite(depth_pred.grad).all() and torch.isfinite(normal_pred.grad).all()
    assert depth_pred.grad.flatten()[1:3].eq(0).all() and normal_pred.grad[..., 1].eq(0).all()  # ignored pixels


def test_depth_loss_is_l1_over_valid_pixels(tasks):
    target = torch.tensor([2.0, 0.0, 1.0, 3.0]).view(1, 1, 2, 2)
    pred = torch.tensor([3.0, 50.0, 1.5, 3.0]).view(1, 1, 2, 2)
    assert tasks["D"].loss(pred, target).item() == pytest.approx((1.0 + 0.5 + 0.0) / 3)


# ------------------------------------------------------------------------------------------ E
def test_edge_loss_balances_positives_by_the_negative_fraction(tasks):
    target = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 2, 2)
    logits = torch.tensor([0.3, -1.0, 2.0, 0.5]).view(1, 1, 2, 2)
    log_p, log_not_p = F.logsigmoid(logits).flatten(), F.logsigmoid(-logits).flatten()
    expected = -(0.75 * log_p[0] + 0.25 * (log_not_p[1] + log_not_p[2] + log_not_p[3])) / 4
    assert tasks["E"].loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    # a batch of one class only gets weight 0 (HED): finite zero, not NaN
    assert tasks["E"].loss(logits, torch.zeros_like(target)).item() == 0.0


def test_edge_metric_is_plain_bce_over_all_pixels_of_all_batches(tasks):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(b, 1, 3, 3, generator=g), (torch.rand(b, 1, 3, 3, generator=g) > 0.7).float())
               for b in (1, 3)]
    metric = tasks["E"].make_metric()
    for pred, target in batches:
        metric.update(pred, target)
    expected = F.binary_cross_entropy_with_logits(torch.cat([p for p, _ in batches]),
                                                  torch.cat([t for _, t in batches]))
    assert metric.compute().item() == pytest.approx(expected.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------ N
def test_normal_metric_perfect_opposite_and_invalid(tasks):
    task = tasks["N"]
    target = F.normalize(torch.randn(N, 3, H, W), dim=1)
    target[:, :, 0, 0] = 0.0  # invalid pixel
    pred = target * 7.0
    pred[:, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0]).view(1, 3)  # would be wrong if it counted
    metric = task.make_metric()
    metric.update(task.postprocess(pred), target)
    assert metric.compute().item() == pytest.approx(1.0)
    assert task.loss(pred, target).item() == pytest.approx(0.0, abs=1e-6)

    metric = task.make_metric()
    metric.update(task.postprocess(-pred), target)
    metric.update(task.postprocess(pred[:1]), target[:1])  # pixel-weighted: 2 images at -1, 1 image at +1
    assert metric.compute().item() == pytest.approx(-1 / 3)


def test_normal_postprocess_gives_unit_vectors(tasks):
    out = tasks["N"].postprocess(torch.randn(N, 3, H, W) * 5)
    assert torch.allclose(out.norm(dim=1), torch.ones(N, H, W), atol=1e-6)


# ------------------------------------------------------------------------------------------ A
def test_reconstruction_metric_is_pixel_weighted_mse(tasks):
    metric = tasks["A"].make_metric()
    a_pred, a_tgt = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)  # squared error 1 everywhere
    b_pred, b_tgt = torch.zeros(3, 3, 2, 2), torch.zeros(3, 3, 2, 2)  # 0 everywhere, three times as many
    metric.update(a_pred, a_tgt)
    metric.update(b_pred, b_tgt)
    assert metric.compute().item() == pytest.approx(0.25)
    assert tasks["A"].loss(a_pred, a_tgt).item() == pytest.approx(1.0)


def test_reconstruction_metric_accumulates_in_float64_as_the_other_metrics(tasks):
    """A's MSE sums in float64 like D's, E's and N's (and the declared reconstruction kind's, the same metric):
    in float32 the second batch's squared errors, 2^-30 each, would vanish beside the first's sum of 3."""
    metric = tasks["A"].make_metric()
    metric.update(torch.ones(1, 3, 1, 1), torch.zeros(1, 3, 1, 1))
    metric.update(torch.full((1, 3, 1, 1), 2.0 ** -15), torch.zeros(1, 3, 1, 1))
    assert metric.compute().item() == (3 + 3 * 2.0 ** -30) / 6


# ------------------------------------------------------------------------------------------ LibMTL
def test_libmtl_task_dict_wraps_losses_and_metrics(tasks):
    from mtsl_plugin.libmtl_compat import import_libmtl

    libmtl = import_libmtl()
    task_dict = libmtl_task_dict(tasks)
    assert list(task_dict) == list(TASKS)
    assert task_dict["S"]["metrics"] == ["mIoU"] and task_dict["S"]["weight"] == [1]
    assert task_dict["D"]["metrics"] == ["RMSE"] and task_dict["D"]["weight"] == [0]
    for name, entry in task_dict.items():
        assert isinstance(entry["loss_fn"], libmtl.loss.AbsLoss), name
        assert isinstance(entry["metrics_fn"], libmtl.metrics.AbsMetric), name

    preds, targets = _random_batch()
    for name, entry in task_dict.items():
        loss = entry["loss_fn"]._update_loss(preds[name], targets[name])
        assert loss.item() == pytest.approx(tasks[name].loss(preds[name], targets[name]).item())
        assert entry["loss_fn"]._average_loss() == pytest.approx(loss.item())

        direct = tasks[name].make_metric()
        for seed in (0, 1):
            p, t = _random_batch(seed=seed)
            entry["metrics_fn"].update_fun(p[name], t[name])
            direct.update(tasks[name].postprocess(p[name]), t[name])
        score = entry["metrics_fn"].score_fun()
        assert isinstance(score, list) and len(score) == 1 and isinstance(score[0], float)
        assert score[0] == pytest.approx(direct.compute().item(), rel=1e-6), name

        entry["metrics_fn"].reinit()
        entry["metrics_fn"].update_fun(preds[name], targets[name])
        fresh = tasks[name].make_metric()
        fresh.update(tasks[name].postprocess(preds[name]), targets[name])
        assert entry["metrics_fn"].score_fun()[0] == pytest.approx(fresh.compute().item(), rel=1e-6), name


def test_tasks_and_libmtl_entries_survive_pickling(tasks):
    task_dict = pickle.loads(pickle.dumps(libmtl_task_dict(tasks)))
    preds, targets = _random_batch()
    restored = pickle.loads(pickle.dumps(tasks))
    for name in TASKS:
        expected = tasks[name].loss(preds[name], targets[name]).item()
        assert restored[name].loss(preds[name], targets[name]).item() == pytest.approx(expected)
        assert task_dict[name]["loss_fn"].compute_loss(preds[name], targets[name]).item() == pytest.approx(expected)


# ------------------------------------------------------------------------------------------ the authors' losses
def test_authors_losses_replace_only_the_losses():
    standard, authors = build_tasks(TASKS, num_classes=4), build_tasks(TASKS, num_classes=4, losses="authors")
    preds, targets = _random_batch()
    for t in TASKS:
        assert authors[t].loss_fn is not standard[t].loss_fn
        assert authors[t].postprocess_fn is standard[t].postprocess_fn
        assert repr(authors[t].make_metric()) == repr(standard[t].make_metric())
        assert torch.isfinite(authors[t].loss(preds[t], targets[t]))
    pickle.loads(pickle.dumps(authors))  # runs save and reload their tasks with the checkpoint
    with pytest.raises(ValueError, match="unknown loss set 'mine'; choose one of standard, authors"):
        build_tasks(TASKS, num_classes=4, losses="mine")


def test_class_balanced_segmentation_loss_weights_classes_by_their_effective_number():
    tasks = build_tasks(["S"], num_classes=4, losses="authors")
    preds, targets = _random_batch()
    pred, target = preds["S"], targets["S"]
    target[0, 0, :] = 3  # class 3: 5 pixels at least; make class 2 absent
    target[target == 2] = -1
    beta = 1 - 1e-3
    num, den = 0.0, 0.0
    for n, i, j in zip(*torch.nonzero(target >= 0, as_tuple=True)):
        c = int(target[n, i, j])
        weight = (1 - beta) / (1 - beta ** int((target == c).sum()))
        num += weight * -F.log_softmax(pred[n, :, i, j], dim=0)[c]
        den += weight
    assert float(tasks["S"].loss(pred, target)) == pytest.approx(float(num / den), rel=1e-6)
    uniform = torch.arange(4).repeat(4).view(2, 4, 2)  # every class 4 pixels
    logits = torch.randn(2, 4, 4, 2)
    assert float(tasks["S"].loss(logits, uniform)) == pytest.approx(float(F.cross_entropy(logits, uniform)), rel=1e-6)


def test_authors_depth_edge_normal_and_reconstruction_losses_by_hand():
    tasks = build_tasks(TASKS, num_classes=4, losses="authors")
    preds, targets = _random_batch()
    valid = targets["D"] > 0
    rmse = ((preds["D"] - targets["D"])[valid] ** 2).mean().sqrt()
    assert float(tasks["D"].loss(preds["D"], targets["D"])) == pytest.approx(float(rmse), rel=1e-6)
    edge = targets["E"]
    bce = F.binary_cross_entropy_with_logits(preds["E"], edge, reduction="none")
    assert float(tasks["E"].loss(preds["E"], edge)) == pytest.approx(
        float((bce * (0.95 * edge + 0.05 * (1 - edge))).mean()), rel=1e-6)
    has_normal = targets["N"].abs().sum(dim=1) > 0
    unit = F.normalize(preds["N"], dim=1)
    l1 = (unit - targets["N"]).abs().permute(0, 2, 3, 1)[has_normal].mean()
    assert float(tasks["N"].loss(preds["N"], targets["N"])) == pytest.approx(float(l1), rel=1e-6)
    assert float(tasks["N"].loss(7 * preds["N"], targets["N"])) == pytest.approx(float(l1), rel=1e-6)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    normalised = F.mse_loss((preds["A"] - mean) / std, (targets["A"] - mean) / std)
    assert float(tasks["A"].loss(preds["A"], targets["A"])) == pytest.approx(float(normalised), rel=1e-5)


def test_authors_depth_loss_without_depth_is_zero_with_finite_gradients():
    tasks = build_tasks(["D"], num_classes=0, losses="authors")
    pred = torch.randn(N, 1, H, W, requires_grad=True)
    loss = tasks["D"].loss(pred, torch.zeros(N, 1, H, W))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred))


# ------------------------------------------------------------------------------------------ a Task's own rules
def _task(**changes):
    fields = dict(name="heat", title="heat", out_channels=1, metric_name="MAE", higher_is_better=False,
                  loss_fn=F.l1_loss, metric_factory=MaskedRMSE, target="dense")
    fields.update(changes)
    return Task(**fields)


@pytest.mark.parametrize("changes, culprit", [
    ({"higher_is_better": "false"}, "higher_is_better must be True or False, got 'false'"),  # bool("false") is True
    ({"higher_is_better": 1}, "higher_is_better must be True or False, got 1"),
    ({"higher_is_better": None}, "higher_is_better must be True or False, got None"),
    ({"out_channels": 1, "target": "image"}, "an image target has 3 channels, but the task has 1 output channel"),
    ({"out_channels": 3, "target": "binary"}, "a binary target has 1 channel, but the task has 3 output channels"),
    ({"out_channels": 2, "target": "normals"}, "a normals target has 3 channels, but the task has 2 output"),
    ({"out_channels": 1, "target": "labels"}, "a labels target needs at least 2 classes"),
    ({"out_channels": True}, "out_channels must be an int >= 1, got True"),
    ({"out_channels": 0}, "out_channels must be an int >= 1, got 0"),
    ({"metric_name": None}, "metric_name must be a str, got None"),
    ({"loss_fn": "l1"}, "loss_fn must be callable, got 'l1'"),
])
def test_a_task_breaking_its_direction_or_layout_is_refused_in_one_line_naming_it(changes, culprit):
    with pytest.raises(ValueError) as caught:
        _task(**changes)
    assert str(caught.value).startswith("task 'heat': ") and culprit in str(caught.value)
    assert "\n" not in str(caught.value)


def test_dense_tasks_take_any_channel_count_and_every_layout_its_own():
    assert _task(out_channels=5).out_channels == 5
    for target, channels in (("labels", 2), ("binary", 1), ("normals", 3), ("image", 3)):
        assert _task(target=target, out_channels=channels).target == target


@pytest.mark.parametrize("name, target", [
    ("D", torch.zeros(N, 3, H, W)),  # would broadcast against (N, 1, H, W)
    ("A", torch.zeros(N, 1, H, W)),
    ("E", torch.zeros(N, H, W)),
    ("S", torch.zeros(N, 1, H, W, dtype=torch.long)),
])
def test_loss_refuses_a_target_of_another_channel_count_naming_the_task_and_both_shapes(tasks, name, target):
    pred = torch.zeros(N, tasks[name].out_channels, H, W)
    with pytest.raises(ValueError) as caught:
        tasks[name].loss(pred, target)
    message = str(caught.value)
    assert f"task {name}" in message and str(tuple(pred.shape)) in message and str(tuple(target.shape)) in message


def test_loss_refuses_a_loss_that_is_not_reduced_to_a_scalar():
    task = _task(loss_fn=partial(F.l1_loss, reduction="none"))
    with pytest.raises(ValueError, match=r"task heat: its loss returned a tensor of shape \(2, 1, 4, 5\), "
                                         "expected a 0-d tensor"):
        task.loss(torch.zeros(N, 1, H, W), torch.zeros(N, 1, H, W))


def test_ratio_metrics_refuse_predictions_and_targets_of_other_shapes():
    for metric, pred, target in ((MaskedRMSE(), torch.ones(N, 1, H, W), torch.ones(N, 3, H, W)),
                                 (MeanCosine(), torch.ones(N, 3, H, W), torch.ones(N, 1, H, W)),
                                 (MeanBCE(), torch.ones(N, 1, H, W), torch.ones(N, H, W))):
        with pytest.raises(ValueError, match=r"different shapes") as caught:
            metric.update(pred, target)
        assert str(tuple(pred.shape)) in str(caught.value) and str(tuple(target.shape)) in str(caught.value)
