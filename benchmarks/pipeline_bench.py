"""Pipeline engine benchmarks: overhead per task, CPU pipeline efficiency, a timeline.

Prints a table of ratios measured side by side in one run; never fails on time.

    python benchmarks/pipeline_bench.py            # CPU (and CUDA per-task cost if present)
    python benchmarks/pipeline_bench.py --quick    # smaller sizes, for tests
"""

import argparse
import os
import queue
import statistics
import threading
import time

import torch
from _plots import gantt  # benchmarks/ is on sys.path when a script here runs
from torch import nn

import shardpipe as sp


def timed(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), statistics.pstdev(samples)


def tutorial_loop(stages, devices, x, chunks):
    """The PyTorch model-parallel tutorial's hand-written pattern, generalised to N stages:
    a Python loop over micro-batches that moves each activation on to the next device."""
    outputs = []
    for part in x.chunk(chunks):
        for stage, device in zip(stages, devices):
            part = stage(part.to(device, non_blocking=True))
        outputs.append(part)
    return torch.cat(outputs)


def overhead(device, stages, chunks, repeats, threads="auto"):
    """Per-task cost (µs) of trivial stages: shardpipe vs the Python loop, and which threads
    the executor ran them on."""
    model = nn.Sequential(*[nn.Identity() for _ in range(stages)])
    devices = [device] * stages
    pipe = sp.Pipeline(model, devices, chunks=chunks, balance=[1] * stages)
    pipe._engine.threads = threads
    x = torch.randn(chunks, 4, device=device)
    tasks = stages * chunks
    with torch.no_grad():
        ours, _ = timed(lambda: pipe(x), repeats)
        loop, _ = timed(lambda: tutorial_loop(pipe.stages, devices, x, chunks), repeats)
    used = pipe._engine.last_threads
    pipe.close()
    return ours / tasks * 1e6, loop / tasks * 1e6, used


def cost_breakdown(stages, chunks, repeats):
    """Where a task's microseconds go, each part measured on its own (µs per task):
    C++ identity stages run by the engine alone, on the caller's thread and on the workers
    (forward only, and forward + backward), and Python identity stages on each."""
    rows = {}
    for threads in ("caller", "workers"):
        rows[threads] = dict(
            engine=sp._C._engine_overhead(stages, chunks, threads, repeats, False),
            autograd=sp._C._engine_overhead(stages, chunks, threads, repeats, True),
            python=overhead("cpu", stages, chunks, repeats, threads)[0],
        )
    caller, workers = rows["caller"], rows["workers"]
    return [
        ("engine bookkeeping (C++ stages, caller thread)", caller["engine"]),
        ("+ hand-off between threads (C++ stages: workers - caller)",
         workers["engine"] - caller["engine"]),
        ("+ GIL and the Python call (Python stages - C++ stages, caller)",
         caller["python"] - caller["engine"]),
        ("+ GIL and the Python call on the workers (Python - C++, workers)",
         workers["python"] - workers["engine"]),
        ("autograd bookkeeping, forward + backward (C++ stages, caller)",
         caller["autograd"]),
        ("total, Python stages on the caller's thread", caller["python"]),
        ("total, Python stages on the workers", workers["python"]),
    ]


def block(width, depth):
    return nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.ReLU())])


