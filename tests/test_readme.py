"""The README's examples as a user copies them: each Python and YAML block runs, in a fresh folder, and does what
the text around it says. A change that breaks an example breaks a test here, not a user's first hour."""
import argparse
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import write_folder_data, write_nyuv2

from benchmarks import cli, compare, export as export_cli
from mtsl_plugin.plugins import load_plugin, similarity

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```\w*\n(.*?)^```", README, re.S | re.M)


def block(start: str) -> str:
    """The one fenced block of the README whose text starts with ``start``."""
    found = [body for body in BLOCKS if body.startswith(start)]
    assert len(found) == 1, f"{len(found)} README blocks start with {start!r}"
    return found[0]


def commands(start: str, prefix: str) -> list[list[str]]:
    """The arguments of each line of the block starting with ``start`` that runs ``prefix`` (comments dropped)."""
    return [shlex.split(line, comments=True)[len(prefix.split()):] for line in block(start).splitlines()
            if line.startswith(prefix)]


def test_the_python_entry_point_and_the_export_commands_run_as_shown(tmp_path, monkeypatch, capsys):
    """``run_method`` on the smoke preset writes the run where the example says; the export section's ONNX
    command reads that folder and writes the file it names."""
    monkeypatch.chdir(tmp_path)
    exec(block("import mtsl_plugin, LibMTL"), {})
    run = tmp_path / "results/demo/mtsl/seed0"
    assert {"config.json", "model.pt", "plan.json", "result.json"} <= {p.name for p in run.iterdir()}
    assert json.loads((run / "result.json").read_text())["plan_text"] in capsys.readouterr().out  # what it prints
    (onnx,) = [args for args in commands('pip install -e ".[export]"', "python benchmarks/export.py")
               if args[0] == "results/demo/mtsl/seed0"]
    assert export_cli.main(onnx) == 0
    assert (tmp_path / onnx[onnx.index("--out") + 1]).stat().st_size > 0


def test_the_libmtl_script_runs_as_shown(tmp_path, monkeypatch, capsys):
    """The LibMTL-shaped script on a tiny NYUv2 folder at ``data/nyuv2``, with 10 epochs for its 80 (the fewest the
    paper's ten phases take): it trains, saves where it says and prints the plan."""
    monkeypatch.chdir(tmp_path)
    write_nyuv2(tmp_path / "data/nyuv2", n_train=16, n_val=8)
    script = block("import timm, torch.nn as nn")
    assert script.count("epochs=80") == 1
    exec(script.replace("epochs=80", "epochs=10"), {})
    assert (tmp_path / "results/nyu-mtsl/model.pt").is_file()
    assert re.search(r"^0-\d: ", capsys.readouterr().out, re.M)  # the plan's description, location 0 first


def test_the_plugin_recipes_register_and_work(tmp_path, monkeypatch, fresh_manager, forget_modules):
    """``my_metric.py`` gives a similarity of 1 between a feature matrix and itself; ``blob_kind.py`` declares a
    task kind that a whole comparison on folder data trains and reports (``--plugin blob_kind``, ``heat: {kind:
    blob}``, the ``heat`` maps of the tests' folder data)."""
    monkeypatch.chdir(tmp_path)
    for name in ("my_metric", "blob_kind"):
        (tmp_path / f"{name}.py").write_text(block(f"# {name}.py"), encoding="utf-8")
        forget_modules.append(name)
    load_plugin("my_metric")
    features = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    assert float(similarity("gram_cosine")(features, features)) == pytest.approx(1.0)
    write_folder_data(tmp_path / "my_data", n_train=24)
    (tmp_path / "heat.yaml").write_text("dataset: {name: folder, root: my_data, height: 32, width: 32, holdout: 8}\n"
                                        "tasks: {parts: {kind: segmentation, classes: 3}, heat: {kind: blob}}\n")
    out = tmp_path / "out"
    assert compare.main(["--preset", "smoke", "--config", "heat.yaml", "--plugin", "blob_kind", "--methods", "mtsl",
                         "--no-progress", "--out", str(out)]) == 0
    assert "| heat MAE ↓ |" in (out / "table.md").read_text(encoding="utf-8")


def test_the_yaml_examples_configure_what_their_text_says(tmp_path):
    """``run.yaml``: 40 epochs, steps at 30 and 35, 128×256 images, six phases; ``mine.yaml``: folder data of three
    declared tasks, ``mask`` read from ``masks/``, whole splits (the text beside it says so)."""
    parser = argparse.ArgumentParser()
    cli.add_run_args(parser)
    for name in ("run.yaml", "mine.yaml"):
        (tmp_path / name).write_text(block(f"# {name}:"), encoding="utf-8")
    run = cli.config_from_args(parser.parse_args(["--config", str(tmp_path / "run.yaml")]))
    assert (run.epochs, run.lr_steps, run.data.height, run.data.width) == (40, (30, 35), 128, 256)
    assert (run.mtsl.num_phases, run.mtsl.threshold) == (6, 0.8)
    mine = cli.config_from_args(parser.parse_args(["--config", str(tmp_path / "mine.yaml")]))
    assert (mine.data.name, mine.tasks) == ("folder", ("parts", "flow", "mask"))
    assert (mine.data.train, mine.data.test) == (None, None)  # the whole splits, not the quick preset's counts
    assert mine.task_specs["mask"] == {"kind": "binary", "loss": "balanced_bce", "metric": "iou", "folder": "masks"}


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of ``markdown``: lower case, punctuation but ``-`` and ``_`` dropped,
    spaces as ``-`` (fenced blocks skipped: their ``#`` lines are comments)."""
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
            for title in re.findall(r"^#+ (.+)$", prose, re.M)}


def test_every_link_between_the_readme_and_docs_resolves():
    """Each relative link of the README and of docs/*.md names a file that exists and, with ``#``, a heading of it:
    the README's summaries point at the measurements in docs/, so a moved file or a renamed heading breaks here."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    checked, broken = 0, []
    for page in pages:
        for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            checked += 1
            if not linked.is_file():
                broken.append(f"{page.name}: {target} (no file)")
            elif anchor and anchor not in heading_anchors(linked.read_text(encoding="utf-8")):
                broken.append(f"{page.name}: {target} (no heading)")
    assert checked >= 10 and broken == []
