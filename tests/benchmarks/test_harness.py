"""The harness's Δs: each run against the STN run of its own configuration, and never a lost table."""
import pytest

from benchmarks.harness import add_deltas

HIGHER = {"S": True, "D": False}


def run(method, seed, s, d, key=None, status="ok"):
    return {"method": method, "label": method, "seed": seed, "status": status, "reference_key": key or f"k{seed}",
            "metrics": {"S": s, "D": d}, "higher_is_better": HIGHER}


def test_deltas_are_against_the_stn_run_of_the_same_configuration():
    results = [run("stn", 0, 0.40, 1.0), run("stn", 1, 0.50, 2.0), run("onenet", 0, 0.44, 0.9),
               run("onenet", 1, 0.44, 0.9), run("mtsl", 2, 0.4, 1.0)]
    add_deltas(results)
    assert results[2]["delta_mtl"] == pytest.approx(10.0) and results[2]["delta_sd"] == pytest.approx(10.0)
    assert results[3]["delta_mtl"] == pytest.approx((-12.0 + 55.0) / 2)
    assert results[0]["delta_mtl"] == 0.0
    assert results[4]["delta_mtl"] is None  # no STN run of seed 2


def test_a_zero_stn_metric_gives_no_delta_instead_of_losing_the_table(capsys):
    """An STN metric of 0 makes the relative change undefined: that run's Δ is None, one line says why, and the
    other runs keep theirs (it raised after all the training, so no table was written)."""
    results = [run("stn", 0, 0.0, 1.0), run("onenet", 0, 0.1, 0.9), run("stn", 1, 0.5, 1.0), run("onenet", 1, 0.5, 1.0)]
    add_deltas(results)
    assert results[1]["delta_mtl"] is None and results[1]["delta_sd"] is None
    assert results[3]["delta_mtl"] == 0.0
    err = capsys.readouterr().err
    assert "[onenet seed 0] no Δ" in err and "zero single-task reference" in err
