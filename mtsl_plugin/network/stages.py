"""The stage table of a timm ResNet encoder-decoder: what lives at each merge location.

Ten locations in the encoder-decoder setting, as in the MTSL paper, in one of two networks. ``compact`` (the CPU
presets' network): a decoder as wide as the skips it reads, output stride 2, heads on the last location.

====  =========  ===========================================  =========
loc   name       module (``compact``)                          reduction
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

``authors`` (the ``paper`` preset's network): the network of the authors' released code (``NeurAI-Lab/MTSL``,
``encoding_custom/models/mtsl.py``, ``encoders_decoders/uninet_encoder.py`` and ``decoder.py``, heads in
``heads/``), with its widths taken from the backbone (the numbers below are ResNet18's):

====  =========  =====================================================================  =========
loc   name       module (``authors``)                                                    reduction
====  =========  =====================================================================  =========
0     stem       conv1, bn1, act1, maxpool                                               4
1-4   layer1-4   layer1 .. layer4                                                        4 .. 32
5     extra      two Bottleneck blocks, planes = layer4's (512 -> 2048), stride 2       64
6     dec1       :class:`BottleneckDecoderStage` to 4 x 64 = 256 channels, skip loc 4   32
7     dec2       the same, skip from loc 3                                               16
8     dec3       the same, skip from loc 2                                               8
9     dec4       the same, skip from loc 1                                               4
====  =========  =====================================================================  =========

Its heads (:class:`MultiScaleHead`) read all four decoder locations and end as the authors' head of their task
(:data:`~mtsl_plugin.network.heads.AUTHORS_HEADS`: S and E a 1x1 conv, D a 3x3 conv and ReLU, N a 3x3 conv and
tanh, A a 3x3 conv; any other task the plain 1x1 form). Locations 0-5 start from He initialisation with every
BatchNorm's scale at 1 (the authors' ``initialize_weights``, which their ResNet and ``uninet_encoder.py`` apply; timm
would start each residual block's last BatchNorm at 0, so the ``authors`` network builds the backbone with
``zero_init_last=False``), unless pretrained or file weights replace locations 0-4; the decoder and the heads keep
PyTorch's default initialisation, as theirs do (their ``Decoder`` calls ``initialize_weights`` only under
``MODEL.DECODER.INIT_WEIGHTS``, which their configs leave False, and their heads call nothing). The encoder-only
setting (6 locations, DeepLab heads) exists for ``compact`` only.

The table (:class:`StageSpec` rows) is plain data read by the network, the cost model and the figures.
:class:`StageFactory` is what every network reads (the table, ``build(location)``, ``build_head``, the head and
feature locations); :class:`ResNetStages` is the factory over a timm ResNet, and
:class:`~mtsl_plugin.network.backbones.TimmStages` the ``compact`` network over any other timm CNN
(:func:`~mtsl_plugin.network.backbones.create_stages` picks one for a backbone name). A factory builds fresh
modules for any location; every build of a location starts from the same weights (the backbone's, random or
pretrained), so the single-task networks MTSL starts from are identical. :meth:`StageFactory.redrawn` gives the same
network with its random initialisation drawn again (what the baselines whose references build every task's
network anew use, :func:`candidate_factories`). Heads (:mod:`mtsl_plugin.network.heads`)
are called ``head(features, size)`` with the outputs of :attr:`StageFactory.head_locations`, in order.
"""
from __future__ import annotations

import copy
import functools
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtsl_plugin.network.heads import AUTHORS_HEADS, PLAIN_HEAD, DeepLabHead, Head, MultiScaleHead
from mtsl_plugin.network.weights import create_timm_model, normalised_stem

ENCODER_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4", "extra")
DECODER_NAMES = ("dec1", "dec2", "dec3", "dec4")
NETWORKS = ("compact", "authors")


def check_network(network: str, decoder: bool) -> None:
    """Refuse, in one line, a network outside :data:`NETWORKS` and ``authors`` without the decoder."""
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}; choose one of {', '.join(NETWORKS)}")
    if network == "authors" and not decoder:
        raise ValueError("network 'authors' is an encoder-decoder; the encoder setting uses network 'compact'")
CANDIDATES = ("independent", "identical")


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


