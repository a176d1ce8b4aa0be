"""Every run says which software trained it on which machine (``trained_by``), and a table whose runs disagree
says so under it: a folder extended after an upgrade or on another machine mixes runs a Δ or a time cannot
compare."""
import importlib.metadata
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import mtsl_plugin
from benchmarks.harness import write_results
from benchmarks.report import provenance_note
from conftest import fake_record, write_folder_data
from mtsl_plugin.experiment import run_method
from mtsl_plugin.provenance import data_files, describe, software, source_commit
from mtsl_plugin.trainer import MTLTrainer

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
PROJECT = Path(mtsl_plugin.__file__).resolve().parent.parent


def git(folder, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=folder, check=True,
                          capture_output=True, text=True).stdout.strip()


@needs_git
def test_the_commit_is_that_of_a_checkout_of_the_project_and_says_when_its_files_were_changed(tmp_path):
    project = tmp_path / "project"
    (project / "mtsl_plugin").mkdir(parents=True)
    (project / "setup.py").write_text("")
    (project / "mtsl_plugin" / "__init__.py").write_text("")
    assert source_commit(project / "mtsl_plugin") is None  # not a repository
    git(project, "init", "-q")
    git(project, "add", ".")
    git(project, "commit", "-q", "-m", "first")
    head = git(project, "rev-parse", "HEAD")
    assert source_commit(project / "mtsl_plugin") == head[:12]
    (project / "notes.txt").write_text("untracked")
    assert source_commit(project / "mtsl_plugin") == head[:12]  # untracked files change no code
    (project / "mtsl_plugin" / "__init__.py").write_text("x = 1\n")
    assert source_commit(project / "mtsl_plugin") == head[:12] + "+dirty"


@needs_git
def test_a_package_folder_inside_another_repository_has_no_commit(tmp_path):
    """e.g. a virtual environment inside a user's own repository: its commit is not the package's."""
    repository = tmp_path / "mine"
    package = repository / "venv" / "site-packages" / "mtsl_plugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (repository / "setup.py").write_text("")
    git(repository, "init", "-q")
    git(repository, "add", ".")
    git(repository, "commit", "-q", "-m", "first")
    assert source_commit(package) is None


@needs_git
def test_this_process_records_the_commit_of_the_sources_it_imported():
    inside = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=PROJECT, capture_output=True, text=True)
    expected = None
    if inside.returncode == 0 and Path(inside.stdout.strip()).resolve() == PROJECT:
        expected = git(PROJECT, "rev-parse", "HEAD")[:12]
    commit = software()["commit"]
    assert (commit is None) if expected is None else commit.removesuffix("+dirty") == expected


