"""Fixtures shared by the actor tests."""

import os
import signal
import uuid

import pytest

from tests.helpers import procs_with_env


@pytest.fixture
def tag(monkeypatch):
    """Every process of the test (workers included: they copy this environment) carries it."""
    value = uuid.uuid4().hex
    monkeypatch.setenv("FORGE_TEST_TAG", value)
    yield value
    leftovers = procs_with_env("FORGE_TEST_TAG", value)
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes left running: {leftovers}"
