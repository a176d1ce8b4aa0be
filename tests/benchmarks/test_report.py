"""Δ_MTL, aggregation over seeds, and the Markdown / CSV tables."""
from __future__ import annotations

import csv
import math
import statistics

import pytest

from benchmarks.report import aggregate, delta_mtl, format_table, write_csv, write_markdown

HIGHER = {"S": True, "D": False, "E": False, "N": True, "A": False}
NAMES = {"S": "mIoU", "D": "RMSE", "E": "BCE", "N": "cos", "A": "MSE"}


def _run(method, seed, s=0.5, d=0.6, status="ok", error=None, **extra):
    run = {"method": method, "seed": seed, "metrics": {"S": s, "D": d}, "delta_mtl": 1.0 + seed,
           "delta_sd": 2.0 * seed, "params_m": 10.0, "gmac": 3.0 + seed, "train_seconds": 100.0 * (seed + 1),
           "status": status, "error": error}
    run.update(extra)
    return run


# ------------------------------------------------------------------------------------------ Δ_MTL
def test_delta_mtl_matches_a_hand_computation_with_mixed_directions():
    reference = {"S": 0.40, "D": 0.80, "N": 0.50}
    metrics = {"S": 0.44, "D": 0.60, "N": 0.45}
    # S: +(0.44-0.40)/0.40 = +10 %; D (lower better): -(0.60-0.80)/0.80 = +25 %; N: +(0.45-0.50)/0.50 = -10 %
    assert delta_mtl(metrics, reference, HIGHER) == pytest.approx((10 + 25 - 10) / 3)


def test_delta_mtl_sign_convention():
    assert delta_mtl({"D": 1.1}, {"D": 1.0}, HIGHER) == pytest.approx(-10.0)  # worse depth error: negative
    assert delta_mtl({"S": 1.1}, {"S": 1.0}, HIGHER) == pytest.approx(10.0)  # better mIoU: positive
    assert delta_mtl({"S": 0.3, "D": 0.5}, {"S": 0.3, "D": 0.5}, HIGHER) == 0.0


def test_delta_mtl_keeps_its_sign_for_a_negative_reference():
    """A metric that can be negative (a cosine similarity, a declared task's own score): moving from a reference of
    -0.10 to +0.10 where higher is better is an improvement of 200 %, not a loss (dividing by the signed reference
    flipped the sign of that task's term)."""
    assert delta_mtl({"N": 0.10}, {"N": -0.10}, HIGHER) == pytest.approx(200.0)
    assert delta_mtl({"N": -0.30}, {"N": -0.10}, HIGHER) == pytest.approx(-200.0)
    assert delta_mtl({"X": -0.5}, {"X": -1.0}, {"X": False}) == pytest.approx(-50.0)  # lower is better: worse


def test_delta_sd_restricts_the_tasks():
    reference = {"S": 0.40, "D": 0.80, "A": 0.01}
    metrics = {"S": 0.44, "D": 0.60, "A": 0.05}
    assert delta_mtl(metrics, reference, HIGHER, tasks=("S", "D")) == pytest.approx((10 + 25) / 2)
    assert delta_mtl(metrics, reference, HIGHER) == pytest.approx((10 + 25 - 400) / 3)


def test_delta_mtl_errors_name_the_task():
    with pytest.raises(ValueError, match="task 'D' is missing from metrics"):
        delta_mtl({"S": 0.4}, {"S": 0.4, "D": 0.5}, HIGHER)
    with pytest.raises(ValueError, match="task 'N' is missing from reference"):
        delta_mtl({"S": 0.4, "N": 0.5}, {"S": 0.4}, HIGHER, tasks=["S", "N"])
    with pytest.raises(ValueError, match="task 'X' is missing from higher_is_better"):
        delta_mtl({"X": 1.0}, {"X": 1.0}, HIGHER)
    with pytest.raises(ValueError, match="task 'A' has a zero single-task reference"):
        delta_mtl({"A": 0.1}, {"A": 0.0}, HIGHER)
    with pytest.raises(ValueError, match="task 'D' has a metric of nan"):  # no valid pixel seen: NaN, not a Δ
        delta_mtl({"S": 0.4, "D": math.nan}, {"S": 0.4, "D": 0.5}, HIGHER)
    with pytest.raises(ValueError, match="task 'S' has a single-task reference of inf"):
        delta_mtl({"S": 0.4}, {"S": math.inf}, HIGHER)
    with pytest.raises(ValueError, match="at least one task"):
        delta_mtl({}, {}, HIGHER)


