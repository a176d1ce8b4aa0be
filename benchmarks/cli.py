"""The command line every benchmark command shares: the run options and the configuration they give, the results
folder, and how a command ends (a user error as one line and exit code 2, a failure of one rank under torchrun,
Ctrl-C or SIGTERM with a line on how to go on). The jobs a command trains are :mod:`benchmarks.harness`'s.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from mtsl_plugin import distributed
from mtsl_plugin.checkpoint import CheckpointError, WriteError
from mtsl_plugin.config import (GROUPING_DATA, PRESETS, SETTINGS, DataConfig, RunConfig, load_config_file, load_preset,
                                switch_data_set)
from mtsl_plugin.learner.schedule import MTSLConfig
from mtsl_plugin.network.backbones import architecture_family
from mtsl_plugin.network.stages import NETWORKS
from mtsl_plugin.plugins import PluginError, load_plugin
from mtsl_plugin.task_kinds import declare_task
from mtsl_plugin.tasks import LOSS_SETS


class UsageError(Exception):
    """Bad command-line input; printed as one line, exit code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a batch scheduler's time limit or preemption, torchrun stopping the other ranks of a failed
    job), raised where the process is, so that it unwinds as Ctrl-C does: a checkpoint being written is abandoned
    and its temporary file removed (the previous one stays), and the command ends with one line on how to go on."""


class RankFailure(RuntimeError):
    """Under torchrun, a run that failed on this rank alone: the command stops (exit code 1), since the other ranks
    may be waiting in a collective of that run; torchrun then stops them."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises :class:`Terminated` (in the main thread; the handler before is restored)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: The exceptions a command turns into ``error: <message>`` and exit code 2 (OSError and CheckpointError: a file
#: that could not be read or written, e.g. on a full disk; their messages name it).
USER_ERRORS = (UsageError, PluginError, ValueError, OSError, CheckpointError)


def add_run_args(p: argparse.ArgumentParser, default_seeds: str = "0") -> None:
    """The options that define the runs (data, backbone, budget, MTSL's plugins); shared by every command that
    trains (compare, ablation, sensitivity, robustness, alignment)."""
    p.add_argument("--preset", default="quick", choices=PRESETS)
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML file of configuration fields over the preset (as the presets or a results folder's "
                        "config.yaml write them); the options below go on top")
    p.add_argument("--setting", default=None, choices=SETTINGS,
                   help="encoder-decoder (default): 10 merge locations on a ResNet (paper Table 2); encoder: 6, "
                        "DeepLab heads (Table 1)")
    p.add_argument("--seeds", default=default_seeds, help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--dataset", default=None,
                   help="synthetic (default), nyuv2, cityscapes, or folder (your own data; declare its tasks in a "
                        "--config file, README 'Your own data and tasks')")
    p.add_argument("--data-root", default=None, help="folder of a preprocessed real data set or of folder data")
    p.add_argument("--no-augment", action="store_true",
                   help="real data: no random zoom and flip of the training samples (on by default)")
    p.add_argument("--grouping-data", default=None, choices=GROUPING_DATA,
                   help="the images MTSL's grouping decisions measure: holdout (default; a slice of the training "
                        "split no method trains on) or train (its first images, trained on too: the authors')")
    p.add_argument("--tasks", default=None,
                   help="comma-separated task names: built-in letters S,D,E,N,A or tasks declared in --config")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--fused", action="store_true",
                   help="MTSL and plans: run the nodes of a location as one vmapped call (grouped convolutions)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for weights and images")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the forward (compiled again after every structural edit; one process)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes that read and augment the samples besides the main one (default: none for "
                        "synthetic data or on the CPU, up to 8 for real data on a GPU); no result depends on it")
    p.add_argument("--backbone", default=None,
                   help="timm CNN name (default resnet18), e.g. resnet50, convnext_atto, efficientnet_b0, "
                        "regnetx_002, mobilenetv3_small_100; another family than the preset's drops its "
                        "backbone_args")
    p.add_argument("--network", default=None, choices=NETWORKS,
                   help="stage table: compact (the CPU presets', any timm CNN) or authors (the paper preset's, the "
                        "authors' code; ResNets)")
    p.add_argument("--pretrained", action="store_true", help="timm's pretrained backbone weights")
    p.add_argument("--weights", default=None, help="local backbone weights file")
    p.add_argument("--weighting", default=None, help="LibMTL weighting method, e.g. EW (default) or UW")
    p.add_argument("--weight-args", default=None, metavar="KEY=VALUE,...",
                   help="the weighting method's hyperparameters, e.g. mgda_gn=l2 for MGDA or T=2 for DWA (default: "
                        "LibMTL's command-line defaults)")
    p.add_argument("--losses", default=None, choices=LOSS_SETS,
                   help="the built-in tasks' losses: standard (default) or authors (the MTSL authors' code's)")
    p.add_argument("--task-weights", default=None, metavar="T=W,...",
                   help="fixed factors on the task losses before the weighting method, e.g. E=10,A=100 (default 1)")
    p.add_argument("--similarity", default=None, help="similarity plugin: cka (default) or rsa")
    p.add_argument("--grouping", default=None, help="grouping-solver plugin: authors (default, the authors' code), "
                   "fewest_groups or exhaustive (the paper's text's score), exact up to 16 tasks; authors_local, "
                   "fewest_groups_local, exhaustive_local: the same rules by local search, any number of tasks")
    p.add_argument("--amalgamator", default=None, help="amalgamator plugin (default att)")
    p.add_argument("--threshold", type=float, default=None, help="grouping threshold γ (default 0.8)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE", help="import a plugin module")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true",
                   help="run every check (data read through, plugins, disk), print what would be reused, continued "
                        "and trained, and stop: nothing is trained or written")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished run's resume checkpoint (optimizer and RNG state, about 3x the size of "
                        "its weights); by default a finished run keeps its weights (model.pt) only")


