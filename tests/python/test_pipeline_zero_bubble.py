"""Zero-bubble schedules (zb1p, zbv) against baselines computed in the same test.

Every test runs under both of the engine's thread modes: the workers (stages at the same
time) and the caller's thread (the lists interleaved in a ready order).
"""

import copy
import itertools
import threading

import pytest
import torch
from torch import nn

import shardpipe as sp

CHECKPOINTS = ["never", "except_last", "always"]
THREADS = ["workers", "caller"]
ZB = ["zb1p", "zbv"]


def mlp(seed=0, width=16, dropout=None):
    torch.manual_seed(seed)
    layers = [nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.GELU(),
              nn.Linear(width, width), nn.Linear(width, 3)]
    if dropout is not None:
        layers.insert(2, nn.Dropout(dropout))
    return nn.Sequential(*layers)


def layout(schedule, blocks):
    """devices and balance: zb1p and 1f1b on 3 CPU stages, zbv on 2 CPU devices (4 stages)."""
    stages = 4 if schedule == "zbv" else 3
    base, extra = divmod(blocks, stages)
    balance = [base + (1 if s < extra else 0) for s in range(stages)]
    return ["cpu"] * (2 if schedule == "zbv" else 3), balance


def pipeline(model, schedule, threads, **kwargs):
    devices, balance = layout(schedule, len(model))
    kwargs.setdefault("balance", balance)
    pipe = sp.Pipeline(model, devices, schedule=schedule, **kwargs)
    pipe._engine.threads = threads
    return pipe


def micro_batched(model, x, chunks):
    """The baseline: the same model run on the same micro-batches one after another."""
    return torch.cat([model(part) for part in x.chunk(chunks)])


def take_grads(model, x=None):
    out = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    if x is not None:
        out.append(x.grad.clone())
        x.grad = None
    return out


def assert_grads_close(got, want):
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g is not None and w is not None, k
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("chunks", [1, 4, 7])
@pytest.mark.parametrize("schedule,checkpoint", list(itertools.product(ZB, CHECKPOINTS)))
def test_gradients_equal_the_micro_batched_baseline_and_1f1b(schedule, checkpoint, chunks,
                                                             threads):
    model = mlp(seed=1)
    x = torch.randn(10, 8, requires_grad=True)  # 10 does not divide by 4 or 7
    target = torch.randn(10, 3)
    loss_fn = nn.functional.mse_loss

    want_loss = loss_fn(micro_batched(model, x, chunks), target)
    want_loss.backward()
    want = take_grads(model, x)

    onefb = pipeline(model, "1f1b", threads, chunks=chunks, checkpoint=checkpoint)
    onefb.train_step(x, target, loss_fn)
    assert_grads_close(take_grads(model, x), want)
    onefb.close()

    pipe = pipeline(model, schedule, threads, chunks=chunks, checkpoint=checkpoint)
    loss = pipe.train_step(x, target, loss_fn)
    torch.testing.assert_close(loss, want_loss.detach())
    assert_grads_close(take_grads(model, x), want)
    # pipe(x) with loss.backward(): the backward phase runs the schedule's B and W tasks.
    loss_fn(pipe(x), target).backward()
    assert_grads_close(take_grads(model, x), want)


class Twice(nn.Module):
    """One nn.Linear applied twice: its weight gets two contributions per micro-batch."""

    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return self.linear(torch.tanh(self.linear(x)))


class TwoOutputs(torch.autograd.Function):
    """A custom op with two outputs that both use a weight."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return x @ weight, (x * x) @ weight

    @staticmethod
    def backward(ctx, ga, gb):
        x, weight = ctx.saved_tensors
        gx = ga @ weight.t() + 2 * x * (gb @ weight.t())
        gw = x.t() @ ga + (x * x).t() @ gb
        return gx, gw


class SplitAndCustom(nn.Module):
    """torch.chunk of a Linear's output, and a two-output custom Function with a weight."""

    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, 2 * width)
        self.weight = nn.Parameter(torch.randn(width, width) / width)

    def forward(self, x):
        a, b = self.linear(x).chunk(2, dim=1)
        c, d = TwoOutputs.apply(a * torch.sigmoid(b), self.weight)
        return c + torch.tanh(d)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("schedule", ZB)
