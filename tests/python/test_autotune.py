"""sp.autotune: its choice trains like the model, respects max_memory, and its cost model
predicts what the same configuration measures (blocks that sleep known times)."""

import copy
import math
import re
import time

import pytest
import torch
from torch import nn

import shardpipe as sp

mse = nn.functional.mse_loss


def mlp(width=32, hidden=256, depth=2):
    layers = [nn.Linear(width, hidden), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(hidden, width))


def data(rows=32, width=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=g), torch.randn(rows, width, generator=g)


def test_the_chosen_configuration_gives_the_models_gradients():
    torch.manual_seed(0)
    model = mlp()
    x, y = data()
    plan = sp.autotune(model, x, y, mse, ["cpu", "cpu"], chunks=[2, 4], measure=2, steps=1,
                       progress=False)
    assert set(plan.kwargs) == {"balance", "chunks", "schedule", "checkpoint"}
    assert sum(r["measured_s"] is not None for r in plan.table) == 2
    assert plan.profile_s > 0 and "fastest measured" in plan.reason

    baseline = copy.deepcopy(model)
    mse(baseline(x), y).backward()
    pipe = sp.Pipeline(copy.deepcopy(model), ["cpu", "cpu"], **plan.kwargs)
    pipe.train_step(x, y, mse)
    expected = dict(baseline.named_parameters())
    for name, param in pipe.named_parameters():
        torch.testing.assert_close(param.grad, expected[name].grad, rtol=1e-5, atol=1e-6)
    pipe.close()
    text = str(plan)
    assert "autotune:" in text and "pred s" in text and len(text.splitlines()) > len(plan.table)
    assert "measured / predicted over the 2 measured" in text


def peak(row):
    return max(row["predicted_bytes"].values())


def test_max_memory_below_every_plain_candidate_chooses_checkpointing():
    torch.manual_seed(0)
    model = mlp()
    x, y = data()
    free = sp.autotune(model, x, y, mse, ["cpu", "cpu"], chunks=[2, 4], measure=0,
                       progress=False)
    plain = min(peak(r) for r in free.table if r["checkpoint"] == "never")
    assert min(peak(r) for r in free.table) < plain  # checkpointing does save memory here
    # The same profile, so the same predictions: below every candidate without checkpointing.
    plan = sp.autotune(model, x, y, mse, ["cpu", "cpu"], max_memory=int(plain) - 1,
                       chunks=[2, 4], measure=1, steps=1, progress=False, profile=free.profile)
    assert plan.kwargs["checkpoint"] != "never"
    assert all(not r["fits"] for r in plan.table if r["checkpoint"] == "never")
    assert "over max_memory" in plan.reason
    # A dict per device works the same way.
    plan = sp.autotune(model, x, y, mse, ["cpu", "cpu"], max_memory={"cpu": int(plain) - 1},
                       chunks=[2, 4], measure=0, progress=False, profile=free.profile)
    assert plan.kwargs["checkpoint"] != "never"


def test_max_memory_below_every_candidate_says_the_smallest_that_fits():
    torch.manual_seed(0)
    model = mlp()
    x, y = data()
    free = sp.autotune(model, x, y, mse, ["cpu", "cpu"], chunks=[2, 4], measure=0,
                       progress=False)
    smallest = min(free.table, key=peak)
    with pytest.raises(ValueError, match="smallest that fits needs") as error:
        sp.autotune(model, x, y, mse, ["cpu", "cpu"], max_memory=int(peak(smallest)) - 1,
                    chunks=[2, 4], measure=0, progress=False, profile=free.profile)
    assert f"{math.ceil(peak(smallest))} bytes" in str(error.value)


