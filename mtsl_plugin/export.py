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
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mtsl_plugin.checkpoint import scratch_file
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
    """The inference network of a trained LibMTL model of this project (``trainer.model``); a network trained
    with fused siblings (``--fused``) is exported unfused, the same function computed node by node."""
    if hasattr(model, "derived_network"):  # LTB, BMTAS: the branched network the gates derive
        network = model.derived_network()
    elif isinstance(getattr(model, "encoder", None), BranchedNetwork):  # MTSL and the fixed plans
        network = model.encoder
        if network.fused:  # a training-speed option; the exported graph runs node by node (ONNX cannot trace
            network = copy.deepcopy(network)  # torch.func's vmap), on a copy so the trainer stays fused
            network.fused = False
    else:  # cross-stitch, MTAN: their own forward, LibMTL's dict of predictions
        network = model
    return StaticNetwork(network, tasks)


def export(static: StaticNetwork, fmt: str, path: str | Path, sample: torch.Tensor,
           metadata: dict[str, str] | None = None) -> float:
    """Write ``static`` as ``fmt`` (``onnx``: ONNX with a dynamic batch size, checked with onnxruntime;
    ``exported``: a ``torch.export`` program, ``torch.export.load``-able, for ``sample``'s shape) and return the
    largest absolute difference between the file's and the module's outputs on ``sample`` (N, 3, H, W). The file
    is written and checked under a temporary name beside ``path``, then renamed: a failed export leaves ``path``
    as it was. ``metadata`` (key -> text, e.g. the run's method, plan and ``trained_by``) goes into the file: the
    ONNX model's ``metadata_props``, the exported program's extra files (``torch.export.load(path,
    extra_files={key: ""})`` reads them back)."""
    check_format(fmt)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sample = sample.to("cpu")
    static = static.to("cpu").eval()
    with torch.no_grad():
        expected = static(sample)
    handle, scratch = scratch_file(path.parent, f".{path.name}.", path.suffix or ".tmp")
    os.close(handle)
    try:
        if fmt == "onnx":
            import onnxruntime

            axes = {name: {0: "batch"} for name in ("image", *static.tasks)}
            torch.onnx.export(static, (sample,), scratch, input_names=["image"], output_names=list(static.tasks),
                              dynamic_axes=axes, dynamo=False)
            if metadata:
                import onnx

                model = onnx.load(scratch, load_external_data=False)  # weights of > 2 GiB stay where they are
                for key, value in metadata.items():
                    model.metadata_props.add(key=key, value=value)
                onnx.save(model, scratch)
            session = onnxruntime.InferenceSession(scratch, providers=["CPUExecutionProvider"])
            got = [torch.from_numpy(a) for a in session.run(None, {"image": sample.numpy()})]
        else:
            torch.export.save(torch.export.export(static, (sample,)), scratch, extra_files=metadata)
            with torch.no_grad():
                got = torch.export.load(scratch).module()(sample)
        difference = max(float((a - b).abs().max()) for a, b in zip(got, expected))
        os.replace(scratch, path)
    finally:
        Path(scratch).unlink(missing_ok=True)
    return difference
