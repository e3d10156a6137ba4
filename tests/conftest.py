"""Shared fixtures: a real Mosquitto broker for the whole test session.

CI installs mosquitto, so there the broker tests always run; the skip below is only for a
developer machine without it, and says how to install it.
"""

from __future__ import annotations

import pytest

from agent.models.digits import frames_from_digits, load_test_set
from edge_lab.broker import LocalBroker, MosquittoNotFound


@pytest.fixture(scope="session")
def broker():
    """A LocalBroker on a free loopback port, shared by the session. Tests must not stop it;
    a test that restarts a broker starts its own."""
    try:
        local_broker = LocalBroker()
    except MosquittoNotFound as exc:
        pytest.skip(f"no MQTT broker for integration tests: {exc}")
    with local_broker:
        yield local_broker


@pytest.fixture(scope="session")
def digits():
    """The shipped digits test set as the demo models' uint8 frames, and its labels."""
    images, labels = load_test_set()
    return frames_from_digits(images), labels
