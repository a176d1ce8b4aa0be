"""Atomic checkpoints: what an unfinished run needs to continue, and what a finished run keeps.

Two kinds of ``torch.save`` file of plain containers and tensors (loadable with ``weights_only=True``):

* a **checkpoint** (:func:`save_checkpoint`): the plan (JSON), model, optimizer and scheduler state, the state a
  weighting method keeps outside the model, RNG states, the epoch position, the structural learner's position and
  the kind of run that wrote it; it exists while a run is unfinished;
* the **trained weights** (:func:`save_weights`): the plan and the model's state only, about a third of a
  checkpoint with Adam (no moments, no RNG); it is what a finished run keeps.

Both are written to a temporary file in the same folder and renamed over the old one, so an interrupted or
failed write (a kill, a full disk) never destroys the previous file; a failed write raises
:class:`CheckpointError` naming the path.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import secrets
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

from mtsl_plugin import distributed

FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run."""


class WriteError(CheckpointError):
    """A file :func:`atomic_write` could not write (a full disk, a read-only folder); the previous file is kept."""


def _cuda_device(device: str | torch.device | None) -> torch.device | None:
    """The CUDA device whose generator a run on ``device`` draws from (its current device when ``device`` names
    no index; the current device when ``device`` is None and CUDA is available); None for a run off CUDA."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def rng_state(device: str | torch.device | None = None) -> dict[str, Any]:
    """The global RNG states of torch (CPU, and the CUDA generator of the run's ``device``), numpy and Python, as
    weights-only-loadable values. Only the run's own GPU is read: reading every GPU's generator would open a
    CUDA context on each of them, in every process of a torchrun job."""
    np_state = np.random.get_state()
    cuda = _cuda_device(device)
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(cuda)] if cuda is not None else [],
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]),
        "python": json.dumps(random.getstate()),
    }


def set_rng_state(state: dict[str, Any], device: str | torch.device | None = None) -> None:
    """Restore :func:`rng_state`'s states; the CUDA generator's into that of the run's ``device`` (so under
    torchrun every rank continues rank 0's stream, as every rank drew the same stream before). The torch states
    are byte tensors that torch only takes on the CPU: a checkpoint loaded with ``map_location`` a GPU brings
    them there, so they are moved back first. Files written before one device's state was kept hold every GPU's
    state, restored as they are."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = _cuda_device(device)
    if len(state["cuda"]) == 1 and cuda is not None:
        torch.cuda.set_rng_state(state["cuda"][0].cpu(), cuda)
    elif len(state["cuda"]) > 1 and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    name, keys, *rest = json.loads(state["numpy"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))


def write_failure(path: Path, exc: BaseException) -> str:
    """One sentence on why writing ``path`` failed; a full disk and an exceeded disk quota are named as such."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        reason = "no space left on the device"
    elif isinstance(exc, OSError) and exc.errno == getattr(errno, "EDQUOT", None):
        reason = "the disk quota is exceeded"
    else:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        with contextlib.suppress(OSError):
            if shutil.disk_usage(path.parent).free < 64 << 20:
                reason = f"the device is (nearly) full: {reason}"
    return f"could not write {path}: {reason}"


def scratch_file(folder: str | Path, prefix: str, suffix: str) -> tuple[int, str]:
    """A new empty file ``folder/<prefix><random><suffix>``, open for writing: its descriptor and path. Unlike
    ``tempfile.mkstemp``, whose files are private (mode 0o600), it gets the mode ``open()`` gives a new file
    (0o666 less the umask), so a file renamed from it over a destination (results, weights, an export) is as
    readable as the user's other files, e.g. by the group on a shared cluster."""
    name = os.path.join(folder, f"{prefix}{secrets.token_hex(6)}{suffix}")
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), name


class _KeepsWriteError:
    """A binary file handle that keeps the ``OSError`` its last failed ``write`` raised: ``torch.save`` turns it
    into an "unexpected pos" enforce failure (a ``RuntimeError``) that no longer says why, e.g. that the disk
    quota, which the free space does not show, is exceeded."""

    def __init__(self, handle: BinaryIO):
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)


