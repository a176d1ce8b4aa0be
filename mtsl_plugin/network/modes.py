"""Running a module in evaluation mode for a block and giving it back its own mode, however the block ends."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` (and every submodule) in evaluation mode for the block, then back in the mode ``module`` was
    in (``module.train(was_training)``, for every submodule), also when the block raises: a caller that catches
    the error and evaluates or trains at once must find the mode it left."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
