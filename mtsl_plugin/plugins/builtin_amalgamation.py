"""Built-in amalgamator plugin: attention-based feature amalgamation (``att``) and plain averaging (``average``).

After MTSL creates a group node F_bar for tasks i in a group (initialised as the average of their task nodes),
``att`` distils it from the frozen task nodes F_i: each task gets a small channel-attention module ATT_i that
predicts, from F_bar's channel means, a per-channel gain a_i, and the loss asks ``a_i * F_bar`` to reproduce
F_i. ``average`` does no distillation at all.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mtsl_plugin.plugins import hookimpl


class AttentionAmalgamation(nn.Module):
    """Attention-based amalgamation loss: ``sum_i mean((F_i - a_i[..., None, None] * F_bar) ** 2)``.

    ``a_i = ATT_i(F_bar)`` of shape (N, C), where ATT_i is global average pooling -> Linear(C, hidden) -> ReLU
    -> Linear(hidden, C) -> Sigmoid, with hidden = C as in the authors' code (``ChannelCoding`` in
    ``encoding_custom/nn/model_fusion.py``). The task outputs F_i are fixed targets (detached inside the loss); the
    gradient reaches the group node's output F_bar (through both the product and the attention input) and the
    ATT_i parameters.

    Args:
        channels: C, the number of channels of the group node's output.
        tasks: names of the tasks merged into the group node (valid ``nn.ModuleDict`` keys: no ".").
        hidden: width of the attention's hidden layer; default ``C``. Subclasses or
            ``functools.partial(AttentionAmalgamation, hidden=...)`` can change it and still serve as a factory.
    """

    def __init__(self, channels: int, tasks: Sequence[str], *, hidden: int | None = None):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"AttentionAmalgamation needs a positive int number of channels, got {channels!r}.")
        if isinstance(tasks, str) or not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"AttentionAmalgamation needs a non-empty sequence of distinct task names, got {tasks!r}.")
        self.hidden = channels if hidden is None else hidden
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, int) or self.hidden < 1:
            raise ValueError(f"AttentionAmalgamation needs a positive int hidden width, got {hidden!r}.")
        self.channels = channels
        self.tasks = tuple(tasks)
        self.attention = nn.ModuleDict()
        for task in self.tasks:
            try:
                self.attention[task] = self.make_attention(channels, self.hidden)
            except (KeyError, TypeError) as error:
                raise ValueError(f"Task name {task!r} cannot name an attention module: {error}.") from error

    @staticmethod
    def make_attention(channels: int, hidden: int) -> nn.Module:
        """Return one ATT_i: a map from channel means (N, C) to channel gains in (0, 1), shape (N, C)."""
        return nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
            nn.Sigmoid(),
        )

    def forward(self, group_out: torch.Tensor, task_outs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Return the 0-d amalgamation loss.

        Args:
            group_out: (N, C, H, W) output F_bar of the group node.
            task_outs: task name -> (N, C, H, W) output F_i of that task's frozen task node, one per task.
        """
        if group_out.dim() != 4 or group_out.shape[1] != self.channels:
            raise ValueError(
                f"AttentionAmalgamation expects group_out of shape (N, {self.channels}, H, W), "
                f"got {tuple(group_out.shape)}."
            )
        if set(task_outs) != set(self.tasks):
            raise ValueError(
                f"AttentionAmalgamation expects task outputs for tasks {sorted(self.tasks)}, got {sorted(task_outs)}."
            )
        channel_means = group_out.mean(dim=(2, 3))
        loss = group_out.new_zeros(())
        for task in self.tasks:
            target = task_outs[task]
            if target.shape != group_out.shape:
                raise ValueError(
                    f"AttentionAmalgamation expects the output of task {task!r} to match group_out's shape "
                    f"{tuple(group_out.shape)}, got {tuple(target.shape)}."
                )
            gains = self.attention[task](channel_means)
            loss = loss + (target.detach() - gains[:, :, None, None] * group_out).pow(2).mean()
        return loss


def average(channels: int, tasks: Sequence[str]) -> None:
    """Return None: the group node keeps its average initialisation and is not distilled."""
    return None


@hookimpl
def mtsl_amalgamators() -> dict:
    """Offer ``att`` (attention-based amalgamation, the paper's) and ``average`` (no distillation)."""
    return {"att": AttentionAmalgamation, "average": average}
