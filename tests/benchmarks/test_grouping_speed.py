"""benchmarks/grouping_speed.py: the solvers' time per task count and local search's gap to the exact optimum."""
import numpy as np
import pytest

from benchmarks import grouping_speed


def test_one_row_per_task_count_with_a_time_per_solver(capsys):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # timed on one core, then given back: every test after one calling main() ran on one thread
        assert grouping_speed.main(["--tasks", "3,5,20", "--repeats", "1"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].count("(s)") == len(grouping_speed.SOLVERS) == 6
    rows = [line.strip("|").split("|") for line in lines[2:]]
    assert [int(r[0]) for r in rows] == [3, 5, 20] and all(float(c) >= 0 for r in rows[:2] for c in r[1:])
    local = [i for i, name in enumerate(grouping_speed.SOLVERS, start=1) if name.endswith("_local")]
    assert all(float(rows[2][i]) >= 0 for i in local)  # 20 tasks: local search only
    assert [c.strip() for i, c in enumerate(rows[2]) if i and i not in local] == ["—"] * 3


def test_gap_table_compares_local_search_with_the_exact_optimum(capsys):
    assert grouping_speed.main(["--tasks", "4,20", "--repeats", "1", "--gap-cases", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line.strip("|").split("|") for line in out.split("\n\n")[1].splitlines()[2:]]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("4", "uniform"), ("4", "planted")]  # not 20: no optimum
    for row in rows:
        # 4 tasks: the coarse start is exact, so no k falls below the optimum and every decision is the exact one.
        assert row[3].strip() == "0/16" and float(row[4]) == 0 and row[5].strip() == "2/2 / 2/2 / 2/2"


@pytest.mark.parametrize("argv, culprit", [
    (["--tasks", "4,x"], "'4,x'"), (["--tasks", ""], "''"), (["--tasks", "257"], "'257'"),
    (["--repeats", "0"], "--repeats"), (["--gap-cases", "-1"], "--gap-cases"), (["--seed", "-1"], "--seed"),
    (["--tasks", "4,4"], "--tasks: 4 is given twice"),
])
def test_bad_input_is_one_line_naming_it(capsys, argv, culprit):
    assert grouping_speed.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert culprit in err and len(err.splitlines()) == 1


def test_a_gap_row_counts_the_ks_below_the_optimum_and_the_worst_relative_gap(monkeypatch):
    """Per matrix and score, each k whose local best scores below the exact best counts once; the worst gap is
    (optimum - found) / |optimum| (faked optima here: 1.5 found 1.0, -2.0 found -2.5)."""
    from mtsl_plugin.plugins import builtin_grouping, partition_search

    optima = {"exact": [(2.0, None), (1.5, None), (-2.0, None)], "local": [(2.0, None), (1.0, None), (-2.5, None)]}
    monkeypatch.setattr(builtin_grouping, "best_partitions", lambda matrix, score, search: optima[search])
    monkeypatch.setattr(partition_search, "best_partitions", lambda matrix, score: optima["local"])
    row = grouping_speed.gap_row(np.random.default_rng(0), 4, "uniform", 1).strip("|").split("|")
    worst = max((1.5 - 1.0) / 1.5, (-2.0 - -2.5) / 2.0)
    assert row[3].strip() == "4/6" and float(row[4]) == pytest.approx(100 * worst, abs=0.005)


def test_the_exact_solvers_are_timed_up_to_their_limit_inclusive(monkeypatch, capsys):
    monkeypatch.setattr(grouping_speed, "MAX_TASKS", 4)  # the limit (16) made small enough to time quickly
    assert grouping_speed.main(["--tasks", "4,5", "--repeats", "1"]) == 0
    rows = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    exact = [i for i, name in enumerate(grouping_speed.SOLVERS, start=1) if not name.endswith("_local")]
    assert all(float(rows[0][i]) >= 0 for i in exact) and all(rows[1][i].strip() == "—" for i in exact)