def interleaved(fns, repeats, warmup=1):
    """Median seconds of each callable, timed round-robin so that a noisy neighbour slows
    every variant of a round alike instead of whichever happened to run then."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


class FreeRunning:
    """Each stage on its own thread over all its micro-batches with no dependency between
    stages: the most two threads can do on this machine, whatever schedules them. The threads
    live as long as the object, like the engine's workers, so neither pays for a new thread
    (a new malloc arena, first-touch page faults) on every run."""

    def __init__(self, stages, inputs, train):
        self.jobs = [queue.Queue() for _ in stages]
        self.done = queue.Queue()
        self.threads = [threading.Thread(target=self._work, args=(stage, parts, train, jobs),
                                         daemon=True)
                        for stage, parts, jobs in zip(stages, inputs, self.jobs)]
        for thread in self.threads:
            thread.start()

    def _work(self, stage, parts, train, jobs):
        torch.set_num_threads(1)
        while jobs.get():
            for part in parts:
                if train:
                    out = stage(part)
                    out.backward(torch.ones_like(out))
                else:
                    with torch.no_grad():
                        stage(part)
            self.done.put(None)

    def __call__(self):
        for jobs in self.jobs:
            jobs.put(True)
        for _ in self.jobs:
            self.done.get()

    def close(self):
        for jobs in self.jobs:
            jobs.put(False)
        for thread in self.threads:
            thread.join()


def machine_ideal(ceiling, chunks):
    """Two-stage pipeline speed-up when both threads together run `ceiling` times one thread:
    the first and last steps run one stage alone, the chunks-1 steps between run both."""
    return chunks / (1 + (chunks - 1) / ceiling)


def efficiency(width, depth, batch, chunks, repeats, trace_path=None):
    """Two CPU stages of equal cost, one intra-op thread each, against one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(block(width, depth), block(width, depth))
        x = torch.randn(batch, width)
        target = torch.randn(batch, width)
        loss_fn = nn.functional.mse_loss
        pipe = sp.Pipeline(model, ["cpu", "cpu"], chunks=chunks, balance=[1, 1], schedule="1f1b")
        parts = list(x.chunk(chunks))
        with torch.no_grad():
            middle = [model[0](part).requires_grad_() for part in parts]
        inputs = [parts, middle]

        def pipe_forward():
            with torch.no_grad():
                pipe(x)

        def sequential_forward():
            with torch.no_grad():
                model(x)

        def sequential_micro_batches():
            # The same work as the pipeline's, on one thread: the micro-batches' smaller
            # matrix products cost differently from the whole batch's.
            with torch.no_grad():
                for part in parts:
                    model(part)

        def sequential_train_micro_batches():
            for part, part_target in zip(parts, target.chunk(chunks)):
                loss_fn(model(part), part_target).backward()

        free_forward = FreeRunning(pipe.stages, inputs, train=False)
        free_train = FreeRunning(pipe.stages, inputs, train=True)
        forward = interleaved({
            "one thread": sequential_forward,
            "micro-batches": sequential_micro_batches,
            "free-running": free_forward,
            "shardpipe": pipe_forward,
        }, repeats)
        train = interleaved({
            "one thread": lambda: loss_fn(model(x), target).backward(),
            "micro-batches": sequential_train_micro_batches,
            "free-running": free_train,
            "shardpipe": lambda: pipe.train_step(x, target, loss_fn),
        }, repeats)
        free_forward.close()
        free_train.close()
        bubble = None
        if trace_path:
            with pipe.record_trace() as trace:
                pipe.train_step(x, target, loss_fn)
            bubble = trace.bubble_fraction()
            trace.save(trace_path + ".json")
            gantt(trace, trace_path + ".png", f"1F1B, 2 CPU stages, {chunks} micro-batches")
        pipe.close()
        return forward, train, bubble
    finally:
        torch.set_num_threads(threads)


class Sleep(nn.Module):
    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x * 1.0


def checkpoint_concurrency(width, depth, batch, chunks, repeats):
    """Forward (grad on) of two CPU stages with checkpoint="except_last" against "never":
    stages that draw no random numbers must stay concurrent. Matmul stages (one intra-op
    thread each) and sleeping stages (robust to a noisy machine). Returns speed ratios."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ratios = {}
        x = torch.randn(batch, width, requires_grad=True)
        models = {
            "matmul stages": nn.Sequential(block(width, depth), block(width, depth)),
            "sleeping stages (20 ms)": nn.Sequential(Sleep(0.02), Sleep(0.02)),
        }
        for name, model in models.items():
            pipes = {}
            for checkpoint in ("never", "except_last"):
                pipe = sp.Pipeline(model, ["cpu", "cpu"], chunks=chunks, balance=[1, 1],
                                   checkpoint=checkpoint)
                pipe._engine.threads = "workers"
                pipes[checkpoint] = pipe
            times = interleaved({k: (lambda p=p: p(x)) for k, p in pipes.items()},
                                repeats if name == "matmul stages" else 3)
            ratios[name] = times["never"] / times["except_last"]
            for pipe in pipes.values():
                pipe.close()
        return ratios
    finally:
        torch.set_num_threads(threads)


def resnet50_on_one_gpu(batch, chunks, repeats):
    """ResNet-50 training step, 2 pipeline stages on one GPU vs the plain model: images/s
    and peak allocated bytes of one step, for the plain model and each schedule."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50().cuda()
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    loss_fn = nn.functional.cross_entropy

    def peak_bytes(step):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    def plain_step():
        loss_fn(model(x), y).backward()

    seconds, _ = timed(plain_step, repeats)
    results = {"plain": (batch / seconds, peak_bytes(plain_step))}
    for schedule in ("gpipe", "1f1b"):
        pipe = sp.Pipeline(sp.sequentialize(model), ["cuda:0", "cuda:0"], chunks=chunks,
                           schedule=schedule)

        def step(pipe=pipe):
            pipe.train_step(x, y, loss_fn)

        seconds, _ = timed(step, repeats)
        results[schedule] = (batch / seconds, peak_bytes(step))
        pipe.close()
    return results


