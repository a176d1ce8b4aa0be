"""One process at a time in a run folder: a second process is refused (run_method, the LibMTL-style Trainer) or
waits (the benchmark commands), a killed holder never blocks the folder, and a dry run's probe takes nothing."""
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import baselines  # noqa: F401  (registers onenet)
from conftest import HOLD, other_process
from mtsl_plugin import folder_lock
from mtsl_plugin.folder_lock import LOCK_FILE, FolderBusy


def test_a_folder_another_process_trains_in_is_refused_untouched(tmp_path):
    """run_method in a folder another process trains in raises before touching it: the other's half-written
    checkpoint (a ``*.tmp``, which a run taking its folder removes as a kill's leftover) stays."""
    from conftest import smoke_config
    from mtsl_plugin.experiment import run_method

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt.tmp").write_bytes(b"half written")
    with other_process(run) as other:
        before = sorted(p.name for p in run.iterdir())
        with pytest.raises(FolderBusy, match=rf"{run} is in use by process {other.pid} on .*, since .*; wait for it"):
            run_method(smoke_config(), "onenet", run, resume=True, progress=False, check=False)
        assert sorted(p.name for p in run.iterdir()) == before
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, "checkpoint.pt.tmp"]
    assert (run / LOCK_FILE).read_text() == ""  # released: it names no holder


