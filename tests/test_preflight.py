"""Preflight (mtsl_plugin.preflight): what only building things finds, refused in one line before any training."""
import pytest

from mtsl_plugin.preflight import LIBMTL_OPTIMIZERS, check_optimizer

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
