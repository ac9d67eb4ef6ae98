"""Pipeline against single-device baselines computed in the same test."""

import gc
import itertools
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from torch import nn

import shardpipe as sp

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


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_forward_equals_module_for_every_chunk_count(stages):
    model = mlp().eval()
    x = torch.randn(7, 8)
    want = model(x)
    devices, balance = layout("gpipe", stages)
    for chunks in range(1, x.shape[0] + 2):
        pipe = sp.Pipeline(model, devices, chunks=chunks, balance=balance)
        torch.testing.assert_close(pipe(x), want, atol=1e-6, rtol=1e-5)
        pipe.close()


@pytest.mark.parametrize("schedule,checkpoint", list(itertools.product(SCHEDULES, CHECKPOINTS)))
@pytest.mark.parametrize("chunks", [1, 3, 8])
def test_backward_equals_module(schedule, checkpoint, chunks):
    model = mlp(seed=1)
    x = torch.randn(10, 8, requires_grad=True)  # 10 does not divide by 3 or 8
    target = torch.randn(10, 3)

    loss = nn.functional.mse_loss(model(x), target)
    loss.backward()
    want, want_x = grads(model), x.grad.clone()
    model.zero_grad()
    x.grad = None

    devices, balance = layout(schedule, 4 if schedule == "interleaved" else 3)
    pipe = sp.Pipeline(model, devices, chunks=chunks, balance=balance, schedule=schedule,
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
def test_train_step_keeps_activations_within_each_schedules_bound(devices, chunks):
    """gpipe keeps every micro-batch alive; 1F1B at most stages - s on stage s; interleaved
    (two virtual stages per device) at most 2 (devices - d - 1) + devices + 1 on device d,
    whatever the number of micro-batches."""
    x, y = torch.randn(2 * chunks, 4), torch.randn(2 * chunks, 4)
    for schedule, virtual in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
        counts = [LiveCount() for _ in range(devices)]
        layers = []
        for s in range(devices * virtual):  # counted after a Linear: its output needs grad
            layers += [nn.Linear(4, 4), Counted(counts[s % devices])]
        pipe = sp.Pipeline(nn.Sequential(*layers), ["cpu"] * devices, chunks=chunks,
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


def test_train_step_sum_reduction():
    model = mlp(seed=2)
    x, target = torch.randn(9, 8), torch.randn(9, 3)
    sum_loss = lambda out, t: ((out - t) ** 2).sum()  # noqa: E731
    want_loss = sum_loss(model(x), target)
    want_loss.backward()
    want = grads(model)
    model.zero_grad()
    pipe = sp.Pipeline(model, ["cpu", "cpu"], chunks=4, balance=[3, 3], schedule="1f1b")
    loss = pipe.train_step(x, target, sum_loss, loss_reduction="sum")
    torch.testing.assert_close(loss, want_loss.detach(), rtol=1e-5, atol=1e-5)
    assert_grads_close(grads(model), want, atol=1e-4)


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_dropout_agrees_with_micro_batched_baseline(schedule, checkpoint):
    model = mlp(seed=3, dropout=0.5).train()
    x, target = torch.randn(12, 8), torch.randn(12, 3)
    chunks = 4

    torch.manual_seed(10)
    nn.functional.mse_loss(micro_batched(model, x, chunks), target).backward()
    want = grads(model)
    model.zero_grad()

    # The dropout (child 2) sits alone in the middle stage: its masks come from the global
    # generator in micro-batch order, as in the baseline.
    pipe = sp.Pipeline(model, ["cpu"] * 3, chunks=chunks, balance=[2, 1, 4], schedule=schedule,
                       checkpoint=checkpoint)
    torch.manual_seed(10)
    pipe.train_step(x, target, nn.functional.mse_loss)
    assert_grads_close(grads(model), want)


def test_eval_and_no_grad_keep_nothing_for_backward():
    model = mlp(seed=4)
    pipe = sp.Pipeline(model, ["cpu", "cpu"], chunks=2, balance=[3, 3])
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


def test_multi_input_stages_and_no_chunk():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Identity(), TwoInputs(), Merge(), nn.Linear(4, 2))
    x = torch.randn(6, 4, requires_grad=True)
    scale = torch.randn(4, requires_grad=True)
    want = model((x, scale))
    want.sum().backward()
    want_x, want_scale = x.grad.clone(), scale.grad.clone()
    x.grad = scale.grad = None

    pipe = sp.Pipeline(model, ["cpu", "cpu", "cpu"], chunks=3, balance=[2, 1, 1])
    out = pipe(x, sp.NoChunk(scale))
    torch.testing.assert_close(out, want)
    out.sum().backward()
    torch.testing.assert_close(x.grad, want_x)
    torch.testing.assert_close(scale.grad, want_scale)


def test_deferred_batch_norm_matches_one_full_batch_step():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 2))
    reference = nn.Sequential(*[m for m in __import__("copy").deepcopy(model)])
    x = torch.randn(8, 3, 8, 8)
    reference(x)  # one full-batch training step's statistics

    pipe = sp.Pipeline(model, ["cpu", "cpu"], chunks=4, balance=[2, 3], deferred_batch_norm=True,
                       checkpoint="always")
    pipe(x).sum().backward()  # recomputation must not count twice
    bn, ref_bn = model[1], reference[1]
    assert isinstance(bn, sp.DeferredBatchNorm)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 1
    assert list(pipe.state_dict()) == list(reference.state_dict())


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_deferred_batch_norm_deeper_layer_gets_full_batch_statistics_of_its_inputs(schedule):
    torch.manual_seed(17)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    fresh = __import__("copy").deepcopy(model[4])
    pipe = sp.Pipeline(model, ["cpu", "cpu"], chunks=4, balance=[3, 4], schedule=schedule,
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


def test_trace_records_every_task():
    pipe = sp.Pipeline(mlp(seed=11), ["cpu", "cpu"], chunks=4, balance=[3, 3], schedule="1f1b")
    x, t = torch.randn(8, 8), torch.randn(8, 3)
    with pipe.record_trace() as trace:
        pipe.train_step(x, t, nn.functional.mse_loss)
    tasks = {(e["stage"], e["micro_batch"], e["phase"]) for e in trace.events}
    assert tasks == {(s, i, p) for s in range(2) for i in range(4) for p in ("forward", "backward")}
    assert 0.0 <= trace.bubble_fraction() < 1.0
    assert trace.to_chrome()["traceEvents"]


class Explode(nn.Module):
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


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_stage_error_in_forward_keeps_its_type_and_says_where(schedule):
    model = nn.Sequential(nn.Linear(8, 8), Explode(on_call=2), nn.Linear(8, 8), nn.Tanh())
    devices = ["cpu", "cpu"] if schedule == "interleaved" else ["cpu"] * 4
    pipe = sp.Pipeline(model, devices, chunks=3, balance=[1, 1, 1, 1], schedule=schedule)
    start = time.monotonic()
    with pytest.raises(KeyError, match=r"stage 1, micro-batch 1 \(forward\)"):
        pipe(torch.randn(6, 8))
    assert time.monotonic() - start < 1.0
    model[1].on_call = -1
    assert pipe(torch.randn(6, 8)).shape == (6, 8)  # still usable


@pytest.mark.parametrize("fused", [False, True])
def test_stage_error_in_backward_keeps_its_type(fused):
    model = nn.Sequential(nn.Linear(8, 8), Explode(0, backward=True), nn.Linear(8, 8))
    pipe = sp.Pipeline(model, ["cpu"] * 3, chunks=2, balance=[1, 1, 1], schedule="1f1b")
    x, t = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ZeroDivisionError, match=r"stage 1, micro-batch \d \(backward\)"):
        if fused:
            pipe.train_step(x, t, nn.functional.mse_loss)
        else:
            pipe(x).sum().backward()
    model[1].backward = False
    pipe(x).sum().backward()


