"""Shared pytest setup: the ``cuda`` marker and the devices tests run on.

Tests (or parameters) marked ``cuda`` are skipped on a machine without a CUDA device;
``pytest -m cuda`` selects exactly them on one that has it.
"""

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Parameters for tests that run on every device: the CUDA one is marked (and so skipped
# without a GPU, but still listed in the report).
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    """Each available device in turn, as a ``torch.device``."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    # Baselines are recomputed in each test from the same seed, never stored.
    torch.manual_seed(0)
