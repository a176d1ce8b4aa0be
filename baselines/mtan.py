"""Multi-Task Attention Network, MTAN (Liu, Johns & Davison, CVPR 2019), on the timm stages, as a LibMTL
architecture.

One shared network (one node per location, ``stages.build``) and, for every task, a soft-attention module at
every location ℓ. With ``s_ℓ`` the shared output at ℓ and ``a_ℓ`` the task's attended features::

    m_0 = att_0(s_0)                                   a_0 = m_0 ⊙ s_0
    m_ℓ = att_ℓ([s_ℓ, carry_ℓ(a_{ℓ-1})])               a_ℓ = m_ℓ ⊙ s_ℓ        (ℓ ≥ 1)

* ``att_ℓ`` (one per task): LibMTL's attention layer, conv1x1-BN-ReLU-conv1x1-BN-sigmoid, from ``C_ℓ`` (ℓ = 0)
  or ``2 C_ℓ`` channels through ``C_ℓ / attention_reduction`` to ``C_ℓ``, so the mask lies in (0, 1);
* ``carry_ℓ`` brings the task's previous attended features to ℓ's resolution and channels with ``proj_ℓ``
  (conv1x1-BN-ReLU from ``C_{ℓ-1}`` to ``C_ℓ``), always at the coarser of the two resolutions: where ℓ is
  coarser, 2x2 max-pooling (LibMTL's choice; adaptive for odd sizes) then ``proj_ℓ``; where ℓ is finer (decoder),
  ``proj_ℓ`` then bilinear upsampling; where sizes agree, ``proj_ℓ`` alone;
* ``proj_ℓ`` is one module per location shared by the tasks, like the block LibMTL applies after each attention
  module (LibMTL uses a residual block there; a 1x1 projection keeps the attention branch light).

Our nodes are opaque stages, so the mask is computed from the node's output and gates that same output (LibMTL,
like the paper, computes it from the features before a stage's last block and gates the block's output).

The task's head reads its attended output of the last location. Decoder locations (encoder-decoder setting) run
on the shared features only: the node's input is the shared output of ℓ−1 and its skip the shared encoder
output of the skip location; attention applies to the shared decoder output as at any other location. The
attention chain thus runs through all 10 locations (6 in the encoder-only setting, where the heads are DeepLab
heads).

Registered as ``mtan``.
"""
from __future__ import annotations

import importlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtsl_plugin.architecture import check_architecture_args
from mtsl_plugin.libmtl_compat import import_libmtl
from mtsl_plugin.methods import MethodSpec, register_method
from mtsl_plugin.network.stages import ResNetStages

AbsArchitecture = import_libmtl().architecture.AbsArchitecture
# LibMTL builds MTAN's attention layers with this method of its ResNet wrapper; it does not use its instance.
_libmtl_attention_layer = importlib.import_module("LibMTL.architecture.MTAN")._transform_resnet_MTAN._att_layer


