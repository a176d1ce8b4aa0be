"""Preflight (mtsl_plugin.preflight): what only building things finds, refused in one line before any training."""
import pytest

from benchmarks import compare
from mtsl_plugin.preflight import LIBMTL_OPTIMIZERS, check_optimizer

ARGS = ["--methods", "mtsl", "--preset", "smoke", "--no-progress"]


@pytest.mark.parametrize("optimizer, culprit", [
    ({"optim": "sgdx"}, "'sgdx'"),
    ({"lr": -1}, "'optim'"),  # a file's optimizer replaces the preset's whole
    ({"optim": "adam", "lr": -1}, "learning rate"),
    ({"optim": "adam", "momentum": 0.9}, "momentum"),
])
def test_an_optimizer_libmtl_cannot_build_is_named(optimizer, culprit):
    with pytest.raises(ValueError) as caught:
        check_optimizer(optimizer)
    assert culprit in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_every_optimizer_libmtl_builds_passes():
    for name in LIBMTL_OPTIMIZERS:
        check_optimizer({"optim": name, "lr": 1e-3, "weight_decay": 5e-5})


@pytest.mark.parametrize("text, culprit", [("optimizer: {optim: sgdx}\n", "sgdx"),
                                           ("optimizer: {lr: -1}\n", "'optim'"),
                                           ("tasks: SD\n", "'SD'")])
def test_compare_refuses_them_before_making_the_results_folder(tmp_path, capsys, text, culprit):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert compare.main([*ARGS, "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and culprit in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
