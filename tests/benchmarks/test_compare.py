"""The harness from the command line: one smoke run end to end, resume, failures and bad input."""
import csv
import json
import shutil

import pytest
import torch

from benchmarks import ablation, compare
from conftest import fake_record, hand_delta, table_row
from mtsl_plugin import methods
from mtsl_plugin.checkpoint import load_checkpoint
from mtsl_plugin.learner.structural import StructuralLearner
from mtsl_plugin.plan import BranchingPlan

ARGS = ["--preset", "smoke", "--tasks", "S,D,E", "--no-progress"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "run"
    code = compare.main(["--methods", "mtsl", "--out", str(out), *ARGS])
    return code, out


def test_one_command_trains_references_and_mtsl_and_writes_everything(finished, capsys):
    code, out = finished
    assert code == 0
    for name in ("config.json", "results.json", "results.csv", "table.md", "architecture.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results] == ["stn", "onenet", "mtsl"]
    stn, onenet, mtsl = results
    assert stn["delta_mtl"] == 0 and stn["delta_sd"] == 0
    assert onenet["params_m"] < mtsl["params_m"] <= stn["params_m"]
    assert sorted(p.name for p in (out / "mtsl" / "seed0").glob("phase_*.json")) == ["phase_0.json",
                                                                                       "phase_1.json"]
    BranchingPlan.from_dict(json.loads((out / "mtsl" / "seed0" / "plan.json").read_text()))
    table = (out / "table.md").read_text()
    assert "| mtsl |" in table and "Δ_MTL" in table and "GMac" in table
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == ["stn", "onenet", "mtsl"]


def test_table_delta_equals_a_hand_computation_from_the_run_json(finished):
    _, out = finished
    stn = json.loads((out / "stn" / "seed0" / "result.json").read_text())
    table = (out / "table.md").read_text()
    reported = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    for method in ("onenet", "mtsl"):
        run = json.loads((out / method / "seed0" / "result.json").read_text())
        hand, hand_sd = hand_delta(run, stn), hand_delta(run, stn, ["S", "D"])
        assert reported[method]["delta_mtl"] == pytest.approx(hand)
        row = table_row(table, method)
        assert row["Δ_MTL (%)"] == f"{hand:+.2f}" and row["Δ_SD (%)"] == f"{hand_sd:+.2f}"
        assert row["S mIoU ↑"] == f"{run['metrics']['S']:#.4g}"  # 4 significant digits, trailing zeros kept


def test_resume_reuses_finished_runs(finished, capsys):
    code, out = finished
    assert compare.main(["--resume", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 3


def test_reuse_removes_a_checkpoint_a_stop_left_beside_a_finished_run(finished, tmp_path, capsys):
    """A stop between a run's result.json and its checkpoint's removal leaves checkpoint.pt: the next command that
    reuses the run removes it (unless it keeps checkpoints), but never one the run kept on purpose."""
    out = tmp_path / "copy"
    shutil.copytree(finished[1], out)
    left, kept = out / "stn" / "seed0", out / "onenet" / "seed0"
    record = json.loads((kept / "result.json").read_text())
    assert record["checkpoint_kept"] is False
    (kept / "result.json").write_text(json.dumps({**record, "checkpoint_kept": True}))  # --keep-checkpoints
    for run in (left, kept):
        (run / "checkpoint.pt").write_bytes(b"weights")
    assert compare.main(["--resume", str(out), "--no-progress", "--keep-checkpoints"]) == 0
    assert (left / "checkpoint.pt").exists() and (kept / "checkpoint.pt").exists()
    assert compare.main(["--resume", str(out), "--no-progress"]) == 0
    assert not (left / "checkpoint.pt").exists() and (kept / "checkpoint.pt").exists()
    assert capsys.readouterr().out.count("reusing the finished run") == 6


def test_a_table_that_cannot_be_written_says_the_runs_are_kept_and_how_to_go_on(tmp_path, monkeypatch, capsys):
    """The runs finished but table.md could not be written (a directory stands in for a read-only or full disk):
    the one error line names the file and the command that writes the tables from the kept runs."""
    out = tmp_path / "cmp"

    def run(config, method, run_dir, **kwargs):
        (out / "table.md").mkdir(exist_ok=True)
        return fake_record(config, method, 0.5)

    monkeypatch.setattr("benchmarks.harness.run_method", run)
    assert compare.main(["--methods", "mtsl", "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"could not write {out / 'table.md'}" in err, err
    assert err.endswith(f"finished runs and the last checkpoint are kept in {out}: "
                        f"python benchmarks/compare.py --resume {out} continues"), err
    assert list((out / "table.md").iterdir()) == [] and not list(out.glob("*.tmp"))


def test_existing_results_are_never_overwritten(finished, capsys):
    _, out = finished
    before = (out / "results.json").read_text()
    assert compare.main(["--methods", "mtsl", "--out", str(out), "--threshold", "0.5", *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "other settings" in err and len(err.splitlines()) == 1
    assert (out / "results.json").read_text() == before


def test_a_comparison_is_extended_reusing_its_runs(finished, tmp_path, capsys):
    """Asking a finished folder of the same settings for another method trains only that method."""
    out = tmp_path / "copy"  # a copy (finished runs need no checkpoint to be reused), so other tests keep theirs
    shutil.copytree(finished[1], out, ignore=shutil.ignore_patterns("checkpoint.pt"))
    capsys.readouterr()
    assert compare.main(["--methods", "onenet_l", "--out", str(out), *ARGS]) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing the finished run") == 3 and "[onenet_l seed 0] training" in printed
    assert [r["method"] for r in json.loads((out / "results.json").read_text())] == ["stn", "onenet", "mtsl",
                                                                                      "onenet_l"]
    assert json.loads((out / "config.json").read_text())["methods"] == ["stn", "onenet", "mtsl", "onenet_l"]


@pytest.mark.parametrize("argv, culprit", [
    (["--methods", "nope"], "nope"),
    (["--seeds", "a,b"], "--seeds"),
    (["--similarity", "cca"], "cca"),
    (["--plugin", "no_such_module_xyz"], "no_such_module_xyz"),
    (["--resume", "/nonexistent/dir"], "config.json"),
])
def test_bad_input_is_one_line_naming_the_culprit(tmp_path, capsys, argv, culprit):
    assert compare.main([*argv, "--out", str(tmp_path / "x"), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert culprit in err and len(err.splitlines()) == 1


def test_a_failing_method_is_reported_and_the_others_still_run(tmp_path, capsys, monkeypatch):
    def broken(config, num_locations):
        raise RuntimeError("this method is broken on purpose")

    monkeypatch.setitem(methods._METHODS, "broken_for_test", broken)

    out = tmp_path / "run"
    code = compare.main(["--methods", "broken_for_test", "--out", str(out), *ARGS])
    assert code == 1
    results = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    assert results["broken_for_test"]["status"] == "failed"
    assert results["stn"]["status"] == results["onenet"]["status"] == "ok"
    assert "broken on purpose" in (out / "table.md").read_text()
    assert (out / "broken_for_test" / "seed0" / "error.txt").exists()


def interrupt_in_second_phase(monkeypatch):
    """Ctrl-C at the start of MTSL's second structural phase (its checkpoint holds the first); returns the
    unpatched phase."""
    phase = StructuralLearner.structural_phase

    def interrupted_phase(self, *args, **kwargs):
        if self.phases_done == 1:
            raise KeyboardInterrupt
        return phase(self, *args, **kwargs)

    monkeypatch.setattr(StructuralLearner, "structural_phase", interrupted_phase)
    return phase


def test_resume_continues_an_interrupted_run_from_its_checkpoint(finished, tmp_path, capsys, monkeypatch):
    """A run interrupted in its second structural phase: --resume continues it from the checkpoint written after
    the first, and ends with the uninterrupted run's plan, metrics and losses, exactly."""
    out = tmp_path / "interrupted"
    shutil.copytree(finished[1], out, ignore=shutil.ignore_patterns("mtsl"))  # STN and One-Net are reused
    phase = interrupt_in_second_phase(monkeypatch)
    capsys.readouterr()
    assert compare.main(["--resume", str(out), "--no-progress"]) == 130  # Ctrl-C: one line on how to go on
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted; finished runs and the last checkpoint are kept in {out}: "
        f"python benchmarks/compare.py --resume {out} continues")
    run = out / "mtsl" / "seed0"
    assert (run / "checkpoint.pt").exists() and not (run / "result.json").exists()
    assert load_checkpoint(run / "checkpoint.pt")["epochs_done"] < json.loads(
        (finished[1] / "mtsl" / "seed0" / "result.json").read_text())["history"][-1]["epoch"]
    monkeypatch.setattr(StructuralLearner, "structural_phase", phase)
    capsys.readouterr()
    assert compare.main(["--resume", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 2  # stn and onenet
    before = json.loads((finished[1] / "mtsl" / "seed0" / "result.json").read_text())
    after = json.loads((run / "result.json").read_text())
    assert after["plan"] == before["plan"] and after["metrics"] == before["metrics"]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in after["history"]] == \
        [{k: v for k, v in h.items() if k != "seconds"} for h in before["history"]]
    assert not (run / "checkpoint.pt").exists() and (run / "model.pt").exists()


def test_retrained_longer_and_encoder_setting_variants(tmp_path):
    out = tmp_path / "variants"
    argv = ["--methods", "mtsl_r,onenet_l,mtsl_noalign", "--setting", "encoder", "--out", str(out),
            "--preset", "smoke", "--tasks", "S,D", "--no-progress"]
    # onenet_l belongs to the encoder-decoder setting only, but asking for it by name still runs it
    assert compare.main(argv) == 0
    results = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    assert list(results) == ["stn", "onenet", "mtsl", "mtsl_r", "onenet_l", "mtsl_noalign"]
    assert results["mtsl_r"]["plan"] == results["mtsl"]["plan"]
    assert BranchingPlan.from_dict(results["mtsl"]["plan"]).num_locations == 6
    smoke_epochs = 3
    onenet_l = json.loads((out / "onenet_l" / "seed0" / "result.json").read_text())
    assert len(onenet_l["history"]) == smoke_epochs + 2  # + the smoke preset's amalgamation epochs
    assert (out / "alignment.png").stat().st_size > 0
    assert "onenet_l" not in methods.method_names("encoder") and "onenet_l" in methods.method_names()


def test_plan_from_retrains_a_plan_learned_on_another_data_set(finished, tmp_path, nyuv2_root):
    """MTSL-R-Switch: the plan MTSL converged to on the synthetic data, retrained on (a tiny) NYUv2."""
    _, source = finished
    root = nyuv2_root
    out = tmp_path / "switch"
    argv = ["--methods", "mtsl_r", "--plan-from", str(source), "--dataset", "nyuv2", "--data-root", str(root),
            "--out", str(out), *ARGS]
    assert compare.main(argv) == 0
    runs = {r["label"]: r for r in json.loads((out / "results.json").read_text())}
    assert list(runs) == ["stn", "onenet", "mtsl_r-from-run"]  # no MTSL trained here
    source_plan = json.loads((source / "mtsl" / "seed0" / "result.json").read_text())["plan"]
    assert runs["mtsl_r-from-run"]["plan"] == source_plan
    assert runs["mtsl_r-from-run"]["delta_mtl"] == pytest.approx(hand_delta(runs["mtsl_r-from-run"], runs["stn"]))
    assert runs["stn"]["metrics"] != json.loads((source / "stn" / "seed0" / "result.json").read_text())["metrics"]
    config = json.loads((out / "mtsl_r-from-run" / "seed0" / "config.json").read_text())["config"]
    assert config["data"]["name"] == "nyuv2"
    assert "mtsl_r-from-run" in (out / "table.md").read_text()
    # a folder without the source's runs, and a method that retrains nothing, are refused in one line
    assert compare.main(["--methods", "mtsl_r", "--plan-from", str(root), "--out", str(tmp_path / "x"), *ARGS]) == 2
    assert compare.main(["--methods", "mtsl", "--plan-from", str(source), "--out", str(tmp_path / "y"), *ARGS]) == 2


def test_a_folder_holding_another_configuration_is_never_overwritten(finished, tmp_path, capsys):
    """Pointing a command at a folder whose run has other settings is refused in one line naming that run's
    folder, before any job trains or is reused, and keeps the files."""
    _, out = finished
    before = (out / "mtsl" / "seed0" / "result.json").read_text()
    capsys.readouterr()
    code = ablation.main(["--out", str(out), "--threshold", "0.5", *ARGS])
    assert code == 2
    printed = capsys.readouterr()
    err = printed.err.strip()
    assert "holds a run of another configuration" in err and str(out / "mtsl" / "seed0") in err
    assert len(err.splitlines()) == 1 and printed.out == ""  # nothing trained, nothing reused
    assert (out / "mtsl" / "seed0" / "result.json").read_text() == before
    assert not (out / "ablation").exists() and not (out / "mtsl_noalign_avg").exists()


def test_resume_refuses_run_options_it_would_ignore(finished, tmp_path, capsys):
    """--resume continues the saved comparison as it was: other methods, tasks, seeds or --out are refused by
    name (they were silently ignored); execution options are taken."""
    _, out = finished
    before = (out / "results.json").read_text()
    elsewhere = tmp_path / "elsewhere"
    argv = ["--resume", str(out), "--methods", "mtsl_noalign", "--tasks", "S,D,E,N", "--seeds", "1", "--preset",
            "quick", "--out", str(elsewhere), "--no-progress", "--device", "cpu", "--keep-checkpoints"]
    assert compare.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "it takes no --methods, --seeds, --tasks, --out (only" in err, err
    assert not elsewhere.exists() and (out / "results.json").read_text() == before


@pytest.mark.parametrize("option", ["--resume", "--out"])
def test_a_run_folder_is_not_a_comparison_folder(finished, capsys, option):
    _, out = finished
    run = out / "mtsl" / "seed0"
    before = sorted(p.name for p in run.iterdir())
    argv = [option, str(run), "--no-progress"] + (["--methods", "mtsl", *ARGS] if option == "--out" else [])
    assert compare.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {option} {run} is the folder of one run, not of a comparison; pass its comparison "
                   f"folder (the parent of its method folder), {out}"), err
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.parametrize("option", ["--resume", "--out"])
def test_a_damaged_config_json_is_named(tmp_path, capsys, option):
    out = tmp_path / "damaged"
    out.mkdir()
    (out / "config.json").write_text('{\n"methods": \n')
    argv = [option, str(out), "--no-progress"] + (["--methods", "mtsl", *ARGS] if option == "--out" else [])
    assert compare.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {out / 'config.json'} cannot be read as JSON (") and len(err.splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["config.json"]


def test_a_seed_saved_before_seeds_were_checked_is_dropped(finished, tmp_path, capsys):
    """A folder whose config.json lists seed -1 (possible before --seeds was range-checked; every run of it
    failed): extending it drops that seed with a note instead of re-running it on every extension."""
    out = tmp_path / "old"
    shutil.copytree(finished[1], out, ignore=shutil.ignore_patterns("checkpoint.pt"))
    meta = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**meta, "seeds": [-1, 0]}))
    capsys.readouterr()
    assert compare.main(["--methods", "mtsl", "--seeds", "0", "--out", str(out), *ARGS]) == 0
    printed = capsys.readouterr()
    assert printed.out.count("reusing the finished run") == 3 and "training" not in printed.out
    assert printed.err.strip().splitlines() == [
        f"note: {out / 'config.json'} lists seed(s) [-1] outside 0..4294967295, which no run can use (numpy "
        "refuses them before any training); they are dropped from the comparison"]
    assert json.loads((out / "config.json").read_text())["seeds"] == [0]
    assert {r["seed"] for r in json.loads((out / "results.json").read_text())} == {0}
    assert not list(out.glob("*/seed-1"))


def test_mtsl_rsa_decides_groupings_with_rsa(finished, tmp_path):
    out = tmp_path / "rsa"
    assert compare.main(["--methods", "mtsl_rsa", "--out", str(out), *ARGS]) == 0
    phase = json.loads((out / "mtsl_rsa" / "seed0" / "phase_0.json").read_text())
    cka_phase = json.loads((finished[1] / "mtsl" / "seed0" / "phase_0.json").read_text())
    run = json.loads((out / "mtsl_rsa" / "seed0" / "result.json").read_text())
    cka_run = json.loads((finished[1] / "mtsl" / "seed0" / "result.json").read_text())
    # alignment is still CKA, so training up to the first phase is MTSL's own, loss for loss...
    assert run["history"][0]["align"] > 0
    assert [h["S"] for h in run["history"][:1]] == [h["S"] for h in cka_run["history"][:1]]
    # ...but the first grouping is decided on other numbers: RSA's, on the same features
    rsa_matrix, cka_matrix = phase["similarities"][0]["matrix"], cka_phase["similarities"][0]["matrix"]
    assert len(rsa_matrix) == len(cka_matrix) == 3 and rsa_matrix != cka_matrix
    from mtsl_plugin.methods import build_method
    assert build_method("mtsl_rsa", compare.RunConfig(), 10).learner.config.similarity == "rsa"


def test_a_run_whose_loss_turns_nan_is_a_failed_row_naming_task_and_epoch(tmp_path, capsys, monkeypatch):
    from mtsl_plugin.trainer import MTLTrainer

    task_losses = MTLTrainer.task_losses
    monkeypatch.setattr(MTLTrainer, "task_losses",
                        lambda self, p, g: task_losses(self, p, g) * torch.tensor([1.0, float("inf")]))
    out = tmp_path / "nan"
    assert compare.main(["--methods", "stn", "--preset", "smoke", "--tasks", "S,D", "--no-progress",
                         "--out", str(out)]) == 1
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    assert rows["stn"]["status"] == "failed" and "task D loss is inf at epoch 1 (step 1" in rows["stn"]["error"]
    assert "[stn seed 0] failed: task D loss is inf" in capsys.readouterr().err


def test_mtsl_options_are_part_of_the_fingerprint_of_methods_with_a_learner_only(smoke):
    """A finished MTSL run is reused only by one of the same MTSL options (here the alignment weight); STN and
    One-Net runs, which have no structural learner, keep theirs and are shared by every MTSL variant."""
    from mtsl_plugin.experiment import method_spec, run_fingerprint

    config, heavier = smoke(), smoke(align_weight=0.7)

    def fingerprint(method, config):
        return run_fingerprint(method, config, method_spec(method, config))

    assert fingerprint("mtsl", heavier) != fingerprint("mtsl", config)
    assert fingerprint("stn", heavier) == fingerprint("stn", config)


def test_fused_execution_is_a_run_option_that_keeps_the_fingerprint(tmp_path, monkeypatch):
    """``--fused``: MTSL trains with every location's nodes fused (through its structural phases); the run's
    fingerprint is the unfused run's (fused execution changes float rounding only). The command trains STN
    (fused too) before MTSL, so a fused call counts as MTSL's only where it trains a partly merged plan, which
    neither STN nor One-Net has."""
    from mtsl_plugin.network.branched import BranchedNetwork

    calls = []
    run_fused = BranchedNetwork.run_fused

    def counting(self, *args, **kwargs):
        calls.append((len(args[1]), self.training, self.plan))
        return run_fused(self, *args, **kwargs)

    monkeypatch.setattr(BranchedNetwork, "run_fused", counting)
    fused, plain = tmp_path / "fused", tmp_path / "plain"
    args = ["--methods", "mtsl", "--preset", "smoke", "--tasks", "S,D", "--no-progress"]
    assert compare.main([*args, "--fused", "--out", str(fused)]) == 0
    assert calls and all(n >= 2 for n, _, _ in calls)
    references = (BranchingPlan.single_task(("S", "D"), 10), BranchingPlan.one_net(("S", "D"), 10))
    final = BranchingPlan.from_dict(json.loads((fused / "mtsl" / "seed0" / "result.json").read_text())["plan"])
    assert final not in references  # MTSL merged, and kept some siblings: a plan of its own
    assert any(training and plan not in references for _, training, plan in calls)  # MTSL's steps after a merge
    calls.clear()
    assert compare.main([*args, "--out", str(plain)]) == 0
    assert not calls
    run = json.loads((fused / "mtsl" / "seed0" / "result.json").read_text())
    assert run["fingerprint"] == json.loads((plain / "mtsl" / "seed0" / "result.json").read_text())["fingerprint"]
    assert json.loads((fused / "mtsl" / "seed0" / "config.json").read_text())["config"]["fused"] is True


def test_the_mtsl_variants_differ_from_mtsl_in_their_one_option_and_names_are_registered_once(smoke):
    """The registry's MTSL variants: ``mtsl_noalign`` only drops the alignment loss, ``mtsl_rsa`` only decides on
    RSA, ``mtsl_r`` retrains MTSL's plan; every variant starts from the single-task plan. A second builder under a
    registered name is refused (the first stays)."""
    config = smoke(tasks=("S", "D"))
    base = methods.build_method("mtsl", config, 4)
    assert base.plan == BranchingPlan.single_task(("S", "D"), 4) and base.learner.config.align
    for name, option, value in (("mtsl_noalign", "align", False), ("mtsl_rsa", "similarity", "rsa")):
        variant = methods.build_method(name, config, 4)
        assert variant.plan == base.plan and getattr(variant.learner.config, option) == value
        assert {**variant.learner.config.to_dict(), option: None} == {**base.learner.config.to_dict(), option: None}
    assert methods.build_method("mtsl_r", config, 4).retrains == "mtsl"
    with pytest.raises(ValueError, match="'mtsl' is already registered"):
        methods.register_method("mtsl")(lambda config, num_locations: methods.MethodSpec())
    assert methods.build_method("mtsl", config, 4).learner is not None


def test_an_extended_comparison_merges_methods_and_seeds_and_resume_takes_only_run_options(smoke, tmp_path, capsys):
    """Extending a saved comparison keeps its methods (first) and seeds and adds the new ones, dropping a seed
    no run can use; one of other settings is refused. ``--resume`` accepts the run options only. The alignment
    figure reads the first phase of finished runs of its row only."""
    from benchmarks.cli import UsageError

    config = smoke()
    (tmp_path / "config.json").write_text(json.dumps({"config": config.to_dict(), "methods": ["stn", "onenet", "mtsl"],
                                                      "seeds": [2, 0, -1, 2], "plan_from": None}))
    merged = compare.extend_comparison(tmp_path, config, ["stn", "onenet", "mtsl_r"], [1, 0], None)
    assert merged == (["stn", "onenet", "mtsl", "mtsl_r"], [0, 1, 2])
    assert "seed(s) [-1] outside" in capsys.readouterr().err
    with pytest.raises(UsageError, match="holds a comparison with other settings"):
        compare.extend_comparison(tmp_path, config.replace(tasks=("S", "D")), ["stn"], [0], None)
    args = compare.parse_args(["--resume", "x", "--device", "cpu", "--workers", "2", "--seeds", "1", "--no-align"])
    assert compare.options_besides_resume(args) == ["--seeds", "--no-align"]
    for seed in (0, 1):
        (tmp_path / "mtsl" / f"seed{seed}").mkdir(parents=True)
        (tmp_path / "mtsl" / f"seed{seed}" / "phase_0.json").write_text(json.dumps({"similarities": [{"s": seed}]}))
    rows = [{"method": "mtsl", "seed": 0, "status": "ok"}, {"method": "mtsl", "seed": 1, "status": "failed"},
            {"method": "mtsl_noalign", "seed": 1, "status": "ok"}]
    assert compare.first_similarities(tmp_path, "mtsl", rows) == [{"s": 0}]


def test_a_dry_run_checks_everything_says_what_each_run_would_do_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """``--dry-run`` (e.g. on a login node before a long GPU job): the checks run as before training, then one
    line per run (reuse, continue, train) and the disk they may take; no folder, file or run is touched."""
    from benchmarks import harness

    out = tmp_path / "cmp"
    argv = ["--preset", "smoke", "--tasks", "S,D", "--no-progress", "--methods", "mtsl", "--out", str(out)]
    assert compare.main([*argv, "--tasks", "S,S", "--dry-run"]) == 2  # bad input is refused as ever
    assert capsys.readouterr().err.startswith("error: a task is requested twice")
    assert compare.main([*argv, "--dry-run"]) == 0 and not out.exists()
    assert [line.split(" in ")[0] for line in capsys.readouterr().out.splitlines()[:3]] == [
        "[stn seed 0] would train", "[onenet seed 0] would train", "[mtsl seed 0] would train"]
    interrupt_in_second_phase(monkeypatch)
    assert compare.main(argv) == 130  # STN and One-Net finished, MTSL has a checkpoint
    files = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*")}
    monkeypatch.setattr(harness, "run_method", lambda *a, **k: pytest.fail("a run started"))
    capsys.readouterr()
    assert compare.main(["--resume", str(out), "--dry-run", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [f"[stn seed 0] would reuse the finished run in {out / 'stn' / 'seed0'}",
                         f"[onenet seed 0] would reuse the finished run in {out / 'onenet' / 'seed0'}",
                         f"[mtsl seed 0] would continue from the checkpoint in {out / 'mtsl' / 'seed0'}"]
    assert lines[3].startswith("dry run: every check passed; the runs may write up to ")
    assert lines[3].endswith(" MiB; nothing was trained or written")
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*")} == files


@pytest.mark.parametrize("other", ["same settings", "other settings"])
def test_commands_started_together_on_one_folder_keep_each_others_methods(tmp_path, monkeypatch, capsys, other):
    """Two commands started together on an empty folder (a job array) both find it empty; the one saving its
    comparison second keeps the first one's methods and seeds beside its own (it overwrote them), so that
    ``--resume`` continues both. A comparison of other settings saved meanwhile is refused before any training."""
    from mtsl_plugin.experiment import write_json

    out, check_jobs = tmp_path / "out", compare.check_jobs

    def meanwhile(jobs, *args, **kwargs):  # the other command saves its comparison while this one checks its own
        config = jobs[0].config if other == "same settings" else jobs[0].config.replace(tasks=("S", "D"))
        out.mkdir()
        write_json(out / "config.json", {"config": config.to_dict(), "methods": ["stn", "onenet", "mtsl"],
                                         "seeds": [1], "plan_from": None})
        return check_jobs(jobs, *args, **kwargs)

    monkeypatch.setattr(compare, "check_jobs", meanwhile)
    code = compare.main(["--methods", "onenet_l", "--seeds", "0", "--out", str(out), *ARGS])
    printed = capsys.readouterr()
    if other == "other settings":
        assert code == 2 and "holds a comparison with other settings" in printed.err
        assert sorted(p.name for p in out.iterdir()) == [".lock", "config.json"]  # nothing trained
        return
    assert code == 0 and "[mtsl seed" not in printed.out  # the other command's runs are its own
    saved = json.loads((out / "config.json").read_text())
    assert saved["methods"] == ["stn", "onenet", "mtsl", "onenet_l"] and saved["seeds"] == [0, 1]


@pytest.mark.parametrize("extends", [False, True], ids=["new-folder", "extended-folder"])
def test_a_stop_before_the_comparison_is_saved_names_no_resume_that_would_not_continue_it(finished, tmp_path, capsys,
                                                                                        monkeypatch, extends):
    """Ctrl-C in the checks (reading real data may take minutes), before this command saved its comparison in
    config.json: the line named `--resume DIR`, which refused a new folder (no config.json) and continued an
    extended one without the methods this command adds. Now: nothing written yet, or the same command again."""
    out = tmp_path / "run"
    if extends:
        out.mkdir()
        shutil.copy(finished[1] / "config.json", out / "config.json")  # a comparison of stn, onenet and mtsl

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "check_jobs", interrupted)
    capsys.readouterr()
    assert compare.main(["--methods", "ltb", "--out", str(out), *ARGS]) == 130
    line = capsys.readouterr().err.strip()
    assert "--resume" not in line and len(line.splitlines()) == 1
    assert line == (f"interrupted; finished runs and the last checkpoint are kept in {out}: the same command again "
                    "continues" if extends else
                    f"interrupted; nothing was written to {out} yet: the same command again starts it")
    assert out.exists() == extends
