"""check_finite names where a NaN or Inf first appears; Ctrl-C stops a step and leaves the
pipeline usable."""

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


class PoisonAt(nn.Module):
    """Identity, but micro-batch ``micro_batch`` (rows of batch index) turns NaN in forward or
    gets a NaN gradient in backward."""

    def __init__(self, micro_batch, where):
        super().__init__()
        self.micro_batch, self.where = micro_batch, where

    def forward(self, values):
        x, index = values
        if int(index[0]) // 2 != self.micro_batch:
            return values
        if self.where == "forward":
            return x * float("nan"), index
        return _NaNGradient.apply(x), index


class _NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, values):
        x, index = values
        return self.lin(x), index


def loss_fn(output, target):
    return nn.functional.mse_loss(output[0], target)


@pytest.mark.parametrize("schedule", ["1f1b", "zb1p"])
@pytest.mark.parametrize("where,phase", [("forward", "forward"), ("backward", "backward")])
def test_check_finite_names_the_stage_and_micro_batch(schedule, where, phase):
    model = nn.Sequential(Layer(), Layer(), PoisonAt(2, where), Layer())
    x, index, y = torch.randn(8, 4, requires_grad=True), torch.arange(8), torch.randn(8, 4)
    plain = sp.Pipeline(model, ["cpu", "cpu", "cpu"], chunks=4, balance=[1, 2, 1],
                        schedule=schedule)
    plain.train_step((x, index), y, loss_fn)  # off: no error, NaNs flow on
    model.zero_grad()
    pipe = sp.Pipeline(model, ["cpu", "cpu", "cpu"], chunks=4, balance=[1, 2, 1],
                       schedule=schedule, check_finite=True)
    with pytest.raises(RuntimeError, match=rf"NaN or Inf.*stage 1, micro-batch 2 \({phase}\)"):
        pipe.train_step((x, index), y, loss_fn)
    model[2].micro_batch = -1
    model.zero_grad()
    pipe.train_step((x, index), y, loss_fn)  # usable, and finite now


def test_ctrl_c_stops_a_step_and_the_pipeline_stays_usable():
    script = textwrap.dedent("""
        import os, signal, threading, time
        import torch
        from torch import nn
        import shardpipe as sp

        class Slow(nn.Module):
            def forward(self, x):
                time.sleep(0.2)
                return x * 2

        # Python leaves SIGINT ignored when it started ignored (a job sent to the background
        # by a shell without job control): Ctrl-C's own handler, as an interactive run has it.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        pipe = sp.Pipeline(nn.Sequential(Slow(), Slow()), ["cpu", "cpu"], chunks=20)
        pipe._engine.threads = "workers"
        threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        start = time.monotonic()
        try:
            pipe(torch.randn(20, 2))
            print("no interrupt")
        except KeyboardInterrupt as error:
            print("interrupted after %.1f s" % (time.monotonic() - start), error)
        pipe[0].forward = pipe[1].forward = lambda x: x + 1
        print("usable", pipe(torch.zeros(4, 2)).tolist()[0])
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("interrupted after"), done.stdout
    # 20 micro-batches of 2 x 0.2 s would take over 4 s; the interrupt ends it at once.
    assert float(lines[0].split()[2]) < 1.5, done.stdout
    assert lines[1] == "usable [2.0, 2.0]", done.stdout
    assert time.monotonic() - start < 60
