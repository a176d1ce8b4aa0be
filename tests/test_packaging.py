"""What a user who installs the package (wheel) or unpacks its source archive (sdist) gets, instead of a clone.

The wheel and the sdist are built offline from a copy of the source tree (setuptools' PEP 517 hooks, as
``pip wheel --no-deps --no-build-isolation`` and ``python -m build --sdist`` call them), so the repository itself
gets no ``build/`` or ``*.egg-info``; without setuptools the tests are skipped.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from configparser import ConfigParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mtsl_plugin", "baselines", "benchmarks")
#: Top-level folders of a working clone that are no part of its source.
NOT_SOURCE = {".git", ".venv", ".tox", ".pytest_cache", ".whl", "build", "dist", "results"}

_BUILD = ("import sys\nfrom setuptools.build_meta import __legacy__ as backend\n"
          "print(getattr(backend, sys.argv[1])(sys.argv[2]))")


def _ignore(directory: str, names: list[str]) -> set[str]:
    top = Path(directory) == ROOT
    return {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".egg-info")) or (top and n in NOT_SOURCE)}


def _build(hook: str, source: Path, out: Path) -> Path:
    """Run setuptools' ``hook`` (build_wheel or build_sdist) in ``source``; the file it writes into ``out``."""
    pytest.importorskip("setuptools.build_meta", reason="setuptools is needed to build the package offline")
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-c", _BUILD, hook, str(out)], cwd=source, capture_output=True, text=True)
    assert done.returncode == 0, f"{hook} failed in {source}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return out / done.stdout.strip().splitlines()[-1]


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The source copy's files, and the wheel, sdist and wheel-from-the-sdist built from it (removed afterwards:
    about 7 MB of copies and build folders)."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=_ignore)
    source_files = _files(source)
    wheel = _build("build_wheel", source, tmp / "wheel")
    sdist = _build("build_sdist", source, tmp / "sdist")
    with tarfile.open(sdist) as archive:
        if hasattr(tarfile, "data_filter"):
            archive.extractall(tmp / "unpacked", filter="data")
        else:  # pragma: no cover - Python without extraction filters
            archive.extractall(tmp / "unpacked")
    (unpacked,) = (tmp / "unpacked").iterdir()
    wheel_from_sdist = _build("build_wheel", unpacked, tmp / "wheel-from-sdist")
    yield {"source": source_files, "wheel": wheel, "sdist": _files(unpacked), "wheel_from_sdist": wheel_from_sdist}
    shutil.rmtree(tmp, ignore_errors=True)


def _read_wheel(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _console_scripts(wheel: dict[str, bytes]) -> dict[str, str]:
    (name,) = [n for n in wheel if n.endswith(".dist-info/entry_points.txt")]
    parser = ConfigParser()
    parser.read_string(wheel[name].decode())
    return dict(parser["console_scripts"]) if parser.has_section("console_scripts") else {}


def test_wheel_holds_every_module_and_the_presets(builds):
    """``pip install`` gives every module of the three packages and the preset files ``load_preset`` reads."""
    wheel = _read_wheel(builds["wheel"])
    wanted = {f for f in builds["source"] if f.split("/")[0] in PACKAGES and f.endswith(".py")}
    wanted |= {f for f in builds["source"] if f.startswith("mtsl_plugin/presets/") and f.endswith(".yaml")}
    assert {"mtsl_plugin/presets/smoke.yaml", "mtsl_plugin/presets/quick.yaml"} <= wanted
    assert sorted(wanted - set(wheel)) == []
    assert not [n for n in wheel if n.startswith("tests/")], "the test suite must not install as a package"


def test_every_benchmark_command_has_an_installed_command(builds):
    """Each ``python benchmarks/<name>.py`` of the README and docs/*.md (and every runnable benchmarks/ file) has a
    console script calling its ``main``, since an installed package has no ``benchmarks/`` folder to run."""
    wheel = _read_wheel(builds["wheel"])
    targets = set(_console_scripts(wheel).values())
    pages = "".join(page.read_text(encoding="utf-8") for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    shown = set(re.findall(r"python benchmarks/(\w+)\.py", pages))
    runnable = {Path(f).stem for f in builds["source"] if re.fullmatch(r"benchmarks/\w+\.py", f)
                and 'if __name__ == "__main__"' in (ROOT / f).read_text(encoding="utf-8")}
    assert {"compare", "export"} <= shown
    assert sorted(n for n in shown | runnable if f"benchmarks.{n}:main" not in targets) == []
    for target in targets:
        module, _, function = target.partition(":")
        source = wheel.get(module.replace(".", "/") + ".py", b"").decode()
        assert f"def {function}(" in source, f"console script target {target} is not in the wheel"


def test_sdist_ships_the_test_suite_and_what_the_readme_names(builds):
    """The source archive runs its own tests (conftest, fixture plugin, pytest.ini) and holds the README's
    figures and the GPU script."""
    sdist = builds["sdist"]
    wanted = {f for f in builds["source"] if f.startswith(("tests/", "docs/"))}
    wanted |= {"README.md", "setup.py", "pytest.ini", "tox.ini", "benchmarks/gpu_checks.sh",
               "tests/conftest.py", "tests/plugins/fixture_plugin/pyproject.toml"}
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    wanted |= set(re.findall(r"\]\((docs/[^)\s#]+)", readme))
    assert sorted(wanted - sdist) == []
    assert not [f for f in sdist if "__pycache__" in f or f.endswith(".pyc")]


def test_sdist_builds_the_same_wheel(builds):
    """``pip install`` from the sdist installs exactly what the wheel built from the tree installs."""
    assert _read_wheel(builds["wheel_from_sdist"]) == _read_wheel(builds["wheel"])
