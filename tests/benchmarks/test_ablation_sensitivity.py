"""ablation.py and sensitivity.py from the command line on the smoke preset: rows, reuse, tables, figures."""
import json

import pytest
import timm
import torch

from benchmarks import ablation, compare, sensitivity
from benchmarks.cli import UsageError
from conftest import fake_record, hand_delta, table_row
from mtsl_plugin.config import load_preset
from mtsl_plugin.learner.schedule import MTSLConfig
from mtsl_plugin.methods import build_method
from mtsl_plugin.plan import BranchingPlan

ARGS = ["--preset", "smoke", "--tasks", "S,D", "--no-progress"]


def results_of(folder):
    return {(r["label"], r["seed"]): r for r in json.loads((folder / "results.json").read_text())}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One results folder used by compare.py first, then by ablation.py (which must reuse its runs)."""
    out = tmp_path_factory.mktemp("shared") / "out"
    assert compare.main(["--methods", "mtsl,mtsl_noalign", "--out", str(out), *ARGS]) == 0
    return out


def test_ablation_trains_the_six_rows_and_reuses_the_comparison(shared, capsys):
    capsys.readouterr()
    assert ablation.main(["--out", str(shared), *ARGS]) == 0
    printed = capsys.readouterr().out
    for label in ("stn", "mtsl", "mtsl_noalign"):  # trained by compare.py already
        assert f"[{label} seed 0] reusing the finished run" in printed
    runs = results_of(shared / "ablation")
    assert [label for label, _ in runs] == ["stn", *[row[0] for row in ablation.ROWS]]
    assert all(r["status"] == "ok" for r in runs.values())
    rows = (shared / "ablation" / "table.md").read_text()
    for (label, _), run in runs.items():
        hand = hand_delta(run, runs[("stn", 0)])
        assert run["delta_mtl"] == pytest.approx(hand, abs=1e-9), label
        assert table_row(rows, label)["Δ_MTL (%)"] == f"{hand:+.2f}", label
    # the switches reached the runs: no alignment term without alignment, no amalgamation without ATT
    for label, _, align, avg, att in ablation.ROWS:
        run = shared / label / "seed0"
        history = json.loads((run / "result.json").read_text())["history"]
        assert (max(h["align"] for h in history) > 0) == align, label
        phases = [json.loads(p.read_text()) for p in sorted(run.glob("phase_*.json"))]
        assert any(p["merged"] for p in phases), label  # so the ATT switch has something to act on
        assert any(p["amalgamation_losses"] for p in phases) == att, label
    table = (shared / "ablation" / "ablation.md").read_text()
    assert table.count("\n") == 2 + len(ablation.ROWS) and "✓ | ✓ | ✓" in table
    for name in ("table.md", "results.csv", "architecture.png"):
        assert (shared / "ablation" / name).stat().st_size > 0


def test_ablation_table_rows_carry_their_switches_and_their_own_runs_numbers():
    """Row i of ablation.md is ROWS[i]: its alignment / avg / ATT marks and its own run's numbers."""
    config = load_preset("smoke").replace(tasks=("S", "D"))
    results = [{**fake_record(config, method, 0.5), "label": label, "params_m": 1.0 + index}
               for index, (label, method, *_) in enumerate(ablation.ROWS)]
    lines = ablation.ablation_table(results).splitlines()[2:]
    assert len(lines) == len(ablation.ROWS)
    mark = {True: "✓", False: "✗"}
    for index, (line, (label, _, align, avg, att)) in enumerate(zip(lines, ablation.ROWS)):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[:3] == [mark[align], mark[avg], mark[att]] and cells[5] == f"{1.0 + index:.2f}", label


def test_every_ablation_row_runs_the_switches_it_shows_whatever_the_configuration():
    """A configuration with average_init and amalgamate off: the mtsl_noalign row (whose method switches alignment
    off itself) ran with them off while its row showed avg ✓ and ATT ✓ (helper-64)."""
    base = load_preset("smoke")
    config = base.replace(mtsl=MTSLConfig.from_dict({**base.mtsl.to_dict(), "average_init": False,
                                                     "amalgamate": False}))
    jobs = {job.label: job for job in ablation.ablation_jobs(config, [0])}
    for label, method, align, avg, att in ablation.ROWS:
        learner = build_method(method, jobs[label].config, 10).learner.config
        assert (learner.aligns, learner.average_init, learner.amalgamate) == (align, avg, att), label


