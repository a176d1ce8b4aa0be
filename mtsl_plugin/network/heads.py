"""Task heads: what each task's prediction is computed from, called ``head(features, size)`` with the outputs of
the stage table's head locations (:attr:`~mtsl_plugin.network.stages.StageFactory.head_locations`), in order."""
from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class HeadForm:
    """How a :class:`MultiScaleHead` ends: the kernel size of its last conv, the activation on that conv's output
    (``None``, ``"relu"`` or ``"tanh"``) and whether its per-location 1x1 convs have a bias."""

    kernel_size: int = 1
    activation: str | None = None
    reduce_bias: bool = True


#: The plain form: the authors' ``SegHead``, and the head of every task without a form of its own.
PLAIN_HEAD = HeadForm()

#: Each built-in task's head in the authors' code (``encoding_custom/heads``), as a :class:`HeadForm`:
#:
#: - ``S`` (``SegHead``) and ``E`` (``SemanticContourHead``, a ``SegHead``): 1x1 convs with bias, a 1x1 last
#:   conv, no activation (logits).
#: - ``D`` (``DepthHead``): 1x1 convs without bias, a 3x3 last conv, then their ``MODEL.DEPTH.ACTIVATION_FN``.
#:   That is a sigmoid by default, for Cityscapes, whose depth they scale to [0, 1] (about metres / 80, their
#:   ``DATALOADER.MAX_DEPTH``), and a ReLU in their NYUv2 configs, whose depth stays in metres. Our ``D``
#:   predicts metres (0 marks no depth, and no data set here is rescaled), so a sigmoid would cap every
#:   prediction at 1 m; ours is the ReLU variant (non-negative, unbounded metres).
#: - ``N`` (``SurfaceNormalHead``, a ``DepthHead``): as ``D``, with a 3x3 last conv to 3 channels and tanh
#:   (each component in [-1, 1]; the task normalises the vector after the head).
#: - ``A`` (``AutoEncoderHead``): 1x1 convs without bias, a 3x3 last conv, no activation.
AUTHORS_HEADS: dict[str, HeadForm] = {
    "S": PLAIN_HEAD,
    "E": PLAIN_HEAD,
    "D": HeadForm(kernel_size=3, activation="relu", reduce_bias=False),
    "N": HeadForm(kernel_size=3, activation="tanh", reduce_bias=False),
    "A": HeadForm(kernel_size=3, activation=None, reduce_bias=False),
}

_ACTIVATIONS = {None: nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh}


class MultiScaleHead(nn.Module):
    """Task head of the ``authors`` network (the heads of their ``encoding_custom/heads``): a 1x1 conv of each
    decoder output to ``width`` channels, each upsampled to a quarter of the input resolution, concatenated, a
    last conv to the task's channels (``form.kernel_size``, padded to keep the size), the output activation
    (``form.activation``), then bilinear upsampling to the input resolution. The form differs per task
    (:data:`AUTHORS_HEADS`); :data:`PLAIN_HEAD` (their ``SegHead``: 1x1, no activation) is the default.

    ``forward([x_6, .., x_9] (N, C, h_l, w_l), size (H, W)) -> (N, out_channels, H, W)``.
    """

    def __init__(self, in_channels: Sequence[int], width: int, out_channels: int, form: HeadForm = PLAIN_HEAD):
        super().__init__()
        if form.activation not in _ACTIVATIONS:
            raise ValueError(f"unknown head activation {form.activation!r}; choose one of "
                             f"{', '.join(map(str, _ACTIVATIONS))}")
        self.form = form
        self.reduce = nn.ModuleList(nn.Conv2d(c, width, 1, bias=form.reduce_bias) for c in in_channels)
        self.classifier = nn.Conv2d(width * len(in_channels), out_channels, form.kernel_size,
                                    padding=form.kernel_size // 2)
        self.activation = _ACTIVATIONS[form.activation]()

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        if len(features) != len(self.reduce):
            raise ValueError(f"MultiScaleHead reads {len(self.reduce)} locations' outputs, got {len(features)}")
        quarter = (max(size[0] // 4, 1), max(size[1] // 4, 1))
        x = torch.cat([F.interpolate(conv(f), size=quarter, mode="bilinear", align_corners=False)
                       for conv, f in zip(self.reduce, features)], dim=1)
        # activation before upsampling, as theirs; bilinear weights are convex, so the output keeps its range
        # (up to float rounding)
        x = self.activation(self.classifier(x))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


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
