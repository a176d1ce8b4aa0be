"""The test session's compile caches (``conftest``): a killed session's folder is removed by the next session, a live
session's never; inductor's precompiled headers go into this session's folder."""
import os
import subprocess
import sys
import tempfile

import pytest
import torch._inductor.codecache as inductor_codecache

import conftest


def test_a_dead_sessions_cache_is_removed_and_a_live_ones_kept(tmp_path, monkeypatch):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                              check=True)
    dead, live = int(finished.stdout), os.getpid()
    for name in (f"{conftest.COMPILE_PREFIX}{dead}-abc", f"{conftest.COMPILE_PREFIX}{live}-def",
                 f"{conftest.COMPILE_PREFIX}old", "unrelated"):
        (tmp_path / name / "inductor").mkdir(parents=True)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    conftest._remove_dead_sessions_caches()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{conftest.COMPILE_PREFIX}{live}-def", f"{conftest.COMPILE_PREFIX}old", "unrelated"])


def test_this_sessions_caches_and_precompiled_headers_live_in_its_own_folder():
    if conftest.COMPILE_CACHE is None:
        pytest.skip("TORCHINDUCTOR_CACHE_DIR was set before the session: the user's folders stay theirs")
    assert os.path.basename(conftest.COMPILE_CACHE).startswith(f"{conftest.COMPILE_PREFIX}{os.getpid()}-")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].startswith(conftest.COMPILE_CACHE)
    assert inductor_codecache._HEADER_DIR.startswith(conftest.COMPILE_CACHE)
    assert inductor_codecache._HEADER_LOCK_DIR.startswith(inductor_codecache._HEADER_DIR)
