"""LibMTL's ``Trainer`` arguments as this package's objects: a LibMTL decoder as one of our heads
(:class:`LibMTLHead`), ``encoder_class`` as merge-location stages (:func:`as_stages`), ``arch_args['plan']`` as a
:class:`~mtsl_plugin.plan.BranchingPlan` (:func:`as_plan`). Used by :class:`mtsl_plugin.Trainer`."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping

import timm
import torch
import torch.nn.functional as F
from torch import nn

from mtsl_plugin.network.backbones import TimmStages
from mtsl_plugin.network.stages import ResNetStages, StageFactory
from mtsl_plugin.plan import BranchingPlan


class LibMTLHead(nn.Module):
    """A LibMTL decoder (``decoder(x (N, C, h, w))``) as one of our heads: it reads the last head location's
    output and a dense prediction ``(N, C', h', w')`` is upsampled (bilinear) to the input size. A decoder whose
    first layer is an ``nn.Linear`` (a classification or regression head, as in LibMTL's Office-31 example) reads
    that output average-pooled, ``(N, C)``, and its prediction is used as it is."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder
        first = next((m for m in decoder.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))), None)
        self.pooled = isinstance(first, nn.Linear)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = features[-1]
        out = self.decoder(x.mean(dim=(2, 3)) if self.pooled else x)
        if out.dim() != 4 or tuple(out.shape[-2:]) == tuple(size):
            return out
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)


def as_head(decoder: nn.Module) -> nn.Module:
    """Our heads as they are; a module whose ``forward`` takes one required argument wrapped in :class:`LibMTLHead`."""
    required = [p for p in inspect.signature(decoder.forward).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return LibMTLHead(decoder) if len(required) == 1 else decoder


def as_stages(encoder_class: Callable[[], Any], network: str = "compact", setting: str = "encoder-decoder",
              seed: int = 0) -> StageFactory:
    """The stages of LibMTL's ``encoder_class``: our stages as they are; a timm model split into locations (a
    ResNet into the ``compact`` or ``authors`` table, any other timm CNN into its feature stages, ``compact``),
    the layers added to it (decoder, extra stage) drawn from ``seed``. A timm model's stages build their
    :meth:`~StageFactory.redrawn` copies by calling ``encoder_class()`` again, as LibMTL builds every task's
    encoder."""
    check_encoder_class(encoder_class)
    built = encoder_class()
    if isinstance(built, StageFactory):
        return built
    stages = _model_stages(built, network, setting, seed)
    stages._remake = functools.partial(_called_again, encoder_class, network, setting)
    return stages


def _model_stages(built: Any, network: str, setting: str, seed: int = 0) -> StageFactory:
    decoder = setting == "encoder-decoder"
    if isinstance(built, timm.models.ResNet):
        return ResNetStages.from_model(built, decoder=decoder, network=network, seed=seed)
    if isinstance(built, nn.Module):
        if network != "compact":
            raise ValueError(f"network {network!r} is built on a timm ResNet; encoder {type(built).__name__} takes "
                             "network 'compact'")
        return TimmStages.from_model(built, decoder=decoder, seed=seed)
    raise ValueError(f"encoder_class must return our stages or a timm model, got {type(built).__name__}")


def _called_again(encoder_class: Callable[[], Any], network: str, setting: str, *, seed: int) -> StageFactory:
    return _model_stages(encoder_class(), network, setting, seed)


def check_encoder_class(encoder_class: Any) -> None:
    """Refuse, in one line, an ``encoder_class`` that is not a zero-argument callable returning the encoder: a model
    instance (LibMTL calls ``encoder_class()``, which would run the model's forward without input) or a name."""
    if isinstance(encoder_class, (nn.Module, StageFactory)) or not callable(encoder_class):
        raise ValueError(f"encoder_class must be a callable returning the encoder (a class, or e.g. lambda: "
                         f"timm.create_model('resnet18')), not a {type(encoder_class).__name__} instance")


def as_plan(plan: Any) -> BranchingPlan | None:
    """``arch_args['plan']``: a :class:`BranchingPlan`, or its dict form (:meth:`BranchingPlan.to_dict`)."""
    if plan is None or isinstance(plan, BranchingPlan):
        return plan
    if isinstance(plan, Mapping):
        return BranchingPlan.from_dict(plan)
    raise ValueError(f"arch_args['plan'] must be a BranchingPlan or its dict form {{'tasks': [...], 'partitions': "
                     f"[...]}}, got a {type(plan).__name__}")
