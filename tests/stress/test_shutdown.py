"""Shutdown: dropping pipelines leaves no threads; interpreter exit with live pipelines, a
step in flight, after a fault, or with a destroyed process group ends in seconds."""

import gc
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import shardpipe as sp

REPO = Path(__file__).resolve().parents[2]


def threads():
    return len(os.listdir("/proc/self/task"))


def test_creating_and_dropping_200_pipelines_leaves_no_threads():
    gc.collect()
    before = threads()
    for k in range(200):
        pipe = sp.Pipeline(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), ["cpu", "cpu"],
                           chunks=2)
        if k % 10 == 0:
            pipe(torch.randn(4, 4)).sum().backward()
        del pipe
    gc.collect()
    assert threads() == before


PROLOGUE = """
import os, sys, threading, time
import torch, torch.distributed as dist
from torch import nn
import shardpipe as sp
torch.set_num_threads(1)
"""

EXITS = {
    "live pipelines": """
        pipes = [sp.Pipeline(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), ["cpu"] * 2,
                             chunks=2) for _ in range(5)]
        pipes[0](torch.randn(4, 4)).sum().backward()
    """,
    "a step in flight in another thread": """
        class Slow(nn.Module):
            def forward(self, x):
                time.sleep(0.2)
                return x * 2
        pipe = sp.Pipeline(nn.Sequential(Slow(), Slow()), ["cpu"] * 2, chunks=4)
        pipe._engine.threads = "workers"
        threading.Thread(target=lambda: pipe(torch.randn(8, 2)), daemon=True).start()
        time.sleep(0.3)
    """,
    "after a fault": """
        class Boom(nn.Module):
            def forward(self, x):
                raise KeyError("boom")
        pipe = sp.Pipeline(nn.Sequential(nn.Linear(4, 4), Boom()), ["cpu"] * 2, chunks=2)
        try:
            pipe(torch.randn(4, 4))
        except KeyError:
            pass
    """,
    "a destroyed process group": """
        dist.init_process_group("gloo", rank=0, world_size=1,
                                init_method="tcp://127.0.0.1:" + sys.argv[1])
        col = sp.ColumnParallelLinear(4, 4, group=dist.group.WORLD)
        pipe = sp.Pipeline(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), ["cpu"] * 2)
        pipe(col(torch.randn(2, 4))).sum().backward()
        dist.destroy_process_group()
    """,
}


@pytest.mark.parametrize("case", list(EXITS))
def test_interpreter_exit_ends_in_seconds(case):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = PROLOGUE + textwrap.dedent(EXITS[case]) + "\nprint('ok')\n"
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script, port], capture_output=True, text=True,
                          timeout=60, env=env)
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")
    # The interpreter's own start (importing torch) is included; the exit itself is the
    # rest. A hang would show as the 60 s timeout.
    assert seconds < 30, f"{seconds:.1f} s"
