"""What the printed tables and figures claim: each cell over the seeds it says, failed runs never drawn as
numbers, plans readable whatever the task names, the alignment figure only where the runs differ in alignment.

The commands run with ``run_method`` replaced by a stand-in that returns fixed records, so the harness and the
reporting code run for real in milliseconds."""
import json

import numpy as np
import pytest
from matplotlib.container import BarContainer

from benchmarks import compare, figures, sensitivity
from benchmarks.report import aggregate, format_table, summary_table
from conftest import fake_record, table_row
from mtsl_plugin.plan import BranchingPlan

ARGS = ["--preset", "smoke", "--tasks", "S,D", "--no-progress"]


def fake_runner(fail=(), similarity=None):
    """A stand-in for ``run_method``: S, D fixed per method and seed; ``(method, seed)`` in ``fail`` raises; MTSL
    runs write a first phase record whose off-diagonal similarity is ``similarity[(method, seed)]``."""
    def run(config, method, run_dir, **kwargs):
        if (method, config.seed) in fail:
            if similarity is not None:  # a run that failed after its first structural phase
                write_phase(run_dir, similarity[(method, config.seed)])
            raise RuntimeError("broken on purpose")
        if similarity is not None and (method, config.seed) in similarity:
            write_phase(run_dir, similarity[(method, config.seed)])
        s = {"stn": 0.5, "onenet": 0.45, "mtsl": 0.4, "mtsl_noalign": 0.42}[method] + 0.01 * config.seed
        return fake_record(config, method, s)

    return run


def write_phase(run_dir, value):
    run_dir.mkdir(parents=True, exist_ok=True)
    matrix = [[1.0, value], [value, 1.0]]
    (run_dir / "phase_0.json").write_text(json.dumps(
        {"phase": 0, "location": 0, "similarities": [{"location": 0, "tasks": ["S", "D"], "matrix": matrix}]}))


# ------------------------------------------------------------------------------ cells over fewer seeds
def test_a_delta_over_fewer_seeds_than_its_row_says_so(tmp_path, monkeypatch):
    """STN failed for seed 1, so MTSL's seed 1 has no Δ: the row's metrics are over seeds 0 and 1, its Δs over
    seed 0 alone, which the cells must say rather than look like a one-seed table."""
    monkeypatch.setattr("benchmarks.harness.run_method", fake_runner(fail={("stn", 1)}))
    out = tmp_path / "cmp"
    assert compare.main(["--methods", "mtsl", "--seeds", "0,1", "--out", str(out), *ARGS]) == 1
    row = table_row((out / "table.md").read_text(), "mtsl")
    assert row["S mIoU ↑"] == "0.4050 ± 0.0071"  # both seeds
    assert row["Δ_MTL (%)"] == "-10.00 (1 of 2 seeds)"  # seed 0 only: (0.4 − 0.5) / 0.5 / 2
    assert row["Params (M)"] == "1.00 ± 0.00"


def test_summary_table_says_when_a_delta_covers_fewer_seeds():
    def run(seed, delta):
        return {"method": "mtsl", "seed": seed, "status": "ok", "metrics": {"S": 0.4}, "delta_mtl": delta,
                "delta_sd": delta, "params_m": 1.0, "gmac": 0.1, "plan_text": "0-1: S | D"}

    table = summary_table([run(0, -2.0), run(1, None), run(2, -4.0)], ["γ"], [(["0.8"], "mtsl")])
    row = table_row(table, "0.8")
    assert row["Δ_MTL (%)"] == "-3.00 ± 1.41 (2 of 3 seeds)"
    assert row["Params (M)"] == "1.00 ± 0.00"  # every seed: no note
    assert table.strip().splitlines()[2].endswith("| 0-1: S \\| D |")  # the plan's own | escaped


def test_cells_over_every_seed_are_unchanged():
    runs = [{"method": "m", "seed": s, "status": "ok", "metrics": {"S": 0.4 + 0.1 * s}, "delta_mtl": 1.0 + s,
             "delta_sd": None, "params_m": 1.0, "gmac": 0.1, "train_seconds": 2.0} for s in (0, 1)]
    row = table_row(format_table(aggregate(runs), ["S"], {"S": True}, {"S": "mIoU"}), "m")
    assert row["S mIoU ↑"] == "0.4500 ± 0.0707" and row["Δ_MTL (%)"] == "+1.50 ± 0.71"
    assert row["Δ_SD (%)"] == "—"  # missing in every seed: no note


# ------------------------------------------------------------------------------ the seeds sweep's table
def plan_record(label, seed, tasks, partitions):
    plan = BranchingPlan(tuple(tasks), [[tuple(g) for g in p] for p in partitions])
    return {"method": "mtsl", "label": label, "seed": seed, "status": "ok", "plan": plan.to_dict()}


def test_grouping_table_keeps_a_failed_runs_error_on_its_row():
    failed = {"method": "mtsl", "label": "mtsl", "seed": 1, "status": "failed",
              "error": "shapes | differ\nsecond line of the message"}
    table = sensitivity.grouping_table([plan_record("mtsl", 0, "SD", [["SD"], ["S", "D"]]), failed],
                                       {"mtsl": "random"})
    lines = table.strip().splitlines()
    assert len(lines) == 4  # header, rule, two runs
    assert lines[3].startswith("| random | 1 | failed: shapes \\| differ")
    assert "second line" not in table


