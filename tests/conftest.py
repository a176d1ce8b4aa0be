"""Shared fixtures: the smoke preset, shrunk further where a test only needs the code path."""
import contextlib
import fcntl
import getpass
import os
import shutil
import subprocess
import sys
import tempfile

# torch.compile's caches (inductor's generated code, Triton's kernels, inductor's precompiled C++ headers, about
# 450 MB a run) go to a folder of this test session, removed when it ends. Set before torch is imported (importing
# the package fixes inductor's folder); the processes the tests start inherit it, and a folder the user set is kept
# as it is. The headers' folder is a global of inductor's, not an environment variable: it is pointed into this
# session's folder once imported (should a torch have no such global, its default folder,
# /tmp/torchinductor_<user>/precompiled_headers, is removed at the end when this session made it). A session holds
# an exclusive lock on a file in its folder while it lives (the system releases it when the process ends, however
# it ends), so the next session removes the folder of a session that was killed (which never reached its end) and
# never a live session's, even one in another process-id namespace sharing this temporary folder.
COMPILE_PREFIX = "mtsl-tests-compile-"
SESSION_LOCK = "session.lock"


def _remove_dead_sessions_caches() -> None:
    for entry in os.scandir(tempfile.gettempdir()):
        if not (entry.name.startswith(COMPILE_PREFIX) and entry.is_dir(follow_symlinks=False)):
            continue
        try:
            with open(os.path.join(entry.path, SESSION_LOCK), "rb") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:  # locked by a live session, another user's, or no lock file: not a dead session's folder
            pass


def _locked_session_folder() -> tuple[str, object]:
    """A new folder of this session and its lock file, open and locked (locked before it takes its name, so that
    no other session ever sees the folder's lock file free)."""
    folder = tempfile.mkdtemp(prefix=f"{COMPILE_PREFIX}{os.getpid()}-")
    lock = open(os.path.join(folder, SESSION_LOCK + ".new"), "wb")
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.rename(lock.name, os.path.join(folder, SESSION_LOCK))
    return folder, lock


COMPILE_CACHE = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _remove_dead_sessions_caches()
    COMPILE_CACHE, SESSION_LOCK_FILE = _locked_session_folder()  # kept open: the lock lasts as long as the process
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(COMPILE_CACHE, "inductor")
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(COMPILE_CACHE, "triton"))

import pytest  # noqa: E402
import torch._inductor.codecache as inductor_codecache  # noqa: E402

from mtsl_plugin.config import load_preset  # noqa: E402
from mtsl_plugin.learner.schedule import MTSLConfig  # noqa: E402

INDUCTOR_HEADERS = os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}", "precompiled_headers")
HEADERS_REDIRECTED = COMPILE_CACHE is not None and all(
    hasattr(inductor_codecache, g) for g in ("_HEADER_DIR", "_HEADER_LOCK_DIR"))
if HEADERS_REDIRECTED:
    inductor_codecache._HEADER_DIR = os.path.join(COMPILE_CACHE, "precompiled_headers")
    inductor_codecache._HEADER_LOCK_DIR = os.path.join(inductor_codecache._HEADER_DIR, "locks")
# inductor's default headers folder is this session's only if its headers still go there and it did not exist yet
INDUCTOR_HEADERS_MADE_HERE = not HEADERS_REDIRECTED and not os.path.exists(INDUCTOR_HEADERS)


def pytest_sessionfinish(session, exitstatus):
    for folder, ours in ((COMPILE_CACHE, COMPILE_CACHE is not None), (INDUCTOR_HEADERS, INDUCTOR_HEADERS_MADE_HERE)):
        if ours:
            shutil.rmtree(folder, ignore_errors=True)
    if COMPILE_CACHE is not None:  # its folder is gone: the lock is released (not left to the interpreter's exit)
        SESSION_LOCK_FILE.close()


def smoke_config(tasks=("S", "D", "E"), **mtsl_changes):
    """The smoke preset on ``tasks`` with MTSL options overridden."""
    config = load_preset("smoke").replace(tasks=tuple(tasks))
    return config.replace(mtsl=MTSLConfig.from_dict({**config.mtsl.to_dict(), **mtsl_changes}))


@pytest.fixture
def smoke():
    return smoke_config


@pytest.fixture
def nyuv2_root(tmp_path):
    """A tiny NYUv2 folder in the LibMTL/MTAN ``.npy`` layout (13 classes), big enough for the smoke preset."""
    return write_nyuv2(tmp_path / "nyuv2")