def test_same_measurements_same_plan():
    model = mlp()
    x, y = data()
    first = sp.autotune(model, x, y, mse, ["cpu", "cpu"], chunks=[1, 2, 4], measure=0,
                        progress=False)
    again = sp.autotune(model, x, y, mse, ["cpu", "cpu"], chunks=[1, 2, 4], measure=0,
                        progress=False, profile=first.profile)
    assert again.kwargs == first.kwargs
    assert [(r["schedule"], r["chunks"], r["checkpoint"], r["predicted_s"]) for r in again.table] \
        == [(r["schedule"], r["chunks"], r["checkpoint"], r["predicted_s"]) for r in first.table]


class _SleepBack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.seconds)
        return grad, None


class Sleeper(nn.Module):
    """A block whose forward sleeps ``forward_s`` and whose input gradient sleeps
    ``backward_s``: known costs, on any machine, that CPU stages can overlap."""

    def __init__(self, forward_s, backward_s):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.forward_s, self.backward_s = forward_s, backward_s

    def forward(self, x):
        time.sleep(self.forward_s)
        return _SleepBack.apply(x * self.scale, self.backward_s)


# The model's prediction against what the same configuration measures, on a loaded 2-core
# machine where a sleep may overrun: within 25 % plus 20 ms.
@pytest.mark.parametrize("devices", [["cpu"], ["cpu", "cpu"]])
def test_cost_model_predicts_sleeping_blocks(devices):
    model = nn.Sequential(*[Sleeper(0.01, 0.02) for _ in range(4)])
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    plan = sp.autotune(model, x, y, mse, devices, chunks=[4], schedules=["1f1b"],
                       checkpoints=["never"], measure=1, steps=2, repeats=2, progress=False)
    (row,) = plan.table
    # On paper: 1F1B with p equal stages of 4/p blocks, F = 10 ms and B = 20 ms per block.
    p, m = len(devices), 4
    theory = (m + p - 1) * (4 // p) * 0.03
    assert row["predicted_s"] == pytest.approx(theory, rel=0.2)
    assert abs(row["measured_s"] - row["predicted_s"]) <= 0.25 * row["predicted_s"] + 0.02, row


def test_projection_is_labelled_a_prediction_for_2_4_8_devices():
    model = mlp(width=16, hidden=64, depth=8)  # 17 blocks: enough for 8 devices, even in a V
    x, y = data(width=16)
    plan = sp.autotune(model, x, y, mse, ["cpu"], chunks=[4, 8], schedules=["1f1b", "zb1p"],
                       checkpoints=["never"], measure=0, progress=False, target_devices=8,
                       device_flops=1e12, link_bandwidth=1e10)
    text = str(plan)
    assert "PREDICTION (not measured)" in text and "FLOP/s" in text
    for n in (2, 4, 8):
        assert re.search(rf"^\s+{n} (1f1b|zb1p)", plan.projection, re.M), plan.projection


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(model="not a model"), TypeError, "model"),
    (dict(loss_fn=3), TypeError, "loss_fn"),
    (dict(target=[1]), TypeError, "target"),
    (dict(devices="cpu"), TypeError, "devices"),
    (dict(max_memory=-1), ValueError, "max_memory"),
    (dict(max_memory={"cuda:7": 10}), ValueError, "max_memory"),
    (dict(chunks=[0]), ValueError, r"chunks\[0\]"),
    (dict(chunks=[64]), ValueError, r"chunks\[0\]"),
    (dict(schedules=["fast"]), ValueError, r"schedules\[0\]"),
    (dict(checkpoints="always"), TypeError, "checkpoints"),
    (dict(schedules=[]), ValueError, "schedules"),
    (dict(measure=-1), ValueError, "measure"),
    (dict(progress=1), TypeError, "progress"),
    (dict(target_devices=8), ValueError, "device_flops"),
    (dict(target_devices=8, device_flops=1e12, link_bandwidth=0), ValueError,
     "link_bandwidth"),
    (dict(profile={"blocks": []}), ValueError, "profile"),
])
def test_bad_arguments_name_themselves(kwargs, error, match):
    x, y = data()
    args = dict(model=mlp(), sample=x, target=y, loss_fn=mse, devices=["cpu", "cpu"],
                measure=0, progress=False)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        sp.autotune(**args)
