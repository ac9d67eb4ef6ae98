"""Reliability report: one table of what the stress suite shows, counted.

- faults: an exception injected at every (stage, micro-batch, phase) of every schedule x
  checkpoint mode x thread mode (tests/stress/faults.py); counted as surfaced correctly (its
  own type, stage and micro-batch named, the pipeline then trains with the baseline's
  gradients), surfaced wrongly, or hung (no answer within --hang-s);
- long runs: training steps of a pipeline and of a tensor-parallel MLP, resident memory and
  thread count after warm-up against the end;
- fuzz: the hypothesis suite (tests/stress/test_fuzz.py) in a child process: cases tried,
  failing (a wrong result or a wrong error), crashed (the process died), hung (timeout);
- faults, many processes: the multi-process fault tests in tests/python (a raising rank at
  each kind of position, a killed rank, ranks that disagree; pipeline over ranks, data
  parallel, tensor parallel over a group) in a child pytest each: passed, failed, hung;
- sanitizers: the GoogleTest suite's last run in build/cmake-address and build/cmake-thread
  (built by ``SHARDPIPE_SANITIZE=address bash scripts/test.sh``), findings counted.

Never fails; it reports. ``--quick`` runs a subset of the fault matrix and shorter runs.

    python benchmarks/reliability_report.py [--quick] [--steps 2000]
"""

import argparse
import functools
import gc
import itertools
import os
import pathlib
import re
import subprocess
import sys
import threading
import time

import torch
from torch import nn

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "stress"))

import faults  # noqa: E402 (tests/stress is put on the path just above)

import shardpipe as sp  # noqa: E402

SCHEDULES = ["gpipe", "1f1b", "interleaved", "zb1p", "zbv"]
CHECKPOINTS = ["never", "except_last", "always"]
THREADS = ["workers", "caller"]


def with_deadline(fn, seconds):
    """Runs ``fn`` on a daemon thread; returns (finished, its result or exception)."""
    box = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as error:  # noqa: BLE001 (reported, not raised)
            box["result"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), box.get("result")


def fault_rows(quick, hang_s):
    rows = {}
    combos = list(itertools.product(SCHEDULES, CHECKPOINTS, THREADS))
    if quick:
        combos = [(s, "except_last", "workers") for s in SCHEDULES]
    for schedule, checkpoint, threads in combos:
        stages = 4 if schedule in ("interleaved", "zbv") else 3
        for position in faults.positions(stages, schedule):
            kind = position[2]
            row = rows.setdefault(kind, {"injected": 0, "surfaced": 0, "wrong": 0, "hung": 0,
                                         "slowest_s": 0.0, "examples": []})
            row["injected"] += 1
            finished, result = with_deadline(
                functools.partial(faults.inject, schedule, checkpoint, threads, stages, position),
                hang_s)
            if not finished:
                row["hung"] += 1
                row["examples"].append(f"{schedule}/{checkpoint}/{threads} {position}: hung")
                continue
            if isinstance(result, BaseException):
                problem, seconds = f"{type(result).__name__}: {result}", 0.0
            else:
                problem, seconds = result
            row["slowest_s"] = max(row["slowest_s"], seconds)
            if problem is None:
                row["surfaced"] += 1
            else:
                row["wrong"] += 1
                row["examples"].append(f"{schedule}/{checkpoint}/{threads} {position}: {problem}")
    return rows


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def thread_count():
    return len(os.listdir("/proc/self/task"))


def drift(step, steps, warmup):
    for _ in range(warmup):
        step()
    gc.collect()
    rss, count = rss_bytes(), thread_count()
    start = time.perf_counter()
    for _ in range(steps - warmup):
        step()
    seconds = time.perf_counter() - start
    gc.collect()
    return (rss_bytes() - rss) / 2**20, thread_count() - count, seconds


def long_run_rows(steps):
    warmup = min(200, steps // 4)
    rows = []
    for threads in THREADS:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                            nn.Linear(32, 4))
        pipe = sp.Pipeline(net, ["cpu", "cpu"], chunks=4, balance=[3, 2], schedule="1f1b",
                           checkpoint="except_last")
        pipe._engine.threads = threads
        optimizer = torch.optim.SGD(pipe.parameters(), lr=1e-3)
        x, y = torch.randn(16, 16), torch.randn(16, 4)

        def step(pipe=pipe, optimizer=optimizer, x=x, y=y):
            optimizer.zero_grad()
            pipe.train_step(x, y, nn.functional.mse_loss)
            optimizer.step()

        rows.append((f"pipeline 2 stages, 1f1b, {threads}", steps, *drift(step, steps, warmup)))
        pipe.close()
    torch.manual_seed(0)
    col = sp.ColumnParallelLinear(16, 32, gather_output=False, devices=["cpu", "cpu"])
    row = sp.RowParallelLinear(32, 16, input_is_parallel=True, devices=["cpu", "cpu"])
    optimizer = torch.optim.SGD(list(col.parameters()) + list(row.parameters()), lr=1e-3)
    x, y = torch.randn(8, 16), torch.randn(8, 16)

    def tp_step():
        optimizer.zero_grad()
        nn.functional.mse_loss(row(torch.tanh(col(x))), y).backward()
        optimizer.step()

    rows.append(("tensor-parallel MLP, 2 shards", steps, *drift(tp_step, steps, warmup)))
    return rows