class BottleneckDecoderStage(nn.Module):
    """The authors' decoder block: upsample the input to the skip's size, concatenate the skip, then a Bottleneck
    (1x1 to ``planes``, 3x3, 1x1 to ``4 * planes``, BN after each) added to the upsampled input (through a 1x1
    projection where its width differs from ``4 * planes``, or always with ``project``: the authors' first block,
    ``dec1``, has one whatever the widths), then ReLU.

    ``forward(x (N, C_in, h, w), skip (N, C_skip, H, W)) -> (N, 4 * planes, H, W)``.
    """

    expansion = 4

    def __init__(self, in_channels: int, skip_channels: int, planes: int, project: bool = False):
        super().__init__()
        out = planes * self.expansion
        project = project or in_channels != out
        self.projection = nn.Conv2d(in_channels, out, 1, bias=False) if project else nn.Identity()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels + skip_channels, planes, 1, bias=False), nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            nn.Conv2d(planes, out, 1, bias=False), nn.BatchNorm2d(out),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return F.relu(self.body(torch.cat([x, skip], dim=1)) + self.projection(x))


def _residual_block(block_type: type[nn.Module], in_channels: int, out_channels: int) -> nn.Module:
    """A block of the backbone's kind (BasicBlock or Bottleneck) mapping in_channels to out_channels."""
    expansion = getattr(block_type, "expansion", 1)
    downsample = None
    if in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        )
    return block_type(in_channels, out_channels // expansion, downsample=downsample)


def _he_init(module: nn.Module) -> nn.Module:
    """The authors' ``initialize_weights``: convolutions N(0, 2 / (k*k*C_out)), BN weight 1 and bias 0. The
    ``authors`` network applies it to location 5 (timm's ResNet draws locations 0-4 the same way, given
    ``zero_init_last=False``); their decoder and heads keep PyTorch's."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def add_compact_tail(templates: list[nn.Module], specs: list[StageSpec], block_type: type[nn.Module],
                     decoder: bool) -> None:
    """Complete ``k`` encoder locations (``templates`` and ``specs``, one per feature stage of the backbone,
    shallow to deep) to the ``compact`` network, in place: location ``k`` ("extra") is one more block of
    ``block_type`` at the deepest stage's width and reduction; with ``decoder``, locations ``k+1 .. 2k-1``
    ("dec1" ...) are one :class:`DecoderStage` per shallower stage, deepest first, each reading the skip of feature
    stage ``k-2 .. 0`` and mapping to its width with one block. ``2k`` locations with the decoder, ``k+1`` without.
    The new blocks draw their initialisation from torch's global generator, in location order."""
    features = len(specs)
    width, reduction = specs[-1].out_channels, specs[-1].reduction
    templates.append(_residual_block(block_type, width, width))
    specs.append(StageSpec("extra", width, width, reduction))
    if not decoder:
        return
    c_in = width
    for index, skip in enumerate(range(features - 2, -1, -1)):
        c_out = specs[skip].out_channels
        templates.append(DecoderStage(_residual_block(block_type, c_in + c_out, c_out)))
        specs.append(StageSpec(f"dec{index + 1}", c_in, c_out, specs[skip].reduction, skip_from=skip,
                               skip_channels=c_out))
        c_in = c_out


class StageFactory:
    """The stage table of a network and fresh modules for its locations: what :class:`BranchedNetwork`, the
    baselines and the cost model read.

    A subclass sets ``backbone`` (the timm name), ``decoder`` (the encoder-decoder setting), ``network``
    (``compact`` or ``authors``), ``specs`` (one :class:`StageSpec` per location), ``feature_locations`` (the
    locations that end with one of the backbone's feature stages, timm's ``feature_info``, shallow to deep),
    ``_templates`` (one module per location; :meth:`build` copies them), ``seed`` (the seed of everything random
    in the templates, and of the heads) and ``_remake`` (``_remake(seed=s)`` builds the factory again from seed
    ``s``: :meth:`redrawn`).
    """

    backbone: str
    decoder: bool
    network: str
    specs: tuple[StageSpec, ...]
    feature_locations: tuple[int, ...]
    _templates: list[nn.Module]
    seed: int
    _remake: Callable[..., "StageFactory"]

    @property
    def num_locations(self) -> int:
        return len(self.specs)

    @property
    def head_locations(self) -> tuple[int, ...]:
        """The locations whose outputs every task head reads, in the order the head takes them."""
        if self.network == "authors":
            return tuple(range(self.num_locations - len(DECODER_NAMES), self.num_locations))
        return (self.num_locations - 1,)

    def build(self, location: int) -> nn.Module:
        """A fresh node for ``location``, initialised like every other node built there."""
        if not 0 <= location < self.num_locations:
            raise IndexError(f"location {location} is outside 0..{self.num_locations - 1}")
        return copy.deepcopy(self._templates[location])

    def redrawn(self, seed: int) -> "StageFactory":
        """The same network with its random initialisation drawn from ``seed``, as a second call of LibMTL's
        ``encoder_class()`` builds another task's encoder: pretrained or file weights are the same, everything they
        do not cover (the whole network without weights; with weights the extra and decoder blocks) is drawn
        again. A factory over a caller's model (``from_model``) keeps that model's weights and redraws the
        blocks added to it; the LibMTL drop-in calls the caller's ``encoder_class()`` again instead
        (:func:`~mtsl_plugin.libmtl_adapters.as_stages`)."""
        return self._remake(seed=seed)

    def check_input_size(self, height: int, width: int) -> None:
        """Refuse an image size the network cannot run on: a ``ValueError`` of one sentence naming the backbone,
        the size and the location that fails. Some timm CNNs need images of a least size (ConvNeXt, DenseNet and
        VGG 32 pixels, Inception about 75) or of multiples of one (DLA 32, TResNet 4); ResNets run on any size.
        Runs one zero image ``(1, 3, height, width)`` through one fresh node per location, in evaluation mode and
        without gradients (no weights change)."""
        self._run_one_image(height, width, self.num_locations, f"cannot run on {height}x{width} images")

    def check_batch_of_one(self, height: int, width: int) -> None:
        """Refuse a training batch of one image ``(1, 3, height, width)`` where the network cannot train on it:
        BatchNorm needs more than one value per channel, so a node or head whose feature map is 1x1 there (a
        ResNet's last stage on 32x32 images, the DeepLab head's image pooling at any size) fails, at the step that
        meets such a batch. Runs one zero image through fresh nodes of every location and a fresh head in training
        mode, without gradients and with the global random state restored (nothing of a run changes); a
        ``ValueError`` names the backbone, the size and the location or head that fails."""
        failure = f"cannot train on a batch of one {height}x{width} image"
        with torch.random.fork_rng(devices=[]):
            outputs = self._run_one_image(height, width, self.num_locations, failure, train=True)
            head = self.build_head(1).to(outputs[-1].device, outputs[-1].dtype).train()  # where the nodes ran
            try:
                with torch.no_grad():
                    head([outputs[location] for location in self.head_locations], (height, width))
            except Exception as exc:  # noqa: BLE001 - whatever the head raises, named in one line
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ValueError(f"backbone {self.backbone!r} {failure}: the task head fails ({reason})") from None

    def _run_one_image(self, height: int, width: int, locations: int, failure: str,
                       train: bool = False) -> list[torch.Tensor]:
        """One zero image through fresh nodes of locations ``0 .. locations - 1`` (evaluation mode, or training
        mode with ``train``; no gradients), returning each location's output; ``ValueError``
        ``"backbone <name> <failure>: ..."`` where a location raises or returns anything but a ``(1, C, h, w)``
        tensor of its width ``C``."""
        like = next(self._templates[0].parameters())
        outputs: list[torch.Tensor] = []
        with torch.no_grad():
            for location in range(locations):
                spec = self.specs[location]
                node = self.build(location).train(train)
                x = torch.zeros(1, 3, height, width, dtype=like.dtype, device=like.device) if location == 0 \
                    else outputs[-1]
                try:
                    out = node(x) if spec.skip_from is None else node(x, outputs[spec.skip_from])
                except Exception as exc:  # noqa: BLE001 - whatever the backbone raises, named in one line
                    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise ValueError(f"backbone {self.backbone!r} {failure}: location {location} ({spec.name}) "
                                     f"fails ({reason})") from None
                if not (torch.is_tensor(out) and out.dim() == 4 and out.shape[1] == spec.out_channels):
                    got = f"shape {tuple(out.shape)}" if torch.is_tensor(out) else f"a {type(out).__name__}"
                    raise ValueError(f"backbone {self.backbone!r} {failure}: location {location} ({spec.name}) "
                                     f"gives {got}, not an (N, {spec.out_channels}, H, W) tensor")
                outputs.append(out)
        return outputs

    def build_head(self, out_channels: int, task: str | None = None, *, name: str | None = None) -> nn.Module:
        """A task head reading the outputs of :attr:`head_locations` (:class:`MultiScaleHead` in the ``authors``
        network, :class:`Head` after the compact decoder, :class:`DeepLabHead` in the encoder-only setting), drawn
        from :func:`head_seed` of this factory's seed and ``name``, the task's name in the run: every build for one
        task is identical, so a task's head starts alike in every method of a comparison, and each task draws its
        own, as the authors' code does (docs/fidelity.md, "Each task's head drawn on its own"). Without ``name``
        the draw depends on the width alone (what every run did before d5a490d of 2026-12-07, when tasks of one
        width, N and A, D and E, started from equal heads).

        ``task`` names the built-in task (S, D, E, N, A) the head is for; in the ``authors`` network it picks that
        task's head (:data:`~mtsl_plugin.network.heads.AUTHORS_HEADS`: its last conv's size and output
        activation). ``None``, or any other name, gives the plain head (1x1, no activation), which is what a task
        a user declares gets: pass ``None`` for a declared task even where it reuses a built-in letter. The
        ``compact`` and encoder-only heads do not depend on ``task``.
        ``forward([x_l (N, C_l, h_l, w_l) for l in head_locations], size (H, W)) -> (N, out_channels, H, W)``."""
        in_channels = [self.specs[l].out_channels for l in self.head_locations]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seed + out_channels if name is None
                                                else head_seed(self.seed, name))
            if self.network == "authors":  # the authors' head width is their decoder's planes (64 on ResNet18)
                return MultiScaleHead(in_channels, in_channels[0] // BottleneckDecoderStage.expansion, out_channels,
                                      AUTHORS_HEADS.get(task, PLAIN_HEAD))
            if self.decoder:
                return Head(in_channels[0], out_channels)
            return DeepLabHead(in_channels[0], out_channels)


