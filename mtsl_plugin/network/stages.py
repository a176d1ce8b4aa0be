"""The stage table of a timm ResNet encoder-decoder: what lives at each merge location.

Ten locations by default, as in the MTSL paper:

====  =========  ===========================================  =========
loc   name       module                                        reduction
====  =========  ===========================================  =========
0     stem       conv1, bn1, act1                              2
1     layer1     maxpool, layer1                               4
2     layer2     layer2                                        8
3     layer3     layer3                                        16
4     layer4     layer4                                        32
5     extra      one more residual block of the backbone's kind 32
6     dec1       upsample x2, concat skip from loc 3, one block 16
7     dec2       upsample x2, concat skip from loc 2, one block 8
8     dec3       upsample x2, concat skip from loc 1, one block 4
9     dec4       upsample x2, concat skip from loc 0, one block 2
====  =========  ===========================================  =========

The table (:class:`StageSpec` rows) is plain data read by the network, the cost model and the figures.
:class:`ResNetStages` builds fresh modules for any location; every build of a location starts from the same
weights (the backbone's, random or pretrained), so the single-task networks MTSL starts from are identical.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

ENCODER_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4", "extra")
DECODER_NAMES = ("dec1", "dec2", "dec3", "dec4")


@dataclass(frozen=True)
class StageSpec:
    """One merge location: its input/output channels, output reduction, and the location it takes a skip from."""

    name: str
    in_channels: int
    out_channels: int
    reduction: int
    skip_from: int | None = None
    skip_channels: int = 0


class DecoderStage(nn.Module):
    """Upsample the input to the skip's size, concatenate the skip, apply one residual block.

    ``forward(x (N, C_in, h, w), skip (N, C_skip, H, W)) -> (N, C_out, H, W)``.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.block(torch.cat([x, skip], dim=1))


