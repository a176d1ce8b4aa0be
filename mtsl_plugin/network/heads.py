"""Task heads: what each task's prediction is computed from, called ``head(features, size)`` with the outputs of
the stage table's head locations (:attr:`~mtsl_plugin.network.stages.StageFactory.head_locations`), in order."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _single(features: Sequence[torch.Tensor], head: str) -> torch.Tensor:
    if len(features) != 1:
        raise ValueError(f"{head} reads one location's output, got {len(features)}")
    return features[0]


class Head(nn.Module):
    """Task head of the ``compact`` network: conv3x3-BN-ReLU-conv1x1 on the last location's output, then bilinear
    upsampling to the input resolution. ``forward([x (N, C, h, w)], size (H, W)) -> (N, out_channels, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, 1),
        )

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.body(_single(features, "Head")), size=size, mode="bilinear", align_corners=False)


class MultiScaleHead(nn.Module):
    """Task head of the ``authors`` network (their ``SegHead``; every task's head has this form): a 1x1 conv of
    each decoder output to ``width`` channels, each upsampled to a quarter of the input resolution, concatenated,
    a 1x1 conv to the task's channels, then bilinear upsampling to the input resolution.

    ``forward([x_6, .., x_9] (N, C, h_l, w_l), size (H, W)) -> (N, out_channels, H, W)``.
    """

    def __init__(self, in_channels: Sequence[int], width: int, out_channels: int):
        super().__init__()
        self.reduce = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.classifier = nn.Conv2d(width * len(in_channels), out_channels, 1)

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        if len(features) != len(self.reduce):
            raise ValueError(f"MultiScaleHead reads {len(self.reduce)} locations' outputs, got {len(features)}")
        quarter = (max(size[0] // 4, 1), max(size[1] // 4, 1))
        x = torch.cat([F.interpolate(conv(f), size=quarter, mode="bilinear", align_corners=False)
                       for conv, f in zip(self.reduce, features)], dim=1)
        return F.interpolate(self.classifier(x), size=size, mode="bilinear", align_corners=False)


class DeepLabHead(nn.Module):
    """Task head of the encoder-only setting: DeepLabV3's ASPP decoder (segmentation-models-pytorch) on the last
    encoder location, a 1x1 classifier, then bilinear upsampling to the input resolution."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 256):
        super().__init__()
        from segmentation_models_pytorch.decoders.deeplabv3.decoder import DeepLabV3Decoder

        self.aspp = DeepLabV3Decoder(in_channels, width, atrous_rates=(12, 24, 36), aspp_separable=False,
                                     aspp_dropout=0.5)
        self.classifier = nn.Conv2d(width, out_channels, 1)

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = self.aspp([_single(features, "DeepLabHead")])
        return F.interpolate(self.classifier(x), size=size, mode="bilinear", align_corners=False)