def test_task_subsets_of_longer_names_keep_labels_apart():
    """Subsets were labelled by their names run together: ``ab, c`` and ``a, bc`` shared ``mtsl_abc``, so the
    second's runs met the first's folders (refused: runs of another configuration). Letters keep their old labels
    (``mtsl_SD``)."""
    config = load_preset("smoke")
    labels = {job.label for job in sensitivity.tasks_jobs(config, [0], [("ab", "c"), ("a", "bc"), ("S", "D")])}
    assert labels == {"stn_ab+c", "mtsl_ab+c", "stn_a+bc", "mtsl_a+bc", "stn_SD", "mtsl_SD"}


def test_threshold_sweep_extremes_give_the_single_task_and_shared_plans(tmp_path):
    out = tmp_path / "sens"
    assert sensitivity.main(["--sweep", "threshold", "--values", "0,1.01", "--out", str(out), *ARGS]) == 0
    runs = results_of(out / "sensitivity-threshold")
    stn_plan = BranchingPlan.from_dict(runs[("stn", 0)]["plan"])
    assert BranchingPlan.from_dict(runs[("mtsl_threshold1.01", 0)]["plan"]) == stn_plan  # above every similarity
    assert sensitivity.mtsl_option_label(load_preset("smoke"), "threshold", 0.8) == "mtsl"  # default γ: compare's
    merged = BranchingPlan.from_dict(runs[("mtsl_threshold0", 0)]["plan"])  # γ = 0: all merge
    phases = 2  # the smoke preset's structural phases, one location each
    assert all(len(merged.partitions[l]) == 1 for l in range(phases))
    assert all(len(merged.partitions[l]) == 2 for l in range(phases, merged.num_locations))
    table = (out / "sensitivity-threshold" / "sensitivity.md").read_text()
    assert "| 0 |" in table and "| 1.01 |" in table
    # every row has the header's number of cells: the plan's own "|" separators are escaped
    assert {line.replace("\\|", "").count("|") for line in table.splitlines()} == {7}
    assert (out / "sensitivity-threshold" / "sensitivity.png").stat().st_size > 0


def test_align_weight_sweep_trains_mtsl_per_weight_and_reuses_the_default(tmp_path):
    """λ = 0 trains without the alignment loss (its history's alignment term stays 0); the default λ (0.2) is
    compare.py's ``mtsl`` run, whose alignment term is positive."""
    out = tmp_path / "sens"
    assert sensitivity.main(["--sweep", "align-weight", "--values", "0,0.2", "--out", str(out), *ARGS]) == 0
    runs = results_of(out / "sensitivity-align-weight")
    assert set(runs) == {("stn", 0), ("mtsl_align0", 0), ("mtsl", 0)}
    assert sensitivity.mtsl_option_label(load_preset("smoke"), "align-weight", 0.05) == "mtsl_align0.05"
    history = {label: json.loads((out / label / "seed0" / "result.json").read_text())["history"]
               for label in ("mtsl_align0", "mtsl")}
    assert all(epoch["align"] == 0 for epoch in history["mtsl_align0"])
    assert any(epoch["align"] > 0 for epoch in history["mtsl"])
    table = (out / "sensitivity-align-weight" / "sensitivity.md").read_text()
    assert "Alignment λ" in table and "| 0 |" in table and "| 0.2 |" in table
    assert (out / "sensitivity-align-weight" / "sensitivity.png").stat().st_size > 0


def test_bmtas_lambda_sweep_trains_one_search_per_weight(tmp_path):
    out = tmp_path / "lambda"
    assert sensitivity.main(["--sweep", "bmtas-lambda", "--values", "0.05,50", "--out", str(out), *ARGS]) == 0
    runs = results_of(out / "sensitivity-bmtas-lambda")
    assert list(runs) == [("stn", 0), ("bmtas", 0), ("bmtas_lambda50", 0)]  # λ = 0.05 is compare.py's bmtas run
    assert all(r["status"] == "ok" for r in runs.values())
    assert runs[("bmtas", 0)]["fingerprint"] != runs[("bmtas_lambda50", 0)]["fingerprint"]
    saved = json.loads((out / "bmtas_lambda50" / "seed0" / "config.json").read_text())
    assert saved["arch_args"] == {"resource_weight": 50.0}  # the weight reached the run (and load_run)
    table = (out / "sensitivity-bmtas-lambda" / "sensitivity.md").read_text()
    assert "| 0.05 |" in table and "| 50 |" in table and "λ" in table
    assert (out / "sensitivity-bmtas-lambda" / "sensitivity.png").stat().st_size > 0