@contextlib.contextmanager
def _noting_interruptions(noted: list[BaseException]):
    """Within the block, the exception a SIGINT or SIGTERM handler raises (Ctrl-C's ``KeyboardInterrupt``, a
    command's ``Terminated``) is also appended to ``noted``: raised inside a write that ``torch.save``'s C++ writer
    calls, it comes out of ``torch.save`` as an "unexpected pos" RuntimeError, which would make a stopped command's
    write look like a failed one. Only the main thread runs signal handlers, so only it wraps them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wrapped = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if callable(handler):
            def noting(number, frame, handler=handler):
                try:
                    handler(number, frame)
                except BaseException as exc:
                    noted.append(exc)
                    raise
            wrapped[signum] = handler
            signal.signal(signum, noting)
    try:
        yield
    finally:
        for signum, handler in wrapped.items():
            signal.signal(signum, handler)


def remove_partial_writes(folder: Path) -> None:
    """Remove the ``*.tmp`` files that writes by :func:`atomic_write` cut short by a kill left in ``folder`` (the
    intact files they were replacing stay); only for a process that holds the folder
    (:mod:`mtsl_plugin.folder_lock`), so that no write of another process is under way."""
    for partial in folder.glob("*.tmp"):
        partial.unlink(missing_ok=True)


def file_version(path: Path) -> tuple[int, int, int] | None:
    """Which version of ``path`` is on disk (inode, modification time, size; an atomic write, which renames a new
    file over it, gives another), or ``None`` when there is no file."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` through ``write(handle)`` into a temporary file of the same folder, fsync it, rename it over
    ``path`` and fsync the folder. On any failure the temporary file is removed, ``path`` keeps its previous
    content, and an ``OSError`` (a full disk, a read-only folder...) becomes a :class:`WriteError` naming ``path``;
    Ctrl-C or SIGTERM during the write comes out as the interruption it is (``torch.save`` alone would make it a
    failed write). Under ``torch.distributed`` only rank 0 writes (every rank holds the same state); the others
    return."""
    path = Path(path)
    if not distributed.is_main():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = scratch_file(path.parent, path.name + ".", ".tmp")
    except OSError as exc:
        raise WriteError(write_failure(path, exc)) from None
    handle, interruptions = None, []
    try:
        with _noting_interruptions(interruptions), os.fdopen(fd, "wb") as opened:
            handle = _KeepsWriteError(opened)
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save raises RuntimeError when a write fails (a full disk)
        Path(tmp).unlink(missing_ok=True)
        if interruptions:  # Ctrl-C or SIGTERM inside torch.save's writes: the command stops, the write did not fail
            raise interruptions[0] from None
        cause = handle.error if handle is not None and handle.error is not None else exc
        raise WriteError(f"{write_failure(path, cause)}; the previous file is kept") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)
    return path


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (fsync the folder), where the system allows it: without it a power cut
    may lose the rename on some file systems, after a later step removed what the old file was replaced by."""
    with contextlib.suppress(OSError):  # Windows opens no folder; some file systems refuse a folder's fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(path: str | Path, payload: dict[str, Any], device: str | torch.device | None = None) -> Path:
    """Write ``payload`` (plus format and RNG states, the CUDA one of ``device``: :func:`rng_state`) to ``path``
    atomically."""
    data = {"format": FORMAT, "kind": "checkpoint", "rng": rng_state(device), **payload}
    return atomic_write(path, lambda handle: torch.save(data, handle))


def save_weights(path: str | Path, plan: str, state: dict[str, torch.Tensor]) -> Path:
    """Write a finished run's trained weights (its plan as JSON, "" when not plan-based, and the model's
    ``state`` dict, read back as the entry ``"model"``) to ``path`` atomically; :func:`load_checkpoint` reads it."""
    return atomic_write(path, lambda handle: torch.save({"format": FORMAT, "kind": "weights", "plan": plan,
                                                         "model": state}, handle))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False
                    ) -> dict[str, Any]:
    """Read a file written by :func:`save_checkpoint` or :func:`save_weights` (``weights_only=True``); its
    ``"kind"`` says which ("checkpoint" or "weights"). With ``mmap`` the tensors are mapped from the file, not
    read: a caller that needs only the plain entries (the plan) reads kilobytes of a file of gigabytes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # a truncated or foreign file
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise CheckpointError(f"checkpoint {path} cannot be read ({reason}); it is truncated or not a checkpoint "
                              "of this package") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a mtsl-plugin checkpoint of format {FORMAT}")
    data.setdefault("kind", "checkpoint")  # files written before weights files existed
    return data