def _attention_layer(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    """conv1x1-BN-ReLU-conv1x1-BN-sigmoid: ``(N, in, H, W) -> (N, out, H, W)`` in (0, 1)."""
    return _libmtl_attention_layer(None, in_channels, mid_channels, out_channels)


def _projection(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv1x1-BN-ReLU: ``(N, in, H, W) -> (N, out, H, W)``."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True))


def _carry(attended: torch.Tensor, projection: nn.Module, size: torch.Size) -> torch.Tensor:
    """``carry_ℓ`` of the module docstring: ``attended (N, C_{ℓ-1}, h, w)`` -> ``(N, C_ℓ, *size)``, projected at
    the coarser of the two resolutions."""
    h, w = attended.shape[-2:]
    if (h, w) == tuple(size):
        return projection(attended)
    if h >= size[0] and w >= size[1]:
        pooled = (F.max_pool2d(attended, 2) if (h, w) == (2 * size[0], 2 * size[1])
                  else F.adaptive_max_pool2d(attended, size))
        return projection(pooled)
    return F.interpolate(projection(attended), size=size, mode="bilinear", align_corners=False)


class AttentionNetwork(nn.Module):
    """The shared network of ``stages`` with per-task attention modules at every location.

    ``forward(x (N, 3, H, W), tasks=None)`` returns ``(attended, masks)``: ``attended[t]`` lists task t's attended
    outputs of the stages' head locations (what its head reads, ``[(N, C_l, h_l, w_l)]``); ``masks[t][ℓ]`` its
    mask at location ℓ, shaped like the shared output there, in (0, 1). ``tasks`` restricts the attention branches
    computed (default: all).
    Attributes: ``nodes[ℓ]`` (shared), ``attention[ℓ][task]``, ``projections[ℓ - 1]`` (shared, ℓ ≥ 1).
    """

    def __init__(self, stages: ResNetStages, tasks: Sequence[str], attention_reduction: int = 4):
        super().__init__()
        if attention_reduction < 1:
            raise ValueError(f"attention_reduction must be a positive integer, got {attention_reduction}")
        self.tasks = tuple(tasks)
        self.specs = stages.specs
        self.head_locations = stages.head_locations
        self.nodes = nn.ModuleList(stages.build(location) for location in range(stages.num_locations))
        self.attention = nn.ModuleList()
        for location, spec in enumerate(self.specs):
            c = spec.out_channels
            c_in = c if location == 0 else 2 * c
            mid = max(c // attention_reduction, 1)
            self.attention.append(nn.ModuleDict({t: _attention_layer(c_in, mid, c) for t in self.tasks}))
        self.projections = nn.ModuleList(_projection(self.specs[l - 1].out_channels, self.specs[l].out_channels)
                                         for l in range(1, len(self.specs)))

    def shared_modules(self) -> list[nn.Module]:
        """The modules every task uses: the nodes and the projections."""
        return [self.nodes, self.projections]

    def forward(self, x: torch.Tensor, tasks: Sequence[str] | None = None
                ) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
        tasks = self.tasks if tasks is None else tuple(tasks)
        shared: list[torch.Tensor] = []
        attended: dict[str, torch.Tensor] = {}
        masks: dict[str, list[torch.Tensor]] = {t: [] for t in tasks}
        head_inputs: dict[str, list[torch.Tensor]] = {t: [] for t in tasks}
        for location, spec in enumerate(self.specs):
            inputs = x if location == 0 else shared[-1]
            node = self.nodes[location]
            s = node(inputs) if spec.skip_from is None else node(inputs, shared[spec.skip_from])
            shared.append(s)
            for t in tasks:
                if location == 0:
                    mask = self.attention[0][t](s)
                else:
                    previous = _carry(attended[t], self.projections[location - 1], s.shape[-2:])
                    mask = self.attention[location][t](torch.cat([s, previous], dim=1))
                masks[t].append(mask)
                attended[t] = mask * s
                if location in self.head_locations:
                    head_inputs[t].append(attended[t])
        return head_inputs, masks


class MTAN(AbsArchitecture):
    """MTAN on a timm ResNet, as a LibMTL architecture.

    Subclasses ``AbsArchitecture`` rather than ``LibMTL.architecture.MTAN``: that class's ``__init__``,
    ``get_share_params`` and ``zero_grad_share_params`` all reach into a torchvision ResNet (``relu``,
    ``layer1``..``layer4``, ``feature_dim``) and its forward calls heads without the output size; what fits, its
    attention layer, is reused (see the module docstring).

    LibMTL interface: ``encoder_class()`` returns the :class:`ResNetStages`; ``decoders`` maps task -> head
    (``head(features, size)``, the attended outputs of the head locations); ``forward(inputs)`` returns task ->
    prediction ``(N, K_t, H, W)`` (``task_name`` computes one task's branch only); the shared parameters are those
    of the shared nodes and projections.
    ``arch_args``: ``attention_reduction`` (the attention layers' bottleneck is ``C_ℓ / attention_reduction``,
    default 4; LibMTL uses ``C_ℓ`` on ResNet-18); ``plan`` must be ``None`` (MTAN is not plan-based).
    ``rep_grad`` and ``multi_input`` are not supported.
    """

    def __init__(self, task_name, encoder_class, decoders, rep_grad, multi_input, device, **kwargs):
        super().__init__(task_name, encoder_class, decoders, rep_grad, multi_input, device, **kwargs)
        check_architecture_args("MTAN", task_name, decoders, rep_grad, multi_input, plan=kwargs.get("plan"))
        self.encoder = AttentionNetwork(encoder_class(), task_name, kwargs.get("attention_reduction", 4))
        self.decoders = nn.ModuleDict({t: decoders[t] for t in task_name})

    def forward(self, inputs: torch.Tensor, task_name: str | None = None) -> dict[str, torch.Tensor]:
        tasks = self.task_name if task_name is None else [task_name]
        attended, _ = self.encoder(inputs, tasks)
        size = (inputs.shape[-2], inputs.shape[-1])
        return {t: self.decoders[t](attended[t], size) for t in tasks}

    def get_share_params(self):
        return (p for module in self.encoder.shared_modules() for p in module.parameters())

    def zero_grad_share_params(self) -> None:
        # in place, not set to None: LibMTL's gradient-surgery methods write into ``param.grad.data``
        for p in self.get_share_params():
            if p.grad is not None:
                p.grad.zero_()


@register_method("mtan")
def mtan(config, num_locations: int) -> MethodSpec:
    """MTAN: one shared network, per-task soft attention at every location."""
    return MethodSpec(architecture=MTAN, arch_args={"attention_reduction": 4})