# ------------------------------------------------------------------------------------------ aggregation
def test_aggregate_means_and_sample_stds_per_method_in_first_seen_order():
    runs = [_run("MTSL", 0, s=0.50), _run("STN", 0, s=0.40), _run("MTSL", 1, s=0.54), _run("MTSL", 2, s=0.49)]
    result = aggregate(runs)
    assert list(result) == ["MTSL", "STN"]
    mtsl = result["MTSL"]
    assert (mtsl["runs"], mtsl["ok"], mtsl["failed"], mtsl["seeds"]) == (3, 3, 0, [0, 1, 2])
    assert mtsl["metrics"]["S"]["mean"] == pytest.approx((0.50 + 0.54 + 0.49) / 3)
    assert mtsl["metrics"]["S"]["std"] == pytest.approx(statistics.stdev([0.50, 0.54, 0.49]))
    assert mtsl["delta_mtl"] == {"mean": pytest.approx(2.0), "std": pytest.approx(1.0), "n": 3}
    assert mtsl["params_m"]["std"] == 0.0
    stn = result["STN"]
    assert stn["metrics"]["S"] == {"mean": 0.40, "std": 0.0, "n": 1}  # one seed: std 0


def test_aggregate_counts_failed_runs_without_averaging_them():
    runs = [_run("LTB", 0, s=0.5), _run("LTB", 1, s=999.0, status="failed", error="CUDA out of memory"),
            _run("BMTAS", 0, status="failed", error="boom"), _run("BMTAS", 1, status="failed", error=None)]
    result = aggregate(runs)
    assert result["LTB"]["ok"] == 1 and result["LTB"]["failed"] == 1 and result["LTB"]["failed_seeds"] == [1]
    assert result["LTB"]["metrics"]["S"]["mean"] == 0.5
    assert result["LTB"]["errors"] == ["CUDA out of memory"]
    bmtas = result["BMTAS"]
    assert bmtas["ok"] == 0 and bmtas["failed"] == 2 and bmtas["metrics"] == {} and bmtas["delta_mtl"] is None
    assert bmtas["errors"] == ["boom", "unknown error"]


def test_aggregate_skips_missing_values_and_rejects_malformed_runs():
    result = aggregate([_run("One-Net", 0, delta_sd=None), _run("One-Net", 1, delta_sd=None)])
    assert result["One-Net"]["delta_sd"] is None
    with pytest.raises(ValueError, match="run 1 has no 'method'"):
        aggregate([_run("A", 0), {"seed": 1, "status": "ok"}])
    with pytest.raises(ValueError, match=r"run 0 \(A\) has status 'done'"):
        aggregate([_run("A", 0, status="done")])


def test_a_nan_metric_of_one_seed_gives_a_nan_mean_not_a_lost_table():
    """A metric over no valid pixel is NaN (RatioMetric): with two seeds statistics.stdev raised on it, and the
    whole comparison's table, CSV and JSON were lost after the training."""
    result = aggregate([_run("STN", 0, s=0.4), _run("STN", 1, s=math.nan), _run("STN", 2, s=math.inf)])
    assert math.isnan(result["STN"]["metrics"]["S"]["mean"]) and math.isnan(result["STN"]["metrics"]["S"]["std"])
    assert result["STN"]["metrics"]["D"]["std"] == 0.0  # the other task's stays
    assert "| nan ± nan |" in format_table(result, ["S"], HIGHER)


# ------------------------------------------------------------------------------------------ tables
def _table_runs():
    return [_run("MTSL", 0, s=0.5), _run("MTSL", 1, s=0.6), _run("STN", 0, s=0.45, d=0.7),
            _run("Cross|Stitch", 0, status="failed", error="RuntimeError: shapes do not match\ntraceback..."),
            _run("LTB", 0, s=0.4), _run("LTB", 1, status="failed", error="nan loss")]


def test_format_table_headers_cells_and_failures():
    table = format_table(aggregate(_table_runs()), ["S", "D"], HIGHER, metric_names=NAMES)
    lines = table.strip().splitlines()
    assert lines[0] == ("| Method | S mIoU ↑ | D RMSE ↓ | Δ_SD (%) | Δ_MTL (%) | Params (M) | GMac | Train (s) |")
    assert len(lines) == 2 + 4
    assert lines[2] == "| MTSL | 0.5500 ± 0.0707 | 0.6000 ± 0.0000 | +1.00 ± 1.41 | +1.50 ± 0.71 | 10.00 ± 0.00 " \
                       "| 3.50 ± 0.71 | 150.0 ± 70.7 |"
    assert lines[3] == "| STN | 0.4500 | 0.7000 | +0.00 | +1.00 | 10.00 | 3.00 | 100.0 |"  # one seed: no ±
    assert lines[4].startswith("| Cross\\|Stitch | failed: RuntimeError: shapes do not match | — |")
    assert "traceback" not in table
    assert lines[5].startswith("| LTB (1 of 2 runs failed) | 0.4000 |")
    assert all(line.count(" | ") == lines[0].count(" | ") for line in lines if not line.startswith("|:"))