def test_grouping_table_tells_multi_letter_task_names_apart():
    """Tasks ``ab`` and ``c`` sharing a node are not tasks ``a`` and ``bc``: cells join such names with ``+``, as
    the plans' text (``describe``) does."""
    one = plan_record("mtsl", 0, ["ab", "c"], [[("ab", "c")], [("ab",), ("c",)]])
    table = sensitivity.grouping_table([one], {"mtsl": "random"})
    assert table_row(table, "random")["0"] == "ab+c"
    assert table_row(table, "random")["1"] == "ab c"
    builtin = sensitivity.grouping_table([plan_record("mtsl", 0, "SDE", [["SDE"], ["SD", "E"]])], {"mtsl": "r"})
    assert table_row(builtin, "r")["0"] == "SDE" and table_row(builtin, "r")["1"] == "SD E"


# ------------------------------------------------------------------------------ sweep figures
@pytest.fixture
def drawn(monkeypatch):
    """The figures ``benchmarks.figures`` makes, kept for inspection."""
    made = []

    class Kept(figures.Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(figures, "Figure", Kept)
    return made


def test_sweep_figure_draws_no_bar_for_a_failed_run(tmp_path, drawn):
    figures.sweep_figure(["S,D", "S,E"], {"Δ_MTL (%)": [-5.0, None]}, tmp_path / "bar.png", "tasks", kind="bar")
    heights = [patch.get_height() for patch in drawn[0].axes[0].patches]
    assert heights[0] == -5.0
    assert len(heights) == 1 or not np.isfinite(heights[1])  # not a bar of height 0, which reads as Δ = 0
    assert any(t.get_text() == "failed" for t in drawn[0].axes[0].texts)


def test_sweep_figure_joins_the_points_in_order_of_the_swept_value(tmp_path, drawn):
    """``--values 0.9,0.5,0.7`` must not draw a line that goes back and forth."""
    figures.sweep_figure([0.9, 0.5, 0.7], {"Δ_MTL (%)": [3.0, 1.0, 2.0]}, tmp_path / "line.png", "γ")
    line = drawn[0].axes[0].lines[0]
    assert list(line.get_xdata()) == [0.5, 0.7, 0.9] and list(line.get_ydata()) == [1.0, 2.0, 3.0]


# ------------------------------------------------------------------------------ the alignment figure
def test_alignment_figure_averages_the_finished_runs_only(tmp_path, monkeypatch):
    """A run that failed after its first phase left ``phase_0.json``; the figure, like the table, averages the
    finished runs only."""
    similarity = {("mtsl", 0): 0.9, ("mtsl", 1): 0.1, ("mtsl_noalign", 0): 0.5, ("mtsl_noalign", 1): 0.6}
    monkeypatch.setattr("benchmarks.harness.run_method", fake_runner(fail={("mtsl", 1)}, similarity=similarity))
    captured = []
    monkeypatch.setattr(compare, "alignment_figure", lambda w, wo, path: captured.append((w, wo)))
    out = tmp_path / "cmp"
    assert compare.main(["--methods", "mtsl,mtsl_noalign", "--seeds", "0,1", "--out", str(out), *ARGS]) == 1
    (with_align, without_align), = captured
    assert [r["matrix"][0][1] for r in with_align] == [0.9]
    assert sorted(r["matrix"][0][1] for r in without_align) == [0.5, 0.6]


def test_alignment_figure_bars_are_the_mean_and_sample_std_over_the_seeds(tmp_path, drawn):
    """As the tables: each bar is the mean over the seeds of a task's summed similarity, its error bar the sample
    std (n - 1); one seed draws no error bar."""
    def record(similarity):
        return {"tasks": ["S", "D"], "matrix": [[1.0, similarity], [similarity, 1.0]]}

    seeds = [0.2, 0.6, 0.7]  # S's and D's summed similarity with the other task, per seed
    figures.alignment_figure([record(v) for v in seeds], [record(0.5)], tmp_path / "a.png")
    mean = sum(seeds) / 3
    std = (sum((v - mean) ** 2 for v in seeds) / (3 - 1)) ** 0.5
    aligned, plain = [c for c in drawn[0].axes[0].containers if isinstance(c, BarContainer)]
    assert [bar.get_height() for bar in aligned] == pytest.approx([mean, mean])
    half = [(end[1] - start[1]) / 2 for start, end in aligned.errorbar.lines[2][0].get_segments()]
    assert half == pytest.approx([std, std]) and plain.errorbar is None


def test_no_alignment_figure_when_mtsl_itself_runs_without_alignment(tmp_path, monkeypatch):
    """With ``--no-align`` the ``mtsl`` row has no alignment either: a figure of 'with' against 'without
    alignment' would compare two runs without it."""
    similarity = {("mtsl", 0): 0.9, ("mtsl_noalign", 0): 0.5}
    monkeypatch.setattr("benchmarks.harness.run_method", fake_runner(similarity=similarity))
    out = tmp_path / "cmp"
    assert compare.main(["--methods", "mtsl,mtsl_noalign", "--no-align", "--out", str(out), *ARGS]) == 0
    assert (out / "table.md").is_file() and not (out / "alignment.png").exists()
    aligned = tmp_path / "aligned"
    assert compare.main(["--methods", "mtsl,mtsl_noalign", "--out", str(aligned), *ARGS]) == 0
    assert (aligned / "alignment.png").stat().st_size > 0
