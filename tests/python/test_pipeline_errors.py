"""Pipeline errors: a stage's exception reaches the caller with its type and where it
happened, and bad arguments or inputs are refused naming what was wrong."""

import time

import pytest
import torch
from pipeline_helpers import SCHEDULES, Explode, mlp
from torch import nn

import shardpipe as sp


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_stage_error_in_forward_keeps_its_type_and_says_where(schedule, make_pipeline):
    model = nn.Sequential(nn.Linear(8, 8), Explode(on_call=2), nn.Linear(8, 8), nn.Tanh())
    devices = ["cpu", "cpu"] if schedule == "interleaved" else ["cpu"] * 4
    pipe = make_pipeline(model, devices, chunks=3, balance=[1, 1, 1, 1], schedule=schedule)
    start = time.monotonic()
    with pytest.raises(KeyError, match=r"stage 1, micro-batch 1 \(forward\)"):
        pipe(torch.randn(6, 8))
    assert time.monotonic() - start < 1.0
    model[1].on_call = -1
    assert pipe(torch.randn(6, 8)).shape == (6, 8)  # still usable


@pytest.mark.parametrize("fused", [False, True])
def test_stage_error_in_backward_keeps_its_type(fused, make_pipeline):
    model = nn.Sequential(nn.Linear(8, 8), Explode(0, backward=True), nn.Linear(8, 8))
    pipe = make_pipeline(model, ["cpu"] * 3, chunks=2, balance=[1, 1, 1], schedule="1f1b")
    x, t = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ZeroDivisionError, match=r"stage 1, micro-batch \d \(backward\)"):
        if fused:
            pipe.train_step(x, t, nn.functional.mse_loss)
        else:
            pipe(x).sum().backward()
    model[1].backward = False
    pipe(x).sum().backward()


def test_loss_fn_errors_reach_the_caller(make_pipeline):
    pipe = make_pipeline(mlp(), ["cpu", "cpu"], chunks=2, balance=[3, 3])
    with pytest.raises(TypeError, match="loss_fn must return a Tensor"):
        pipe.train_step(torch.randn(4, 8), torch.randn(4, 3), lambda o, t: 1.0)
    with pytest.raises(ValueError, match="scalar"):
        pipe.train_step(torch.randn(4, 8), torch.randn(4, 3), lambda o, t: o - t)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(devices=[]), ValueError, "devices"),
    (dict(devices="cpu"), TypeError, "devices"),
    (dict(devices=["tpu"]), ValueError, r"devices\[0\]"),
    (dict(devices=["cuda:7"]), ValueError, r"devices\[0\]"),
    (dict(chunks=0), ValueError, "chunks"),
    (dict(chunks=1.5), TypeError, "chunks"),
    (dict(balance=[3, 2]), ValueError, "balance"),
    (dict(balance=[6, 0]), ValueError, r"balance\[1\]"),
    (dict(balance=[3, 3, 0]), ValueError, r"balance\[2\]"),
    (dict(balance=[2, 2, 2]), ValueError, "balance"),
    (dict(schedule="zigzag"), ValueError, "schedule"),
    (dict(checkpoint="sometimes"), ValueError, "checkpoint"),
    (dict(devices=["cpu"] * 7, balance=None), ValueError, "children"),
    (dict(deferred_batch_norm=1), TypeError, "deferred_batch_norm"),
    (dict(nested="yes"), TypeError, "nested"),
    (dict(chunks=2**70), ValueError, "chunks"),
])
def test_bad_arguments(kwargs, error, match):
    args = dict(devices=["cpu", "cpu"], balance=[3, 3])
    args.update(kwargs)
    with pytest.raises(error, match=match):
        sp.Pipeline(mlp(), **args)


def test_bad_inputs():
    pipe = sp.Pipeline(mlp(), ["cpu", "cpu"], chunks=2, balance=[3, 3])
    with pytest.raises(TypeError, match="input 0"):
        pipe("not a tensor")
    with pytest.raises(ValueError, match="batch"):
        pipe(torch.randn(0, 8))
    with pytest.raises(TypeError, match="target"):
        pipe.train_step(torch.randn(4, 8), "y", nn.functional.mse_loss)
    with pytest.raises(TypeError, match="target .*empty list"):
        pipe.train_step(torch.randn(4, 8), [], nn.functional.mse_loss)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        pipe.train_step(torch.randn(4, 8), torch.randn(4, 3), nn.functional.mse_loss)
    with pytest.raises(ValueError, match="loss_reduction"):
        pipe.train_step(torch.randn(4, 8), torch.randn(4, 3), nn.functional.mse_loss, "max")
    with pytest.raises(TypeError, match="places its stages"):
        pipe.to("cpu")
