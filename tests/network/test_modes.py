"""``evaluating``: evaluation mode for a block, every submodule's own mode afterwards."""
from contextlib import nullcontext

import pytest
from torch import nn

from mtsl_plugin.network.modes import evaluating


@pytest.mark.parametrize("raises", [False, True])
def test_every_submodule_gets_its_own_mode_back(raises):
    """A network training with a frozen batch norm (a common fine-tuning set-up) has it frozen again after a
    block in evaluation mode, also when the block raises; everything else trains again."""
    network = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)))
    network.train()
    network[1].eval()
    before = [m.training for m in network.modules()]
    assert before.count(False) == 1
    with pytest.raises(RuntimeError) if raises else nullcontext():
        with evaluating(network):
            assert not any(m.training for m in network.modules())
            if raises:
                raise RuntimeError("out of memory")
    assert [m.training for m in network.modules()] == before
