"""The whole suite: integration tests run before unit tests, whatever the order of the paths given.

Importing the ``actors`` package builds the engine's broker from the environment once per process.
The integration run points the environment at its own vhost in a session fixture
(tests/integration/conftest.py); a unit test that imported ``actors`` first would leave the broker
on another vhost, and every publish of the integration tests would go there. Under pytest-xdist
(make test) each worker process is handed tests in this order too (its default ``load`` scheduling
sends the pending tests front first), so none runs a unit test before an integration test.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Integration tests first; the order within each tree is kept."""
    items.sort(key=lambda item: 0 if "integration" in item.path.parts else 1)
