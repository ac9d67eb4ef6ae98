"""Pipeline numerics: forward and backward equal the single-device baseline computed in the
same test, under every schedule, checkpoint mode and thread choice (``make_pipeline``)."""

import copy
import itertools
import threading

import pytest
import torch
from pipeline_helpers import (
    CHECKPOINTS,
    SCHEDULES,
    assert_grads_close,
    grads,
    layout,
    micro_batched,
    mlp,
)
from torch import nn

import shardpipe as sp


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_forward_equals_module_for_every_chunk_count(stages, make_pipeline):
    model = mlp().eval()
    x = torch.randn(7, 8)
    want = model(x)
    devices, balance = layout("gpipe", stages)
    for chunks in range(1, x.shape[0] + 2):
        pipe = make_pipeline(model, devices, chunks=chunks, balance=balance)
        torch.testing.assert_close(pipe(x), want, atol=1e-6, rtol=1e-5)
        pipe.close()


@pytest.mark.parametrize("schedule,checkpoint", list(itertools.product(SCHEDULES, CHECKPOINTS)))
@pytest.mark.parametrize("chunks", [1, 3, 8])
def test_backward_equals_module(schedule, checkpoint, chunks, make_pipeline):
    model = mlp(seed=1)
    x = torch.randn(10, 8, requires_grad=True)  # 10 does not divide by 3 or 8
    target = torch.randn(10, 3)

    loss = nn.functional.mse_loss(model(x), target)
    loss.backward()
    want, want_x = grads(model), x.grad.clone()
    model.zero_grad()
    x.grad = None

    devices, balance = layout(schedule, 4 if schedule == "interleaved" else 3)
    pipe = make_pipeline(model, devices, chunks=chunks, balance=balance, schedule=schedule,
                         checkpoint=checkpoint)
    nn.functional.mse_loss(pipe(x), target).backward()
    assert_grads_close(grads(model), want)
    torch.testing.assert_close(x.grad, want_x, atol=1e-6, rtol=1e-5)

    model.zero_grad()
    x.grad = None
    fused = pipe.train_step(x, target, nn.functional.mse_loss)
    torch.testing.assert_close(fused, loss.detach(), atol=1e-6, rtol=1e-5)
    assert_grads_close(grads(model), want)
    torch.testing.assert_close(x.grad, want_x, atol=1e-6, rtol=1e-5)


class LiveCount:
    """Micro-batches whose forward through a point has run and whose backward has not."""

    def __init__(self):
        self.lock = threading.Lock()
        self.alive = self.peak = 0

    def change(self, by):
        with self.lock:
            self.alive += by
            self.peak = max(self.peak, self.alive)


class CountLive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, count):
        count.change(+1)
        ctx.count = count
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.count.change(-1)
        return grad, None


class Counted(nn.Module):
    def __init__(self, count):
        super().__init__()
        self.count = count

    def forward(self, x):
        return CountLive.apply(x, self.count)


@pytest.mark.parametrize("devices", [2, 3, 4])
@pytest.mark.parametrize("chunks", [8, 16])
def test_train_step_keeps_activations_within_each_schedules_bound(devices, chunks, make_pipeline):
    """gpipe keeps every micro-batch alive; 1F1B at most stages - s on stage s; interleaved
    (two virtual stages per device) at most 2 (devices - d - 1) + devices + 1 on device d,
    whatever the number of micro-batches."""
    x, y = torch.randn(2 * chunks, 4), torch.randn(2 * chunks, 4)
    for schedule, virtual in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
        counts = [LiveCount() for _ in range(devices)]
        layers = []
        for s in range(devices * virtual):  # counted after a Linear: its output needs grad
            layers += [nn.Linear(4, 4), Counted(counts[s % devices])]
        pipe = make_pipeline(nn.Sequential(*layers), ["cpu"] * devices, chunks=chunks,
                             balance=[2] * (devices * virtual), schedule=schedule)
        pipe.train_step(x, y, nn.functional.mse_loss)
        pipe.close()
        peaks = [c.peak for c in counts]
        assert all(c.alive == 0 for c in counts), schedule
        if schedule == "gpipe":
            assert peaks == [chunks] * devices
        elif schedule == "1f1b":
            assert peaks == [devices - d for d in range(devices)]
        else:
            bounds = [2 * (devices - d - 1) + devices + 1 for d in range(devices)]
            assert all(p <= b for p, b in zip(peaks, bounds)), (peaks, bounds)


def test_train_step_sum_reduction(make_pipeline):
    model = mlp(seed=2)
    x, target = torch.randn(9, 8), torch.randn(9, 3)
    sum_loss = lambda out, t: ((out - t) ** 2).sum()  # noqa: E731
    want_loss = sum_loss(model(x), target)
    want_loss.backward()
    want = grads(model)
    model.zero_grad()
    pipe = make_pipeline(model, ["cpu", "cpu"], chunks=4, balance=[3, 3], schedule="1f1b")
    loss = pipe.train_step(x, target, sum_loss, loss_reduction="sum")
    torch.testing.assert_close(loss, want_loss.detach(), rtol=1e-5, atol=1e-5)
    assert_grads_close(grads(model), want, atol=1e-4)


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_dropout_agrees_with_micro_batched_baseline(schedule, checkpoint, make_pipeline):
    model = mlp(seed=3, dropout=0.5).train()
    x, target = torch.randn(12, 8), torch.randn(12, 3)
    chunks = 4

    torch.manual_seed(10)
    nn.functional.mse_loss(micro_batched(model, x, chunks), target).backward()
    want = grads(model)
    model.zero_grad()

    # The dropout (child 2) sits alone in the middle stage: its masks come from the global
    # generator in micro-batch order, as in the baseline.
    pipe = make_pipeline(model, ["cpu"] * 3, chunks=chunks, balance=[2, 1, 4], schedule=schedule,
                         checkpoint=checkpoint)
    torch.manual_seed(10)
    pipe.train_step(x, target, nn.functional.mse_loss)
    assert_grads_close(grads(model), want)


