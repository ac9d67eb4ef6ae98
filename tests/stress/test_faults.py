"""A fault at every (stage, micro-batch, phase) of every schedule and checkpoint mode reaches
the caller with its own type and place within a second; the same pipeline then trains with
the baseline's gradients."""

import itertools

import pytest
import torch
from faults import (
    CHUNKS,
    InjectedError,
    baseline_grads,
    data,
    inject,
    loss_fn,
    model,
    positions,
)
from torch import nn

import shardpipe as sp

SCHEDULES = ["gpipe", "1f1b", "interleaved", "zb1p", "zbv"]
CHECKPOINTS = ["never", "except_last", "always"]


@pytest.mark.parametrize("threads", ["workers", "caller"])
@pytest.mark.parametrize("schedule,checkpoint", list(itertools.product(SCHEDULES, CHECKPOINTS)))
def test_a_fault_at_every_position_surfaces_and_the_pipeline_recovers(schedule, checkpoint,
                                                                       threads):
    stages = 4 if schedule in ("interleaved", "zbv") else 3
    problems = {}
    for position in positions(stages, schedule):
        problem, seconds = inject(schedule, checkpoint, threads, stages, position)
        if problem is None and seconds > 1.0:
            problem = f"took {seconds:.2f} s"
        if problem is not None:
            problems[position] = problem
    assert not problems, problems


@pytest.mark.parametrize("threads", ["workers", "caller"])
def test_an_error_in_a_backward_hook_keeps_its_type(threads):
    net = model(2)
    pipe = sp.Pipeline(net, ["cpu", "cpu"], chunks=CHUNKS, balance=[3, 3], schedule="1f1b")
    pipe._engine.threads = threads

    def hook(module, grad_input, grad_output):
        raise InjectedError("from a backward hook")

    handle = net[4].lin.register_full_backward_hook(hook)
    (x, index), y = data()
    with pytest.raises(InjectedError, match=r"backward hook.*stage 1, micro-batch \d"):
        pipe.train_step((x, index), y, loss_fn())
    handle.remove()
    net.zero_grad()
    pipe.train_step((x, index), y, loss_fn())
    for got, want in zip((p.grad for p in net.parameters()), baseline_grads(2)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_a_fault_in_pipe_forward_then_backward_surfaces_too():
    net = model(2)
    pipe = sp.Pipeline(net, ["cpu", "cpu"], chunks=CHUNKS, balance=[3, 3])
    (x, index), y = data()
    net[3].armed = (2, "backward")
    out, _ = pipe((x, index))
    with pytest.raises(InjectedError, match=r"stage 1, micro-batch 2 \(backward\)"):
        nn.functional.mse_loss(out, y).backward()
