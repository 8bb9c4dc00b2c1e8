"""The Hub tests talk to tests/hub/standin.py, a local stand-in for the Hub, never to the Hub itself."""

import pytest

import pico.hub.api
from tests.hub.standin import LocalHub


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fresh stand-in that every Hub call of this test goes to."""
    standin = LocalHub(tmp_path / "standin")
    standin.set_faults()
    monkeypatch.setattr(pico.hub.api, "connect", lambda: standin)
    return standin