def head_seed(seed: int, name: str) -> int:
    """The seed of the head of the task called ``name`` in a network built from ``seed``: one that numpy's
    ``SeedSequence`` derives from ``seed`` and the CRC-32 of the name, so that tasks draw apart."""
    return int(np.random.SeedSequence([seed % (1 << 64), zlib.crc32(name.encode())]).generate_state(1)[0])


def slot_seed(seed: int, slot: int) -> int:
    """The seed of copy ``slot`` of a network built from ``seed``: ``seed`` itself for slot 0, for the others one
    that numpy's ``SeedSequence`` derives from ``(seed, slot)``, so that no two copies, and no copy and another
    run's seed, share their initialisation."""
    if slot == 0:
        return seed
    return int(np.random.SeedSequence([seed % (1 << 64), slot]).generate_state(1, np.uint64)[0] >> 1)


def candidate_factories(stages: StageFactory, count: int, candidates: str = "independent") -> list[StageFactory]:
    """The factories of ``count`` copies of ``stages``' network, one per task slot of a baseline that holds a
    network (or a candidate node per location) for every task.

    ``independent``: slot 0 is ``stages``, slot ``j`` its :meth:`~StageFactory.redrawn` copy from
    :func:`slot_seed`, as the baselines' references start: LibMTL calls ``encoder_class()`` once per task
    (LTB, cross-stitch), and brdav/bmtas initialises every candidate operation on its own before loading the
    ImageNet weights into the encoder's. With pretrained or file weights the copies differ only where those
    weights do not reach. ``identical``: ``stages`` for every slot (all copies start as one network, as MTSL's
    single-task networks do).
    """
    if candidates not in CANDIDATES:
        raise ValueError(f"candidates must be one of {CANDIDATES}, got {candidates!r}")
    if candidates == "identical":
        return [stages] * count
    if getattr(stages, "_remake", None) is None or getattr(stages, "seed", None) is None:
        raise ValueError(f"stages {type(stages).__name__} cannot draw their initialisation again (no seed and "
                         "_remake, see StageFactory); pass arch_args candidates='identical'")
    return [stages] + [stages.redrawn(slot_seed(stages.seed, j)) for j in range(1, count)]