@pytest.mark.parametrize("block", [Twice, SplitAndCustom])
def test_weights_used_twice_and_ops_with_several_outputs(block, schedule, threads):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 8), block(8), nn.Tanh(), block(8), nn.Linear(8, 8),
                          nn.Linear(8, 3))
    x, target = torch.randn(9, 8, requires_grad=True), torch.randn(9, 3)
    nn.functional.mse_loss(micro_batched(model, x, 4), target).backward()
    want = take_grads(model, x)
    for checkpoint in ("never", "always"):
        pipe = pipeline(model, schedule, threads, chunks=4, checkpoint=checkpoint)
        pipe.train_step(x, target, nn.functional.mse_loss)
        assert_grads_close(take_grads(model, x), want)
        pipe.close()


class Hooked(nn.Module):
    """A Linear whose output (its addmm is a weight node) has a hook that scales its gradient
    and counts its calls, and keeps its gradient (retain_grad): each must act once."""

    def __init__(self, width, record):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.record = record

    def forward(self, x):
        h = self.linear(x)
        if h.requires_grad:
            h.retain_grad()
            # Per layer: its forwards come in micro-batch order, whatever the threads.
            self.record["retained"].setdefault(id(self), []).append(h)

            def hook(grad):
                self.record["calls"] += 1
                return grad * 3

            h.register_hook(hook)
        return torch.tanh(h)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("schedule", ZB)
def test_hooks_on_what_feeds_a_weight_act_once(schedule, threads):
    results = {}
    for name in ("1f1b", schedule):
        record = {"calls": 0, "retained": {}}
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(8, 8), Hooked(8, record), nn.Linear(8, 8),
                              Hooked(8, record), nn.Linear(8, 3))
        x, target = torch.randn(8, 8), torch.randn(8, 3)
        pipe = pipeline(model, name, threads, chunks=4)
        pipe.train_step(x, target, nn.functional.mse_loss)
        retained = [h.grad for layer in (model[1], model[3])
                    for h in record["retained"][id(layer)]]
        results[name] = (record["calls"], retained, take_grads(model))
        pipe.close()
    calls, retained, grads = results["1f1b"]
    assert calls == 8  # two hooked layers x four micro-batches
    assert results[schedule][0] == calls
    for got, want in zip(results[schedule][1], retained):
        torch.testing.assert_close(got, want)
    assert_grads_close(results[schedule][2], grads)


def bn_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8),
                         nn.BatchNorm1d(8), nn.Linear(8, 3))


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("schedule", ZB)
def test_batch_norm_equals_the_micro_batched_baseline(schedule, threads):
    x, target = torch.randn(12, 8), torch.randn(12, 3)
    baseline = bn_model(3).train()
    nn.functional.mse_loss(micro_batched(baseline, x, 4), target).backward()
    want = take_grads(baseline)

    model = bn_model(3).train()
    pipe = pipeline(model, schedule, threads, chunks=4)
    pipe.train_step(x, target, nn.functional.mse_loss)
    assert_grads_close(take_grads(model), want)
    # Running statistics were updated per micro-batch, in micro-batch order, as the baseline's.
    for got, ref in zip(model.modules(), baseline.modules()):
        if isinstance(got, nn.BatchNorm1d):
            torch.testing.assert_close(got.running_mean, ref.running_mean)
            torch.testing.assert_close(got.running_var, ref.running_var)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("schedule", ZB)
def test_deferred_batch_norm_with_recomputation(schedule, threads):
    x, target = torch.randn(12, 8), torch.randn(12, 3)
    reference = bn_model(4).train()
    full = copy.deepcopy(reference)
    full(x)  # one full-batch step's running statistics (of the first batch norm's input)
    nn.functional.mse_loss(micro_batched(reference, x, 4), target).backward()
    want = take_grads(reference)

    model = bn_model(4).train()
    pipe = pipeline(model, schedule, threads, chunks=4, checkpoint="always",
                    deferred_batch_norm=True)
    pipe.train_step(x, target, nn.functional.mse_loss)  # recomputation must not count twice
    assert_grads_close(take_grads(model), want)
    bn, ref_bn = model[1], full[1]
    assert isinstance(bn, sp.DeferredBatchNorm)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