def fuzz_row(timeout_s, long):
    env = dict(os.environ, SHARDPIPE_STRESS_LONG="1" if long else "0")
    command = [sys.executable, "-m", "pytest", str(REPO / "tests" / "stress" / "test_fuzz.py"),
               "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics"]
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"tried": "?", "failing": "?", "crashed": 0, "hung": 1}
    out = done.stdout + done.stderr
    # hypothesis's statistics, one line per test and phase: "- 93 passing, 0 failing, and 7
    # invalid test cases".
    counts = re.findall(r"(\d+) passing, (\d+) failing, and \d+ invalid test cases", out)
    passing = sum(int(p) for p, _ in counts)
    failing = sum(int(f) for _, f in counts)
    failed_tests = len(re.findall(r"^FAILED ", out, re.MULTILINE))
    crashed = 1 if done.returncode < 0 or "Fatal Python error" in out else 0
    return {"tried": passing + failing, "failing": max(failing, failed_tests),
            "crashed": crashed, "hung": 0}


# The multi-process fault tests (gloo on loopback, ranks spawned by the tests), by kind: the
# file under tests/ and the pytest -k expression that selects them in it (None: all of it).
MULTIPROCESS_FAULTS = {
    "pipeline over ranks": ("python/test_pipeline_dist.py",
                            "raise or killed or torchrun_exit or disagree or refused"),
    "data parallel": ("python/test_data_parallel.py", "raise or killed or refused or disagree"),
    "tensor parallel": ("stress/test_tp_faults.py", None),
}


def multiprocess_fault_rows(timeout_s):
    """Per kind: (tests run, passed, failed, hung) of the multi-process fault tests, each
    file in a child pytest bounded by ``timeout_s``."""
    rows = []
    for kind, (name, expression) in MULTIPROCESS_FAULTS.items():
        command = [sys.executable, "-m", "pytest", str(REPO / "tests" / name), "-q",
                   "-p", "no:cacheprovider"] + (["-k", expression] if expression else [])
        try:
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rows.append((kind, "?", "?", "?", 1))
            continue
        out = done.stdout + done.stderr

        def count(word, out=out):
            found = re.search(rf"(\d+) {word}", out)
            return int(found.group(1)) if found else 0

        passed, failed = count("passed"), count("failed") + count("error")
        rows.append((kind, passed + failed, passed, failed, 0))
    return rows


def sanitizer_rows():
    rows = []
    for name, marker in (("address", r"ERROR: AddressSanitizer|ERROR: LeakSanitizer"),
                         ("thread", r"WARNING: ThreadSanitizer")):
        log = REPO / "build" / f"cmake-{name}" / "Testing" / "Temporary" / "LastTest.log"
        if not log.exists():
            rows.append((name, "not run", "-", "-"))
            continue
        text = log.read_text(errors="replace")
        passed = len(re.findall(r"Test Passed\.", text))
        failed = len(re.findall(r"Test Failed\.", text))
        findings = len(re.findall(marker, text))
        rows.append((name, f"{passed} passed, {failed} failed", str(findings),
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(log.stat().st_mtime))))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a subset, for a fast look")
    parser.add_argument("--steps", type=int, default=None, help="steps of each long run")
    parser.add_argument("--hang-s", type=float, default=10.0,
                        help="an injection with no answer after this long counts as hung")
    parser.add_argument("--long-fuzz", action="store_true", help="the long fuzz variant")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = args.steps or (300 if args.quick else 2000)
    print(f"shardpipe reliability report  (torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {'quick' if args.quick else 'full'})\n")

    print("faults injected, one process  (kind: where the exception was raised)")
    print(f"{'kind':<10}{'injected':>10}{'surfaced':>10}{'wrong':>8}{'hung':>6}{'slowest s':>11}")
    examples = []
    for kind, row in fault_rows(args.quick, args.hang_s).items():
        print(f"{kind:<10}{row['injected']:>10}{row['surfaced']:>10}{row['wrong']:>8}"
              f"{row['hung']:>6}{row['slowest_s']:>11.3f}")
        examples += row["examples"][:3]
    for line in examples:
        print(f"  ! {line}")

    print("\nlong runs  (after warm-up; memory in MiB)")
    print(f"{'run':<36}{'steps':>7}{'rss drift':>11}{'threads':>9}{'ms/step':>9}")
    for name, count, rss, threads, seconds in long_run_rows(steps):
        per_step = 1e3 * seconds / max(1, count - min(200, count // 4))
        print(f"{name:<36}{count:>7}{rss:>11.2f}{threads:>+9d}{per_step:>9.2f}")

    print("\nfuzzed input  (tests/stress/test_fuzz.py, hypothesis)")
    fuzz = fuzz_row(1800, args.long_fuzz)
    print(f"{'tried':>8}{'failing':>9}{'crashed':>9}{'hung':>6}")
    print(f"{fuzz['tried']:>8}{fuzz['failing']:>9}{fuzz['crashed']:>9}{fuzz['hung']:>6}")

    print("\nsanitizers  (GoogleTest suite, last run in build/cmake-<sanitizer>)")
    print(f"{'sanitizer':<11}{'tests':<24}{'findings':>9}  when")
    for name, tests, findings, when in sanitizer_rows():
        print(f"{name:<11}{tests:<24}{findings:>9}  {when}")
    print("\nfaults, many processes  (gloo on loopback: a raising rank at each kind of position, "
          "a killed rank, ranks that disagree, a rank that never comes; tests/python and "
          "tests/stress)")
    print(f"{'kind':<22}{'tests':>7}{'passed':>8}{'failed':>8}{'hung':>6}")
    for kind, tests, passed, failed, hung in multiprocess_fault_rows(900):
        print(f"{kind:<22}{tests:>7}{passed:>8}{failed:>8}{hung:>6}")


if __name__ == "__main__":
    main()
