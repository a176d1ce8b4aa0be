"""The stage table of any timm CNN, and the one factory that picks a stage table for a backbone name.

:func:`create_stages` is how every caller gets stages: a timm ResNet (a model of ``timm/models/resnet.py``:
ResNet, ResNeXt, SE-ResNet, ...) gets :class:`~mtsl_plugin.network.stages.ResNetStages` (networks ``compact``
and ``authors``, unchanged, so every earlier run keeps its fingerprint and numbers); any other timm CNN whose
``features_only`` model runs its modules in sequence gets :class:`TimmStages`, the ``compact`` network over it.

:class:`TimmStages` cuts timm's ``features_only`` model into one location per feature it returns (``k`` feature
stages; ``feature_info`` may list more, e.g. DLA's stride-1 ``level0``, which then runs inside the first stage):
location ``i`` runs the modules after feature ``i - 1`` up to and including feature ``i``, so running locations
``0 .. k-1`` in turn gives timm's feature maps exactly (tested). Widths and reductions are ``feature_info``'s. A
feature stage without parameters (VGG's last max-pool) would be a location with nothing to share; it joins the
stage before it (:func:`join_parameter_free`), so VGG has 5 feature stages, not 6. Then, as ``compact`` on a
ResNet (:func:`~mtsl_plugin.network.stages.add_compact_tail`): location ``k`` is one more residual block (timm's
ResNet ``BasicBlock``) at the deepest width, and with the decoder, locations ``k+1 .. 2k-1`` upsample,
concatenate the skip of feature stage ``k-2 .. 0`` and map to its width with one ``BasicBlock``; the heads
(``Head``) read the last location, at the first feature stage's reduction (``DeepLabHead`` on location ``k`` in
the encoder setting). ``2k`` locations with the decoder, ``k+1`` without:

=======================  ====================================  ====================  ==========  =========
family (timm name)       feature stages (timm module names)    widths                reductions  locations
=======================  ====================================  ====================  ==========  =========
ConvNeXt (atto)          stages.0 .. stages.3                  40, 80, 160, 320      4 .. 32     8 / 5
EfficientNet (b0)        blocks.0, .1, .2, .4, .6              16, 24, 40, 112, 320  2 .. 32     10 / 6
MobileNetV3 (small_050)  bn1 (the stem), blocks.0, .1, .3, .5  16, 8, 16, 24, 288    2 .. 32     10 / 6
RegNet (x_002)           stem, s1 .. s4                        32, 24, 56, 152, 368  2 .. 32     10 / 6
=======================  ====================================  ====================  ==========  =========

(locations: encoder-decoder / encoder setting.)

Which ``features_only`` models can be cut: timm's ``FeatureListNet`` / ``FeatureDictNet`` (most CNNs: its
modules run in order and the features are the outputs of ``return_layers``) and the ``EfficientNetFeatures`` /
``MobileNetV3Features`` of the EfficientNet, MobileNet and related families (stem, then ``blocks``; feature ``i``
after block stage ``i - 1``, feature 0 after the stem). Models whose features come from hooks or from
``forward_intermediates`` (``FeatureHookNet``, ``FeatureGetterNet``: vision transformers, Xception, HRNet, ...),
those whose features are channels-last (MambaOut, Sequencer) and those whose stages pass anything but one
``(N, C, H, W)`` tensor of the listed width (SelecSLS passes lists; found by running the stages once on one image
of timm's input size when the table is built) are refused in one line. Some CNNs need a least image size or
multiples of one (DLA: multiples of 32; Inception: about 75 pixels); :meth:`StageFactory.check_input_size
<mtsl_plugin.network.stages.StageFactory.check_input_size>` refuses a size the network cannot run on.
"""
from __future__ import annotations

import functools
import json
from collections import OrderedDict
from pathlib import Path

import timm
import torch
from timm.models import model_entrypoint
from timm.models._features import FeatureDictNet, FeatureListNet
from timm.models.efficientnet import EfficientNetFeatures
from timm.models.mobilenetv3 import MobileNetV3Features
from timm.models.resnet import BasicBlock
from torch import nn

from mtsl_plugin.network.stages import ResNetStages, StageFactory, StageSpec, add_compact_tail, check_network
from mtsl_plugin.network.weights import create_timm_model, normalised_stem


def is_timm_resnet(backbone: str) -> bool:
    """Whether timm builds ``backbone`` in ``timm/models/resnet.py`` (its ``ResNet`` class: layer1-4)."""
    return timm.is_model(backbone) and model_entrypoint(backbone).__module__ == "timm.models.resnet"


def architecture_family(backbone: str) -> str | None:
    """The timm module that defines ``backbone`` (e.g. ``timm.models.convnext``), ``None`` for an unknown name:
    models of one family take the same ``timm.create_model`` keyword arguments."""
    return model_entrypoint(backbone).__module__ if timm.is_model(backbone) else None