@pytest.mark.parametrize("schedule", ZB)
def test_dropout_under_recomputation_agrees_with_the_baseline(schedule, checkpoint, threads):
    model = mlp(seed=5, dropout=0.5).train()  # 7 children, the dropout is child 2
    x, target = torch.randn(12, 8), torch.randn(12, 3)
    torch.manual_seed(10)
    nn.functional.mse_loss(micro_batched(model, x, 4), target).backward()
    want = take_grads(model)

    # The dropout sits alone in stage 1; no other stage draws random numbers, so its masks
    # come from the generator in micro-batch order, as in the baseline.
    balance = [2, 1, 1, 3] if schedule == "zbv" else [2, 1, 4]
    pipe = pipeline(model, schedule, threads, chunks=4, balance=balance, checkpoint=checkpoint)
    torch.manual_seed(10)
    pipe.train_step(x, target, nn.functional.mse_loss)
    assert_grads_close(take_grads(model), want)


class LiveSaved:
    """Micro-batches that still have a tensor saved for backward at a point of the model:
    counted from the first tensor saved there until the last of them is freed, which is when
    the stage's graph lets go of it (after B in 1F1B, after W in the zero-bubble schedules)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.saved = {}  # forward call -> its tensors still saved
        self.peak = 0

    @property
    def alive(self):
        return len(self.saved)

    def pack(self, call, tensor):
        with self.lock:
            self.saved[call] = self.saved.get(call, 0) + 1
            self.peak = max(self.peak, len(self.saved))
        return _Packed(self, call, tensor)

    def freed(self, call):
        with self.lock:
            self.saved[call] -= 1
            if not self.saved[call]:
                del self.saved[call]


class _Packed:
    def __init__(self, count, call, tensor):
        self.count, self.call, self.tensor = count, call, tensor

    def __del__(self):
        self.count.freed(self.call)


class Saved(nn.Module):
    """Runs `module`, counting its saved tensors' micro-batches in `count`."""

    def __init__(self, count, module):
        super().__init__()
        self.count, self.module = count, module

    def forward(self, x):
        call = object()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: self.count.pack(call, t),
                                                      lambda packed: packed.tensor):
            return self.module(x)


