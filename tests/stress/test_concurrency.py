"""Pipelines driven from several threads at once, from a thread other than their builder's,
and built and dropped while another trains: all correct."""

import copy
import threading

import torch
from torch import nn

import shardpipe as sp


def small(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 2))


def grads_of(model, x, y, chunks):
    for part, target in zip(x.chunk(chunks), y.chunk(chunks)):
        (nn.functional.mse_loss(model(part), target) / chunks).backward()
    return [p.grad.clone() for p in model.parameters()]


def run_threads(*targets, timeout=120):
    errors = []

    def guarded(target):
        try:
            target()
        except BaseException as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(t,), daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread hangs"
    assert not errors, errors


def check_training(pipe, model, seed, steps=30):
    # A generator of its own: the threads must not race on the global one.
    generator = torch.Generator().manual_seed(seed + 100)
    x, y = torch.randn(8, 8, generator=generator), torch.randn(8, 2, generator=generator)
    want = grads_of(copy.deepcopy(model), x, y, 4)
    for _ in range(steps):
        model.zero_grad()
        pipe.train_step(x, y, nn.functional.mse_loss)
        for got, w in zip(model.parameters(), want):
            torch.testing.assert_close(got.grad, w, atol=1e-5, rtol=1e-4)


def test_two_pipelines_from_two_threads_at_once():
    models = [small(0), small(1)]
    pipes = [sp.Pipeline(m, ["cpu", "cpu"], chunks=4, schedule="1f1b") for m in models]
    run_threads(*[lambda k=k: check_training(pipes[k], models[k], k) for k in range(2)])


def test_a_pipeline_called_from_another_thread_than_its_builder():
    model = small(2)
    pipe = sp.Pipeline(model, ["cpu", "cpu"], chunks=4, checkpoint="always")
    run_threads(lambda: check_training(pipe, model, 2))


def test_pipelines_built_and_dropped_while_another_trains():
    model = small(3)
    pipe = sp.Pipeline(model, ["cpu", "cpu"], chunks=4)

    def churn():
        for _ in range(40):
            other = sp.Pipeline(small(4), ["cpu"] * 3, chunks=2)
            other(torch.randn(4, 8)).sum().backward()
            del other

    run_threads(lambda: check_training(pipe, model, 3, steps=60), churn)
