"""Pipeline lifecycle: worker threads, closing, concurrent callers, interpreter exit and
pipelines inside pipelines; the ones that could hang run in a fresh interpreter."""

import gc
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from pipeline_helpers import mlp, run_isolated
from torch import nn

import shardpipe as sp


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


class Sleep(nn.Module):
    """A task of a few milliseconds: far dearer than handing it to a worker thread."""

    def forward(self, x):
        time.sleep(0.005)
        return x


@pytest.mark.parametrize("layer,chosen", [(nn.Identity, "caller"), (Sleep, "workers")])
def test_auto_threads_follow_the_cost_of_a_task_and_keep_the_workers(layer, chosen):
    gc.collect()
    before = _threads()
    pipe = sp.Pipeline(nn.Sequential(layer(), layer(), layer()), ["cpu"] * 3, chunks=4,
                       balance=[1, 1, 1])
    assert pipe._engine.threads == "auto"
    assert _threads() == before + 3  # the workers exist from the start...
    x = torch.randn(8, 4)
    tried = set()
    for _ in range(4):  # the first calls try both ways and time them...
        torch.testing.assert_close(pipe(x), x)
        tried.add(pipe._engine.last_threads)
    assert tried == {"caller", "workers"}
    for _ in range(2):  # ...then the faster one runs
        torch.testing.assert_close(pipe(x), x)
        assert pipe._engine.last_threads == chosen
    assert _threads() == before + 3  # ...and stay, whichever threads ran the tasks
    pipe.close()


def test_backward_after_close_raises_instead_of_hanging():
    pipe = sp.Pipeline(mlp(), ["cpu", "cpu"], chunks=2, balance=[3, 3])
    out = pipe(torch.randn(4, 8))
    pipe.close()
    with pytest.raises(RuntimeError, match="closed"):
        out.sum().backward()
    with pytest.raises(RuntimeError, match="closed"):
        pipe(torch.randn(4, 8))


@pytest.mark.parametrize("where", ["stage", "loss_fn"])
def test_closing_a_pipeline_from_inside_itself_raises_and_it_stays_usable(where, make_pipeline):
    class CloseIt(nn.Module):
        def forward(self, x):
            holder[0].close()
            return x

    holder = []
    layers = [nn.Linear(8, 8), CloseIt() if where == "stage" else nn.Identity(), nn.Linear(8, 2)]
    pipe = make_pipeline(nn.Sequential(*layers), ["cpu", "cpu"], chunks=2, balance=[1, 2])
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
