"""MTSL through LibMTL's own calls: ``Trainer(...)`` with LibMTL's arguments, then ``train(...)`` and ``test(...)``.

A LibMTL user's script (``examples/nyu/main.py`` and the like) builds ``Trainer(task_dict, weighting,
architecture, encoder_class, decoders, rep_grad, multi_input, optim_param, scheduler_param, **kwargs)`` and calls
``train(train_dataloaders, test_dataloaders, epochs, val_dataloaders=None)``. :class:`Trainer` takes exactly
that and runs MTSL's loop (:meth:`MTLTrainer.fit`: alignment loss, structural phases, checkpoints) when the
architecture is MTSL, or our loop without a structural learner for any other architecture:

* LibMTL's own architectures (HPS, MMoE, ...) get ``encoder_class`` and ``decoders`` exactly as LibMTL passes
  them; the points below are about this project's architectures (MTSL, cross-stitch, MTAN, LTB, BMTAS);

* ``weighting`` / ``architecture``: LibMTL classes or their names (``"EW"``, ``"MTSL"``);
* ``encoder_class``: a zero-argument callable returning our stages (:func:`~mtsl_plugin.network.create_stages`)
  or a timm CNN (e.g. ``lambda: timm.create_model("resnet18")`` or ``"convnext_atto"``), whose stages become the
  merge locations (:meth:`TimmStages.from_model` for other families than ResNets);
* ``decoders``: task -> head; a LibMTL head (``head(features)`` on one tensor) reads the last location's output
  and is upsampled to the input size; our heads (``head(features, size)``) are used as they are;
* ``kwargs``: LibMTL's ``weight_args`` and ``arch_args``; ``arch_args["mtsl"]`` holds MTSL's options (an
  :class:`~mtsl_plugin.learner.schedule.MTSLConfig` or a dict of its fields; without ``task_epochs``, the
  paper's schedule scaled to ``train()``'s epochs), ``arch_args["plan"]`` a starting
  plan, ``arch_args["network"]`` / ``arch_args["setting"]`` the stages built over a timm ResNet;
  ``save_path`` (a folder: the resume checkpoint ``checkpoint.pt``, continued by a new ``Trainer`` on the same
  folder, and the final weights ``model.pt``), ``load_path`` (weights or a checkpoint to start from; its plan
  is used), ``device`` (default CUDA when available).

Evaluation and best-epoch selection: LibMTL evaluates the test loader after every epoch and reports the best
epoch by the test results when no validation loader is given. Here the model of the **last** epoch is the
result (MTSL's architecture changes during training; the paper reports the final network), the test loader is
evaluated once, after training, and never selects anything. ``val_dataloaders``, when given, is evaluated after
training too and its data is what grouping decisions are measured on; without it, grouping decisions use the
first 800 training samples (as the authors do, through the training set's own transform).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from mtsl_plugin.architecture import MTSL
from mtsl_plugin.learner.schedule import MTSLConfig, require, scale_schedule
from mtsl_plugin.learner.structural import StructuralLearner
from mtsl_plugin.libmtl_compat import import_libmtl
from mtsl_plugin.network.backbones import TimmStages
from mtsl_plugin.network.stages import ResNetStages, StageFactory
from mtsl_plugin.plan import BranchingPlan
from mtsl_plugin.trainer import MTLTrainer, RunData

AUTHORS_SIMILARITY_SAMPLES = 800  # the authors measure similarity on the first 800 training images
CHECKPOINT, WEIGHTS = "checkpoint.pt", "model.pt"


class LibMTLHead(nn.Module):
    """A LibMTL decoder (``decoder(x (N, C, h, w))``) as one of our heads: it reads the last head location's
    output and its prediction is upsampled (bilinear) to the input size."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        out = self.decoder(features[-1])
        return out if tuple(out.shape[-2:]) == tuple(size) else F.interpolate(out, size=size, mode="bilinear",
                                                                              align_corners=False)


