"""Files a run writes through ``atomic_write`` (configs, records, weights, checkpoints)."""
import errno
import io
import os
import signal
import stat
from pathlib import Path

import pytest
import torch

from benchmarks import cli
from mtsl_plugin import checkpoint
from mtsl_plugin.checkpoint import (CheckpointError, atomic_write, load_checkpoint, rng_state, save_checkpoint,
                                    save_weights, set_rng_state)
from mtsl_plugin.plan import BranchingPlan
from mtsl_plugin.trainer import MTLTrainer


def test_written_files_get_the_mode_a_new_file_gets_not_a_private_one(tmp_path, umask):
    """A run's files are as readable as the user's other files (``0o666 & ~umask``: by the group on a shared
    cluster under umask 022 or 027). They were written through ``tempfile.mkstemp``, whose files are 0o600, and
    kept that mode when renamed over the destination, unlike the table and figures beside them."""
    record = atomic_write(tmp_path / "run" / "result.json", lambda handle: handle.write(b"{}"))
    weights = save_weights(tmp_path / "run" / "model.pt", "{}", {"w": torch.ones(2)})
    for path in (record, weights):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    assert record.read_bytes() == b"{}" and torch.equal(load_checkpoint(weights)["model"]["w"], torch.ones(2))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model.pt", "result.json"]  # no scratch left


def _bytes_read() -> int:
    """What this process has read through system calls so far (Linux's ``/proc/self/io`` ``rchar``)."""
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines()
                    if line.startswith("rchar")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts bytes read through Linux's /proc/self/io")
def test_a_write_syncs_the_file_then_its_folder_after_the_rename(tmp_path, monkeypatch):
    """The rename is durable only once the folder is synced (a power cut may lose it on some file systems)."""
    synced = []
    real = os.fsync
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
                        or real(fd))
    checkpoint.atomic_write(tmp_path / "a.json", lambda handle: handle.write(b"{}"))
    assert synced == [False, True] and (tmp_path / "a.json").read_bytes() == b"{}"


def test_a_file_of_another_format_is_refused_and_an_old_checkpoint_without_a_kind_reads_as_a_checkpoint(tmp_path):
    """Another program's torch.save dict, or a later format, is one CheckpointError, not a KeyError when resuming;
    a checkpoint written before the ``kind`` entry existed resumes as a checkpoint (optimizer and RNGs restored)."""
    for data in ({"plan": "", "model": {}}, {"format": checkpoint.FORMAT + 1, "plan": "", "model": {}}):
        torch.save(data, tmp_path / "other.pt")
        with pytest.raises(CheckpointError, match="other.pt is not a mtsl-plugin checkpoint of format"):
            load_checkpoint(tmp_path / "other.pt")
    torch.save({"format": checkpoint.FORMAT, "plan": "", "model": {}}, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["kind"] == "checkpoint"


def test_an_interruption_in_a_write_callback_leaves_no_partial_file(tmp_path):
    def interrupted(handle):
        handle.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "table.md", interrupted)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoints_plan_is_read_without_reading_its_weights(tmp_path):
    """Resuming a run (and ``load_run``, and a LibMTL ``Trainer`` given a file) reads the file's plan to build the
    trainer, then the whole file in ``load``. The plan's read deserialised every tensor too: each checkpoint was
    read twice (a 256 MiB one: 256 MiB read and 257 MiB more peak memory for a string of a few hundred bytes)."""
    plan = BranchingPlan.single_task(["S", "D"], 10)
    path = save_checkpoint(tmp_path / "checkpoint.pt", {"plan": plan.to_json(), "model": {"w": torch.zeros(8 << 20)}})
    before = _bytes_read()
    assert MTLTrainer.checkpoint_plan(path) == plan
    assert _bytes_read() - before < path.stat().st_size / 8  # the archive's index and records: kilobytes of 32 MiB


@pytest.mark.parametrize("code, named", [(errno.EDQUOT, "the disk quota is exceeded"),
                                         (errno.ENOSPC, "no space left on the device")])
