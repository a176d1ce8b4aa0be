"""The alignment figure (paper Fig. 4)."""
import numpy as np
import pytest

from benchmarks.figures import alignment_figure, summed_similarity


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