def test_loss_fn_errors_reach_the_caller():
    pipe = sp.Pipeline(mlp(), ["cpu", "cpu"], chunks=2, balance=[3, 3])
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


def _threads():
    return len(os.listdir("/proc/self/task"))


def test_deleting_a_pipeline_joins_its_threads():
    gc.collect()
    before = _threads()
    pipe = sp.Pipeline(mlp(), ["cpu"] * 3, balance=[2, 2, 2])
    assert _threads() == before + 3
    pipe(torch.randn(2, 8)).sum().backward()
    del pipe
    gc.collect()
    assert _threads() == before


def run_isolated(body, timeout=90):
    """Runs `body` in a fresh interpreter, so that a hang fails this test, not the suite."""
    script = "import threading, time, torch\nfrom torch import nn\nimport shardpipe as sp\n"
    result = subprocess.run([sys.executable, "-c", script + textwrap.dedent(body)],
                            capture_output=True, text=True, timeout=timeout, env={**os.environ})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_backward_after_close_raises_instead_of_hanging():
    pipe = sp.Pipeline(mlp(), ["cpu", "cpu"], chunks=2, balance=[3, 3])
    out = pipe(torch.randn(4, 8))
    pipe.close()
    with pytest.raises(RuntimeError, match="closed"):
        out.sum().backward()
    with pytest.raises(RuntimeError, match="closed"):
        pipe(torch.randn(4, 8))


