"""Stress tests: faults at every position, long runs, concurrency, shutdown, fuzzed input.

They run in CI at sizes that fit its time budget; SHARDPIPE_STRESS_LONG=1 selects the long
variants (more steps, more fuzz cases).
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # One intra-op thread: tiny tensors gain nothing from OpenMP, and its spinning threads
    # make step times swing with whatever else the machine runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