def feature_stages(model: nn.Module, backbone: str) -> list[nn.Sequential]:
    """timm's ``features_only`` ``model`` cut into one ``nn.Sequential`` per feature it returns (the modules keep
    their timm names, dots as underscores): stage ``i`` maps feature ``i - 1`` (the image for ``i = 0``)
    ``(N, C_{i-1}, H_{i-1}, W_{i-1})`` to feature ``i`` ``(N, feature_info.channels()[i], H / reduction_i, ...)``."""
    if isinstance(model, FeatureDictNet) and model.output_fmt != "NCHW":
        raise ValueError(f"backbone {backbone!r}: timm gives its features channels-last ({model.output_fmt.value}); "
                         "the stages need (N, C, H, W) feature maps")
    if isinstance(model, FeatureDictNet):  # FeatureListNet too: its modules run in order
        sequence = [(name, module, name in model.return_layers) for name, module in model.items()]
    elif isinstance(model, (EfficientNetFeatures, MobileNetV3Features)) and model.feature_hooks is None:
        stem = [("conv_stem", model.conv_stem), ("bn1", model.bn1)] + (
            [("act1", model.act1)] if hasattr(model, "act1") else [])
        out = model._stage_out_idx  # 0: the stem's output, i: after block stage i - 1
        sequence = [(name, module, 0 in out and index == len(stem) - 1) for index, (name, module) in enumerate(stem)]
        sequence += [(f"blocks_{i}", block, i + 1 in out) for i, block in enumerate(model.blocks)]
    else:
        raise ValueError(f"backbone {backbone!r}: timm's features_only model ({type(model).__name__}) does not run "
                         "its stages in sequence, so it cannot be cut into merge locations; use a CNN such as "
                         "convnext_tiny, efficientnet_b0, regnetx_002, mobilenetv3_large_100 or a ResNet")
    stages, current = [], OrderedDict()
    for name, module, ends_stage in sequence:
        current[name] = module
        if ends_stage:
            stages.append(nn.Sequential(current))
            current = OrderedDict()
    wanted = len(model.feature_info.channels())  # the features it returns (out_indices), not every entry listed
    if len(stages) != wanted:
        raise ValueError(f"backbone {backbone!r}: cut into {len(stages)} stages but timm's features_only model "
                         f"returns {wanted} features")
    return stages


def join_parameter_free(stages: list[nn.Sequential], backbone: str) -> tuple[list[nn.Sequential], list[int]]:
    """``stages`` with every stage that holds no parameters (VGG's last max-pool) joined to the stage before it
    (a leading one to the stage after it): a merge location needs weights that tasks can share or keep apart.
    Returns the joined stages and, for each, the index of the feature stage it ends with (its timm feature)."""
    joined: list[nn.Sequential] = []
    ends: list[int] = []
    leading: list[tuple[str, nn.Module]] = []
    for index, stage in enumerate(stages):
        if any(True for _ in stage.parameters()):
            joined.append(nn.Sequential(OrderedDict(leading + list(stage.named_children()))) if leading else stage)
            ends.append(index)
            leading = []
        elif joined:
            joined[-1] = nn.Sequential(OrderedDict(list(joined[-1].named_children()) + list(stage.named_children())))
            ends[-1] = index
        else:
            leading += list(stage.named_children())
    if leading:
        raise ValueError(f"backbone {backbone!r}: its feature stages hold no parameters")
    return joined, ends


