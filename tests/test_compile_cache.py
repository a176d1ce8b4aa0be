"""The test session's compile caches (``conftest``): a killed session's folder is removed by the next session, a live
session's never (its lock is held); inductor's precompiled headers go into this session's folder."""
import fcntl
import os
import tempfile

import pytest
import torch._inductor.codecache as inductor_codecache

import conftest


def test_a_dead_sessions_cache_is_removed_and_a_live_ones_kept(tmp_path, monkeypatch):
    """A folder whose lock file nobody holds (its session was killed) is removed; one whose lock is held (a live
    session, whatever its process id says), one without a lock file (any name anyone can make in the shared
    temporary folder), a link and an unrelated folder are kept."""
    prefix = conftest.COMPILE_PREFIX
    for name in ("1-dead", "2-live", "3-no-lock", "2147483648-x", "\u00b2-x"):
        (tmp_path / f"{prefix}{name}" / "inductor").mkdir(parents=True)
    (tmp_path / "unrelated").mkdir()
    for folder in (f"{prefix}1-dead", f"{prefix}2-live", "unrelated"):
        (tmp_path / folder / conftest.SESSION_LOCK).touch()
    (tmp_path / f"{prefix}link").symlink_to(tmp_path / "unrelated")  # never followed
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    with open(tmp_path / f"{prefix}2-live" / conftest.SESSION_LOCK, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another open file description conflicts, even in this process
        conftest._remove_dead_sessions_caches()
    kept = [f"{prefix}{name}" for name in ("2-live", "3-no-lock", "2147483648-x", "\u00b2-x", "link")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["unrelated"])
    assert (tmp_path / "unrelated" / conftest.SESSION_LOCK).exists()


def test_this_sessions_caches_and_precompiled_headers_live_in_its_own_folder():
    if conftest.COMPILE_CACHE is None:
        pytest.skip("TORCHINDUCTOR_CACHE_DIR was set before the session: the user's folders stay theirs")
    assert os.path.basename(conftest.COMPILE_CACHE).startswith(f"{conftest.COMPILE_PREFIX}{os.getpid()}-")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].startswith(conftest.COMPILE_CACHE)
    assert inductor_codecache._HEADER_DIR.startswith(conftest.COMPILE_CACHE)
    assert inductor_codecache._HEADER_LOCK_DIR.startswith(inductor_codecache._HEADER_DIR)
    with open(os.path.join(conftest.COMPILE_CACHE, conftest.SESSION_LOCK), "rb") as lock, \
            pytest.raises(BlockingIOError):
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while the session lives
    # this session never writes inductor's default headers folder, so one made meanwhile is another process's
    assert not conftest.INDUCTOR_HEADERS_MADE_HERE
