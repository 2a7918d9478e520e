"""Fixtures shared by the engine tests."""

import pytest


@pytest.fixture
def clean_registry():
    """Restores the scheduling-policy registry after a test registers its own policies."""
    from tandem.engine import scheduling_policy

    before = dict(scheduling_policy._REGISTRY)
    yield
    scheduling_policy._REGISTRY.clear()
    scheduling_policy._REGISTRY.update(before)
