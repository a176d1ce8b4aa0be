"""Atomic checkpoints that hold everything a run needs to continue.

A checkpoint is one ``torch.save`` file of plain containers and tensors (loadable with ``weights_only=True``):
the plan (JSON), model, optimizer and scheduler state, RNG states, the epoch position and the structural
learner's position. It is written to a temporary file in the same folder and renamed over the old one, so an
interrupted write never destroys the previous checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run."""


def rng_state() -> dict[str, Any]:
    """The global RNG states of torch (CPU and CUDA), numpy and Python, as weights-only-loadable values."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]),
        "python": json.dumps(random.getstate()),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = json.loads(state["numpy"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus format and RNG states) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "rng": rng_state(), **payload}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a mtsl-plugin checkpoint of format {FORMAT}")
    return data