def test_task_sweep_trains_stn_and_mtsl_per_subset_with_their_own_reference(tmp_path):
    out = tmp_path / "tasks"
    argv = ["--sweep", "tasks", "--values", "D,S", "--out", str(out), "--preset", "smoke", "--tasks", "S,D,E",
            "--no-progress"]
    assert sensitivity.main(argv) == 0
    runs = results_of(out / "sensitivity-tasks")
    assert set(runs) == {("stn_SD", 0), ("mtsl_SD", 0)}
    assert set(runs[("mtsl_SD", 0)]["metrics"]) == {"S", "D"}
    assert runs[("stn_SD", 0)]["delta_mtl"] == 0  # each subset against its own STN, not the full set's
    assert runs[("mtsl_SD", 0)]["delta_mtl"] == pytest.approx(hand_delta(runs[("mtsl_SD", 0)], runs[("stn_SD", 0)]))
    assert "| S,D |" in (out / "sensitivity-tasks" / "sensitivity.md").read_text()


def test_sweep_labels_are_exact_and_keep_their_earlier_names():
    """Values {:g} would round get their exact repr (0.1234561 and 0.1234562 were both mtsl_threshold0.123456);
    values {:g} writes exactly keep their labels, so earlier results folders are still reused."""
    config = load_preset("smoke")
    assert sensitivity.mtsl_option_label(config, "threshold", 0.1234561) == "mtsl_threshold0.1234561"
    assert sensitivity.mtsl_option_label(config, "threshold", 0.1234562) == "mtsl_threshold0.1234562"
    for value, label in ((0.7, "mtsl_threshold0.7"), (0.0, "mtsl_threshold0"), (1.01, "mtsl_threshold1.01"),
                         (1e-7, "mtsl_threshold1e-07")):
        assert sensitivity.mtsl_option_label(config, "threshold", value) == label
    assert sensitivity.bmtas_label(50.0) == "bmtas_lambda50" and sensitivity.bmtas_label(0.01) == "bmtas_lambda0.01"
    assert sensitivity.bmtas_label(1 / 3) == "bmtas_lambda0.3333333333333333"


def test_a_failed_sweep_row_shows_as_failed_not_as_its_neighbours_numbers(tmp_path, monkeypatch, capsys):
    """Two γ that {:g} cannot tell apart: each row shows its own run, the failed one as failed."""
    def fake_run(config, method, run_dir, **kwargs):  # the harness and the table, without training
        if config.mtsl.threshold == 0.1234562:
            raise RuntimeError("broken on purpose")
        s = {"stn": 0.5, "mtsl": 0.4}[method]
        return fake_record(config, method, s)

    monkeypatch.setattr("benchmarks.harness.run_method", fake_run)
    out = tmp_path / "sens"
    argv = ["--sweep", "threshold", "--values", "0.1234561,0.1234562", "--out", str(out), *ARGS]
    assert sensitivity.main(argv) == 1
    table = (out / "sensitivity-threshold" / "sensitivity.md").read_text()
    assert table_row(table, "0.1234561")["Δ_MTL (%)"] == "-10.00"
    assert table_row(table, "0.1234562")["Δ_SD (%)"].startswith("failed: broken on purpose")


def test_task_subsets_leave_one_out_in_canonical_order():
    assert sensitivity.task_subsets(("S", "D", "E", "N", "A"), "all") == [
        ("S", "D", "E", "N"), ("S", "D", "E", "A"), ("S", "D", "N", "A"), ("S", "E", "N", "A"), ("D", "E", "N", "A")]
    assert sensitivity.task_subsets(("S", "D", "E", "N", "A"), "N,E,D,S") == [("S", "D", "E", "N")]
    for bad in ("S,X", "S", "S,S"):
        with pytest.raises(UsageError, match="--values"):
            sensitivity.task_subsets(("S", "D", "E"), bad)