@pytest.mark.parametrize("where", ["stage", "loss_fn"])
def test_closing_a_pipeline_from_inside_itself_raises_and_it_stays_usable(where):
    class CloseIt(nn.Module):
        def forward(self, x):
            holder[0].close()
            return x

    holder = []
    layers = [nn.Linear(8, 8), CloseIt() if where == "stage" else nn.Identity(), nn.Linear(8, 2)]
    pipe = sp.Pipeline(nn.Sequential(*layers), ["cpu", "cpu"], chunks=2, balance=[1, 2])
    holder.append(pipe)

    def loss_fn(out, target):
        if where == "loss_fn":
            pipe.close()
        return nn.functional.mse_loss(out, target)

    x, y = torch.randn(4, 8), torch.randn(4, 2)
    with pytest.raises(RuntimeError, match="from inside one of its own stages"):
        pipe.train_step(x, y, loss_fn)
    holder[0] = sp.Pipeline(nn.Sequential(nn.Linear(8, 8)), ["cpu"])  # a harmless one to close
    pipe.train_step(x, y, nn.functional.mse_loss)


def test_two_threads_training_through_one_pipeline_do_not_deadlock():
    print(run_isolated("""
        torch.set_num_threads(1)
        pipe = sp.Pipeline(nn.Sequential(*[nn.Linear(4, 4) for _ in range(8)]), ["cpu"] * 8,
                           chunks=1, schedule="1f1b")
        x, y = torch.randn(8, 4), torch.randn(8, 4)
        done = [0, 0]

        def run(k):
            for _ in range(300):
                pipe.train_step(x, y, nn.functional.mse_loss)
                done[k] += 1

        threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert done == [300, 300], done
        print("ok")
    """))


def test_closing_while_another_thread_trains_ends_both():
    out = run_isolated("""
        torch.set_num_threads(1)
        errors = []
        for trial in range(10):
            pipe = sp.Pipeline(nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)]), ["cpu"] * 4,
                               chunks=2, schedule="1f1b")
            x, y = torch.randn(8, 4), torch.randn(8, 4)

            def run():
                try:
                    while True:
                        pipe.train_step(x, y, nn.functional.mse_loss)
                except RuntimeError as error:
                    errors.append(str(error))

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            time.sleep(0.02)
            pipe.close()
            thread.join(10)
            assert not thread.is_alive(), f"trial {trial}: the training thread hangs"
        assert len(errors) == 10 and all("closed" in e for e in errors), errors
        print("ok")
    """)
    assert out.strip() == "ok"


def test_a_pipeline_inside_a_checkpointed_stage_of_another():
    # The outer stage holds the CPU generator's lock while its inner pipeline's workers
    # checkpoint too: they must serialise among themselves instead of waiting for it.
    out = run_isolated("""
        import itertools
        for outer_mode, inner_mode in itertools.product(["never", "always"], repeat=2):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                                  nn.Linear(8, 2))
            x = torch.randn(8, 4, requires_grad=True)
            model(x).sum().backward()
            want = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
            model.zero_grad()
            x.grad = None
            inner = sp.Pipeline(nn.Sequential(model[1], model[2], model[3]), ["cpu", "cpu"],
                                chunks=2, balance=[2, 1], checkpoint=inner_mode)

            class Inner(nn.Module):
                def forward(self, h):
                    return inner(h)

            outer = sp.Pipeline(nn.Sequential(model[0], Inner(), model[4]), ["cpu", "cpu"],
                                chunks=2, balance=[2, 1], checkpoint=outer_mode)
            outer(x).sum().backward()
            got = [p.grad for p in model.parameters()] + [x.grad]
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b)
        print("ok")
    """)
    assert out.strip() == "ok"


def test_a_frozen_model_gives_an_output_without_grad():
    model = mlp()
    model.requires_grad_(False)
    pipe = sp.Pipeline(model, ["cpu", "cpu"], chunks=2, balance=[3, 3])
    assert not pipe(torch.randn(4, 8)).requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        pipe.train_step(torch.randn(4, 8), torch.randn(4, 3), nn.functional.mse_loss)


