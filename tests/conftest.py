"""Shared fixtures: tiny random SD pipelines of the real component classes (fast, offline)."""

from __future__ import annotations

import pytest
import torch

from sage_core.models import tiny_pipeline


def pytest_collection_modifyitems(config, items):
    """Skip GPU-marked tests where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_pipe():
    """A tiny random StableDiffusionPipeline (shared; tests must not modify it)."""
    torch.set_num_threads(1)
    return tiny_pipeline(seed=0)


# Edge server process fixtures (tests/server_fixtures.py): `edge_server_factory`.
from server_fixtures import edge_server_factory  # noqa: E402,F401
