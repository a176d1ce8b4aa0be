"""Run configuration: presets (YAML files shipped with the package) and their overrides."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from mtsl_plugin.learner.schedule import MTSLConfig, require, scale_schedule
from mtsl_plugin.libmtl_compat import weight_args as libmtl_weight_args
from mtsl_plugin.network.backbones import architecture_family
from mtsl_plugin.network.branched import check_task_names
from mtsl_plugin.network.stages import check_network
from mtsl_plugin.tasks import LOSS_SETS

PRESETS = ("smoke", "quick", "paper")
# the paper's Table 2 (10 merge locations on a ResNet, 2k on a timm CNN of k feature stages) and Table 1 (6 and
# k + 1, DeepLab heads); mtsl_plugin.experiment.num_locations counts a configuration's
SETTINGS = ("encoder-decoder", "encoder")
#: Where MTSL's grouping data comes from: a held-out slice of the training split, or its first images (trained on).
GROUPING_DATA = ("holdout", "train")
#: How a run computes, not what it computes: not in fingerprints, and a resumed run may change them.
EXECUTION_OPTIONS = ("fused", "channels_last", "compile", "workers")


def home(path: Any) -> Any:
    """``path`` (a string or a ``pathlib.Path``) as a string with a leading ``~`` expanded to the user's home folder
    (a shell expands it on the command line, a ``--config`` file or a Python caller does not); anything else
    unchanged."""
    path = os.fspath(path) if isinstance(path, os.PathLike) else path
    return os.path.expanduser(path) if isinstance(path, str) else path


@dataclass(frozen=True)
class DataConfig:
    """Which data, at what resolution, and how many samples. MTSL's grouping decisions measure ``holdout``
    images: with ``grouping_data: holdout`` (the default) a slice cut from the end of the training split that no
    method trains on (``train`` excludes it); with ``grouping_data: train`` the first ``holdout`` images of the
    training split, which every method also trains on (the authors' protocol: their first 800 training images)."""

    name: str = "synthetic"
    root: str | None = None
    height: int = 64
    width: int = 64
    train: int | None = 256
    holdout: int = 64
    test: int | None = 64
    augment: bool | None = None  # random zoom and flip of real training data; None: on for NYUv2 and Cityscapes (as
    # the authors), off for folder data (a declared dense task's values may depend on scale or direction)
    grouping_data: str = "holdout"  # the images grouping decisions measure: holdout or train (GROUPING_DATA)

    @property
    def augments(self) -> bool:
        """Whether the training samples (not the held-out slice, not the test split) are augmented."""
        if self.name == "folder":
            return self.augment is True
        return self.name != "synthetic" and self.augment is not False

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", home(self.root))
        require("data.name", self.name, str)
        require("data.root", self.root, str, optional=True)
        if self.name == "synthetic" and self.root is not None:  # a forgotten name would train on generated scenes
            raise ValueError(f"data.root {self.root!r}: the data set is synthetic (generated, no folder); set "
                             "data.name to nyuv2, cityscapes or folder too")
        for key, least in (("height", 1), ("width", 1), ("train", 1), ("holdout", None), ("test", 1)):
            require(f"data.{key}", getattr(self, key), int, least, optional=key in ("train", "test"))
        require("data.augment", self.augment, bool, optional=True)
        if self.grouping_data not in GROUPING_DATA:
            raise ValueError(f"data.grouping_data must be one of {', '.join(GROUPING_DATA)}, got {self.grouping_data!r}")
        if self.name == "synthetic" and None in (self.train, self.test):
            raise ValueError("synthetic data needs data.train and data.test, the numbers of scenes to generate")
        if self.holdout < 4:
            raise ValueError(f"the held-out slice needs at least 4 samples for the unbiased CKA (got {self.holdout})")


@dataclass(frozen=True)
class RunConfig:
    """One training run of one method on one seed. A value of the wrong type or range is refused when it is made,
    in one sentence naming its key, and so is an MTSL schedule longer than ``epochs`` (MTSL would train longer than
    STN and One-Net)."""

    preset: str = "quick"
    setting: str = "encoder-decoder"
    data: DataConfig = field(default_factory=DataConfig)
    tasks: tuple[str, ...] = ("S", "D", "E", "N", "A")
    task_specs: dict = field(default_factory=dict)  # declared tasks: name -> {kind, options, folder} (task_kinds)
    backbone: str = "resnet18"
    backbone_args: dict = field(default_factory=dict)  # keyword arguments of timm.create_model, e.g. channels
    network: str = "compact"  # the stage table: compact (any timm CNN) or authors (ResNets); network.backbones
    pretrained: bool = False
    weights: str | None = None
    batch_size: int = 16
    optimizer: dict = field(default_factory=lambda: {"optim": "adam", "lr": 1e-4, "weight_decay": 5e-5})
    epochs: int = 80
    lr_steps: tuple[int, ...] = (60, 70)
    weighting: str = "EW"
    weight_args: dict = field(default_factory=dict)  # the weighting's hyperparameters (others: LibMTL's defaults)
    task_weights: dict = field(default_factory=dict)  # task -> fixed factor on its loss (1 when absent)
    losses: str = "standard"  # the built-in tasks' loss set: standard or authors (tasks.LOSS_SETS)
    mtsl: MTSLConfig = field(default_factory=MTSLConfig)
    device: str = "cpu"
    fused: bool = False  # run the nodes of a location as one call (an execution option, like the device)
    channels_last: bool = False  # NHWC memory format for weights and images (an execution option too)
    compile: bool = False  # torch.compile the forward (an execution option too)
    workers: int | None = None  # processes that read samples besides the main one; None: experiment.loader_workers
    seed: int = 0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)} (a --config file's "
                             "'preset' only names the preset it was made from)")
        for key, kind, least in (("epochs", int, 1), ("batch_size", int, 1), ("seed", int, 0), ("lr_steps", list, 0),
                                 ("pretrained", bool, None), ("fused", bool, None), ("channels_last", bool, None),
                                 ("compile", bool, None), ("optimizer", Mapping, None),
                                 ("backbone_args", Mapping, None), ("task_specs", Mapping, None),
                                 ("task_weights", Mapping, None), ("weight_args", Mapping, None)):
            require(key, getattr(self, key), kind, least)
        require("workers", self.workers, int, 0, optional=True)
        for key in ("backbone", "device", "weighting", "network", "setting", "losses"):
            require(key, getattr(self, key), str)
        object.__setattr__(self, "weights", home(self.weights))
        require("weights", self.weights, str, optional=True)
        if self.seed >= 2**32:  # numpy's global seed takes 32 bits, and the synthetic scenes repeat 2**32 apart
            raise ValueError(f"seed must be at most 2**32 - 1, got {self.seed}")
        if not isinstance(self.tasks, (list, tuple)) or not all(isinstance(t, str) for t in self.tasks):
            raise ValueError(f"tasks must be a list of task names (or one string, comma-separated: S,D), got "
                             f"{self.tasks!r}")
        check_task_names(self.tasks)
        if list(self.lr_steps) != sorted(set(self.lr_steps)):  # a step given twice divides the rate by 100 there
            raise ValueError(f"lr_steps must be strictly increasing, got {list(self.lr_steps)}")
        for step in self.lr_steps:  # MultiStepLR would never reach a later step, and would start decayed at 0
            if not 1 <= step < self.epochs:
                raise ValueError(f"lr_steps {list(self.lr_steps)}: a step must lie in 1 to epochs - 1 "
                                 f"({self.epochs - 1}), got {step}")
        if self.mtsl.total_epochs > self.epochs:
            raise ValueError(f"MTSL's schedule trains {self.mtsl.total_epochs} task-learning epochs "
                             f"(mtsl.total_epochs; each of its {self.mtsl.num_phases} phases takes at least one) but "
                             f"epochs, the budget of STN and One-Net, is {self.epochs}; raise epochs or use fewer "
                             "mtsl.phases")
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown setting {self.setting!r}; choose one of {', '.join(SETTINGS)}")
        check_network(self.network, decoder=self.setting == "encoder-decoder")
        if self.losses not in LOSS_SETS:
            raise ValueError(f"unknown losses {self.losses!r}; choose one of {', '.join(LOSS_SETS)}")
        typed = libmtl_weight_args(self.weighting, self.weight_args)  # refuses a key or value the method cannot take
        object.__setattr__(self, "weight_args", {key: typed[key] for key in self.weight_args})  # frozen: normalised once
        for task, weight in self.task_weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
                raise ValueError(f"task_weights: the weight of task {task!r} must be a positive number, got {weight!r}")

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    @property
    def execution(self) -> dict[str, Any]:
        """The execution options (:data:`EXECUTION_OPTIONS`) and their values: how the run computes, not what."""
        return {key: getattr(self, key) for key in EXECUTION_OPTIONS}

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["backbone_args"] = json.loads(json.dumps(self.backbone_args))  # tuples as lists, as YAML gives
        data["tasks"] = list(self.tasks)
        data["task_specs"] = json.loads(json.dumps(self.task_specs))
        data["task_weights"] = {t: float(w) for t, w in self.task_weights.items()}
        data["weight_args"] = dict(self.weight_args)
        data["lr_steps"] = list(self.lr_steps)
        data["mtsl"]["task_epochs"] = list(self.mtsl.task_epochs)
        data["mtsl"]["amalgamation_epochs"] = list(self.mtsl.amalgamation_epochs)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown configuration key(s) {unknown}; known: {sorted(known)}")
        for key in ("data", "mtsl"):
            require(key, data.get(key, {}), Mapping)
        data["data"] = DataConfig(**data.get("data", {}))
        data["mtsl"] = MTSLConfig.from_dict(data.get("mtsl", {}))
        for key in ("tasks", "lr_steps"):  # lists, as YAML and JSON give them; the tasks also as --tasks takes them
            value = data.get(key, getattr(cls, key))
            value = [t.strip() for t in value.split(",")] if key == "tasks" and isinstance(value, str) else value
            data[key] = tuple(value) if isinstance(value, (list, tuple)) else value
        return cls(**data)

    def fingerprint(self, *, exclude: tuple[str, ...] = ("device",), extra: Mapping[str, Any] | None = None) -> str:
        """A short hash of everything that changes results (the device and the execution options do not: they
        change float rounding only), plus ``extra`` values."""
        data = {k: v for k, v in self.to_dict().items() if k not in exclude and k not in EXECUTION_OPTIONS}
        if not data.get("backbone_args", True):  # runs from before these fields existed keep their fingerprint
            del data["backbone_args"]
        specs = {t: spec for t, spec in data.pop("task_specs", {}).items() if t in self.tasks}
        if specs:  # the declarations of the tasks that run
            data["task_specs"] = specs
        weights = {t: w for t, w in data.pop("task_weights", {}).items() if t in self.tasks and w != 1}
        if weights:  # only when a running task's loss is weighted: every older run keeps its fingerprint
            data["task_weights"] = weights
        if not data.get("weight_args"):  # LibMTL's defaults: older runs keep their fingerprint
            data.pop("weight_args", None)
        for key, default in (("network", "compact"), ("losses", "standard")):  # older runs keep their fingerprint
            if data.get(key) == default:
                del data[key]
        if "data" in data and data["data"].get("augment", False) is None:
            del data["data"]["augment"]
        if data.get("data", {}).get("grouping_data") == "holdout":  # the default: older runs keep their fingerprint
            del data["data"]["grouping_data"]
        data.update(extra or {})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def config_from_mapping(raw: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
    """``base`` (default: :class:`RunConfig`'s defaults) with the fields of ``raw`` on top, in the presets' form
    (``dataset:``, ``mtsl: {phases: N}``) or :meth:`RunConfig.to_dict`'s (``data:``, every MTSL field).

    ``data`` and ``mtsl`` are merged field by field. ``tasks`` is a list of names (or one comma-separated string,
    as ``--tasks`` takes them) or a mapping name -> declaration (``{kind: ..., <options>}``, see
    :mod:`mtsl_plugin.task_kinds`; empty for a built-in task S D E N A), which sets ``tasks`` and ``task_specs``
    together. When ``raw`` gives the epochs or the number of phases (1 to 10, the paper schedule's), MTSL's schedule
    (the fields ``mtsl`` does not give) is the paper's scaled to them
    (:func:`~mtsl_plugin.learner.schedule.scale_schedule`); when it gives the epochs and not ``lr_steps``, ``base``'s
    steps are scaled to them too (rounded; a step that falls on the last epoch or after it is dropped), so that the
    learning rate still decays where the base's does. Unknown keys are refused, naming them.
    """
    raw = dict(raw)
    for key in ("dataset", "data", "mtsl"):
        require(key, raw.get(key), Mapping, optional=True)
    if "dataset" in raw:
        if "data" in raw:
            raise ValueError("give the data once, as 'dataset' or as 'data', not both")
        raw["data"] = raw.pop("dataset")
    base = base or RunConfig()
    data_raw = dict(raw.pop("data", None) or {})
    unknown = sorted(set(data_raw) - {f.name for f in dataclasses.fields(DataConfig)})
    if unknown:
        raise ValueError(f"unknown data key(s) {unknown}; known: {[f.name for f in dataclasses.fields(DataConfig)]}")
    if isinstance(raw.get("tasks"), Mapping):
        if "task_specs" in raw:
            raise ValueError("declare the tasks once, as a 'tasks' mapping or as 'task_specs', not both")
        raw["tasks"], raw["task_specs"] = _task_declarations(raw["tasks"])
    if not isinstance(raw.get("task_specs", {}), Mapping):
        raise ValueError(f"task_specs must map task names to declarations, got {raw['task_specs']!r}")
    mtsl_raw = dict(raw.pop("mtsl", None) or {})
    phases = mtsl_raw.pop("phases", None)
    given = mtsl_raw.get("task_epochs")
    if phases is not None and isinstance(given, (list, tuple)) and phases != len(given):
        raise ValueError(f"mtsl.phases ({phases}) and mtsl.task_epochs ({len(given)} phases) disagree; give one")
    if ("backbone" in raw and "backbone_args" not in raw and isinstance(raw["backbone"], str)
            and architecture_family(raw["backbone"]) != architecture_family(base.backbone)):
        raw["backbone_args"] = {}  # the base's (e.g. a ResNet's channels) are another family's arguments
    fields = {**{k: v for k, v in base.to_dict().items() if k not in ("data", "mtsl")}, **raw}
    if "epochs" in raw and "lr_steps" not in raw and isinstance(raw["epochs"], int):  # a wrong epochs is named later
        scaled = (round(step * raw["epochs"] / base.epochs) for step in base.lr_steps)
        fields["lr_steps"] = sorted({step for step in scaled if 1 <= step < raw["epochs"]})
    mtsl = base.mtsl.to_dict()
    if phases is not None or "epochs" in raw:  # the fields mtsl_raw gives stay as it gives them
        mtsl.update(_scaled_schedule(fields["epochs"], phases, base.mtsl.num_phases, mtsl_raw))
    data = switch_data_set(base.data, data_raw["name"], base.preset) if "name" in data_raw else base.data
    config = RunConfig.from_dict({**fields, "data": {**dataclasses.asdict(data), **data_raw},
                                  "mtsl": {**mtsl, **mtsl_raw}})
    # a shorter MTSL schedule (a results folder's config.yaml with only its epochs raised kept the old one) would
    # train MTSL less than the others and miss their late lr_steps; a stored run's config (RunConfig.from_dict,
    # as load_run reads it) is not refused, so runs finished before this rule stay readable
    if config.mtsl.total_epochs < config.epochs:
        raise ValueError(f"mtsl.total_epochs ({config.mtsl.total_epochs}) must equal epochs ({config.epochs}), the "
                         "budget of STN and One-Net: set it to epochs, or leave it out to follow epochs")
    return config


def switch_data_set(data: DataConfig, name: Any, preset: str) -> DataConfig:
    """``data`` for the data set ``name``: unchanged when it is ``data``'s own; else without ``data``'s root (a
    folder of the other data set) and, for a real data set, without its sample counts (a preset's numbers of
    synthetic scenes), so that the whole splits are read, except on the smoke preset, whose small counts serve
    its quick checks on any data; synthetic data keeps the counts ``data`` has and takes the preset's for the
    others. ``--dataset`` and a configuration file's ``dataset: {name: ...}`` both switch through it."""
    if name == data.name:
        return data
    counts = {} if preset == "smoke" else {"train": None, "test": None}
    if name == "synthetic":  # the scenes to generate: the counts given, else the preset's
        scenes = load_preset(preset).data if preset in PRESETS else DataConfig()
        counts = {key: getattr(data, key) or getattr(scenes, key) for key in ("train", "test")}
    return dataclasses.replace(data, name=name, root=None, **counts)


def _task_declarations(declared: Mapping[str, Any]) -> tuple[list[str], dict[str, dict]]:
    """The task names and ``task_specs`` of a ``tasks`` mapping (name -> declaration, empty for a built-in)."""
    bad = [name for name, spec in declared.items() if spec and not isinstance(spec, Mapping)]
    if bad:
        raise ValueError(f"task {bad[0]!r}: a declaration is a mapping with a 'kind', got {declared[bad[0]]!r}")
    return list(declared), {name: dict(spec) for name, spec in declared.items() if spec}


def _scaled_schedule(epochs: Any, phases: Any, base_phases: int, mtsl_raw: Mapping[str, Any]) -> dict[str, Any]:
    """MTSL's schedule fields for a budget of ``epochs`` and ``phases`` phases (``base_phases`` when ``None``): the
    paper's scaled to them; with phases of the user's own (``task_epochs`` in ``mtsl_raw`` without
    ``total_epochs``), fine-tuning up to ``epochs``."""
    paper = MTSLConfig()
    require("epochs", epochs, int, 1)
    require("mtsl.phases", phases, int, 1, paper.num_phases, optional=True)
    schedule = scale_schedule(paper, epochs, base_phases if phases is None else phases)
    fields = {k: getattr(schedule, k) for k in ("task_epochs", "amalgamation_epochs", "total_epochs")}
    if "task_epochs" in mtsl_raw and "total_epochs" not in mtsl_raw:
        require("mtsl.task_epochs", mtsl_raw["task_epochs"], list, 0)
        fields["total_epochs"] = max(epochs, sum(mtsl_raw["task_epochs"]))
    return fields


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one without a word, so
    a task declared twice lost its first declaration); keys a merge (``<<: *base``) brings in may be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
            try:
                if key in lines:
                    where = f"lines {lines[key]} and {line}" if lines[key] != line else f"both on line {line}"
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice in one mapping ({where})", key_node.start_mark)
            except TypeError:  # an unhashable key: the base class names it
                continue
            lines[key] = line
        return super().construct_mapping(node, deep)