def test_the_seeds_sweep_trains_three_seeds_unless_told_and_the_others_one(tmp_path, monkeypatch):
    class Stop(Exception):
        pass

    def train(jobs, out, args):
        raise Stop  # the jobs are what this test checks: nothing trains

    checked = []
    monkeypatch.setattr(sensitivity, "check_jobs", lambda jobs, *args: checked.append(jobs))
    monkeypatch.setattr(sensitivity, "train", train)
    for sweep in ("seeds", "threshold"):
        with pytest.raises(Stop):
            sensitivity.main(["--sweep", sweep, "--out", str(tmp_path / sweep), *ARGS])
    seeds, threshold = checked
    assert sorted({job.config.seed for job in seeds}) == [0, 1, 2]
    assert {job.config.seed for job in threshold} == {0}


def test_the_grouping_table_writes_each_locations_groups_as_the_plans_text_does():
    """Task names of several letters are joined by + (``parts+flow heat``), single letters run together (SD)."""
    for tasks in (("parts", "flow", "heat"), ("S", "D", "E")):
        plan = BranchingPlan(tasks, [[tasks], [tasks[:2], tasks[2:]]])
        table = sensitivity.grouping_table([{"label": "mtsl", "seed": 0, "status": "ok", "plan": plan.to_dict()}],
                                           {"mtsl": "random"})
        cells = [part.split(": ", 1)[1] for part in plan.describe().split(" | ")]  # one part per location here
        assert f"| random | 0 | {' | '.join(cells)} |" in table


def test_seed_sweep_prints_the_grouping_table_per_init(tmp_path, capsys):
    weights = tmp_path / "other_init.pth"
    torch.manual_seed(123)
    channels = tuple(load_preset("smoke").backbone_args["channels"])  # the smoke preset's narrow ResNet18
    torch.save(timm.create_model("resnet18", num_classes=0, channels=channels).state_dict(), weights)
    out = tmp_path / "seeds"
    argv = ["--sweep", "seeds", "--seeds", "0,1", "--inits", f"random,{weights}", "--out", str(out),
            "--similarity", "rsa", *ARGS]
    assert sensitivity.main(argv) == 0
    printed = capsys.readouterr().out
    runs = results_of(out / "sensitivity-seeds")
    # the configuration's own (random) initialisation keeps the label "mtsl", so compare.py's runs are reused
    assert set(runs) == {(label, s) for label in ("mtsl", "mtsl_other_init") for s in (0, 1)}
    for (label, seed), run in runs.items():
        config = json.loads((out / label / f"seed{seed}" / "config.json").read_text())["config"]
        assert config["mtsl"]["similarity"] == "rsa"
        assert (config["weights"] is not None) == (label == "mtsl_other_init")
    table = (out / "sensitivity-seeds" / "sensitivity.md").read_text()
    assert table in printed and "| other_init | 1 |" in table and "| random | 0 |" in table
    assert table.splitlines()[0].endswith("| 9 |")  # one column per location
    assert (out / "sensitivity-seeds" / "sensitivity.png").stat().st_size > 0


@pytest.mark.parametrize("argv, culprit", [
    (["--sweep", "threshold", "--values", "0.5,high"], "--values"),
    (["--sweep", "align-weight", "--values=-0.1"], "align_weight must be a finite number >= 0, got -0.1"),
    (["--sweep", "tasks", "--values", "S,Q"], "S,Q"),
    (["--sweep", "seeds", "--inits", "nowhere.pth"], "nowhere.pth"),
    (["--sweep", "bmtas-lambda", "--values", "0,-1"], "λ must be a finite number ≥ 0, got -1"),  # 0: no λ loss
    # empty or unused options ran the defaults (all six γ; seed 0) or were ignored without a word (a dry run:
    # before, each was one):
    (["--sweep", "threshold", "--values", "0.5", "--seeds", "", "--dry-run"], "--seeds is empty"),
    (["--sweep", "threshold", "--values", "", "--dry-run"], "--values is empty"),
    (["--sweep", "tasks", "--values", "", "--dry-run"], "--values is empty"),
    (["--sweep", "seeds", "--values", "0.5", "--dry-run"], "--values does not apply to --sweep seeds"),
    (["--sweep", "threshold", "--inits", "foo", "--dry-run"], "--inits applies to --sweep seeds only"),
])
def test_sensitivity_bad_input_is_one_line(tmp_path, capsys, argv, culprit):
    assert sensitivity.main([*argv, "--out", str(tmp_path / "x"), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert culprit in err and len(err.splitlines()) == 1
