"""What the pipeline tests share: small models, the micro-batched baseline, gradient checks.

The test files import it by name (``from pipeline_helpers import mlp``): pytest puts this
folder on ``sys.path``, as it holds a ``conftest.py`` and no ``__init__.py``.
"""

import os
import subprocess
import sys
import textwrap
import time

import torch
from torch import nn

SCHEDULES = ["gpipe", "1f1b", "interleaved"]
CHECKPOINTS = ["never", "except_last", "always"]


def mlp(seed=0, width=16, depth=6, dropout=None):
    torch.manual_seed(seed)
    layers = [nn.Linear(8, width)]
    for i in range(depth - 2):
        layers += [nn.Tanh()] if i % 2 else [nn.Linear(width, width)]
    if dropout is not None:
        layers.insert(2, nn.Dropout(dropout))
    layers.append(nn.Linear(width, 3))
    return nn.Sequential(*layers)


def micro_batched(model, x, chunks):
    """The baseline: the same model run on the same micro-batches one after another."""
    return torch.cat([model(part) for part in x.chunk(chunks)])


def grads(model):
    return [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


def assert_grads_close(got, want, atol=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g is not None and w is not None
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-4)


def layout(schedule, stages):
    """devices and balance for a 6-child model on `stages` CPU stages."""
    if schedule == "interleaved":
        devices = ["cpu"] * max(1, stages // 2)
        stages = 2 * len(devices)
    else:
        devices = ["cpu"] * stages
    base, extra = divmod(6, stages)
    return devices, [base + (1 if s < extra else 0) for s in range(stages)]


class Sleep(nn.Module):
    """A copy of its input, taking ``seconds`` per call (a stage that computes for a while)."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x * 1.0


class Explode(nn.Module):
    """Raises KeyError on forward call ``on_call``, or with ``backward`` in every backward."""

    def __init__(self, on_call, backward=False):
        super().__init__()
        self.on_call, self.backward, self.calls = on_call, backward, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.on_call and not self.backward:
            raise KeyError(f"exploded on call {self.calls}")
        if self.backward:
            return _FailingBackward.apply(x)
        return x


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise ZeroDivisionError("no gradient today")


def run_isolated(body, timeout=90):
    """Runs `body` in a fresh interpreter, so that a hang fails this test, not the suite."""
    script = "import threading, time, torch\nfrom torch import nn\nimport shardpipe as sp\n"
    result = subprocess.run([sys.executable, "-c", script + textwrap.dedent(body)],
                            capture_output=True, text=True, timeout=timeout, env={**os.environ})
    assert result.returncode == 0, result.stderr
    return result.stdout
