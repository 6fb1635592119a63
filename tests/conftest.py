"""Suite-wide test settings: the ``slow`` marker for tests whose module does not set it itself."""

from __future__ import annotations

import pytest

# Node ids (without parameters) of tests that need minutes or hundreds of MB and live in a
# module that does not mark them; marked here so the default run stays short. See tests/README.md.
SLOW_BY_NAME = {
    "tests/test_engine.py::test_accuracy_on_1e8_element_tensor",  # a 400 MB float32 tensor
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.split("[", 1)[0] in SLOW_BY_NAME:
            item.add_marker(pytest.mark.slow)