class Head(nn.Module):
    """Task head: conv3x3-BN-ReLU-conv1x1, then bilinear upsampling to the input resolution."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, 1),
        )

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.body(x), size=size, mode="bilinear", align_corners=False)


class DeepLabHead(nn.Module):
    """Task head of the encoder-only setting: DeepLabV3's ASPP decoder (segmentation-models-pytorch) on the last
    encoder location, a 1x1 classifier, then bilinear upsampling to the input resolution."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 256):
        super().__init__()
        from segmentation_models_pytorch.decoders.deeplabv3.decoder import DeepLabV3Decoder

        self.aspp = DeepLabV3Decoder(in_channels, width, atrous_rates=(12, 24, 36), aspp_separable=False,
                                     aspp_dropout=0.5)
        self.classifier = nn.Conv2d(width, out_channels, 1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.classifier(self.aspp([x])), size=size, mode="bilinear", align_corners=False)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class NormalizedStem(nn.Sequential):
    """The stem of a backbone with pretrained (or file) weights: it normalises its input images, (N, 3, H, W) in
    [0, 1], with the mean and standard deviation of the weights' training data (timm's ``pretrained_cfg``,
    ImageNet's by default) before its modules run. The two are constants (non-persistent buffers), so the stem's
    state dict is that of the plain ``nn.Sequential`` of the same modules."""

    def __init__(self, *modules: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__(*modules)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def _residual_block(block_type: type[nn.Module], in_channels: int, out_channels: int) -> nn.Module:
    """A block of the backbone's kind (BasicBlock or Bottleneck) mapping in_channels to out_channels."""
    expansion = getattr(block_type, "expansion", 1)
    downsample = None
    if in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        )
    return block_type(in_channels, out_channels // expansion, downsample=downsample)


class ResNetStages:
    """Stage factory over a timm ResNet (``resnet18`` default; any timm ResNet with layer1-4 works).

    Args:
        backbone: timm model name.
        pretrained: load timm's pretrained weights through timm's own mechanism (needs the hub or its cache).
        weights: a local weights file for the backbone (timm's ``pretrained_cfg_overlay=dict(file=...)``).
        decoder: build the 4 decoder locations (encoder-decoder setting); without it there are 6 locations.
        seed: seed for the random initialisation of everything the backbone does not provide.
        backbone_args: further keyword arguments of ``timm.create_model``, e.g. ``{"channels": (16, 32, 64, 128)}``
            for a ResNet of a quarter of the usual width (the ``smoke`` and ``quick`` presets use narrow ResNets).
    """

    def __init__(self, backbone: str = "resnet18", *, pretrained: bool = False, weights: str | Path | None = None,
                 decoder: bool = True, seed: int = 0, backbone_args: dict | None = None):
        if weights is not None and not Path(weights).is_file():
            raise FileNotFoundError(f"backbone weights file {str(weights)!r} does not exist")
        kwargs = {**(backbone_args or {})}
        if "channels" in kwargs:
            kwargs["channels"] = tuple(kwargs["channels"])
        if weights is not None:
            kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                model = timm.create_model(backbone, pretrained=pretrained or weights is not None, num_classes=0,
                                          **kwargs)
            except Exception as exc:  # unknown name, unreadable weights file, hub unreachable
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if weights is not None:
                    raise ValueError(f"backbone weights file {str(weights)!r} could not be loaded into "
                                     f"{backbone!r}: {reason}") from None
                if isinstance(exc, OSError):
                    raise ValueError(f"timm could not fetch pretrained weights for {backbone!r} ({reason}); "
                                     "pass a local weights file with --weights when offline") from None
                raise ValueError(f"timm could not build backbone {backbone!r}: {reason}") from None
            if not all(hasattr(model, a) for a in ("conv1", "bn1", "act1", "maxpool", "layer1", "layer4")):
                raise ValueError(f"backbone {backbone!r} is not a ResNet with conv1/bn1/act1/maxpool/layer1-4")
            channels = [info["num_chs"] for info in model.feature_info]  # stem, layer1..4
            templates, specs = self._templates_and_specs(model, channels, decoder)
            if pretrained or weights is not None:  # the weights expect the inputs they were trained on
                cfg = model.pretrained_cfg
                templates[0] = NormalizedStem(*templates[0], mean=cfg.get("mean", IMAGENET_MEAN),
                                              std=cfg.get("std", IMAGENET_STD))
        self.backbone = backbone
        self.decoder = decoder
        self._head_seed = seed
        self.specs: tuple[StageSpec, ...] = tuple(specs)
        self._templates = templates

    @staticmethod
    def _templates_and_specs(model: nn.Module, channels: list[int], decoder: bool
                             ) -> tuple[list[nn.Module], list[StageSpec]]:
        block_type = type(model.layer4[-1])
        templates: list[nn.Module] = [
            nn.Sequential(model.conv1, model.bn1, model.act1),
            nn.Sequential(model.maxpool, model.layer1),
            model.layer2,
            model.layer3,
            model.layer4,
            _residual_block(block_type, channels[4], channels[4]),
        ]
        specs = [StageSpec(name, cin, cout, red) for name, cin, cout, red in zip(
            ENCODER_NAMES, [3] + channels, channels + [channels[4]], [2, 4, 8, 16, 32, 32])]
        if decoder:
            c_in = channels[4]
            for i, name in enumerate(DECODER_NAMES):
                skip = 3 - i
                c_out = channels[skip]
                templates.append(DecoderStage(_residual_block(block_type, c_in + c_out, c_out)))
                specs.append(StageSpec(name, c_in, c_out, specs[skip].reduction, skip_from=skip, skip_channels=c_out))
                c_in = c_out
        return templates, specs

    @property
    def num_locations(self) -> int:
        return len(self.specs)

    @property
    def out_channels(self) -> int:
        """Channels of the last location's output, which the task heads read."""
        return self.specs[-1].out_channels

    def build(self, location: int) -> nn.Module:
        """A fresh node for ``location``, initialised like every other node built there."""
        if not 0 <= location < self.num_locations:
            raise IndexError(f"location {location} is outside 0..{self.num_locations - 1}")
        return copy.deepcopy(self._templates[location])

    def build_head(self, out_channels: int) -> nn.Module:
        """A task head reading the last location's output (:class:`Head` after the decoder, :class:`DeepLabHead`
        in the encoder-only setting); seeded so that every build with one width is identical.
        ``forward(x (N, C, h, w), size (H, W)) -> (N, out_channels, H, W)``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._head_seed + out_channels)
            if self.decoder:
                return Head(self.out_channels, out_channels)
            return DeepLabHead(self.out_channels, out_channels)
