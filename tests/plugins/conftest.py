"""Every plugin test gets its own plugin manager and leaves none of its plugins behind."""
import sys

import pytest

from mtsl_plugin.plugins import reset_plugin_manager


@pytest.fixture(autouse=True)
def fresh_manager():
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def forget_modules():
    """Collect module names to drop from sys.modules after the test, so no test sees another's plugins."""
    names: list[str] = []
    yield names
    for name in names:
        sys.modules.pop(name, None)
