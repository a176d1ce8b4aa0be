"""benchmarks/grouping_speed.py: the exact solvers' time per task count."""
import pytest

from benchmarks import grouping_speed


def test_one_row_per_task_count_with_a_time_per_solver(capsys):
    assert grouping_speed.main(["--tasks", "3,5", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].count("(s)") == len(grouping_speed.SOLVERS)
    rows = [line.strip("|").split("|") for line in lines[2:]]
    assert [int(r[0]) for r in rows] == [3, 5] and all(float(c) >= 0 for r in rows for c in r[1:])


@pytest.mark.parametrize("argv, culprit", [
    (["--tasks", "4,x"], "'4,x'"), (["--tasks", ""], "''"), (["--tasks", "17"], "'17'"),
    (["--repeats", "0"], "--repeats"), (["--seed", "-1"], "--seed"),
])
def test_bad_input_is_one_line_naming_it(capsys, argv, culprit):
    assert grouping_speed.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert culprit in err and len(err.splitlines()) == 1