class ResNetStages(StageFactory):
    """Stage factory over a timm ResNet (``resnet18`` default; any timm ResNet with layer1-4 works).

    Args:
        backbone: timm model name.
        pretrained: load timm's pretrained weights through timm's own mechanism (needs the hub or its cache).
        weights: a local weights file for the backbone (timm's ``pretrained_cfg_overlay=dict(file=...)``).
        decoder: build the 4 decoder locations (encoder-decoder setting); without it there are 6 locations.
        seed: seed for the random initialisation of everything the backbone does not provide.
        backbone_args: further keyword arguments of ``timm.create_model``, e.g. ``{"channels": (16, 32, 64, 128)}``
            for a ResNet of a quarter of the usual width (the ``smoke`` and ``quick`` presets use narrow ResNets).
        network: ``compact`` or ``authors`` (see the module docstring); ``authors`` needs the decoder.
    """

    def __init__(self, backbone: str = "resnet18", *, pretrained: bool = False, weights: str | Path | None = None,
                 decoder: bool = True, seed: int = 0, backbone_args: dict | None = None, network: str = "compact"):
        check_network(network, decoder)  # before the timm model is built
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU generator only: fork_rng restores no GPU one
            authors_init = {"zero_init_last": False} if network == "authors" else {}  # BN scales at 1, as theirs
            model = create_timm_model(backbone, pretrained=pretrained, weights=weights,
                                      backbone_args={**authors_init, **(backbone_args or {})}, num_classes=0)
            self._build(model, backbone, decoder, network, seed, normalise=pretrained or weights is not None)
        self._remake = functools.partial(ResNetStages, backbone, pretrained=pretrained, weights=weights,
                                         decoder=decoder, backbone_args=backbone_args, network=network)

    @classmethod
    def from_model(cls, model: nn.Module, *, decoder: bool = True, network: str = "compact", seed: int = 0
                   ) -> "ResNetStages":
        """Stages over a timm ResNet the caller built (e.g. LibMTL's ``encoder_class()``), used as it is: its
        weights, and no input normalisation added (the caller's data feeds it as it expects)."""
        check_network(network, decoder)
        stages = cls.__new__(cls)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            stages._build(model, type(model).__name__, decoder, network, seed, normalise=False)
        stages._remake = functools.partial(ResNetStages.from_model, model, decoder=decoder, network=network)
        return stages

    def _build(self, model: nn.Module, backbone: str, decoder: bool, network: str, seed: int, normalise: bool
               ) -> None:
        if not all(hasattr(model, a) for a in ("conv1", "bn1", "act1", "maxpool", "layer1", "layer4", "feature_info")):
            raise ValueError(f"backbone {backbone!r} is not a timm ResNet with conv1/bn1/act1/maxpool/layer1-4")
        channels = [info["num_chs"] for info in model.feature_info]  # stem, layer1..4
        if network == "authors":
            templates, specs = self._authors_templates_and_specs(model, channels)
        else:
            templates, specs = self._templates_and_specs(model, channels, decoder)
        if normalise:  # the weights expect the inputs they were trained on
            templates[0] = normalised_stem(templates[0], model)
        self.backbone = backbone
        self.decoder = decoder
        self.network = network
        self.seed = seed
        self.specs: tuple[StageSpec, ...] = tuple(specs)
        self.feature_locations = (0, 1, 2, 3, 4)  # stem (with the max-pool in 'authors'), layer1-4
        self._templates = templates

    @staticmethod
    def _templates_and_specs(model: nn.Module, channels: list[int], decoder: bool
                             ) -> tuple[list[nn.Module], list[StageSpec]]:
        templates: list[nn.Module] = [
            nn.Sequential(model.conv1, model.bn1, model.act1),
            nn.Sequential(model.maxpool, model.layer1),
            model.layer2,
            model.layer3,
            model.layer4,
        ]
        specs = [StageSpec(name, cin, cout, red) for name, cin, cout, red in zip(
            ENCODER_NAMES, [3] + channels, channels, [2, 4, 8, 16, 32])]
        add_compact_tail(templates, specs, type(model.layer4[-1]), decoder)
        return templates, specs

    @staticmethod
    def _authors_templates_and_specs(model: nn.Module, channels: list[int]
                                     ) -> tuple[list[nn.Module], list[StageSpec]]:
        from timm.models.resnet import Bottleneck

        expansion = getattr(type(model.layer4[-1]), "expansion", 1)
        extra_planes = channels[4] // expansion  # layer4's planes: 512 -> 2048 on ResNet18
        extra_out = extra_planes * Bottleneck.expansion
        downsample = nn.Sequential(nn.Conv2d(channels[4], extra_out, 1, stride=2, bias=False),
                                   nn.BatchNorm2d(extra_out))
        extra = _he_init(nn.Sequential(Bottleneck(channels[4], extra_planes, stride=2, downsample=downsample),
                                       Bottleneck(extra_out, extra_planes)))
        templates: list[nn.Module] = [nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool),
                                      model.layer1, model.layer2, model.layer3, model.layer4, extra]
        reductions = [4, 4, 8, 16, 32, 64]
        specs = [StageSpec(name, cin, cout, red) for name, cin, cout, red in zip(
            ENCODER_NAMES, [3] + channels, channels + [extra_out], reductions)]
        planes = channels[1] // expansion  # layer1's planes: 64 on ResNet18, a 256-channel decoder
        c_in = extra_out
        for i, name in enumerate(DECODER_NAMES):
            skip = 4 - i
            stage = BottleneckDecoderStage(c_in, channels[skip], planes, project=i == 0)  # PyTorch's init, as theirs
            templates.append(stage)
            c_out = planes * BottleneckDecoderStage.expansion
            specs.append(StageSpec(name, c_in, c_out, reductions[skip], skip_from=skip, skip_channels=channels[skip]))
            c_in = c_out
        return templates, specs