def test_the_data_files_change_with_a_file_edited_added_or_removed_and_not_with_results_beside_them(tmp_path):
    import os

    root = write_folder_data(tmp_path / "data", n_train=4, n_val=2)
    before = data_files(root)
    assert before.startswith("24 files, ") and data_files(root) == before  # 6 samples: an image and 3 targets each
    (root / "results" / "run").mkdir(parents=True)  # a results folder inside the data root is no data
    (root / "results" / "run" / "table.md").write_text("| a |")
    assert data_files(root) == before
    heat = root / "train" / "heat" / "s000.npy"
    stat = heat.stat()
    os.utime(heat, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # edited in place: same size, later time
    edited = data_files(root)
    assert edited != before
    extra = root / "val" / "heat" / "s009.npy"
    extra.write_bytes(heat.read_bytes())
    assert data_files(root) not in (before, edited)
    extra.unlink()
    assert data_files(root) == edited
    assert data_files(None) is None
    (root / "train" / "heat" / "loop").symlink_to(root / "train")  # a link back up the tree ends
    assert data_files(root).startswith("24 files, ")


def test_a_run_records_who_trained_it(smoke, tmp_path):
    config = smoke(tasks=("S", "D"))
    result = run_method(config, "onenet", tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["trained_by"]
    assert result["trained_by"] == saved and len(saved) == 1
    entry = saved[0]
    assert entry["mtsl_plugin"] == mtsl_plugin.__version__
    assert entry["torch"] == importlib.metadata.version("torch")
    assert entry["libmtl"] == importlib.metadata.version("LibMTL")
    assert entry["device"].startswith("cpu") and entry["threads"] == torch.get_num_threads()
    assert entry["processes"] == 1 and entry["data_files"] is None  # synthetic scenes: no files
    assert entry["execution"] == {}  # no execution option set
    fused = run_method(config.replace(fused=True, channels_last=True), "onenet", tmp_path / "fused", progress=False)
    assert fused["trained_by"][0]["execution"] == {"fused": True, "channels_last": True}
    assert describe(fused["trained_by"][0]).endswith("threads; fused, channels_last")
    assert json.loads((tmp_path / "run" / "result.json").read_text())["trained_by"] == saved


def stopped(*args, **kwargs):
    raise KeyboardInterrupt


def test_a_resumed_run_adds_an_entry_and_one_from_before_the_record_says_so(smoke, tmp_path):
    config = smoke(tasks=("S", "D"))
    run = tmp_path / "run"
    first = run_method(config, "onenet", run, progress=False, keep_checkpoint=True)["trained_by"]
    (run / "result.json").unlink()  # as if it had stopped after its last checkpoint
    again = run_method(config, "onenet", run, resume=True, progress=False, keep_checkpoint=True)["trained_by"]
    assert again[0] == first[0] and len(again) == 2 and describe(again[1]) == describe(first[0])
    with pytest.MonkeyPatch.context() as patch:  # a process stopped before its first checkpoint added nothing
        patch.setattr(MTLTrainer, "fit", stopped)
        (run / "result.json").unlink()
        with pytest.raises(KeyboardInterrupt):
            run_method(config, "onenet", run, resume=True, progress=False, keep_checkpoint=True)
    # the checkpoint holds the first process's training only (the second resumed it finished and wrote none), so
    # the stopped process recorded [first, itself] and the next one records [first, itself], not four entries
    assert len(json.loads((run / "config.json").read_text())["trained_by"]) == 2
    again = run_method(config, "onenet", run, resume=True, progress=False, keep_checkpoint=True)["trained_by"]
    assert len(again) == 2 and again[0] == first[0]
    meta = json.loads((run / "config.json").read_text())
    del meta["trained_by"]  # a run from before runs recorded who trained them
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    del checkpoint["trained_by"]  # ... and whose checkpoint did not hold them
    torch.save(checkpoint, run / "checkpoint.pt")
    (run / "config.json").write_text(json.dumps(meta))
    (run / "result.json").unlink()
    assert run_method(config, "onenet", run, resume=True, progress=False)["trained_by"][0] is None


def entry(**changes):
    return {"mtsl_plugin": "0.1.0", "commit": "abc", "python": "3.11.7", "torch": "2.14.1", "timm": "1.0",
            "libmtl": "1.1.5", "numpy": "2.0", "device": "cpu: X", "threads": 2, "processes": 1,
            "data_files": "8 files, 1.0 MiB, 9f8e", "started": "2026-12-06T10:00:00Z", **changes}


def records(smoke, trained_by):
    """Finished fake runs labelled by method, ``trained_by[method]`` their entries (absent: none recorded)."""
    out = []
    for method, s in (("stn", 0.5), ("mtsl", 0.4), ("ltb", 0.45)):
        record = {**fake_record(smoke(tasks=("S", "D")), method, s), "label": method}
        if method in trained_by:
            record["trained_by"] = trained_by[method]
        out.append(record)
    return out


def test_a_table_of_runs_trained_alike_has_no_note(smoke, tmp_path):
    same = {m: [entry(started=f"2026-12-0{i}T00:00:00Z")] for i, m in enumerate(("stn", "mtsl", "ltb"), 1)}
    assert provenance_note(records(smoke, same)) is None  # the dates differ, the software and machine do not
    assert "Note" not in write_results(records(smoke, same), tmp_path)
    assert provenance_note(records(smoke, {})) is None


@pytest.mark.parametrize("change", [{"commit": "def"}, {"torch": "2.13.0"}, {"device": "cuda: H100"},
                                    {"threads": 16}, {"processes": 4}, {"data_files": "9 files, 1.0 MiB, 0a1b"},
                                    {"execution": {"compile": True, "workers": 4}}])
def test_a_table_of_runs_trained_by_other_software_or_machines_says_which(smoke, tmp_path, change):
    trained_by = {"stn": [entry()], "mtsl": [entry(), entry(**change)], "ltb": [entry(**change)]}
    table = write_results(records(smoke, trained_by), tmp_path)
    assert (tmp_path / "table.md").read_text() == table
    note = table.rstrip().splitlines()[-1]
    assert note.startswith("Note: these runs were not all trained by the same software on the same machine")
    assert f"stn seed 0, mtsl seed 0: {describe(entry())}" in note
    assert f"mtsl seed 0, ltb seed 0: {describe(entry(**change))}" in note


def test_the_note_names_each_row_once_with_its_seeds(smoke):
    old, new = entry(commit="old"), entry(commit="new")
    runs = [{**record, "seed": seed, "trained_by": [old if record["method"] == "stn" or seed == 2 else new]}
            for seed in (0, 1, 2) for record in records(smoke, {})]
    note = provenance_note(runs)
    assert f"stn seeds 0, 1, 2, mtsl seed 2, ltb seed 2: {describe(old)}" in note
    assert f"mtsl seeds 0, 1, ltb seeds 0, 1: {describe(new)}" in note


def test_runs_from_before_the_record_are_named_as_such(smoke):
    note = provenance_note(records(smoke, {"ltb": [entry()]}))
    assert "stn seed 0, mtsl seed 0: unrecorded (trained before runs recorded their software)" in note
    assert f"ltb seed 0: {describe(entry())}" in note


def test_the_device_is_recorded_by_kind_and_model_not_by_index(monkeypatch):
    """``--device cuda``, ``cuda:0`` or ``cuda:3`` on a machine of one GPU model train alike: a folder extended on
    another GPU of the same box gets no note (the index named the GPU, not what it is)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    from mtsl_plugin.provenance import device_name

    assert {device_name(d) for d in ("cuda", "cuda:0", "cuda:3")} == {"cuda: NVIDIA H100 80GB HBM3"}


def test_a_cpu_is_recorded_with_the_kernels_torch_runs_on_it(monkeypatch):
    """The same run on one CPU gives other digits with AVX2 kernels than with AVX512 ones (ATEN_CPU_CAPABILITY),
    so runs of the two differ in their record, and a table of both gets a note."""
    from mtsl_plugin.provenance import device_name

    names = set()
    for capability in ("AVX2", "AVX512"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda capability=capability: capability)
        names.add(device_name("cpu"))
        assert device_name("cpu").endswith(f", {capability} kernels")
    assert len(names) == 2


def test_a_dangling_link_in_the_data_is_no_data_and_fails_no_run(tmp_path):
    """A symbolic link whose target is gone (a data set linked in from a moved folder) is skipped, not read: the
    record of the data files never stops a run."""
    root = write_folder_data(tmp_path / "data", n_train=4, n_val=2)
    before = data_files(root)
    (root / "train" / "heat" / "gone.npy").symlink_to(tmp_path / "moved" / "gone.npy")
    assert data_files(root) == before


def test_a_commands_own_table_carries_the_note_too(smoke, tmp_path, capsys):
    """The commands that publish a table of their own (robustness, alignment) write and print it with the note under
    it when its runs disagree, as the comparison table has it."""
    from benchmarks.harness import publish

    results = records(smoke, {"stn": [entry()], "mtsl": [entry(commit="def")]})
    publish(results, tmp_path, "| own table |\n", "own.md")
    written = (tmp_path / "own.md").read_text()
    assert written == f"| own table |\n\n{provenance_note(results)}\n"
    assert written in capsys.readouterr().out


def test_the_note_names_finished_runs_only_each_seed_once_under_its_rows_label(smoke):
    """A failed run (no ``trained_by``) is no run of other software; a resumed run trained twice alike is one seed;
    a row is named by its label (``mtsl_t0.5`` of a sensitivity sweep), not by its method."""
    runs = records(smoke, {"stn": [entry()], "mtsl": [entry(), entry()], "ltb": [entry(commit="def")]})
    runs[1]["label"] = "mtsl_t0.5"
    failed = {"method": "onenet", "label": "onenet", "seed": 0, "status": "failed", "error": "out of memory"}
    assert provenance_note([*runs[:2], failed]) is None
    assert provenance_note([*runs, failed]).endswith(
        f"(each run's result.json: trained_by): stn seed 0, mtsl_t0.5 seed 0: {describe(entry())}; ltb seed 0: "
        f"{describe(entry(commit='def'))}")


def test_the_data_files_of_folder_data_include_its_test_folder(tmp_path):
    """Folder data reads its test split from ``test/`` where there is one: a file edited there changes the record."""
    import os

    root = write_folder_data(tmp_path / "data", n_train=4, n_val=2)
    shutil.copytree(root / "val", root / "test")
    before = data_files(root)
    image = next((root / "test" / "image").iterdir())
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert data_files(root) != before
