"""A backbone's timm model with its weights (timm's, a local file's, or none) and the stem that normalises the
images as those weights expect: what :class:`~mtsl_plugin.network.stages.ResNetStages` and
:class:`~mtsl_plugin.network.backbones.TimmStages` build their locations from."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import timm
import torch
from torch import nn

#: ImageNet's per-channel mean and standard deviation (of images in [0, 1]): what pretrained weights expect.
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


def normalised_stem(stem: nn.Sequential, model: nn.Module) -> NormalizedStem:
    """``stem`` (location 0's modules, names kept) normalising its input as ``model``'s weights expect: the mean
    and standard deviation of timm's ``pretrained_cfg`` (ImageNet's where it gives none)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return NormalizedStem(OrderedDict(stem.named_children()), mean=cfg.get("mean", IMAGENET_MEAN),
                          std=cfg.get("std", IMAGENET_STD))


def create_timm_model(backbone: str, *, pretrained: bool, weights: str | Path | None, backbone_args: dict | None,
                      **timm_kwargs) -> nn.Module:
    """``timm.create_model(backbone, ...)`` with the backbone's weights: timm's (``pretrained``), a local file
    (``weights``, through ``pretrained_cfg_overlay``) or none; ``backbone_args`` and ``timm_kwargs`` are passed on
    (lists in ``backbone_args``, as YAML and JSON give them, as tuples). A weights file that does not exist is a
    ``FileNotFoundError``; every other failure a ``ValueError`` of one sentence naming the backbone (or the
    weights file). The caller seeds the random initialisation."""
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"backbone weights file {str(weights)!r} does not exist")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in (backbone_args or {}).items()}
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
    try:
        model = timm.create_model(backbone, pretrained=pretrained or weights is not None, **kwargs, **timm_kwargs)
    except Exception as exc:  # unknown name, unreadable weights file, hub unreachable, no features_only
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if weights is not None:
            raise ValueError(f"backbone weights file {str(weights)!r} could not be loaded into "
                             f"{backbone!r}: {reason}") from None
        if isinstance(exc, OSError):
            raise ValueError(f"timm could not fetch pretrained weights for {backbone!r} ({reason}); "
                             "pass a local weights file with --weights when offline") from None
        raise ValueError(f"timm could not build backbone {backbone!r}: {reason}") from None
    if weights is not None:
        check_loaded(model, weights, backbone)
    return model


def check_loaded(model: nn.Module, weights: str | Path, backbone: str) -> None:
    """Refuse a weights file that left ``model`` mostly at its random initialisation. timm loads a file into a
    model without its classifier non-strictly (unknown and missing names are only logged), so a file of another
    model would otherwise pass silently; a tensor counts as loaded when the file holds one equal to it."""
    try:
        found = [t for t in timm.models.load_state_dict(str(weights)).values() if torch.is_tensor(t)]
    except Exception:  # noqa: BLE001 - timm read the file a moment ago; nothing to count if it cannot now
        return
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for tensor in found:
        by_shape.setdefault(tuple(tensor.shape), []).append(tensor)
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    loaded = sum(any(torch.equal(t, f.to(t.dtype)) for f in by_shape.get(tuple(t.shape), [])) for t in tensors)
    if 2 * loaded < len(tensors):
        raise ValueError(f"backbone weights file {str(weights)!r} holds only {loaded} of the {len(tensors)} tensors "
                         f"of {backbone!r}; it is not a checkpoint of this backbone (and width)")