def counted_pipeline(schedule, devices, chunks, threads):
    """A Linear per stage (two per 1f1b stage where zbv has half-size stages), each counted
    on its device's LiveSaved."""
    stages = 2 * devices if schedule in ("zbv", "1f1b-halves") else devices
    counts = [LiveSaved() for _ in range(devices)]
    device_of = (lambda s: s if s < devices else 2 * devices - 1 - s) if schedule == "zbv" \
        else (lambda s: s // 2) if schedule == "1f1b-halves" else (lambda s: s)
    layers = [Saved(counts[device_of(s)], nn.Linear(4, 4)) for s in range(stages)]
    name = "1f1b" if schedule == "1f1b-halves" else schedule
    balance = [2] * devices if schedule == "1f1b-halves" else [1] * stages
    pipe = sp.Pipeline(nn.Sequential(*layers), ["cpu"] * devices, chunks=chunks,
                       balance=balance, schedule=name)
    pipe._engine.threads = threads
    x, y = torch.randn(2 * chunks, 4), torch.randn(2 * chunks, 4)
    pipe.train_step(x, y, nn.functional.mse_loss)
    pipe.close()
    assert all(c.alive == 0 for c in counts), schedule
    return [c.peak for c in counts]


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("devices", [2, 3, 4])
@pytest.mark.parametrize("chunks", [8, 16])
def test_live_activations_per_stage_stay_within_1f1bs_peak(devices, chunks, threads):
    """1F1B keeps devices - d micro-batches on stage d, so `devices` at most, on its first
    stage. ZB-H1 (as in Qi et al.) lets every stage hold that many to delay its weight
    gradients, never more; ZB-V does the same with half-size stages."""
    onefb = counted_pipeline("1f1b", devices, chunks, threads)
    assert onefb == [devices - d for d in range(devices)]
    zb1p = counted_pipeline("zb1p", devices, chunks, threads)
    assert max(zb1p) == max(onefb) and all(p <= max(onefb) for p in zb1p), (zb1p, onefb)

    halves = counted_pipeline("1f1b-halves", devices, chunks, threads)  # two Linears a stage
    zbv = counted_pipeline("zbv", devices, chunks, threads)
    assert max(halves) == 2 * devices
    assert all(p <= max(halves) for p in zbv), (zbv, halves)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("schedule", ZB)
def test_an_error_in_w_keeps_its_type_and_says_where(schedule, fused, threads):
    model = mlp(seed=6)
    pipe = pipeline(model, schedule, threads, chunks=3)
    x, target = torch.randn(6, 8), torch.randn(6, 3)

    def explode(grad):  # a parameter's hook runs when its gradient accumulates: in W
        raise ZeroDivisionError("no weight gradient today")

    handle = model[2].weight.register_hook(explode)  # stage 1 in both layouts
    with pytest.raises(ZeroDivisionError, match=r"stage 1, micro-batch \d \(weight\)"):
        if fused:
            pipe.train_step(x, target, nn.functional.mse_loss)
        else:
            nn.functional.mse_loss(pipe(x), target).backward()
    handle.remove()
    model.zero_grad()
    nn.functional.mse_loss(micro_batched(model, x, 3), target).backward()
    want = take_grads(model)
    pipe.train_step(x, target, nn.functional.mse_loss)  # still usable, and right
    assert_grads_close(take_grads(model), want)


@pytest.mark.parametrize("schedule", ZB)
def test_trace_records_every_weight_task(schedule):
    pipe = pipeline(mlp(seed=7), schedule, "workers", chunks=4)
    with pipe.record_trace() as trace:
        pipe.train_step(torch.randn(8, 8), torch.randn(8, 3), nn.functional.mse_loss)
    stages = len(pipe.stages)
    tasks = {(e["stage"], e["micro_batch"], e["phase"]) for e in trace.events}
    assert tasks == {(s, i, p) for s in range(stages) for i in range(4)
                     for p in ("forward", "backward", "weight")}
    assert {e["name"][0] for e in trace.to_chrome()["traceEvents"]} == {"F", "B", "W"}


def test_zbv_places_stages_in_a_v_and_defaults_to_two_per_device():
    assert sp._C.place("zbv", 4, ["cuda:0", "cuda:1"]) == (
        ["cuda:0", "cuda:1", "cuda:1", "cuda:0"], 2)
    pipe = sp.Pipeline(mlp(seed=8), ["cpu", "cpu"], chunks=2, schedule="zbv")
    assert len(pipe.stages) == 4 and len(pipe.balance) == 4
    x = torch.randn(4, 8)
    torch.testing.assert_close(pipe(x), pipe.stages[3](pipe.stages[2](
        pipe.stages[1](pipe.stages[0](x)))))


@pytest.mark.parametrize("kwargs,match", [
    (dict(schedule="zbv", balance=[3, 3]), r"balance needs two stages per device"),
    (dict(schedule="zbv", balance=[2, 2, 2]), r"balance needs two stages per device"),
    (dict(schedule="zb1p", balance=[2, 2, 2]), "balance"),
    (dict(schedule="zbv", devices=["cpu"] * 4, balance=None), r"zbv.*children"),
])
def test_bad_balances_name_the_argument(kwargs, match):
    args = dict(devices=["cpu", "cpu"], balance=[3, 3])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sp.Pipeline(mlp(), **args)


def test_schedule_names_come_from_the_core():
    assert {"zb1p", "zbv"} <= set(sp._C.schedule_names())
    with pytest.raises(ValueError, match="zb1p"):
        sp.Pipeline(mlp(), ["cpu", "cpu"], balance=[3, 3], schedule="zb2p")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("checkpoint", ["never", "always"])
@pytest.mark.parametrize("schedule", ZB)
def test_stages_on_one_gpu_equal_the_micro_batched_baseline(schedule, checkpoint):
    # Both devices are cuda:0: pipe(x)'s backward runs on autograd's cuda:0 thread, which
    # must run every stage's B and W itself (the CUDA trap in ARCHITECTURE).
    model = mlp(seed=9).cuda()
    x = torch.randn(10, 8, device="cuda", requires_grad=True)
    target = torch.randn(10, 3, device="cuda")
    nn.functional.mse_loss(micro_batched(model, x, 4), target).backward()
    want = take_grads(model, x)
    balance = [2, 1, 2, 1] if schedule == "zbv" else [3, 3]
    pipe = sp.Pipeline(model, ["cuda:0", "cuda:0"], chunks=4, balance=balance,
                       schedule=schedule, checkpoint=checkpoint)
    pipe.train_step(x, target, nn.functional.mse_loss)
    assert_grads_close(take_grads(model, x), want)
    nn.functional.mse_loss(pipe(x), target).backward()
    assert_grads_close(take_grads(model, x), want)