def as_head(decoder: nn.Module) -> nn.Module:
    """Our heads as they are; a module whose ``forward`` takes one required argument wrapped in :class:`LibMTLHead`."""
    required = [p for p in inspect.signature(decoder.forward).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return LibMTLHead(decoder) if len(required) == 1 else decoder


def as_stages(encoder_class: Callable[[], Any], network: str = "compact", setting: str = "encoder-decoder"
              ) -> StageFactory:
    """The stages of LibMTL's ``encoder_class``: our stages as they are; a timm model split into locations (a
    ResNet into the ``compact`` or ``authors`` table, any other timm CNN into its feature stages, ``compact``)."""
    built = encoder_class()
    if isinstance(built, StageFactory):
        return built
    decoder = setting == "encoder-decoder"
    if isinstance(built, timm.models.ResNet):
        return ResNetStages.from_model(built, decoder=decoder, network=network)
    if isinstance(built, nn.Module):
        if network != "compact":
            raise ValueError(f"network {network!r} is built on a timm ResNet; encoder {type(built).__name__} takes "
                             "network 'compact'")
        return TimmStages.from_model(built, decoder=decoder)
    raise ValueError(f"encoder_class must return our stages or a timm model, got {type(built).__name__}")


def _resolve(value: Any, namespace: Any, kind: str) -> type:
    if isinstance(value, str):
        if not hasattr(namespace, value):
            raise ValueError(f"LibMTL has no {kind} named {value!r}")
        return getattr(namespace, value)
    return value


class LoaderData(RunData):
    """:class:`RunData` over a user's loaders: training batches come from the user's loader as it is (its own
    sampler, order and transforms, so a resumed run sees other batches than an uninterrupted one); everything
    else (grouping data, amalgamation, BMTAS's split) is batched at the loader's batch size."""

    def __init__(self, loader: DataLoader, grouping: Dataset, test: Dataset, seed: int = 0):
        super().__init__(train=loader.dataset, holdout=grouping, test=test, batch_size=loader.batch_size or 1,
                         seed=seed)
        self.loader = loader

    def batches(self, dataset: Dataset, key: Iterable[int] | None = None, shard: bool = True) -> DataLoader:
        if dataset is self.train and key is not None and key[0] == 0:  # the epochs' training batches
            return self.loader
        return super().batches(dataset, key, shard)


class Trainer(MTLTrainer):
    """LibMTL's ``Trainer`` interface with MTSL's training (see the module docstring)."""

    def __init__(self, task_dict, weighting, architecture, encoder_class, decoders, rep_grad=False,
                 multi_input=False, optim_param=None, scheduler_param=None, save_path=None, load_path=None, *,
                 device: str | torch.device | None = None, **kwargs):
        libmtl = import_libmtl()
        weighting = _resolve(weighting, libmtl.weighting, "weighting method")
        architecture = _resolve(architecture, libmtl.architecture, "architecture")
        arch_args = dict(kwargs.get("arch_args") or {})
        mtsl = arch_args.pop("mtsl", None)
        ours = architecture.__module__.split(".")[0] in ("mtsl_plugin", "baselines")
        if ours:  # our architectures run on merge-location stages and call heads with the output size
            stages = as_stages(encoder_class, arch_args.pop("network", "compact"),
                               arch_args.pop("setting", "encoder-decoder"))
            encoder_class, decoders = (lambda: stages), {t: as_head(d) for t, d in dict(decoders).items()}
        self.save_path = None if save_path is None else Path(save_path)
        load_path = None if load_path is None else Path(load_path)
        if load_path is not None and not load_path.is_file():
            raise FileNotFoundError(f"load_path {str(load_path)!r} is not a file")
        resume = self.save_path / CHECKPOINT if self.save_path is not None else None
        start = resume if resume is not None and resume.is_file() else load_path  # an unfinished run wins
        learner = None
        self._scale_schedule = False
        if issubclass(architecture, MTSL):
            options = mtsl.to_dict() if isinstance(mtsl, MTSLConfig) else dict(mtsl or {})
            self._scale_schedule = "task_epochs" not in options  # the paper's schedule, scaled in train()
            learner = StructuralLearner(MTSLConfig.from_dict(options))
            if start is not None:
                arch_args["plan"] = MTLTrainer.checkpoint_plan(start)
            arch_args.setdefault("plan", BranchingPlan.single_task(list(task_dict), stages.num_locations))
        elif mtsl is not None:
            raise ValueError(f"arch_args['mtsl'] is for the MTSL architecture, not {architecture.__name__}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        super().__init__(task_dict, weighting, architecture, encoder_class, decoders, rep_grad, multi_input,
                         optim_param, scheduler_param, device=device, learner=learner,
                         **{**kwargs, "arch_args": arch_args})
        if start is not None:
            self.load(start)

    def train(self, train_dataloaders, test_dataloaders, epochs: int, val_dataloaders=None,
              return_weight: bool = False, progress: bool = True) -> dict[str, dict[str, float]]:
        """Train for ``epochs`` epochs (MTSL's phases, alignment and checkpoints included), then evaluate.

        Returns ``{"test": {task: metric}}`` (plus ``"val"`` when ``val_dataloaders`` is given), the last epoch's
        model's results. With ``save_path`` an unfinished run in that folder is resumed.
        """
        if self.multi_input or isinstance(train_dataloaders, Mapping):
            raise ValueError("MTSL trains all tasks on one input: pass one training DataLoader (multi_input=False)")
        if return_weight:
            raise ValueError("return_weight is not supported: the task weights are not recorded per batch")
        require("epochs", epochs, int, 1)
        if self.learner is not None:
            if self._scale_schedule and self.learner.phases_done == 0:
                self.learner.config = scale_schedule(self.learner.config, epochs)
            ends = self.learner.config.phase_ends()
            if ends and ends[-1] > epochs:
                raise ValueError(f"MTSL's phases end after {ends[-1]} task-learning epochs (arch_args['mtsl'] "
                                 f"task_epochs) but train() was given {epochs} epochs")
        if val_dataloaders is not None:
            grouping = val_dataloaders.dataset
        else:
            dataset = train_dataloaders.dataset
            grouping = Subset(dataset, range(min(AUTHORS_SIMILARITY_SAMPLES, len(dataset))))
        data = LoaderData(train_dataloaders, grouping, test_dataloaders.dataset)
        checkpoint = None
        if self.save_path is not None:
            self.save_path.mkdir(parents=True, exist_ok=True)
            checkpoint = self.save_path / CHECKPOINT
        self.fit(data, epochs, checkpoint=checkpoint, progress=progress)
        if self.save_path is not None:
            self.save_weights(self.save_path / WEIGHTS)
        results = {"test": self.test(test_dataloaders)}
        if val_dataloaders is not None:
            results["val"] = self.test(val_dataloaders, mode="val")
        return results

    def test(self, test_dataloaders, epoch: int | None = None, mode: str = "test") -> dict[str, float]:
        """Each task's metric on ``test_dataloaders`` (printed, and returned as ``{task: value}``)."""
        scores = self.evaluate(test_dataloaders)
        print(f"{mode}: " + "  ".join(f"{t} {v:.4f}" for t, v in scores.items()))
        return scores