# YAML 1.1, which PyYAML follows, reads 1e-4 (no dot) as a string, which the optimizer then failed to compare with
# a number; the configuration files read it as YAML 1.2 and JSON do, a float.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """An integer as YAML 1.1 reads it, refusing the forms it reads otherwise than a reader expects: ``010`` is
    octal (8) and ``1:20`` base 60 (80), so ``seed: 010`` ran seed 8 without a word."""
    text = str(loader.construct_scalar(node)).replace("_", "")
    if re.fullmatch(r"[-+]?0[0-9]+", text) or ":" in text:
        raise yaml.constructor.ConstructorError(
            None, None, f"{text!r} is read as an octal or base-60 number by YAML 1.1; write it in decimal, "
            "without a leading 0", node.start_mark)
    return loader.construct_yaml_int(node)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def load_config_file(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    """The configuration of a YAML (or JSON) file, over ``base`` (see :func:`config_from_mapping`); a file that
    cannot be read, holds a key twice in one mapping or holds no mapping is named in one line."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except (OSError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"config file {str(path)!r} could not be read: {reason}") from None
    if not isinstance(raw, Mapping):
        raise ValueError(f"config file {str(path)!r} holds no mapping of configuration keys")
    try:
        return config_from_mapping(raw, base)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config file {str(path)!r}: {exc}") from None


def load_preset(name: str) -> RunConfig:
    """The configuration of a shipped preset (``smoke``, ``quick`` or ``paper``).

    A preset names its epoch budget and number of structural phases; MTSL's schedule is the paper's, scaled to
    that budget (:func:`~mtsl_plugin.learner.schedule.scale_schedule`), so ``paper`` is the paper's exactly,
    unless the preset gives its own ``mtsl.task_epochs`` (``quick``: one epoch per phase).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    raw = yaml.safe_load((resources.files("mtsl_plugin") / "presets" / f"{name}.yaml").read_text())
    return config_from_mapping({**raw, "preset": name})
