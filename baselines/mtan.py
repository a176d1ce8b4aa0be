"""Multi-Task Attention Network, MTAN (Liu, Johns & Davison, CVPR 2019), on the timm stages, as a LibMTL
architecture, after ``SimonVandenhende/Multi-Task-Learning-PyTorch`` (``models/mtan.py``).

One shared network (one node per location, ``stages.build``) and, for every task, a soft-attention module at
every location ℓ. With ``b_ℓ`` the shared features *before the last block* of location ℓ, ``s_ℓ`` the shared
output of ℓ, and ``a_ℓ`` the task's attended features::

    m_0 = att_0(b_0)                                   a_0 = m_0 ⊙ s_0
    m_ℓ = att_ℓ([b_ℓ, carry_ℓ(a_{ℓ-1})])               a_ℓ = m_ℓ ⊙ s_ℓ        (ℓ ≥ 1)

* ``b_ℓ``: the input of the node's last residual block (of a ResNet layer or any timm stage, of the extra
  block(s), of a decoder block: the upsampled input concatenated with the skip); a location without residual
  blocks (a stem) uses its output, ``b_0 = s_0``. The blocks are found by timm's marker: every timm residual
  block (ResNet's, ConvNeXt's, RegNet's, EfficientNet's and MobileNetV3's, ...) has a ``drop_path`` attribute
  (its stochastic depth); the last of them in module order is the last block (:func:`last_block`). Where that
  block is its stage's only one and strided (RegNetX-200MF's and MobileNetV3's first stage, a ResNet of one
  block per layer), its input is finer than ``s_ℓ``, and ``b_ℓ`` is that input average-pooled to ``s_ℓ``'s size;
* ``att_ℓ`` (one per task): conv1x1-BN-ReLU-conv1x1-BN-sigmoid (the reference's and LibMTL's attention layer)
  from ``b_ℓ``'s channels (plus ``C_ℓ`` for ℓ ≥ 1) through ``C_ℓ / attention_reduction`` (default 4, as the
  reference) to ``C_ℓ``, so the mask lies in (0, 1);
* ``carry_ℓ``: the shared refinement block ``refine_ℓ`` (one timm Bottleneck from ``C_{ℓ-1}`` to ``C_ℓ`` with a
  1x1 conv-BN projection, the reference's ``RefinementBlock``) at ℓ−1's resolution, then to ℓ's resolution:
  2x2 max-pooling where ℓ is twice as coarse (the reference), adaptive max-pooling for other coarser sizes,
  bilinear upsampling where ℓ is finer (decoder).

The reference attends layer1-4 of an encoder; here every merge location is attended, so the chain runs through
all locations (10 on a ResNet, 6 in the encoder-only setting, where the heads are DeepLab heads). Decoder locations
(encoder-decoder setting) run on the shared features: the node's input is the shared output of ℓ−1 and its skip
the shared output of the skip location; attention applies to the shared decoder output as at any other location.
The task's heads read its attended outputs at the head locations.

Registered as ``mtan``.
"""
from __future__ import annotations

import functools
import importlib
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.models.resnet import Bottleneck
from torch import nn

from mtsl_plugin.architecture import check_arch_args, check_architecture_args
from mtsl_plugin.learner.schedule import require
from mtsl_plugin.libmtl_compat import import_libmtl, zero_shared_grads_in_place
from mtsl_plugin.methods import MethodSpec, register_method
from mtsl_plugin.network.stages import BottleneckDecoderStage, StageFactory

#: The attention layers' bottleneck divisor (hidden width ``C / 4``), as in the reference.
ATTENTION_REDUCTION = 4

AbsArchitecture = import_libmtl().architecture.AbsArchitecture
# LibMTL builds MTAN's attention layers with this method of its ResNet wrapper; it does not use its instance.
_libmtl_attention_layer = importlib.import_module("LibMTL.architecture.MTAN")._transform_resnet_MTAN._att_layer