def add_out_arg(p: argparse.ArgumentParser, command: str, reuses: bool = True) -> None:
    """``--out`` of an evaluation command: a folder (default ``results/<command>-<preset>``, see
    :func:`out_folder`) that may hold earlier runs, which the command reuses (``reuses``)."""
    reused = "; may hold earlier runs, which are reused" if reuses else ""
    p.add_argument("--out", default=None, help=f"results folder (default results/{command}-<preset>){reused}")


def out_folder(args: argparse.Namespace, command: str, config: RunConfig) -> Path:
    """The command's results folder (``--out``, default ``results/<command>-<preset>``), checked; remembered on
    ``args`` for the line an interruption prints (:func:`run_main`)."""
    args.results_folder = check_out(Path(args.out or f"results/{command}-{config.preset}"))
    return args.results_folder


def nearest_existing(path: Path) -> Path:
    """``path`` if it exists, else its nearest parent that does (where it would be created)."""
    return next(p for p in (path, *path.absolute().parents) if p.exists())


def check_out(out: Path) -> Path:
    """``out`` if it can be a results folder: a folder this process can write in, or one it can create (checked
    on its nearest existing parent, creating nothing); a file there, or in the way, is refused."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; name a folder for the results")
    existing = nearest_existing(out)
    if not existing.is_dir():
        raise UsageError(f"--out {out} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out} cannot be {'written' if existing == out else 'created'}: "
                         f"{existing} is not writable")
    return out


#: Options copied into the configuration when given, and flags that switch a configuration field on.
_VALUE_OPTIONS = ("device", "setting", "workers", "backbone", "network", "weights", "weighting", "losses")
_FLAG_OPTIONS = ("fused", "channels_last", "compile", "pretrained")


def join_ranks(config: RunConfig) -> RunConfig:
    """Under torchrun: join the process group on ``config``'s device (``--device``, else a ``--config`` file's or a
    resumed comparison's) and return ``config`` on this rank's device (``cuda:<local rank>``); in one process,
    ``config`` as it is. Called once, when a command's configuration is known."""
    if not distributed.launched():
        return config
    return config.replace(device=distributed.init_from_env(config.device))


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The :class:`RunConfig` of :func:`add_run_args`' options (plugins named there must be loaded already), on
    this rank's device under torchrun (:func:`join_ranks`)."""
    config = load_preset(args.preset)
    if args.config:
        config = load_config_file(args.config, base=config)
        try:  # its declared tasks now, with the plugins loaded, so that a mistake names the file too
            for name, declaration in config.task_specs.items():
                declare_task(name, declaration)
        except ValueError as exc:
            raise ValueError(f"config file {args.config!r}: {exc}") from None
    changes: dict[str, Any] = {"data": _data_from_args(args, config), "mtsl": _mtsl_from_args(args, config.mtsl)}
    changes.update({key: getattr(args, key) for key in _VALUE_OPTIONS if getattr(args, key) is not None})
    changes.update({key: True for key in _FLAG_OPTIONS if getattr(args, key)})
    if args.tasks is not None:
        changes["tasks"] = parse_tasks(args.tasks)
    if args.task_weights:
        changes["task_weights"] = {**config.task_weights, **parse_task_weights(args.task_weights)}
    kept = config.weight_args if args.weighting in (None, config.weighting) else {}  # another method's otherwise
    given = parse_pairs(args.weight_args, "weight-args", "mgda_gn=l2") if args.weight_args else {}
    if given or kept != config.weight_args:
        changes["weight_args"] = {**kept, **given}
    if args.backbone is not None and architecture_family(args.backbone) is None:
        raise UsageError(f"--backbone {args.backbone!r} is not a timm model name (e.g. resnet18, convnext_atto, "
                         "efficientnet_b0, regnetx_002, mobilenetv3_small_100)")
    if args.backbone is not None and architecture_family(args.backbone) != architecture_family(config.backbone):
        changes["backbone_args"] = {}  # the preset's (e.g. a ResNet's channels) are another family's arguments
    return join_ranks(config.replace(**changes))  # the rest is checked with every job's configuration: check_jobs


