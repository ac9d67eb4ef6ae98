"""Fuzzed constructor arguments and inputs never crash, hang or give a wrong result: the
pipeline answers as the plain model does, or raises ValueError/TypeError naming what is
wrong, or raises what the plain model raises on the same input."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stress_settings import LONG
from torch import nn

import shardpipe as sp

EXAMPLES = 500 if LONG else 60
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
ARGUMENTS = ("module", "devices", "chunks", "balance", "schedule", "checkpoint",
             "deferred_batch_norm", "nested")


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 4),
                         nn.Tanh(), nn.Linear(4, 2))


anything = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**40), st.floats(),
                     st.text(max_size=5))
devices = st.one_of(anything, st.lists(st.one_of(st.sampled_from(["cpu", "cuda:0", "tpu", "cpu:0"]),
                                                 st.integers(-1, 2), st.none()),
                                       max_size=5))
balances = st.one_of(st.none(), anything, st.lists(st.one_of(st.integers(-1, 7), st.floats(),
                                                             st.none()), max_size=6))


def names_an_argument(error):
    return any(name in str(error) for name in ARGUMENTS)


@SETTINGS
@given(devices=devices, chunks=st.one_of(anything, st.integers(0, 9)), balance=balances,
       schedule=st.one_of(anything, st.sampled_from(sp._C.schedule_names())),
       checkpoint=st.one_of(anything, st.sampled_from(sp._C.checkpoint_names())),
       deferred=st.one_of(st.booleans(), anything), nested=st.one_of(st.booleans(), anything))
def test_constructor_arguments(devices, chunks, balance, schedule, checkpoint, deferred, nested):
    net = model().eval()
    try:
        pipe = sp.Pipeline(net, devices, chunks=chunks, balance=balance, schedule=schedule,
                           checkpoint=checkpoint, deferred_batch_norm=deferred, nested=nested)
    except (ValueError, TypeError) as error:
        assert names_an_argument(error), error
        return
    x = torch.randn(6, 4)
    with torch.no_grad():
        torch.testing.assert_close(pipe(x), net(x))
    pipe.close()


class Ragged(nn.Module):
    """Returns a tuple whose length depends on its argument: stages between must cope."""

    def __init__(self, extra):
        super().__init__()
        self.extra = extra

    def forward(self, x):
        x = x if isinstance(x, torch.Tensor) else x[0]
        return (x,) + tuple(x * k for k in range(self.extra)) if self.extra else x


def micro_batched(net, args, chunks):
    """The baseline the contract names: the model on the micro-batches one after another
    (every tensor split along its dim 0 like torch.chunk), outputs concatenated."""
    parts = [torch.chunk(a, chunks) if isinstance(a, torch.Tensor) else None for a in args]
    count = min(len(p) for p in parts if p is not None)
    outs = []
    with torch.no_grad():
        for i in range(count):
            mb = tuple(p[i] if p is not None else a for p, a in zip(parts, args))
            outs.append(net(*mb) if len(mb) == 1 else net(mb))
    if isinstance(outs[0], torch.Tensor):
        return torch.cat(outs)
    return tuple(torch.cat(group) for group in zip(*outs))


tensors = st.builds(
    lambda shape, dtype, nan: _tensor(shape, dtype, nan),
    st.lists(st.integers(0, 5), min_size=0, max_size=3),
    st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool]),
    st.booleans())


def _tensor(shape, dtype, nan):
    t = torch.randn(shape) * 3
    if nan and t.numel():
        t.view(-1)[0] = math.nan
    return t.to(dtype)


@SETTINGS
@given(x=st.one_of(tensors, anything, st.tuples(tensors, tensors)),
       extra=st.integers(0, 2), chunks=st.integers(1, 5),
       schedule=st.sampled_from(["gpipe", "1f1b"]),
       threads=st.sampled_from(["workers", "caller"]))
def test_inputs(x, extra, chunks, schedule, threads):
    torch.manual_seed(0)
    net = nn.Sequential(Ragged(extra), Ragged(0), nn.Linear(4, 3), Ragged(extra), Ragged(0))
    pipe = sp.Pipeline(net, ["cpu", "cpu"], chunks=chunks, balance=[2, 3], schedule=schedule)
    pipe._engine.threads = threads
    args = x if isinstance(x, tuple) else (x,)
    try:
        want = micro_batched(net, args, chunks)
    except Exception as error:  # noqa: BLE001 (whatever the plain model raises)
        want = error
    try:
        with torch.no_grad():
            got = pipe(*args)
    except (ValueError, TypeError) as error:
        # The pipeline's own checks (nothing to split, an empty or 0-dim batch) name the
        # input; otherwise it is what the plain model raises too.
        assert "input" in str(error) or "batch" in str(error) or isinstance(want, Exception), \
            error
        return
    except Exception as error:  # noqa: BLE001
        assert isinstance(want, Exception) and type(error) is type(want), (error, want)
        return
    assert not isinstance(want, Exception), f"the plain model raised {want!r}, the pipeline not"
    torch.testing.assert_close(got, want, equal_nan=True)