def test_interpreter_exit_with_live_pipelines_does_not_hang():
    script = textwrap.dedent("""
        import torch, shardpipe as sp
        from torch import nn
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        pipe = sp.Pipeline(model, ["cpu"] * 3, chunks=2, balance=[1, 1, 1])
        out = pipe(torch.randn(4, 4))
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, env={**os.environ})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_resnet_train_mode_equals_micro_batched_baseline_and_eval_equals_model():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(12)
    model = torchvision.models.resnet18(num_classes=5)
    baseline = __import__("copy").deepcopy(model)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 5, (6,))

    nn.functional.cross_entropy(micro_batched(baseline, x, 3), y).backward()
    pipe = sp.Pipeline(sp.sequentialize(model), ["cpu", "cpu"], chunks=3)
    assert list(pipe.state_dict()) == list(baseline.state_dict())
    nn.functional.cross_entropy(pipe(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), baseline.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=name)
    for (name, a), b in zip(pipe.state_dict().items(), baseline.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)  # BN running stats

    pipe.eval()
    baseline.eval()
    with torch.no_grad():
        torch.testing.assert_close(pipe(x), baseline(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_nested_cuts_inside_a_sequential_child_and_keeps_the_keys(schedule):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(15)
    model = torchvision.models.resnet18(num_classes=5)
    baseline = __import__("copy").deepcopy(model)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 5, (6,))
    loss_fn = nn.functional.cross_entropy

    loss_fn(micro_batched(baseline, x, 3), y).backward()
    # 4 stem children + 2 blocks in each of layer1..layer4 + avgpool, flatten, fc: 15 blocks;
    # the stages meet between layer3.0 and layer3.1.
    pipe = sp.Pipeline(model, ["cpu", "cpu"], chunks=3, balance=[9, 6], schedule=schedule,
                       nested=True)
    assert "layer3.0\nstage 1 on cpu: layer3.1," in pipe.extra_repr()
    assert list(pipe.state_dict()) == list(baseline.state_dict())
    assert pipe.stages[0][-1] is model.layer3[0] and pipe.stages[1][0] is model.layer3[1]
    pipe.train_step(x, y, loss_fn)
    for (name, p), q in zip(model.named_parameters(), baseline.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=name)
    for (name, a), b in zip(pipe.state_dict().items(), baseline.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)

    with pytest.raises(ValueError, match="15 blocks"):
        sp.Pipeline(baseline, ["cpu", "cpu"], balance=[6, 5], nested=True)
    # Without nested the same model has 11 children, and the default balance counts blocks.
    assert sum(sp.Pipeline(baseline, ["cpu", "cpu"], nested=True).balance) == 15
    assert sum(sp.Pipeline(baseline, ["cpu", "cpu"]).balance) == 11


def test_nested_leaves_sequential_subclasses_whole():
    class Residual(nn.Sequential):
        def forward(self, x):
            return x + super().forward(x)

    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(4, 4), Residual(nn.Linear(4, 4), nn.ReLU()),
                          nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
    x = torch.randn(8, 4)
    pipe = sp.Pipeline(model, ["cpu", "cpu"], chunks=2, balance=[2, 2], nested=True)
    assert pipe.stages[0][1] is model[1]  # the subclass stays one block
    torch.testing.assert_close(pipe(x), model(x))


def test_vit_class_token_stays_in_the_state_dict():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(13)
    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2,
                                               num_heads=2, hidden_dim=16, mlp_dim=32,
                                               num_classes=3).eval()
    x = torch.randn(4, 3, 16, 16)
    want = vit(x)
    pipe = sp.Pipeline(sp.sequentialize(vit), ["cpu", "cpu"], chunks=2)
    assert list(pipe.state_dict()) == list(vit.state_dict())
    torch.testing.assert_close(pipe(x), want)
    pipe(x).sum().backward()
    assert vit.class_token.grad is not None


class DoubleInPlace(nn.Module):
    def forward(self, x):
        return x.mul_(2)


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_a_stage_may_start_with_an_in_place_layer(checkpoint):
    torch.manual_seed(14)
    # Doubling is not idempotent: a recomputation fed the modified input would be off.
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 8),
                          DoubleInPlace(), nn.Linear(8, 2))
    x = torch.randn(6, 8)
    model(x).sum().backward()
    want = grads(model)
    model.zero_grad()
    pipe = sp.Pipeline(model, ["cpu"] * 3, chunks=3, balance=[1, 2, 2], checkpoint=checkpoint)
    pipe(x).sum().backward()
    assert_grads_close(grads(model), want)
