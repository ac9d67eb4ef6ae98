"""Running ``check_*`` functions on several gloo ranks on loopback, for the multi-process tests.

One spawn per world size runs every check of a test module on all ranks (starting processes
is the slow part), a barrier before each; every rank writes what each check raised (None:
passed) to a JSON file, and the test of each check reports its own result. The whole spawn
has a deadline after which the ranks are killed, and every collective a timeout, so a hang
fails the test instead of stalling CI.
"""

import datetime
import importlib
import json
import os
import pathlib
import signal
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

REPO = pathlib.Path(__file__).resolve().parents[2]
COLLECTIVE_TIMEOUT_S = 60


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_loopback(rank, world, port):
    """Joins the gloo group of ``world`` ranks on 127.0.0.1:``port``."""
    sys.path.insert(0, str(REPO / "python"))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}",
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )


def _run_checks(rank, world, port, out_dir, module_name, checks):
    init_loopback(rank, world, port)
    module = importlib.import_module(module_name)
    results = {}
    path = pathlib.Path(out_dir, f"rank{rank}.json")
    for name in checks:
        # Written before and after each check: a rank that is killed or hangs still tells
        # which check it was in.
        results[name] = "started, never finished"
        path.write_text(json.dumps(results))
        dist.barrier()
        try:
            getattr(module, name)(rank, world)
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc()
        path.write_text(json.dumps(results))
    dist.destroy_process_group()


def spawn(fn, world, args, timeout_s):
    """Runs ``fn(rank, *args)`` on ``world`` spawned processes and waits for all of them (one
    that dies does not end the others: they must notice by themselves); kills them and fails
    the test when they have not all finished within ``timeout_s``. Returns their exit codes."""
    context = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.is_alive() for p in context.processes):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} ranks did not finish within {timeout_s} s")
            time.sleep(0.2)
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(5)
    return [p.exitcode for p in context.processes]


def run_checks(module_name, checks, world, out_dir, timeout_s):
    """Every check of ``module_name`` on ``world`` ranks; per rank, what each raised."""
    spawn(_run_checks, world, (world, free_port(), str(out_dir), module_name, checks), timeout_s)
    results = []
    for r in range(world):
        path = pathlib.Path(out_dir) / f"rank{r}.json"
        results.append(json.loads(path.read_text()) if path.exists() else {})
    return results


def checks_fixture(module_name, checks, worlds, timeout_s):
    """A module-scoped pytest fixture running the checks of ``module_name`` once per world
    size of ``worlds``: ``checks`` is a list run on every world, or a dict of world size to
    its own list (then parametrize the tests with ``cases``). A test module assigns it to
    ``results`` and asserts per check with ``assert_passed``."""

    @pytest.fixture(scope="module", params=worlds, ids=lambda w: f"world{w}")
    def results(request, tmp_path_factory):
        world = request.param
        chosen = checks[world] if isinstance(checks, dict) else checks
        out_dir = tmp_path_factory.mktemp(f"world{world}")
        return run_checks(module_name, chosen, world, out_dir, timeout_s)

    return results


def cases(checks_by_world):
    """``pytest.param(world, check)`` for every check of every world, for
    ``parametrize("results,check", cases(...), indirect=["results"])``."""
    return [pytest.param(world, check, id=f"world{world}-{check}")
            for world, checks in checks_by_world.items() for check in checks]


def assert_passed(results, check):
    failures = [
        f"--- rank {rank} ---\n{res[check]}" for rank, res in enumerate(results)
        if res.get(check, "did not run") is not None
    ]
    assert not failures, "\n".join(failures)


class KillRank1(nn.Module):
    """A block that kills its own process on global rank 1 (SIGKILL: no cleanup, no message)."""

    def forward(self, x):
        if dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return x


def record_outcome(out_dir, rank, step):
    """Runs ``step()`` and writes "returned", or "<seconds> s: <message>" for the RuntimeError
    it raised, to ``out_dir/rank<rank>.txt``; then leaves the process at once (a process
    group with a dead peer cannot be torn down)."""
    start = time.monotonic()
    try:
        step()
        outcome = "returned"
    except RuntimeError as error:
        outcome = f"{time.monotonic() - start:.1f} s: {error}"
    pathlib.Path(out_dir, f"rank{rank}.txt").write_text(outcome)
    os._exit(0)


def assert_survivor_raised(out_dir, codes, naming, within_s=15):
    """Rank 1 was killed and rank 0 raised within ``within_s`` seconds, its error containing
    ``naming``."""
    assert codes[1] == -signal.SIGKILL, codes
    outcome = pathlib.Path(out_dir, "rank0.txt").read_text()
    seconds = float(outcome.split(" s:")[0]) if " s:" in outcome else None
    assert seconds is not None and seconds < within_s, outcome
    assert naming in outcome, outcome
