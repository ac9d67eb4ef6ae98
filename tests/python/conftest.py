"""Shared pytest setup: the ``cuda`` marker, the devices tests run on, and the threads
that run a pipeline's tasks.

Tests (or parameters) marked ``cuda`` are skipped on a machine without a CUDA device;
``pytest -m cuda`` selects exactly them on one that has it.
"""

import pytest
import torch

import shardpipe as sp

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


# The engine's private switch of which threads run a phase's tasks. Its default, "auto", keeps
# them on the calling thread while tasks are as cheap as the tests' tiny models make them, so
# without this the worker threads would go untested.
THREADS = ["workers", "caller"]


@pytest.fixture(params=THREADS)
def make_pipeline(request):
    """``sp.Pipeline(...)`` whose tasks run on the worker threads, or on the caller's."""
    made = []

    def make(*args, **kwargs):
        pipe = sp.Pipeline(*args, **kwargs)
        pipe._engine.threads = request.param
        made.append(pipe)
        return pipe

    yield make
    # The test ran where its id says (each pipeline it made has run at least one phase).
    assert [p._engine.last_threads for p in made] == [request.param] * len(made)


@pytest.fixture(autouse=True)
def _seed():
    # Baselines are recomputed in each test from the same seed, never stored.
    torch.manual_seed(0)