# --- zero-bubble schedules: zb1p and zbv beside 1f1b ------------------------------------------

def at_ceiling(events, ceiling):
    """Length of a two-worker timeline (tuples as Engine.take_trace gives them) when both
    workers busy at once run `ceiling` times one worker's speed, not twice it."""
    points = sorted({t for e in events for t in e[4:6]})
    total = 0.0
    for a, b in zip(points, points[1:]):
        busy = len({e[3] for e in events if e[4] <= a and e[5] >= b and e[5] > e[4]})
        total += (b - a) * (busy / ceiling if busy > 1 else 1.0)
    return total


def zero_bubble(width, depth, batch, chunks, repeats):
    """Two CPU devices of equal cost, one intra-op thread each, threads forced to the workers:
    1f1b and zb1p with two stages, zbv with four (two per device); the same model and
    micro-batches, timed round-robin against the machine's two-thread ceiling."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(*[block(width, depth) for _ in range(4)])
        x, target = torch.randn(batch, width), torch.randn(batch, width)
        loss_fn = nn.functional.mse_loss
        layouts = {"1f1b": [2, 2], "zb1p": [2, 2], "zbv": [1, 1, 1, 1]}
        pipes = {}
        for name, balance in layouts.items():
            pipes[name] = sp.Pipeline(model, ["cpu", "cpu"], chunks=chunks, balance=balance,
                                      schedule=name)
            pipes[name]._engine.threads = "workers"
        parts = list(x.chunk(chunks))
        first = pipes["1f1b"].stages[0]
        with torch.no_grad():
            middle = [first(part).requires_grad_() for part in parts]
        free = FreeRunning(pipes["1f1b"].stages, [parts, middle], train=True)

        def micro_batches():
            for part, part_target in zip(parts, target.chunk(chunks)):
                loss_fn(model(part), part_target).backward()

        fns = {"micro-batches": micro_batches, "free-running": free}
        for name, pipe in pipes.items():
            fns[name] = lambda pipe=pipe: pipe.train_step(x, target, loss_fn)
        times = interleaved(fns, repeats)
        free.close()
        ceiling = times["micro-batches"] / times["free-running"]
        rows = {}
        for name, pipe in pipes.items():
            with pipe.record_trace() as trace:
                pipe.train_step(x, target, loss_fn)
            stages = len(layouts[name])
            theory = sp._C.schedule_timeline(name, stages, chunks, 2)  # F = B = W per stage
            rows[name] = dict(time=times[name], bubble=trace.bubble_fraction(),
                              theory=sp.Trace(theory).bubble_fraction(),
                              predicted=at_ceiling(theory, ceiling) * 2 / stages)
            pipe.close()
        return rows, ceiling
    finally:
        torch.set_num_threads(threads)


def print_zero_bubble(quick, repeats):
    width, depth, batch = (128, 1, 64) if quick else (1024, 2, 1024)
    for chunks in ([4] if quick else [4, 8]):
        rows, ceiling = zero_bubble(width, depth, batch, chunks, repeats)
        base = rows["1f1b"]
        print(f"\nzero bubble: 2 cpu devices, {chunks} mb, two-thread ceiling {ceiling:.2f}")
        print(f"{'schedule':<8} {'bubble':>7} {'theory':>7} {'time/1f1b':>10} {'theory':>7} "
              f"{'gain':>7} {'theory':>7} {'share':>6}")
        for name, row in rows.items():
            ratio = row["time"] / base["time"]
            predicted = row["predicted"] / base["predicted"]
            gain, want = 1 / ratio - 1, 1 / predicted - 1
            # A share of a gain the ceiling leaves no room for says nothing.
            share = f"{gain / want:6.0%}" if want > 0.005 else f"{'-':>6}"
            print(f"{name:<8} {row['bubble']:>7.3f} {row['theory']:>7.3f} {ratio:>10.3f} "
                  f"{predicted:>7.3f} {gain:>+7.1%} {want:>+7.1%} {share}")
    print("bubble: measured idle share of the workers (Trace.bubble_fraction) | theory: the"
          " schedule on paper with F = B = W (sp._C.schedule_timeline); time/1f1b: step time"
          " against 1f1b's, measured | theory at the measured ceiling; gain: speed-up over"
          " 1f1b; share: measured gain / predicted gain")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (for tests)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 10)
    os.makedirs(args.out, exist_ok=True)

    rows = []
    for stages, chunks in ([(2, 4)] if args.quick else [(2, 8), (4, 8), (4, 32)]):
        ours, loop, used = overhead("cpu", stages, chunks, repeats)
        rows.append((f"per-task cost, {stages} cpu stages x {chunks} mb (us, {used})", ours, loop,
                     loop / ours))
    if torch.cuda.is_available():
        for threads in ("auto", "workers"):
            ours, loop, used = overhead("cuda:0", 2, 8, repeats, threads)
            rows.append((f"per-task cost, 2 stages on cuda:0 x 8 mb (us, {used})", ours, loop,
                         loop / ours))
    breakdown = cost_breakdown(2, 4 if args.quick else 8, repeats)

    if torch.cuda.is_available() and not args.quick:
        results = resnet50_on_one_gpu(batch=64, chunks=4, repeats=repeats)
        plain_speed, plain_peak = results["plain"]
        for schedule in ("gpipe", "1f1b"):
            speed, peak = results[schedule]
            rows.append((f"resnet50 train, 2 stages on cuda:0, {schedule} (img/s)", speed,
                         plain_speed, speed / plain_speed))
            rows.append((f"  peak memory of a step, {schedule} (GiB)", peak / 2**30,
                         plain_peak / 2**30, peak / plain_peak))

    width, depth, batch = (128, 2, 64) if args.quick else (1024, 4, 1024)
    chunks = 8
    forward, train, bubble = efficiency(width, depth, batch, chunks, repeats,
                                        trace_path=os.path.join(args.out, "pipeline_timeline"))
    ideal = 2 * chunks / (chunks + 1)
    speedup_rows = []
    for label, times in (("forward", forward), ("train_step 1f1b", train)):
        same_work = times["micro-batches"] / times["shardpipe"]
        ceiling = times["micro-batches"] / times["free-running"]
        speedup_rows.append((f"2 cpu stages, {label}: speed-up vs 1 thread",
                             times["one thread"] / times["shardpipe"], ideal))
        speedup_rows.append(("  same, vs the micro-batches one by one", same_work, ideal))
        speedup_rows.append(("  two free-running threads (machine ceiling)", ceiling, 2.0))
        speedup_rows.append(("  same as above vs the ideal at that ceiling", same_work,
                             machine_ideal(ceiling, chunks)))
    rows += [(name, ours, base, ours / base) for name, ours, base in speedup_rows]
    for name, ratio in checkpoint_concurrency(width, depth, batch, chunks, repeats).items():
        rows.append((f"checkpoint except_last vs never, forward, {name}", ratio, 1.0, ratio))

    print(f"{'measure':<58} {'shardpipe':>10} {'baseline':>10} {'ratio':>7}")
    for name, ours, base, ratio in rows:
        print(f"{name:<58} {ours:>10.2f} {base:>10.2f} {ratio:>7.2f}")
    print()
    print(f"{'where a task of 2 cpu stages goes (us per task)':<66} {'us':>8}")
    for name, us in breakdown:
        print(f"{name:<66} {us:>8.2f}")
    print()
    print("resnet50 rows: baseline = the plain model on the same GPU; ratio = throughput share"
          " (memory: peak share)")
    print("per-task rows: baseline = hand-written Python micro-batch loop; ratio = loop/shardpipe;"
          " (caller) or (workers): the threads the executor chose ('auto')")
    print(f"speed-up rows: baseline = ideal p*m/(m+p-1) = {ideal:.2f}; ratio = share of ideal")
    print("ceiling rows: each stage on its own thread over all micro-batches, no dependencies,"
          " against the micro-batches one by one; the ideal at that ceiling is"
          " m/(1+(m-1)/ceiling)")
    print("checkpoint rows: speed of checkpoint='except_last' relative to 'never' (forward with"
          " grad, 2 cpu stages on workers); stages that draw no random numbers run unlocked")
    if bubble is not None:
        print(f"measured bubble fraction (1f1b, {chunks} mb): {bubble:.2f}; timeline in {args.out}")
    print_zero_bubble(args.quick, repeats)

if __name__ == "__main__":
    main()