def test_eval_and_no_grad_keep_nothing_for_backward(make_pipeline):
    model = mlp(seed=4)
    pipe = make_pipeline(model, ["cpu", "cpu"], chunks=2, balance=[3, 3])
    x = torch.randn(6, 8)
    with torch.no_grad():
        out = pipe(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, model(x).detach())
    pipe.eval()
    assert not any(m.training for m in model.children())


class TwoInputs(nn.Module):
    def forward(self, inputs):
        x, scale = inputs
        return x * scale, x.sum(1, keepdim=True)


class Merge(nn.Module):
    def forward(self, inputs):
        a, b = inputs
        return a + b


def test_multi_input_stages_and_no_chunk(make_pipeline):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Identity(), TwoInputs(), Merge(), nn.Linear(4, 2))
    x = torch.randn(6, 4, requires_grad=True)
    scale = torch.randn(4, requires_grad=True)
    want = model((x, scale))
    want.sum().backward()
    want_x, want_scale = x.grad.clone(), scale.grad.clone()
    x.grad = scale.grad = None

    pipe = make_pipeline(model, ["cpu", "cpu", "cpu"], chunks=3, balance=[2, 1, 1])
    out = pipe(x, sp.NoChunk(scale))
    torch.testing.assert_close(out, want)
    out.sum().backward()
    torch.testing.assert_close(x.grad, want_x)
    torch.testing.assert_close(scale.grad, want_scale)


def test_deferred_batch_norm_matches_one_full_batch_step(make_pipeline):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 2))
    reference = nn.Sequential(*[m for m in copy.deepcopy(model)])
    x = torch.randn(8, 3, 8, 8)
    reference(x)  # one full-batch training step's statistics

    pipe = make_pipeline(model, ["cpu", "cpu"], chunks=4, balance=[2, 3], deferred_batch_norm=True,
                         checkpoint="always")
    pipe(x).sum().backward()  # recomputation must not count twice
    bn, ref_bn = model[1], reference[1]
    assert isinstance(bn, sp.DeferredBatchNorm)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 1
    assert list(pipe.state_dict()) == list(reference.state_dict())


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_deferred_batch_norm_deeper_layer_gets_full_batch_statistics_of_its_inputs(
        schedule, make_pipeline):
    torch.manual_seed(17)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    fresh = copy.deepcopy(model[4])
    pipe = make_pipeline(model, ["cpu", "cpu"], chunks=4, balance=[3, 4], schedule=schedule,
                         deferred_batch_norm=True)
    seen = []
    model[4].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    x, y = torch.randn(8, 3, 8, 8), torch.randn(8, 2)
    pipe.train_step(x, y, nn.functional.mse_loss)
    # The second batch norm saw the first one's per-micro-batch output; one full-batch step
    # of a plain BatchNorm2d on exactly those inputs gives the statistics it must hold.
    fresh(torch.cat(seen))
    torch.testing.assert_close(model[4].running_mean, fresh.running_mean)
    torch.testing.assert_close(model[4].running_var, fresh.running_var)


def test_state_dict_round_trip():
    model = mlp(seed=7)
    pipe = sp.Pipeline(mlp(seed=8), ["cpu", "cpu"], balance=[3, 3])
    assert list(pipe.state_dict()) == list(model.state_dict())
    pipe.load_state_dict(model.state_dict())
    for (k, a), (k2, b) in zip(pipe.state_dict().items(), model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    other = mlp(seed=9)
    other.load_state_dict(pipe.state_dict())
    x = torch.randn(4, 8)
    torch.testing.assert_close(other(x), pipe(x).detach())


def test_interleaved_places_stages_round_robin():
    model = mlp(seed=10)
    pipe = sp.Pipeline(model, ["cpu", "cpu"], chunks=4, balance=[2, 1, 2, 1],
                       schedule="interleaved")
    assert len(pipe.stages) == 4 and pipe.balance == [2, 1, 2, 1]
    assert pipe.devices == [torch.device("cpu")] * 4
    x = torch.randn(8, 8)
    torch.testing.assert_close(pipe(x), model(x))
    assert "stage 3 on cpu" in repr(pipe)


def test_trace_records_every_task(make_pipeline):
    pipe = make_pipeline(mlp(seed=11), ["cpu", "cpu"], chunks=4, balance=[3, 3], schedule="1f1b")
    x, t = torch.randn(8, 8), torch.randn(8, 3)
    with pipe.record_trace() as trace:
        pipe.train_step(x, t, nn.functional.mse_loss)
    tasks = {(e["stage"], e["micro_batch"], e["phase"]) for e in trace.events}
    assert tasks == {(s, i, p) for s in range(2) for i in range(4) for p in ("forward", "backward")}
    assert 0.0 <= trace.bubble_fraction() < 1.0
    assert trace.to_chrome()["traceEvents"]


def test_a_frozen_model_gives_an_output_without_grad(make_pipeline):
    model = mlp()
    model.requires_grad_(False)
    pipe = make_pipeline(model, ["cpu", "cpu"], chunks=2, balance=[3, 3])
    assert not pipe(torch.randn(4, 8)).requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        pipe.train_step(torch.randn(4, 8), torch.randn(4, 3), nn.functional.mse_loss)
