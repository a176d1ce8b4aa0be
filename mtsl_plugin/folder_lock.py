"""One process at a time in a run folder.

Two commands pointed at one ``--out`` (two jobs of a cluster array: ``--methods mtsl`` and ``--methods ltb`` both
need the STN reference) would otherwise train the same run side by side: twice the compute, each continuing the
other's checkpoints, and the second one's start deleting the first one's half-written checkpoint (the ``*.tmp``
files a kill leaves are removed when a run takes its folder), which fails the first run at its next checkpoint.

A run folder is held through an advisory lock (``fcntl.flock``, exclusive) on its :data:`LOCK_FILE`, into which
the holder writes who it is (process id, host, start) so that a process kept out can say whom it waits for. The
operating system releases the lock when its process ends, killed or not, so a crashed run never blocks the
folder. The file stays, emptied on release: removing it would let a process that opened it just before lock a
file no other process sees any more (the usual remedy, comparing the path's inode after locking, is not reliable
on network file systems, which cache file attributes). :func:`holding` is reentrant within a process (the harness
holds the folder while it decides to reuse, continue or train, and :func:`~mtsl_plugin.experiment.run_method`
takes it again). Under torchrun rank 0 takes the lock and every rank follows its answer, or raises its error. On
a file system without locks (Lustre mounted without ``flock``, NFS without a lock daemon) the folder is used
unlocked, after one line saying so; without ``fcntl`` (Windows), silently.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from mtsl_plugin import distributed

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

LOCK_FILE = ".lock"
POLL_SECONDS = 10.0  # how often a waiting process tries again
BUSY = {errno.EWOULDBLOCK, errno.EAGAIN}  # another process holds the lock
#: errnos of a file system that keeps no locks: the folder is used unlocked
NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


@dataclass
class _Hold:
    depth: int  # nested holding() blocks of this process
    fd: int | None  # the locked file; None where the folder is used unlocked, and on every rank but 0


_held: dict[Path, _Hold] = {}


class FolderBusy(RuntimeError):
    """Another process holds the run folder (``holder``: which, in words, as :func:`holder` says)."""

    holder = "another process"


def holder(folder: Path) -> str:
    """Who holds ``folder``'s lock, in words (what its :data:`LOCK_FILE` says)."""
    try:
        entry = json.loads((folder / LOCK_FILE).read_text())
        return f"process {entry['pid']} on {entry['host']}, since {entry['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # being written by a holder that has just taken it
        return "another process"


def _try_lock(folder: Path) -> tuple[bool, int | None]:
    """Try once to lock ``folder``: ``(True, fd)`` when this process now holds it, ``(True, None)`` when the file
    system keeps no locks (a warning is printed), ``(False, None)`` when another process holds it."""
    if fcntl is None:
        return True, None
    try:  # readable and writable by whoever may write the results (0o666 less the umask, as the results are)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's lock file in a shared folder: flock needs no write access
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in BUSY:
            return False, None
        if exc.errno not in NO_LOCKS:
            raise
        print(f"warning: {folder} cannot be locked ({os.strerror(exc.errno)}): nothing keeps a second process "
              "from training in it at the same time", file=sys.stderr, flush=True)
        return True, None
    try:
        with contextlib.suppress(OSError):  # who holds it is a courtesy: a full disk or quota must not fail the run
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    except BaseException:  # an interrupt: the lock must not outlive the hold that failed
        os.close(fd)
        raise
    return True, fd


def _release(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no one holds it
        os.close(fd)  # releases the lock


def busy(folder: str | Path) -> str | None:
    """Who holds ``folder`` now (:func:`holder`), ``None`` when no other process does. A probe that writes
    nothing (what a dry run reports): a shared lock, which fails only while a process holds the folder."""
    folder = Path(folder).resolve()
    if fcntl is None or folder in _held:
        return None
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file: never held
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return holder(folder) if exc.errno in BUSY else None
    finally:
        os.close(fd)
    return None


def _acquire(folder: Path, wait: bool, on_wait: Callable[[str], None] | None) -> int | None:
    """:func:`holding`'s first hold of ``folder``: the descriptor of its lock (``None`` where the folder is used
    unlocked, and on every rank but 0)."""

    def attempt() -> tuple[bool, int | None]:
        if not distributed.is_main():
            return True, None
        folder.mkdir(parents=True, exist_ok=True)
        return _try_lock(folder)

    told = False
    while True:
        # an error on rank 0 (a folder it cannot create, a lock file it may not open) is raised on every rank, so
        # that no rank waits in the broadcast below for a rank 0 that has gone on
        got, fd = distributed.fail_together(attempt, OSError)
        got, who = distributed.broadcast_object((got, None if got else holder(folder)))
        if got:
            return fd
        if not wait:
            refusal = FolderBusy(f"{folder} is in use by {who}, which trains a run there; wait for it to finish or "
                                 "choose another folder")
            refusal.holder = who
            raise distributed.on_every_rank(refusal)
        if not told and on_wait is not None:
            on_wait(who)
            told = True
        time.sleep(POLL_SECONDS)


@contextlib.contextmanager
def holding(folder: str | Path, *, wait: bool = False, on_wait: Callable[[str], None] | None = None
            ) -> Iterator[None]:
    """Hold ``folder`` (created if missing) for the block. When another process holds it: with ``wait``, call
    ``on_wait`` with who holds it (:func:`holder`) once and try again every :data:`POLL_SECONDS` until it is
    free; else raise :class:`FolderBusy` naming the folder and the holder. Collective under torchrun: every
    rank calls it with the same arguments, rank 0 locks."""
    folder = Path(folder).resolve()
    hold = _held.get(folder)
    if hold is None:
        hold = _held[folder] = _Hold(0, _acquire(folder, wait, on_wait))
    hold.depth += 1
    try:
        yield
    finally:
        hold.depth -= 1
        if not hold.depth:
            del _held[folder]
            _release(hold.fd)
