"""Tests of the built-in amalgamators: attention-based amalgamation (``att``) and ``average``."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from mtsl_plugin.plugins import amalgamator
from mtsl_plugin.plugins.builtin_amalgamation import AttentionAmalgamation, average

CHANNELS = 8
TASKS = ["seg", "depth"]


def _setup(seed: int = 0):
    """A shared input, two frozen task nodes, and a group node initialised as their average."""
    torch.manual_seed(seed)
    inputs = torch.randn(4, 3, 6, 6)
    task_nodes = {task: nn.Conv2d(3, CHANNELS, 3, padding=1) for task in TASKS}
    group_node = nn.Conv2d(3, CHANNELS, 3, padding=1)
    with torch.no_grad():
        group_node.weight.copy_(sum(node.weight for node in task_nodes.values()) / len(TASKS))
        group_node.bias.copy_(sum(node.bias for node in task_nodes.values()) / len(TASKS))
    return inputs, task_nodes, group_node


def test_att_loss_is_finite_scalar_and_decreases_with_training() -> None:
    inputs, task_nodes, group_node = _setup()
    loss_module = amalgamator("att")(CHANNELS, TASKS)
    assert isinstance(loss_module, AttentionAmalgamation)
    targets = {task: node(inputs) for task, node in task_nodes.items()}
    optimizer = torch.optim.Adam([*group_node.parameters(), *loss_module.parameters()], lr=1e-2)
    losses = []
    for _ in range(50):
        loss = loss_module(group_node(inputs), targets)
        assert loss.dim() == 0 and torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]  # two different task nodes cannot both be matched exactly


def test_att_gradient_reaches_group_node_and_attention_but_not_task_nodes() -> None:
    inputs, task_nodes, group_node = _setup(1)
    loss_module = AttentionAmalgamation(CHANNELS, TASKS)
    task_outs = {task: node(inputs) for task, node in task_nodes.items()}
    loss_module(group_node(inputs), task_outs).backward()
    for parameter in [*group_node.parameters(), *loss_module.parameters()]:
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
        assert parameter.grad.abs().sum() > 0
    for node in task_nodes.values():
        assert all(parameter.grad is None for parameter in node.parameters())


def test_att_loss_matches_its_definition() -> None:
    inputs, task_nodes, group_node = _setup(2)
    loss_module = AttentionAmalgamation(CHANNELS, TASKS)
    group_out = group_node(inputs)
    task_outs = {task: node(inputs) for task, node in task_nodes.items()}
    pooled = group_out.mean(dim=(2, 3))
    expected = 0.0
    for task in TASKS:
        layers = loss_module.attention[task]
        gains = torch.sigmoid(layers[2](torch.relu(layers[0](pooled))))
        expected = expected + ((task_outs[task] - gains[:, :, None, None] * group_out) ** 2).mean()
    torch.testing.assert_close(loss_module(group_out, task_outs), expected)


def test_att_hidden_width_default_and_override() -> None:
    assert AttentionAmalgamation(64, TASKS).hidden == 64  # the authors' ChannelCoding: Linear(C, C) twice
    assert AttentionAmalgamation(8, TASKS).hidden == 8
    assert [m.out_features for m in AttentionAmalgamation(64, TASKS).attention[TASKS[0]] if hasattr(m, "out_features")] \
        == [64, 64]
    wide = functools.partial(AttentionAmalgamation, hidden=32)(64, TASKS)
    assert wide.attention["seg"][0].out_features == 32


def test_att_rejects_mismatched_inputs() -> None:
    loss_module = AttentionAmalgamation(CHANNELS, TASKS)
    group_out = torch.randn(2, CHANNELS, 4, 4)
    with pytest.raises(ValueError, match="task outputs"):
        loss_module(group_out, {"seg": torch.randn(2, CHANNELS, 4, 4)})
    with pytest.raises(ValueError, match="'depth'"):
        loss_module(group_out, {"seg": group_out, "depth": torch.randn(2, CHANNELS, 2, 2)})
    with pytest.raises(ValueError, match="group_out"):
        loss_module(torch.randn(2, CHANNELS + 1, 4, 4), {"seg": group_out, "depth": group_out})
    with pytest.raises(ValueError, match="'a.b'"):
        AttentionAmalgamation(CHANNELS, ["a.b", "c"])


def test_average_means_no_distillation() -> None:
    assert average(CHANNELS, TASKS) is None
    assert amalgamator("average")(CHANNELS, TASKS) is None
