"""Fault injection for the one-process pipeline, shared by tests/stress and
benchmarks/reliability_report.py.

Each layer of the model passes ``(x, index)`` on, where ``index`` holds every sample's
position in the batch, so a layer knows which micro-batch it sees whatever the schedule.
A ``Fault`` layer raises at one (micro-batch, phase) position; the loss function can raise
for one micro-batch too.
"""

import time

import torch
from torch import nn

import shardpipe as sp

BATCH, CHUNKS, WIDTH = 8, 4, 6


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)

    def forward(self, values):
        x, index = values
        return torch.tanh(self.lin(x)), index


class InjectedError(Exception):
    """What a fault raises: a type of its own, so a test sees it arrive unchanged."""


class _RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, where):
        ctx.where = where
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise InjectedError(f"injected into {ctx.where}")


class Fault(nn.Module):
    """``x * scale`` (``scale`` a parameter equal to one), raising at micro-batch
    ``micro_batch`` in ``phase`` ("forward", "backward" or, with a zero-bubble schedule,
    "weight": the gradient of ``scale``) while ``armed``."""

    def __init__(self):
        super().__init__()
        self.armed = None  # (micro_batch, phase)
        self.scale = nn.Parameter(torch.ones(()))
        self.weight_gradients = 0
        self.scale.register_hook(self._weight_gradient)

    def _weight_gradient(self, grad):
        # A stage's weight gradients run in micro-batch order.
        here, self.weight_gradients = self.weight_gradients, self.weight_gradients + 1
        if self.armed is not None and self.armed == (here % CHUNKS, "weight"):
            raise InjectedError(f"injected into the weight gradient of micro-batch {here}")
        return grad

    def forward(self, values):
        x, index = values
        x = x * self.scale
        if self.armed is None:
            return x, index
        micro_batch, phase = self.armed
        here = int(index[0]) // (BATCH // CHUNKS)
        if here != micro_batch:
            return x, index
        if phase == "forward" and not sp._C.is_recomputing():
            raise InjectedError(f"injected into the forward of micro-batch {here}")
        if phase == "backward":
            return _RaiseInBackward.apply(x, f"the backward of micro-batch {here}"), index
        return x, index


def model(stages, seed=0):
    """``stages`` x (Fault, Layer, Layer) and a final head."""
    torch.manual_seed(seed)
    layers = []
    for _ in range(stages):
        layers += [Fault(), Layer(), Layer()]
    return nn.Sequential(*layers)


def data(seed=1):
    # The input wants a gradient, so that every stage's backward runs its first layer too.
    torch.manual_seed(seed)
    x = torch.randn(BATCH, WIDTH, requires_grad=True)
    return (x, torch.arange(BATCH)), torch.randn(BATCH, WIDTH)


def loss_fn(armed_micro_batch=None):
    def loss(output, target):
        x, index = output
        here = int(index[0]) // (BATCH // CHUNKS)
        if here == armed_micro_batch:
            raise InjectedError(f"injected into the loss of micro-batch {here}")
        return nn.functional.mse_loss(x, target)

    return loss


def baseline_grads(stages):
    """The plain model on the same micro-batches one after another, the same loss."""
    reference = model(stages)
    (x, index), y = data()
    for part, idx, target in zip(x.chunk(CHUNKS), index.chunk(CHUNKS), y.chunk(CHUNKS)):
        out, _ = reference((part, idx))
        (nn.functional.mse_loss(out, target) / CHUNKS).backward()
    return [p.grad.clone() for p in reference.parameters()]


def layout(schedule, stages):
    two_per_device = schedule in ("interleaved", "zbv")
    devices = ["cpu"] * (stages // 2 if two_per_device else stages)
    return devices, [3] * stages


def positions(stages, schedule):
    """Every (stage, micro-batch, phase) a fault can be injected at."""
    phases = ("forward", "backward") + (("weight",) if schedule.startswith("zb") else ())
    for stage in range(stages):
        for micro_batch in range(CHUNKS):
            for phase in phases:
                yield stage, micro_batch, phase
    for micro_batch in range(CHUNKS):
        yield stages - 1, micro_batch, "loss"


def inject(schedule, checkpoint, threads, stages, position):
    """Builds a pipeline, injects one fault at ``position`` and runs a train_step.

    Returns ``(problem, seconds)``: ``problem`` is None when the fault surfaced as expected
    (its own type, the stage and micro-batch in the message) and the same pipeline then
    trained with the baseline's gradients; else what went wrong."""
    stage, micro_batch, phase = position
    net = model(stages)
    devices, balance = layout(schedule, stages)
    pipe = sp.Pipeline(net, devices, chunks=CHUNKS, balance=balance, schedule=schedule,
                       checkpoint=checkpoint)
    pipe._engine.threads = threads
    (x, index), y = data()
    fault = net[3 * stage]
    if phase != "loss":
        fault.armed = (micro_batch, phase)
        fault.weight_gradients = 0
    start = time.monotonic()
    try:
        pipe.train_step((x, index), y, loss_fn(micro_batch if phase == "loss" else None))
        return "no error", time.monotonic() - start
    except InjectedError as error:
        seconds = time.monotonic() - start
        where = f"stage {stage}, micro-batch {micro_batch}"
        if where not in str(error):
            return f"message without {where!r}: {error}", seconds
    except Exception as error:  # noqa: BLE001 (the wrong type is the finding)
        return f"{type(error).__name__} instead of InjectedError: {error}", \
            time.monotonic() - start
    fault.armed = None
    net.zero_grad()
    pipe.train_step((x, index), y, loss_fn())
    for got, want in zip((p.grad for p in net.parameters()), baseline_grads(stages)):
        if got is None or not torch.allclose(got, want, atol=1e-5, rtol=1e-4):
            return "wrong gradients after the fault", seconds
    pipe.close()
    return None, seconds