def write_nyuv2(root, n_train=40, n_val=8, size=(32, 32), seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    h, w = size
    for split, n in (("train", n_train), ("val", n_val)):
        for folder in ("image", "label", "depth", "normal"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            np.save(root / split / "image" / f"{i}.npy", rng.uniform(0, 1, (h, w, 3)).astype(np.float32))
            np.save(root / split / "label" / f"{i}.npy", rng.integers(-1, 13, (h, w)).astype(np.float32))
            np.save(root / split / "depth" / f"{i}.npy", rng.uniform(0.5, 8, (h, w, 1)).astype(np.float32))
            np.save(root / split / "normal" / f"{i}.npy", rng.normal(size=(h, w, 3)).astype(np.float32))
    return root


def hand_delta(run, reference, tasks=None):
    """Δ (%) of a run record against its STN record, computed here from the metrics: the mean over ``tasks``
    (default all) of ±(M − M_STN)/M_STN, + where higher is better."""
    tasks = tasks or list(run["metrics"])
    signs = {t: 1 if run["higher_is_better"][t] else -1 for t in tasks}
    return 100 * sum(signs[t] * (run["metrics"][t] - reference["metrics"][t]) / reference["metrics"][t]
                     for t in tasks) / len(tasks)


def differs(a, b):
    """Some floating-point tensor of two modules' states differs."""
    a, b = a.state_dict(), b.state_dict()
    return any(not a[k].equal(b[k]) for k in a if a[k].is_floating_point())


def fake_record(config, method, s):
    """What ``run_method`` returns for a finished run of ``method`` under ``config`` with S's metric ``s`` and D's 1:
    the harness and the tables run on it without training."""
    return {"method": method, "seed": config.seed, "status": "ok", "error": None,
            "metrics": {"S": s, "D": 1.0}, "higher_is_better": {"S": True, "D": False},
            "metric_names": {"S": "mIoU", "D": "RMSE"}, "plan": None, "plan_text": None, "params_m": 1.0,
            "gmac": 0.1, "train_seconds": 1.0, "wall_seconds": 1.0, "history": [], "fingerprint": "x",
            "config_fingerprint": config.fingerprint(), "reference_key": config.fingerprint(exclude=("device", "mtsl"))}


def table_rows(table):
    """Every row of a Markdown table, in order, as its cells by column header."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def table_row(table, label):
    """The cells of the first row ``label`` (first column) of a Markdown table, by column header."""
    for row in table_rows(table):
        if next(iter(row.values())) == label:
            return row
    raise KeyError(f"no row {label!r} in the table")


def write_folder_data(root, n_train=40, n_val=8, size=(32, 32), seed=0):
    """A tiny data set in the folder layout of ``mtsl_plugin.data.folder`` with three targets of one bright
    rectangle per image: ``parts/`` (PNG labels: 0 background, 1 and 2 the rectangle's left and right halves, 255
    on the top row = ignore), ``flow/`` (.npy (H, W, 2): each pixel's offset from the rectangle's centre in
    image widths, NaN outside the rectangle) and ``heat/`` (.npy (H, W): a blob at the centre, in [0, 1])."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for split, n in (("train", n_train), ("val", n_val)):
        for folder in ("image", "parts", "flow", "heat"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
            bottom, right = top + rng.integers(4, h // 2), left + rng.integers(4, w // 2)
            inside = (yy >= top) & (yy < bottom) & (xx >= left) & (xx < right)
            cy, cx = (top + bottom) / 2, (left + right) / 2
            image = rng.uniform(0, 60, (h, w, 3))
            image[inside] += 150
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / split / "image" / f"s{i:03d}.png")
            parts = np.where(inside, np.where(xx < cx, 1, 2), 0).astype(np.uint8)
            parts[0] = 255
            Image.fromarray(parts).save(root / split / "parts" / f"s{i:03d}.png")
            flow = np.stack([(xx - cx) / w, (yy - cy) / w], axis=-1)
            np.save(root / split / "flow" / f"s{i:03d}.npy", np.where(inside[..., None], flow, np.nan))
            heat = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 8.0)
            np.save(root / split / "heat" / f"s{i:03d}.npy", heat.astype(np.float32))
    return root


#: The two declared tasks of :func:`write_folder_data` (neither is one of S D E N A).
FOLDER_TASKS = {"parts": {"kind": "segmentation", "classes": 3},
                "flow": {"kind": "regression", "channels": 2, "loss": "l1", "metric": "rmse"}}


@pytest.fixture(params=[0o022, 0o027, 0o077], ids=["umask022", "umask027", "umask077"])
def umask(request):
    """The process's umask set to each of three values for the test (restored after it): the mode a new file
    should get is ``0o666 & ~umask``."""
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


@pytest.fixture
def fresh_manager():
    """Give the test its own plugin manager and leave none of its plugins behind (the plugin tests use it for
    every test: ``pytestmark``)."""
    from mtsl_plugin.plugins import reset_plugin_manager

    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def forget_modules():
    """Collect module names to drop from sys.modules after the test, so no test sees another's plugins."""
    names: list[str] = []
    yield names
    for name in names:
        sys.modules.pop(name, None)


#: a process holding the folder argv[1] (mtsl_plugin.folder_lock) until its stdin ends
HOLD = """
import sys
from mtsl_plugin import folder_lock
with folder_lock.holding(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def other_process(folder):
    """A second process holding ``folder`` until the block ends (its stdin closed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
