"""Shared fixtures: the smoke preset, shrunk further where a test only needs the code path."""
import pytest

from mtsl_plugin.config import load_preset
from mtsl_plugin.learner.schedule import MTSLConfig


def smoke_config(tasks=("S", "D", "E"), **mtsl_changes):
    """The smoke preset on ``tasks`` with MTSL options overridden."""
    config = load_preset("smoke").replace(tasks=tuple(tasks))
    return config.replace(mtsl=MTSLConfig.from_dict({**config.mtsl.to_dict(), **mtsl_changes}))


@pytest.fixture
def smoke():
    return smoke_config
