"""Fixtures shared by the integration tests (real processes, real Redis)."""

import pytest


@pytest.fixture(scope="session")
def e2e_model(tiny_model):
    return tiny_model("llama")