def _attention_layer(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    """conv1x1-BN-ReLU-conv1x1-BN-sigmoid: ``(N, in, H, W) -> (N, out, H, W)`` in (0, 1)."""
    return _libmtl_attention_layer(None, in_channels, mid_channels, out_channels)


def _refinement_block(in_channels: int, out_channels: int) -> nn.Module:
    """One Bottleneck ``(N, in, H, W) -> (N, out, H, W)`` (planes ``out / 4``) with a 1x1 conv-BN projection."""
    if out_channels % Bottleneck.expansion:
        raise ValueError(f"MTAN's refinement Bottleneck needs a width divisible by {Bottleneck.expansion}, "
                         f"got {out_channels}")
    projection = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
    return Bottleneck(in_channels, out_channels // Bottleneck.expansion, downsample=projection)


def last_block(node: nn.Module) -> nn.Module | None:
    """The module whose input is the node's "features before the last block": the body of the authors' decoder
    block, else the last residual block in ``node.modules()`` order (the node itself included; a timm block is a
    module with a ``drop_path`` attribute, as timm's ResNet, ConvNeXt, RegNet, EfficientNet and MobileNetV3 blocks
    and the extra and decoder blocks, which are timm BasicBlocks or Bottlenecks, all are); ``None`` if the node
    has none (a stem)."""
    if isinstance(node, BottleneckDecoderStage):
        return node.body
    blocks = [m for m in node.modules() if hasattr(m, "drop_path")]
    return blocks[-1] if blocks else None


def _carry(attended: torch.Tensor, refine: nn.Module, size: torch.Size) -> torch.Tensor:
    """``carry_ℓ`` of the module docstring: ``attended (N, C_{ℓ-1}, h, w)`` -> ``(N, C_ℓ, *size)``."""
    refined = refine(attended)
    h, w = refined.shape[-2:]
    if (h, w) == tuple(size):
        return refined
    if h >= size[0] and w >= size[1]:
        return (F.max_pool2d(refined, 2) if (h, w) == (2 * size[0], 2 * size[1])
                else F.adaptive_max_pool2d(refined, size))
    return F.interpolate(refined, size=size, mode="bilinear", align_corners=False)


class AttentionNetwork(nn.Module):
    """The shared network of ``stages`` with per-task attention modules at every location.

    ``forward(x (N, 3, H, W), tasks=None)`` returns ``(attended, masks)``: ``attended[t]`` lists task t's attended
    outputs of the stages' head locations (what its head reads, ``[(N, C_l, h_l, w_l)]``); ``masks[t][ℓ]`` its
    mask at location ℓ, shaped like the shared output there, in (0, 1). ``tasks`` restricts the attention branches
    computed (default: all).
    Attributes: ``nodes[ℓ]`` (shared), ``attention[ℓ][task]``, ``refinements[ℓ - 1]`` (shared, ℓ ≥ 1).
    """

    def __init__(self, stages: StageFactory, tasks: Sequence[str], attention_reduction: int = ATTENTION_REDUCTION):
        super().__init__()
        if attention_reduction < 1:
            raise ValueError(f"attention_reduction must be a positive integer, got {attention_reduction}")
        self.tasks = tuple(tasks)
        self.specs = stages.specs
        self.head_locations = stages.head_locations
        self.nodes = nn.ModuleList(stages.build(location) for location in range(stages.num_locations))
        self._before: dict[int, torch.Tensor] = {}
        before_channels = self._find_last_blocks()
        self.attention = nn.ModuleList()
        for location, spec in enumerate(self.specs):
            c = spec.out_channels
            c_in = before_channels[location] + (0 if location == 0 else c)
            mid = max(c // attention_reduction, 1)
            self.attention.append(nn.ModuleDict({t: _attention_layer(c_in, mid, c) for t in self.tasks}))
        self.refinements = nn.ModuleList(_refinement_block(self.specs[l - 1].out_channels, self.specs[l].out_channels)
                                         for l in range(1, len(self.specs)))

    def _find_last_blocks(self) -> list[int]:
        """Hook each node's last block to keep its input (``b_ℓ``) in ``self._before``; returns the channels
        of every ``b_ℓ``: what the block's first convolution reads (a node without blocks: its output's)."""
        channels = []
        for location, node in enumerate(self.nodes):
            block = last_block(node)
            if block is None:
                channels.append(self.specs[location].out_channels)
                continue
            block.register_forward_pre_hook(functools.partial(self._keep_before, location))
            channels.append(next(m for m in block.modules() if isinstance(m, nn.Conv2d)).in_channels)
        return channels

    def _keep_before(self, location: int, _block: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        """The hook of location ``location``'s last block. A bound method (a lambda over ``self._before`` would
        stay the original's in a ``copy.deepcopy``, e.g. ``AveragedModel``'s, so the copy read no ``b_ℓ``)."""
        self._before[location] = inputs[0]

    def _shared(self, x: torch.Tensor) -> list[torch.Tensor]:
        shared: list[torch.Tensor] = []
        for location, spec in enumerate(self.specs):
            inputs = x if location == 0 else shared[-1]
            node = self.nodes[location]
            shared.append(node(inputs) if spec.skip_from is None else node(inputs, shared[spec.skip_from]))
        return shared

    def shared_modules(self) -> list[nn.Module]:
        """The modules every task uses: the nodes and the refinement blocks."""
        return [self.nodes, self.refinements]

    def forward(self, x: torch.Tensor, tasks: Sequence[str] | None = None
                ) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
        tasks = self.tasks if tasks is None else tuple(tasks)
        self._before.clear()
        shared = self._shared(x)
        before = [self._before.get(location, s) for location, s in enumerate(shared)]
        before = [b if b.shape[-2:] == s.shape[-2:] else F.adaptive_avg_pool2d(b, s.shape[-2:])  # one strided block
                  for b, s in zip(before, shared)]
        self._before.clear()
        attended: dict[str, torch.Tensor] = {}
        masks: dict[str, list[torch.Tensor]] = {t: [] for t in tasks}
        head_inputs: dict[str, list[torch.Tensor]] = {t: [] for t in tasks}
        for location, s in enumerate(shared):
            for t in tasks:
                if location == 0:
                    mask = self.attention[0][t](before[0])
                else:
                    previous = _carry(attended[t], self.refinements[location - 1], before[location].shape[-2:])
                    mask = self.attention[location][t](torch.cat([before[location], previous], dim=1))
                masks[t].append(mask)
                attended[t] = mask * s
                if location in self.head_locations:
                    head_inputs[t].append(attended[t])
        return head_inputs, masks


class MTAN(AbsArchitecture):
    """MTAN on the timm stages, as a LibMTL architecture.

    Subclasses ``AbsArchitecture`` rather than ``LibMTL.architecture.MTAN``: that class's ``__init__``,
    ``get_share_params`` and ``zero_grad_share_params`` all reach into a torchvision ResNet (``relu``,
    ``layer1``..``layer4``, ``feature_dim``) and its forward calls heads without the output size; what fits, its
    attention layer, is reused (see the module docstring).

    LibMTL interface: ``encoder_class()`` returns the stages (a :class:`StageFactory`); ``decoders`` maps task -> head
    (``head(features, size)``, the attended outputs of the head locations); ``forward(inputs)`` returns task ->
    prediction ``(N, K_t, H, W)`` (``task_name`` computes one task's branch only); the shared parameters are those
    of the shared nodes and refinement blocks.
    ``arch_args``: ``attention_reduction`` (the attention layers' bottleneck is ``C_ℓ / attention_reduction``,
    default 4 as the reference; LibMTL uses ``C_ℓ`` on ResNet-18); ``plan`` must be ``None`` (MTAN is not plan-based).
    ``rep_grad`` and ``multi_input`` are not supported.
    """

    reads_stages = True  # encoder_class() gives a StageFactory, heads are called with the output size (Trainer)
    label = "MTAN"  # for messages (LibMTL subclasses the architecture, so the class name is not ours)
    known_args = frozenset({"plan", "attention_reduction"})

    @classmethod
    def check_args(cls, task_count: int, num_locations: int, arch_args: Mapping[str, Any]) -> None:
        """The checks of :func:`~mtsl_plugin.architecture.check_arch_args`."""
        require("MTAN attention_reduction", arch_args.get("attention_reduction", ATTENTION_REDUCTION), int, least=1)

    def __init__(self, task_name, encoder_class, decoders, rep_grad, multi_input, device, **kwargs):
        super().__init__(task_name, encoder_class, decoders, rep_grad, multi_input, device, **kwargs)
        check_architecture_args("MTAN", task_name, decoders, rep_grad, multi_input, plan=kwargs.get("plan"))
        stages = encoder_class()
        check_arch_args(type(self), len(task_name), stages.num_locations, kwargs)
        self.encoder = AttentionNetwork(stages, task_name, kwargs.get("attention_reduction", ATTENTION_REDUCTION))
        self.decoders = nn.ModuleDict({t: decoders[t] for t in task_name})

    def forward(self, inputs: torch.Tensor, task_name: str | None = None) -> dict[str, torch.Tensor]:
        tasks = self.task_name if task_name is None else [task_name]
        attended, _ = self.encoder(inputs, tasks)
        size = (inputs.shape[-2], inputs.shape[-1])
        return {t: self.decoders[t](attended[t], size) for t in tasks}

    def get_share_params(self):
        return (p for module in self.encoder.shared_modules() for p in module.parameters())

    zero_grad_share_params = zero_shared_grads_in_place


@register_method("mtan")
def mtan(config, num_locations: int) -> MethodSpec:
    """MTAN: one shared network, per-task soft attention at every location."""
    return MethodSpec(architecture=MTAN, arch_args={"attention_reduction": ATTENTION_REDUCTION})