class TimmStages(StageFactory):
    """The ``compact`` network over any timm CNN that :func:`feature_stages` can cut (see the module docstring).

    Args:
        backbone: timm model name, e.g. ``convnext_atto``, ``efficientnet_b0``, ``regnetx_002``.
        pretrained: timm's pretrained weights (through timm's own mechanism: the hub or its cache).
        weights: a local weights file for the backbone (timm's ``pretrained_cfg_overlay=dict(file=...)``).
        decoder: build the decoder locations (encoder-decoder setting): ``2k`` locations, else ``k + 1``.
        seed: seed for the random initialisation (the backbone's without weights, and the extra and decoder
            blocks).
        backbone_args: further keyword arguments of ``timm.create_model``, e.g. ``{"dims": (16, 32, 64, 128)}``
            for a narrow ConvNeXt.

    With weights, location 0 normalises the images as the weights expect (timm's ``pretrained_cfg``).
    """

    network = "compact"

    def __init__(self, backbone: str, *, pretrained: bool = False, weights: str | Path | None = None,
                 decoder: bool = True, seed: int = 0, backbone_args: dict | None = None):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU generator only: fork_rng restores no GPU one
            model = create_timm_model(backbone, pretrained=pretrained, weights=weights, backbone_args=backbone_args,
                                      features_only=True)
            self._build(model, backbone, decoder, seed, normalise=pretrained or weights is not None)
        self._remake = functools.partial(TimmStages, backbone, pretrained=pretrained, weights=weights,
                                         decoder=decoder, backbone_args=backbone_args)

    @classmethod
    def from_model(cls, model: nn.Module, *, decoder: bool = True, seed: int = 0) -> "TimmStages":
        """Stages over a timm CNN the caller built without ``features_only`` (e.g. LibMTL's ``encoder_class()``),
        used as it is: its weights, no input normalisation added. Its modules are wrapped in timm's
        ``FeatureListNet`` at every ``feature_info`` stage (its top-level modules in order, sequences flattened),
        which serves the families whose features are outputs of those modules (ConvNeXt, RegNet, EfficientNet,
        MobileNetV3, ...); any other is refused in one line."""
        name = type(model).__name__
        if not hasattr(model, "feature_info"):
            raise ValueError(f"encoder {name} is not a timm model (it has no feature_info)")
        try:
            wrapped = FeatureListNet(model, out_indices=tuple(range(len(model.feature_info))),
                                     flatten_sequential=True)
        except (AssertionError, ValueError, KeyError, AttributeError) as exc:
            raise ValueError(f"encoder {name}: timm cannot list its features as outputs of its modules "
                             f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); pass "
                             "create_stages(<timm name>) instead") from None
        stages = cls.__new__(cls)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            stages._build(wrapped, name, decoder, seed, normalise=False)
        stages._remake = functools.partial(TimmStages.from_model, model, decoder=decoder)
        return stages

    def _build(self, model: nn.Module, backbone: str, decoder: bool, seed: int, normalise: bool) -> None:
        joined, ends = join_parameter_free(feature_stages(model, backbone), backbone)
        templates: list[nn.Module] = list(joined)
        info = model.feature_info
        channels = [info.channels()[i] for i in ends]
        specs = [StageSpec(name, c_in, c_out, reduction) for name, c_in, c_out, reduction
                 in zip([info.module_name()[i] for i in ends], [3] + channels, channels,
                        [info.reduction()[i] for i in ends])]
        add_compact_tail(templates, specs, BasicBlock, decoder)
        if normalise:  # the weights expect the inputs they were trained on
            templates[0] = normalised_stem(templates[0], model)
        self.backbone = backbone
        self.decoder = decoder
        self.seed = seed
        self.specs = tuple(specs)
        self.feature_locations = tuple(range(len(channels)))
        self._templates = templates
        # timm lists the features, but only running them shows that each stage gives the next one a tensor of
        # the listed width (SelecSLS's stages pass lists): once, at the size timm's configuration names
        cfg = getattr(model, "pretrained_cfg", None) or {}
        height, width = tuple(cfg.get("input_size", (3, 224, 224)))[-2:]
        self._run_one_image(height, width, len(channels), "cannot be cut into merge locations")


def create_stages(backbone: str = "resnet18", *, pretrained: bool = False, weights: str | Path | None = None,
                  decoder: bool = True, seed: int = 0, backbone_args: dict | None = None, network: str = "compact"
                  ) -> StageFactory:
    """The stage table of ``backbone`` (arguments as :class:`~mtsl_plugin.network.stages.ResNetStages`):
    :class:`ResNetStages` for a timm ResNet, :class:`TimmStages` (``compact`` only) for any other timm CNN.
    Every error a user can cause (unknown name, a model that cannot be cut, network ``authors`` on another
    family, weights) is a ``ValueError`` of one sentence naming the backbone, except a weights file that does not
    exist: a ``FileNotFoundError`` naming the file."""
    check_network(network, decoder)
    if not timm.is_model(backbone):
        raise ValueError(f"backbone {backbone!r} is not a timm model name (e.g. resnet18, convnext_atto, "
                         "efficientnet_b0, regnetx_002, mobilenetv3_small_100)")
    options = dict(pretrained=pretrained, weights=weights, decoder=decoder, seed=seed, backbone_args=backbone_args)
    if is_timm_resnet(backbone):
        return ResNetStages(backbone, network=network, **options)
    if network != "compact":
        raise ValueError(f"network {network!r} is built on a timm ResNet; backbone {backbone!r} takes network "
                         "'compact' (--network compact)")
    return TimmStages(backbone, **options)


def location_count(backbone: str, *, decoder: bool = True, backbone_args: dict | None = None,
                   network: str = "compact") -> int:
    """The number of merge locations of :func:`create_stages`' table (10 / 6 on a ResNet, ``2k`` / ``k + 1`` on a
    timm CNN of ``k`` feature stages), without weights; built once per distinct arguments in a process."""
    return _location_count(backbone, decoder, json.dumps(backbone_args or {}, sort_keys=True), network)


@functools.lru_cache(maxsize=64)
def _location_count(backbone: str, decoder: bool, backbone_args: str, network: str) -> int:
    return create_stages(backbone, decoder=decoder, backbone_args=json.loads(backbone_args),
                         network=network).num_locations
