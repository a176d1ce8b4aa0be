"""Running a module in evaluation mode for a block and giving it back its own mode, however the block ends."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` (and every submodule) in evaluation mode for the block, then give every submodule back the
    mode it was in (a frozen batch norm in a training network stays frozen), also when the block raises: a caller
    that catches the error and evaluates or trains at once must find the modes it left."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
