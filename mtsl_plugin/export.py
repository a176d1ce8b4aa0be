"""The trained network of a run as a static module, and as ONNX or ``torch.export`` files.

:func:`static_network` strips the training machinery: no LibMTL weighting, no structural learner, no features
kept for the alignment loss, no gates (LTB and BMTAS give their derived branched network, with the weights of the
supernet nodes it keeps). Its ``forward(image (N, 3, H, W))`` returns one prediction per task, a tuple in task
order (``static.tasks``), each ``(N, C_t, H, W)``. :func:`export` writes it and checks the written file against
the module on a sample batch.
"""
from __future__ import annotations

import copy
import importlib.util
import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mtsl_plugin.network.branched import BranchedNetwork

NEEDS = {"onnx": ("onnx", "onnxruntime"), "exported": ()}  # each format and the packages it needs besides torch
FORMATS = tuple(NEEDS)


def check_format(fmt: str) -> None:
    """Refuse, in one line, a format that is unknown or whose packages are not installed (the ``export`` extra)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    missing = [name for name in NEEDS[fmt] if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"format {fmt!r} needs {', '.join(missing)} (not installed): "
                         "pip install \"mtsl-plugin[export]\", or pip install -e \".[export]\" in a clone")


class StaticNetwork(nn.Module):
    """Image in, the tasks' predictions out (a tuple in ``tasks`` order); the wrapped network in eval mode."""

    def __init__(self, network: nn.Module, tasks: Sequence[str]):
        super().__init__()
        self.network = network.eval()
        self.tasks = tuple(tasks)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.network(image)
        preds = out[0] if isinstance(out, tuple) else out  # a branched network also returns sibling features
        return tuple(preds[t] for t in self.tasks)


def static_network(model: nn.Module, tasks: Sequence[str]) -> StaticNetwork:
    """The inference network of a trained LibMTL model of this project (``trainer.model``), on a copy of its
    modules, so that the trainer keeps its mode, device and fused siblings; a network trained with fused siblings
    (``--fused``) is exported unfused, the same function computed node by node."""
    if hasattr(model, "derived_network"):  # LTB, BMTAS: the branched network the gates derive
        network = model.derived_network()
    elif isinstance(getattr(model, "encoder", None), BranchedNetwork):  # MTSL and the fixed plans
        network = model.encoder
    else:  # cross-stitch, MTAN: their own forward, LibMTL's dict of predictions
        network = model
    network = copy.deepcopy(network)  # eval(), to("cpu") and unfusing below must not reach the trainer's modules
    if isinstance(network, BranchedNetwork):  # a training-speed option; the exported graph runs node by node
        network.fused = False  # (ONNX cannot trace torch.func's vmap)
    return StaticNetwork(network, tasks)


def export(static: StaticNetwork, fmt: str, path: str | Path, sample: torch.Tensor,
           metadata: dict[str, str] | None = None) -> float:
    """Write ``static`` as ``fmt`` (``onnx``: ONNX with a dynamic batch size, checked with onnxruntime;
    ``exported``: a ``torch.export`` program, ``torch.export.load``-able, for ``sample``'s image size and any batch
    size) and return the largest absolute difference between the file's and the module's outputs on ``sample`` (N,
    3, H, W). The file is written and checked in a scratch folder beside ``path``, then renamed: a failed export
    leaves ``path``'s folder as it was. ``metadata`` (key -> text, e.g. the run's method, plan and ``trained_by``)
    goes into the file: the ONNX model's ``metadata_props``, the exported program's extra files
    (``torch.export.load(path, extra_files={key: ""})`` reads them back).

    An ONNX model over protobuf's 2 GiB keeps its weights outside the file; torch's exporter writes one file per
    weight, named after the weight, into the file's folder, where a second export would overwrite them. Here
    they become one file, ``<path>.data`` (e.g. ``mtsl.onnx.data``), which the model names and which must stay
    beside it; a smaller model written over such an export removes it."""
    check_format(fmt)
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; name the file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    sample = sample.to("cpu")
    static = static.to("cpu").eval()
    with torch.no_grad():
        expected = static(sample)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        written = scratch / path.name
        if fmt == "onnx":
            import onnxruntime

            moved = write_onnx(static, sample, written, metadata)
            session = onnxruntime.InferenceSession(str(written), providers=["CPUExecutionProvider"])
            got = [torch.from_numpy(a) for a in session.run(None, {onnx_input(static.tasks): sample.numpy()})]
        else:
            moved = [written]
            # the batch dimension dynamic, as in ONNX; traced on two images at least (one would specialise it to 1)
            trace = sample if sample.shape[0] > 1 else torch.cat([sample, sample])
            program = torch.export.export(static, (trace,), dynamic_shapes=({0: torch.export.Dim("batch")},))
            torch.export.save(program, written, extra_files=metadata)
            with torch.no_grad():
                got = torch.export.load(written).module()(sample)
        # torch's max, not Python's: a NaN output is the difference wherever its task stands in the order
        difference = float(torch.stack([(a - b).abs().max() for a, b in zip(got, expected, strict=True)]).max())
        for file in moved:  # the weights first: the model file that names them arrives last
            os.replace(file, path.parent / file.name)
        if fmt == "onnx" and len(moved) == 1:  # the weights of an earlier export to this name, which nothing names
            weights_file(path).unlink(missing_ok=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return difference


def onnx_input(tasks: Sequence[str]) -> str:
    """The ONNX model's input name: ``image``, or the first of ``input``, ``input_0``, ``input_1``, ... that no
    task (an output name) is called."""
    names = itertools.chain(("image", "input"), (f"input_{i}" for i in itertools.count()))
    return next(name for name in names if name not in tasks)


def weights_file(path: Path) -> Path:
    """Where the weights of the ONNX model ``path`` go when they do not fit in it: ``<path>.data`` beside it."""
    return path.with_name(path.name + ".data")


def write_onnx(static: StaticNetwork, sample: torch.Tensor, path: Path, metadata: dict[str, str] | None) -> list[Path]:
    """Export ``static`` to ``path`` with ``metadata`` and return the files written, in the order to move them:
    ``[path]``, or ``[<path>.data, path]`` where the weights are too large for one file (see :func:`export`).
    ``path``'s folder must hold nothing else: the exporter writes weights there by their own names."""
    import onnx

    axes = {name: {0: "batch"} for name in (onnx_input(static.tasks), *static.tasks)}
    torch.onnx.export(static, (sample,), str(path), input_names=[onnx_input(static.tasks)],
                      output_names=list(static.tasks),
                      dynamic_axes=axes, dynamo=False)
    model = onnx.load(str(path), load_external_data=False)  # weights of > 2 GiB stay where they are
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    if not any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer):
        onnx.save(model, str(path))
        return [path]
    onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    for file in path.parent.iterdir():
        if file != path:
            file.unlink()  # the exporter's per-weight files, now in memory
    data = weights_file(path)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                    size_threshold=0)
    os.chmod(data, path.stat().st_mode & 0o777)  # onnx makes it private (0o600); as readable as the model file
    return [data, path]