def _data_from_args(args: argparse.Namespace, config: RunConfig) -> DataConfig:
    """The data options (``--dataset``, ``--data-root``, ``--no-augment``, ``--grouping-data``) over ``config``'s."""
    data = config.data
    if args.no_augment:
        data = dataclasses.replace(data, augment=False)
    if args.grouping_data is not None:
        data = dataclasses.replace(data, grouping_data=args.grouping_data)
    if args.data_root is not None and (args.dataset or data.name) == "synthetic":
        raise UsageError(f"--data-root {args.data_root}: the data set is synthetic (generated, no folder); pass "
                         "--dataset nyuv2, cityscapes or folder too")
    if args.dataset is not None:  # a root of the configuration's own data set stays unless --data-root replaces it
        data = switch_data_set(data, args.dataset, config.preset)
    if args.data_root is not None:  # the real data set of --dataset, the preset or --config, from this folder
        data = dataclasses.replace(data, root=args.data_root)
    return data


def _mtsl_from_args(args: argparse.Namespace, mtsl: MTSLConfig) -> MTSLConfig:
    """MTSL's options (``--similarity``, ``--grouping``, ``--amalgamator``, ``--threshold`` and the ``--no-*``
    ablation flags of the commands that have them) over ``mtsl``."""
    fields = mtsl.to_dict()
    for key in ("similarity", "grouping", "amalgamator", "threshold"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    for key, flag in (("align", "no_align"), ("average_init", "no_average_init"), ("amalgamate", "no_amalgamation")):
        if getattr(args, flag, False):
            fields[key] = False
    return MTSLConfig.from_dict(fields)


def load_plugins(args: argparse.Namespace) -> None:
    for module in getattr(args, "plugin", ()):  # the commands that train take --plugin; speed, export... do not
        load_plugin(module)


def parse_list(text: str, what: str) -> list[str]:
    """``--what a,b,c`` as ``["a", "b", "c"]``; an empty list or item (``mtsl,``, ``0,,1``) is refused."""
    items = [x.strip() for x in text.split(",")]
    if items == [""]:
        raise UsageError(f"--{what} is empty")
    if "" in items:
        raise UsageError(f"--{what} has an empty item: {text!r}")
    return items


def distinct(values: Sequence[Any], what: str) -> list[Any]:
    """``values`` as a list if none is given twice (two equal values would be counted as two samples); else a
    :class:`UsageError` naming the first repeated one."""
    for index, value in enumerate(values):
        if value in values[:index]:
            raise UsageError(f"--{what}: {value} is given twice")
    return list(values)


def parse_tasks(text: str) -> tuple[str, ...]:
    """``--tasks S,D,E`` as ``("S", "D", "E")``; an empty list or name is refused (a task given twice is refused
    with the configuration, by :func:`~benchmarks.harness.check_jobs`)."""
    return tuple(parse_list(text, "tasks"))


def parse_pairs(text: str, option: str, example: str) -> dict[str, str]:
    """``--<option> a=1,b=x`` as ``{"a": "1", "b": "x"}``: non-empty keys, each once, and values."""
    pairs: dict[str, str] = {}
    for item in parse_list(text, option):
        key, equals, value = (part.strip() for part in item.partition("="))
        if not key or not equals or not value:
            raise UsageError(f"--{option} takes KEY=VALUE pairs, e.g. {example}; got {item!r}")
        if key in pairs:
            raise UsageError(f"--{option}: {key} is given twice")
        pairs[key] = value
    return pairs


def parse_task_weights(text: str) -> dict[str, float]:
    """``--task-weights E=10,A=100`` as ``{"E": 10.0, "A": 100.0}``."""
    weights = {}
    for task, value in parse_pairs(text, "task-weights", "E=10,A=100").items():
        try:
            weights[task] = float(value)
        except ValueError:
            raise UsageError(f"--task-weights: the weight of task {task} must be a number, got {value!r}") from None
    return weights


#: The largest seed: numpy, which every run seeds, takes seeds in 0..2**32 - 1.
MAX_SEED = 2**32 - 1


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` as ``[0, 1, 2]``: integers in 0..:data:`MAX_SEED`, none twice."""
    try:
        seeds = [int(s) for s in parse_list(text, "seeds")]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers, got {text!r}") from None
    for seed in seeds:
        if not 0 <= seed <= MAX_SEED:
            raise UsageError(f"--seeds: {seed} is not in 0..{MAX_SEED}")
    return distinct(seeds, "seeds")


def refuse_torchrun() -> bool:
    """For a command that runs in one process: under torchrun, print the one-line refusal and return True."""
    if distributed.launched():
        print(f"error: {Path(sys.argv[0]).name} runs in one process; start it without torchrun", file=sys.stderr)
        return True
    return False


def run_main(main_body, args: argparse.Namespace, distributed_ok: bool = False) -> int:
    """Run a command's body; user errors become one line on stderr and exit code 2, Ctrl-C and SIGTERM one line
    too (exit codes 130, 143); after a stop, or a file that could not be written, the line says how to go on where
    the command has a results folder. Under torchrun a command that supports it (``distributed_ok``: compare,
    ablation, sensitivity, robustness) joins the process group once its configuration is known
    (:func:`join_ranks`); the others refuse to start."""
    if not distributed_ok and refuse_torchrun():
        return 2
    try:
        with sigterm_as_interrupt():
            load_plugins(args)
            return main_body()
    except USER_ERRORS as exc:  # a file not written (a table on a full disk): the runs are kept, say so
        print(f"error: {exc}{how_to_go_on(args) if isinstance(exc, WriteError) else ''}", file=sys.stderr)
        return 2
    except RankFailure as exc:
        print(f"error: {exc}{how_to_go_on(args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: one line on how to go on, not a traceback
        if distributed.is_main():
            print(("terminated" if isinstance(exc, Terminated) else "interrupted") + how_to_go_on(args),
                  file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def how_to_go_on(args: argparse.Namespace) -> str:
    """``; <where a stopped command's finished runs are and the command that continues it>``, or nothing for a
    command that keeps no results folder."""
    folder = getattr(args, "results_folder", None)
    if folder is None:
        return ""
    if not Path(folder).is_dir():  # stopped in the checks, before the folder was made
        return f"; nothing was written to {folder} yet: the same command again starts it"
    return (f"; finished runs and the last checkpoint are kept in {folder}: "
            f"{getattr(args, 'continue_with', 'the same command again')} continues")
