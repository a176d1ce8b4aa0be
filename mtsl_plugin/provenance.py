"""Where a run's numbers come from: the software that trained it, the machine it ran on, the data files it read.

Every run records, in its ``config.json`` and ``result.json`` (``trained_by``), one entry per process that trained
it (a resumed run: the processes whose training its checkpoint holds, then itself), so that a results folder
extended after an upgrade, or on another machine, can say which of its runs were trained by what: a comparison
whose STN was trained by other code than its MTSL compares more than the methods (:func:`describe` gives the line
a table prints).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from mtsl_plugin.config import RunConfig
from mtsl_plugin.data.folder import SPLIT_FOLDER_CHOICES
from mtsl_plugin.data.real import SPLIT_FOLDERS

#: The packages whose versions change a run's numbers (besides Python and mtsl-plugin itself).
PACKAGES = ("torch", "timm", "LibMTL", "numpy")


def _git(source: Path, *args: str) -> str | None:
    """``git <args>`` run in ``source``, its output stripped; ``None`` when git is missing or fails."""
    if shutil.which("git") is None:
        return None
    try:
        done = subprocess.run(["git", *args], cwd=source, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_commit(package: Path = Path(__file__).resolve().parent) -> str | None:
    """The git commit (12 digits) of mtsl-plugin's sources in ``package`` (default: those this process imported)
    when they lie in a git checkout of the project, ``+dirty`` when tracked files differ from it; else ``None`` (an
    installed package, or a package folder inside some other repository)."""
    package = Path(package).resolve()
    top = _git(package, "rev-parse", "--show-toplevel")
    if top is None or not (Path(top) / "setup.py").is_file() or Path(top).resolve() != package.parent:
        return None
    commit = _git(package, "rev-parse", "HEAD")
    if commit is None:
        return None
    changed = _git(package, "status", "--porcelain", "--untracked-files=no")
    return commit[:12] + ("+dirty" if changed else "")


@functools.lru_cache(maxsize=1)
def software() -> dict[str, Any]:
    """mtsl-plugin's version and commit (:func:`source_commit`), Python's and :data:`PACKAGES`' versions: read
    once per process, at its first run, since the code a process runs is the code it imported."""
    from mtsl_plugin import __version__

    versions = {}
    for name in PACKAGES:
        try:
            versions[name.lower()] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name.lower()] = None
    return {"mtsl_plugin": __version__, "commit": source_commit(), "python": platform.python_version(), **versions}


def device_name(device: str) -> str:
    """``device``'s kind with its model: ``cuda: NVIDIA H100 80GB HBM3``, ``cpu: AMD EPYC, AVX512 kernels`` (the
    model from ``/proc/cpuinfo`` where there is one, and the instruction set torch's CPU kernels use: the same run
    gives other digits with AVX2 kernels than with AVX512 ones); not the GPU's index (``cuda:3``), which says which
    GPU of the machine, not what it is."""
    device = str(device)
    kind = device.split(":", 1)[0]
    if kind == "cuda" and torch.cuda.is_available():
        return f"{kind}: {torch.cuda.get_device_name(torch.device(device))}"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text(errors="replace").splitlines()
                 if line.startswith("model name") and ":" in line]
        model = names[0] if names else model
    kernels = f"{torch.backends.cpu.get_cpu_capability()} kernels" if kind == "cpu" else ""
    return f"{kind}: {', '.join(part for part in (model, kernels) if part)}" if model or kernels else kind


def data_files(root: str | Path | None) -> str | None:
    """The state of the data files under ``root``'s split folders (``train/``, ``val/``, ``test/``: what every real
    layout reads, so a results folder elsewhere under ``root`` is no data), symbolic links followed: ``"<n> files,
    <size>, <hash>"``, the hash over each file's path, size and modification time; ``None`` without a root
    (synthetic scenes, which the configuration and the code determine). Reading names and sizes only, it takes
    milliseconds; a file edited in place, added or removed changes it (so does a copy that does not keep
    modification times)."""
    if root is None:
        return None
    root = Path(root)
    digest, count, size = hashlib.sha256(), 0, 0
    splits = sorted({*SPLIT_FOLDERS.values(), *(name for names in SPLIT_FOLDER_CHOICES.values() for name in names)})
    seen = set()  # the folders walked, as (device, inode): a link back up the tree is walked once
    for folder, subfolders, names in (step for split in splits for step in os.walk(root / split, followlinks=True)):
        here = os.stat(folder)
        if (here.st_dev, here.st_ino) in seen:
            subfolders.clear()
            continue
        seen.add((here.st_dev, here.st_ino))
        subfolders.sort()
        for name in sorted(names):
            path = Path(folder) / name
            try:
                stat = path.stat()
            except OSError:  # a dangling link: no data
                continue
            digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            count, size = count + 1, size + stat.st_size
    return f"{count} files, {size / 2**20:.1f} MiB, {digest.hexdigest()[:12]}"


def provenance(config: RunConfig, processes: int = 1) -> dict[str, Any]:
    """This process's entry of a run's ``trained_by`` under ``config``: :func:`software`, the machine (the device's
    kind and model, torch's CPU threads, the number of processes training together), the execution options set
    (:attr:`~mtsl_plugin.config.RunConfig.execution`: not in a run's fingerprint, but they change its times and
    float rounding), the data files (:func:`data_files` of the data root) and when it started (UTC)."""
    return {**software(), "device": device_name(config.device), "threads": torch.get_num_threads(),
            "processes": processes, "execution": {k: v for k, v in config.execution.items() if v},
            "data_files": data_files(config.data.root), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def describe(entry: Mapping[str, Any] | None) -> str:
    """``entry`` in a few words, without its date: what has to be equal for two runs' numbers and timings to
    compare (``"unrecorded"`` for a run trained before runs recorded it)."""
    if not entry:
        return "unrecorded (trained before runs recorded their software)"
    commit = f" at {entry['commit']}" if entry.get("commit") else ""
    packages = ", ".join(f"{name} {entry.get(name.lower())}" for name in PACKAGES)
    processes = f" x{entry['processes']} processes" if entry.get("processes", 1) > 1 else ""
    options = ", ".join(k if v is True else f"{k} {v}" for k, v in (entry.get("execution") or {}).items())
    execution = f"; {options}" if options else ""
    data = f"; data files: {entry['data_files']}" if entry.get("data_files") else ""
    return (f"mtsl-plugin {entry.get('mtsl_plugin')}{commit}, Python {entry.get('python')}, {packages}; "
            f"{entry.get('device')}, {entry.get('threads')} threads{processes}{execution}{data}")