def test_a_write_the_file_system_refuses_midway_is_named_by_its_cause(tmp_path, monkeypatch, code, named):
    """``torch.save`` turns a write's ``OSError`` into an "unexpected pos" RuntimeError; the message names the
    cause it lost (an exceeded quota leaves the device's free space untouched, so nothing else shows it), and the
    previous file is kept."""
    path = save_weights(tmp_path / "weights.pt", "", {"w": torch.zeros(4)})
    before = path.read_bytes()

    class RefusesAfterAKilobyte(io.FileIO):
        def write(self, data):
            if self.tell() + len(data) > 1024:
                raise OSError(code, os.strerror(code))
            return super().write(data)

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: RefusesAfterAKilobyte(fd, mode))
    with pytest.raises(CheckpointError) as info:
        save_weights(path, "", {"w": torch.zeros(100_000)})
    message = str(info.value)
    assert named in message and str(path) in message and "previous file is kept" in message
    assert "unexpected pos" not in message and len(message.splitlines()) == 1
    monkeypatch.undo()
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_write_stops_the_command_instead_of_failing_the_write(tmp_path, monkeypatch, signum):
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM that arrives while ``torch.save`` writes: its handler raises inside
    the write torch's C++ writer calls, which torch would turn into an "unexpected pos" RuntimeError, a failed write
    (the run reported failed, the command going on with the next run). The interruption itself comes out; the
    temporary file goes and the previous file stays."""
    path = save_weights(tmp_path / "weights.pt", "", {"w": torch.zeros(4)})
    before = path.read_bytes()

    class SignalledAfterAKilobyte(io.FileIO):
        sent = False

        def write(self, data):
            if self.tell() + len(data) > 1024 and not self.sent:
                self.sent = True
                os.kill(os.getpid(), signum)  # the handler runs at the next Python instruction: inside the writes
            return super().write(data)

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: SignalledAfterAKilobyte(fd, mode))
    # Python's Ctrl-C handler, which a process started with SIGINT ignored (a script's background job) lacks
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with cli.sigterm_as_interrupt(), pytest.raises(KeyboardInterrupt) as info:
            save_weights(path, "", {"w": torch.zeros(100_000), "v": torch.zeros(100_000)})
    finally:
        signal.signal(signal.SIGINT, previous)
    assert isinstance(info.value, cli.Terminated) == (signum == signal.SIGTERM)
    monkeypatch.undo()
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_a_write_leaves_the_signal_handlers_as_it_found_them(tmp_path):
    """A write notes interruptions through wrappers of the SIGINT and SIGTERM handlers and puts the handlers back
    afterwards (left in place, every checkpoint of a long run would wrap them once more)."""
    def on_sigterm(number, frame):
        raise cli.Terminated()

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm)}
    try:
        for _ in range(2):
            save_weights(tmp_path / "weights.pt", "", {"w": torch.zeros(4)})
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is on_sigterm
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_file_is_written_from_a_thread_other_than_the_main_one(tmp_path):
    """Only the main thread may set signal handlers; a write from another thread (a script's background saver)
    leaves them alone and writes its file."""
    import threading

    errors = []

    def write():
        try:
            atomic_write(tmp_path / "result.json", lambda handle: handle.write(b"{}"))
        except Exception as exc:  # noqa: BLE001  reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    thread.join()
    assert errors == [] and (tmp_path / "result.json").read_bytes() == b"{}"


def test_the_rng_states_restored_draw_again_what_they_drew(tmp_path):
    """torch's, numpy's and Python's global generators, through a checkpoint file: nothing in the package draws
    from numpy's or Python's after seeding, so a resume test could not see them lost, but a plugin or a user's
    dataset that draws from them must resume its stream too."""
    import random

    import numpy as np

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    first = (random.random(), float(np.random.rand()), float(torch.rand(())))
    set_rng_state(torch.load(path, weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == first
