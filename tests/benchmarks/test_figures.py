"""The alignment figure (paper Fig. 4) and the search curves of LTB and BMTAS."""
import numpy as np
import pytest

from benchmarks.figures import alignment_figure, search_figure, summed_similarity


def record(matrix):
    return {"tasks": ["S", "D", "E"], "matrix": matrix}


def test_summed_similarity_excludes_the_diagonal():
    m = [[1.0, 0.5, 0.25], [0.5, 1.0, 0.75], [0.25, 0.75, 1.0]]
    assert summed_similarity(record(m)) == {"S": 0.75, "D": 1.25, "E": 1.0}


def test_alignment_figure_is_written_and_depends_on_the_data(tmp_path):
    gen = np.random.default_rng(0)

    def random_record():
        a = gen.uniform(0.5, 1, (3, 3))
        a = (a + a.T) / 2
        np.fill_diagonal(a, 1)
        return record(a.tolist())

    first = alignment_figure([random_record(), random_record()], [random_record()], tmp_path / "a.png")
    second = alignment_figure([random_record()], [random_record()], tmp_path / "b.png")
    assert first.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and first.stat().st_size > 5000
    assert first.read_bytes() != second.read_bytes()
    with pytest.raises(ValueError, match="at least one run"):
        alignment_figure([], [random_record()], tmp_path / "c.png")


def test_search_figure_draws_the_searched_runs_only(tmp_path):
    def run(method, entropies, expected=None):
        history = [{"epoch": e + 1, "gate_entropy": h, "max_entropy": 1.61, "derived_gmac": 1.0 - 0.1 * e,
                    **({} if expected is None else {"expected_gflops": expected[e]})} for e, h in enumerate(entropies)]
        return {"method": method, "seed": 0, "history": history}

    plain = {"method": "stn", "seed": 0, "history": [{"epoch": 1, "S": 1.0}]}
    first = search_figure([plain, run("ltb", [1.6, 1.5, 1.2]), run("bmtas", [1.6, 1.0, 0.5], [9, 7, 5])],
                          tmp_path / "s.png")
    second = search_figure([run("ltb", [1.6, 1.6, 1.6])], tmp_path / "t.png")
    assert first.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and first.read_bytes() != second.read_bytes()
    with pytest.raises(ValueError, match="LTB or BMTAS"):
        search_figure([plain], tmp_path / "u.png")