def test_format_table_defaults_to_builtin_metric_names_and_checks_directions():
    table = format_table(aggregate([_run("X", 0)]), ["S", "D"], HIGHER)
    assert "S mIoU ↑" in table and "D RMSE ↓" in table
    with pytest.raises(ValueError, match="task 'Q' has no entry in higher_is_better"):
        format_table(aggregate([_run("X", 0)]), ["Q"], HIGHER)


def test_small_metrics_keep_significant_figures():
    table = format_table(aggregate([_run("X", 0, s=0.001234)]), ["S"], HIGHER, metric_names=NAMES)
    assert "| 0.001234 |" in table


def test_csv_round_trips_through_the_csv_module(tmp_path):
    aggregated = aggregate(_table_runs())
    path = write_csv(aggregated, tmp_path / "out" / "results.csv")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == ["MTSL", "STN", "Cross|Stitch", "LTB"]
    mtsl = rows[0]
    assert float(mtsl["S_mean"]) == aggregated["MTSL"]["metrics"]["S"]["mean"]  # exact, not rounded
    assert float(mtsl["S_std"]) == aggregated["MTSL"]["metrics"]["S"]["std"]
    assert float(mtsl["train_seconds_mean"]) == 150.0 and mtsl["seeds"] == "0;1" and mtsl["S_n"] == "2"
    failed = rows[2]
    assert (failed["ok"], failed["failed"], failed["S_mean"]) == ("0", "1", "")
    assert failed["errors"].startswith("RuntimeError: shapes do not match\ntraceback")  # newline survives quoting
    assert rows[3]["errors"] == "nan loss" and rows[3]["failed_seeds"] == "1"


def test_the_csv_says_over_how_many_seeds_each_value_is(tmp_path):
    """As the table's "(n of k seeds)": a Δ that one seed's failed STN left out is over 1 of the 2 seeds (the CSV
    showed it with a std of 0 and seeds 0;1, as if over both)."""
    runs = [_run("MTSL", 0, delta_mtl=5.0), _run("MTSL", 1, delta_mtl=None)]
    rows = list(csv.DictReader(write_csv(aggregate(runs), tmp_path / "r.csv").open(newline="", encoding="utf-8")))
    assert (rows[0]["ok"], rows[0]["S_n"], rows[0]["delta_mtl_n"], rows[0]["delta_mtl_mean"]) == ("2", "2", "1", "5.0")


def test_an_error_is_cut_to_its_first_line_of_at_most_sixty_characters():
    from benchmarks.report import first_line_of

    assert first_line_of("x" * 60 + "\nmore") == "x" * 60
    assert first_line_of("x" * 61) == "x" * 59 + "…" and first_line_of("  \n") == "unknown error"


def test_write_markdown_creates_folders_and_ends_with_newline(tmp_path):
    path = write_markdown("| a |", tmp_path / "deep" / "table.md")
    assert path.read_text(encoding="utf-8") == "| a |\n"


@pytest.mark.parametrize("writer", ["markdown", "csv"])
def test_a_table_write_cut_short_keeps_the_previous_table(tmp_path, writer):
    """table.md and results.csv were written in place: a write that failed or was stopped midway (a full disk,
    Ctrl-C) left a cut table instead of the previous one, of a folder a command extends. Now they are written to a
    temporary file and renamed (checkpoint.atomic_write): the previous file stays whole, and no temporary one."""
    import resource
    import signal

    from mtsl_plugin.checkpoint import CheckpointError

    path = tmp_path / "table"
    path.write_text("the previous table\n")
    aggregated = aggregate(_table_runs())
    write = (lambda: write_markdown("| a |\n" * 1000, path)) if writer == "markdown" else \
        (lambda: write_csv(aggregated, path))
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    before = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, limit[1]))
    try:
        with pytest.raises((CheckpointError, OSError)):
            write()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, before)
    assert path.read_text() == "the previous table\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table"]