def test_a_killed_holder_blocks_nothing(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    assert folder_lock.busy(tmp_path).startswith(f"process {proc.pid} on ")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdin.close()
    assert folder_lock.holder(tmp_path).startswith(f"process {proc.pid} on ")  # its record stays, its lock not
    assert folder_lock.busy(tmp_path) is None
    with folder_lock.holding(tmp_path):  # at once, no waiting
        assert folder_lock.holder(tmp_path).startswith(f"process {os.getpid()} on ")
    assert (tmp_path / LOCK_FILE).read_text() == ""


def locked(folder):
    """Whether any open file (this process's included) holds a lock on ``folder``'s lock file: an exclusive lock
    of a new one is refused then."""
    fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_holding_is_reentrant_within_a_process(tmp_path):
    with folder_lock.holding(tmp_path):
        with folder_lock.holding(tmp_path):
            pass
        assert locked(tmp_path) and folder_lock.busy(tmp_path) is None  # held, by this process
    assert not locked(tmp_path) and (tmp_path / LOCK_FILE).read_text() == ""


def test_a_dry_runs_probe_takes_nothing(tmp_path):
    """busy() writes nothing, not even a lock file (a dry run writes nothing), and leaves no lock behind."""
    assert folder_lock.busy(tmp_path) is None and not (tmp_path / LOCK_FILE).exists()
    with other_process(tmp_path) as other:
        record = (tmp_path / LOCK_FILE).read_text()
        entry = json.loads(record)
        assert entry["pid"] == other.pid
        assert folder_lock.busy(tmp_path) == f"process {other.pid} on {entry['host']}, since {entry['since']}"
        assert (tmp_path / LOCK_FILE).read_text() == record
    assert folder_lock.busy(tmp_path) is None and not locked(tmp_path)


def test_a_holder_record_that_cannot_be_written_still_holds_and_releases(tmp_path, monkeypatch):
    """A full disk or a quota failing the holder's record (a courtesy to the processes kept out) does not fail
    the hold; the lock is held and given back as usual."""
    def over_quota(fd, data):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(folder_lock.os, "write", over_quota)
    with folder_lock.holding(tmp_path):
        monkeypatch.undo()
        assert locked(tmp_path) and folder_lock.holder(tmp_path) == "another process"
    assert not locked(tmp_path)


def test_the_lock_file_is_as_writable_as_the_results_and_anothers_read_only_one_still_locks(tmp_path, monkeypatch):
    """In a group-shared folder (umask 002) a group member who may write the results may open the lock too; a
    lock file this user cannot write (another user's, made before) is locked through a read-only descriptor."""
    umask = os.umask(0o002)
    try:
        with folder_lock.holding(tmp_path / "shared"):
            pass
    finally:
        os.umask(umask)
    assert (tmp_path / "shared" / LOCK_FILE).stat().st_mode & 0o777 == 0o664
    opened = os.open

    def not_writable(path, flags, *mode):  # as for a user other than the lock file's owner (root may write it)
        if flags & os.O_RDWR:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return opened(path, flags, *mode)

    monkeypatch.setattr(folder_lock.os, "open", not_writable)
    with folder_lock.holding(tmp_path / "shared"):
        monkeypatch.undo()
        assert locked(tmp_path / "shared")
    assert not locked(tmp_path / "shared")


def test_a_file_system_without_locks_is_used_unlocked_after_a_warning(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(folder_lock.fcntl, "flock", no_locks)
    with folder_lock.holding(tmp_path):
        pass
    assert f"warning: {tmp_path} cannot be locked (No locks available)" in capsys.readouterr().err


def test_the_harness_puts_off_a_run_another_process_trains_then_waits_and_reuses_it(tmp_path, monkeypatch, capsys):
    """Two commands on one --out (a cluster's job array) train each shared run once: the second puts the run the
    first trains off, then waits for it, says whom it waits for (its dry run too), and reuses the finished run."""
    from benchmarks import harness
    from conftest import smoke_config

    job = harness.Job("onenet", "onenet", smoke_config())
    harness.run_job(job, tmp_path, [], progress=False)
    run = job.run_dir(tmp_path)
    weights = (run / "model.pt").stat().st_mtime_ns
    capsys.readouterr()
    monkeypatch.setattr(folder_lock, "POLL_SECONDS", 0.05)
    with other_process(run) as other:
        harness.dry_run([job], tmp_path)
        assert f"[onenet seed 0] would wait for process {other.pid} on " in capsys.readouterr().out
        threading.Timer(1.0, other.stdin.close).start()
        started = time.perf_counter()
        (record,) = harness.run_jobs([job], tmp_path, progress=False)
        assert time.perf_counter() - started >= 0.9
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"[onenet seed 0] process {other.pid} on ") and lines[0].endswith(
        ", trains it; back to it after the other runs")
    assert lines[1].startswith(f"[onenet seed 0] waiting for process {other.pid} on ") and len(lines) == 3
    assert lines[2].startswith("[onenet seed 0] reusing the finished run") and record["status"] == "ok"
    assert (run / "model.pt").stat().st_mtime_ns == weights


def test_runs_other_processes_train_are_put_off_with_the_runs_retraining_their_plans(tmp_path, monkeypatch):
    """Commands sharing an --out share out its runs: a run another process holds waits until the command's other
    runs are done (a "-R" run retraining its plan with it), and the records keep the jobs' order."""
    from benchmarks import harness
    from conftest import smoke_config

    held, calls = {"stn", "mtsl"}, []

    def run_job(job, out, results, progress, keep_checkpoints, wait=True):
        if job.label in held and not wait:
            raise FolderBusy("in use")
        calls.append((job.label, wait, [r["label"] for r in results]))
        return {"label": job.label, "status": "ok"}

    monkeypatch.setattr(harness, "run_job", run_job)
    jobs = [harness.Job(m, m, smoke_config()) for m in ("stn", "onenet", "mtsl", "mtsl_r", "mtsl_noalign")]
    records = harness.run_jobs(jobs, tmp_path, progress=False)
    assert [r["label"] for r in records] == ["stn", "onenet", "mtsl", "mtsl_r", "mtsl_noalign"]
    assert calls == [("onenet", False, []), ("mtsl_noalign", False, ["onenet"]),
                     ("stn", True, ["onenet", "mtsl_noalign"]), ("mtsl", True, ["stn", "onenet", "mtsl_noalign"]),
                     ("mtsl_r", True, ["stn", "onenet", "mtsl", "mtsl_noalign"])]


def test_under_torchrun_every_rank_follows_rank_0s_answer(tmp_path, monkeypatch):
    """Rank 0 alone locks; another rank takes its answer (busy: refused alike, or waited for alike) and never
    touches the folder, so every rank leaves the block's collectives together."""
    from mtsl_plugin import distributed

    answers = iter([(False, "process 7 on node1, since then"), (True, None), (False, "process 7 on node1, since then")])
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    monkeypatch.setattr(distributed, "broadcast_object", lambda value: next(answers))
    monkeypatch.setattr(distributed, "fail_together", lambda action, errors: action())
    monkeypatch.setattr(folder_lock, "POLL_SECONDS", 0.0)
    waited = []
    with folder_lock.holding(tmp_path / "run", wait=True, on_wait=waited.append):
        assert not (tmp_path / "run").exists()
    assert waited == ["process 7 on node1, since then"]
    with pytest.raises(FolderBusy, match="is in use by process 7 on node1") as refused:
        with folder_lock.holding(tmp_path / "run"):
            pass
    assert distributed.raised_on_every_rank(refused.value)


def test_a_lock_error_other_than_a_file_system_without_locks_is_raised_not_warned_about(tmp_path, monkeypatch,
                                                                                       capsys):
    """Only the errnos of a file system that keeps no locks let the folder be used unlocked; another failure of
    ``flock`` (an I/O error) is raised, so that no run trains unlocked on a folder it could not lock for another
    reason, and no hold is left behind."""
    def io_error(fd, operation):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(folder_lock.fcntl, "flock", io_error)
    with pytest.raises(OSError, match="Input/output error"):
        with folder_lock.holding(tmp_path):
            pass
    assert "warning" not in capsys.readouterr().err and tmp_path.resolve() not in folder_lock._held


def test_two_dry_runs_probing_one_folder_at_once_see_it_free(tmp_path):
    """A probe takes a shared lock, which another probe's shared lock does not refuse: two dry runs on one folder
    do not report each other as a process training in it."""
    (tmp_path / LOCK_FILE).touch()
    fd = os.open(tmp_path / LOCK_FILE, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # the other dry run's probe, held at this moment
        assert folder_lock.busy(tmp_path) is None
    finally:
        os.close(fd)


def test_a_process_waiting_for_a_folder_says_whom_it_waits_for_once(tmp_path, monkeypatch):
    """A wait of many polls (every POLL_SECONDS, for hours behind a long run) says once whom it waits for, not at
    every poll."""
    monkeypatch.setattr(folder_lock, "POLL_SECONDS", 0.01)
    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another holder: a lock of another open file
    threading.Timer(0.3, os.close, (fd,)).start()
    waited = []
    with folder_lock.holding(tmp_path, wait=True, on_wait=waited.append):
        assert locked(tmp_path)
    assert waited == ["another process"]


def test_an_interrupt_while_the_holder_record_is_written_leaves_no_lock(tmp_path, monkeypatch):
    """Ctrl-C arriving while the holder writes its record leaves the folder free: the lock file is closed, not
    left open (and locked) for as long as the process lives (a notebook, a script that catches the interrupt)."""
    def interrupted(fd, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(folder_lock.os, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with folder_lock.holding(tmp_path):
            pass
    monkeypatch.undo()
    assert not locked(tmp_path) and folder_lock.busy(tmp_path) is None
