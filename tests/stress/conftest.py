"""Stress tests: faults at every position, long runs, concurrency, shutdown, fuzzed input.

They run in CI at sizes that fit its time budget; SHARDPIPE_STRESS_LONG=1 selects the long
variants (more steps, more fuzz cases).
"""

import os
import sys
from pathlib import Path

import pytest
import torch

LONG = os.environ.get("SHARDPIPE_STRESS_LONG") == "1"
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
