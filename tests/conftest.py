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
