"""One process at a time in a run folder.

Two commands pointed at one ``--out`` (two jobs of a cluster array: ``--methods mtsl`` and ``--methods ltb`` both
need the STN reference) would otherwise train the same run side by side: twice the compute, each continuing the
other's checkpoints, and the second one's start deleting the first one's half-written checkpoint (the ``*.tmp``
files a kill leaves are removed when a run takes its folder), which fails the first run at its next checkpoint.

A run folder is held through an advisory lock (``fcntl.flock``, exclusive) on its :data:`LOCK_FILE`, which
names the holder (process id, host, start) so that the process kept out can say who holds it. The operating
system releases the lock when its process ends, killed or not, so a crashed run never blocks the folder; the
file is removed on release and a process that locked a file removed meanwhile tries again (the usual
lock-file-with-unlink protocol). :func:`holding` is reentrant within a process (the harness holds the folder
while it decides to reuse, continue or train, and :func:`~mtsl_plugin.experiment.run_method` takes it again).
Under torchrun rank 0 takes the lock and every rank follows its answer. On a file system without locks (Lustre
mounted without ``flock``, NFS without a lock daemon) and without ``fcntl`` (Windows) the folder is used unlocked,
after one line saying so.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from mtsl_plugin import distributed

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

LOCK_FILE = ".lock"
POLL_SECONDS = 10.0  # how often a waiting process tries again
#: errnos of a file system that keeps no locks: the folder is used unlocked
NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}

_held: dict[Path, list] = {}  # folder -> [depth, file descriptor or None (unlocked or not rank 0)]


class FolderBusy(RuntimeError):
    """Another process holds the run folder."""


def holder(folder: Path) -> str:
    """Who holds ``folder``'s lock, in words (what its :data:`LOCK_FILE` says)."""
    try:
        entry = json.loads((folder / LOCK_FILE).read_text())
        return f"process {entry['pid']} on {entry['host']}, since {entry['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # released meanwhile, or being written
        return "another process"


def _try_lock(folder: Path) -> tuple[bool, int | None]:
    """Try once to lock ``folder``: ``(True, fd)`` when this process now holds it, ``(True, None)`` when the file
    system keeps no locks (a warning is printed), ``(False, None)`` when another process holds it."""
    if fcntl is None:
        return True, None
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False, None
            if exc.errno not in NO_LOCKS:
                raise
            with contextlib.suppress(OSError):
                path.unlink()
            print(f"warning: {folder} cannot be locked ({os.strerror(exc.errno)}): nothing keeps a second process "
                  "from training in it at the same time", file=sys.stderr, flush=True)
            return True, None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:  # the holder released (and removed) it between our open and our lock
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
            return True, fd
        os.close(fd)


def _release(folder: Path, fd: int | None) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):  # removed while still locked, so no process locks a file about to go
        (folder / LOCK_FILE).unlink()
    os.close(fd)  # releases the lock


def busy(folder: str | Path) -> str | None:
    """Who holds ``folder`` now (:func:`holder`), ``None`` when no other process does (a lock file a killed process
    left is removed). Takes no lock beyond the check: what a dry run reports."""
    folder = Path(folder).resolve()
    if folder in _held or not (folder / LOCK_FILE).exists():
        return None
    got, fd = _try_lock(folder)
    if got:
        _release(folder, fd)
        return None
    return holder(folder)


@contextlib.contextmanager
def holding(folder: str | Path, *, wait: bool = False, on_wait: Callable[[str], None] | None = None
            ) -> Iterator[None]:
    """Hold ``folder`` (created if missing) for the block. When another process holds it: with ``wait``, call
    ``on_wait`` with who holds it (:func:`holder`) once and try again every :data:`POLL_SECONDS` until it is
    free; else raise :class:`FolderBusy` naming the folder and the holder. Collective under torchrun: every
    rank calls it with the same arguments, rank 0 locks."""
    folder = Path(folder).resolve()
    if folder in _held:
        _held[folder][0] += 1
    else:
        if distributed.is_main():
            folder.mkdir(parents=True, exist_ok=True)
        told = False
        while True:
            got, fd = _try_lock(folder) if distributed.is_main() else (True, None)
            who = holder(folder) if not got else None
            got, who = distributed.broadcast_object((got, who))
            if got:
                break
            if not wait:
                raise distributed.on_every_rank(FolderBusy(
                    f"{folder} is in use by {who}, which trains a run there; wait for it to finish or choose "
                    "another folder"))
            if not told and on_wait is not None:
                on_wait(who)
                told = True
            time.sleep(POLL_SECONDS)
        _held[folder] = [1, fd]
    try:
        yield
    finally:
        _held[folder][0] -= 1
        if not _held[folder][0]:
            _release(folder, _held.pop(folder)[1])
