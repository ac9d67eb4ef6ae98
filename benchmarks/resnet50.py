"""ResNet-50 model parallel: the PyTorch tutorial's experiment, reproduced with its peers.

The PyTorch model-parallel tutorial trains torchvision's ResNet-50 (batch 120, 128x128
images, 3 batches per run, 10 runs; SGD, MSE loss against one-hot labels) on one GPU, split
over two GPUs, and split and pipelined by hand, then sweeps the split size. This script runs
the same experiment, every way in one run on the same model and shapes:

- ``single device``: the plain model on ``devices[0]``.
- ``naive split``: the stages one after another (the tutorial's model-parallel class; one
  split, so a device idles while the other works).
- ``hand-written``: the tutorial's pipelining pattern, a class holding the stages whose
  forward loops over splits of the batch, feeding the next stage's split while the previous
  stage takes the next one (written here in its style, generalised to N stages).
- ``shardpipe gpipe`` / ``shardpipe 1f1b``: ``shardpipe.Pipeline(...).train_step``.
- ``torch pipelining``: ``torch.distributed.pipelining`` with ``ScheduleGPipe``, one
  process per stage (gloo on CPU, NCCL on GPUs), spawned by this script on a free loopback
  port. It runs only the chunk counts that divide the batch. Its processes live through the
  whole measurement and take their turn in every round like the other ways.
- ``shardpipe, process per stage``: ``shardpipe.Pipeline(model, group=...)`` with GPipe, one
  process per stage like ``torch pipelining`` and run the same way (CPU stages over gloo).

Every pipelined way uses the same stages (``shardpipe.balance_by_time`` on a micro-batch of
the sweep's middle chunk count, or ``--balance``; a stage may end inside ``layer1``..
``layer4`` as with ``Pipeline(nested=True)``, unless ``--no-nested``) and the same
micro-batches, and is swept over ``--chunks`` (split size = batch / chunks, rounded up).
Times are per run of ``--batches`` training steps, mean ± std over ``--repeats`` runs after
one warm-up step; the ratio is the single device's time over the way's (above 1: faster).
Never fails on time.

On CPU each stage stands for one device with one core: every stage (worker thread or
process) runs with one intra-op thread, and ``single device`` gets as many threads as there
are stages (the same cores); ``single device, 1 thread`` is shown for scale. The tutorial's
pattern runs in one host thread and CPU operators do not return before they finish, so on
CPU it cannot overlap its stages: it is measured as written, with one thread per stage.

``--autotune`` adds two ways: ``shardpipe autotuned`` (the configuration
``shardpipe.autotune`` chooses over the same chunk counts: balance, chunks, schedule,
checkpointing) and ``shardpipe default`` (``Pipeline(model, devices)`` as it comes), and
prints them beside the best of the sweep (shardpipe gpipe / 1f1b over ``--chunks``), with
the seconds autotune took and the seconds the sweep's runs took.

Outputs (``--out``, default benchmarks/out/): resnet50_ways.png (bar chart of the ways, each
pipelined one at its best split size), resnet50_split_size.png (time against split size),
resnet50_timeline_{gpipe,1f1b}.png/.json (Gantt chart and Chrome trace of one shardpipe
step at 1F1B's best chunk count).

    python benchmarks/resnet50.py --devices cpu cpu --batch 32 --image-size 64 --batches 1 \\
        --repeats 3 --chunks 1 2 4 8                    # CPU, a few minutes on 2 cores
    python benchmarks/resnet50.py --devices cpu cpu --batch 32 --image-size 64 --batches 1 \\
        --repeats 3 --chunks 1 2 4 8 --autotune         # the sweep against sp.autotune
    python benchmarks/resnet50.py                       # the tutorial's sizes on the GPUs

On N GPUs: ``--devices cuda:0 cuda:1`` reproduces the tutorial's two-GPU figure (the
default when the machine has several GPUs is all of them, one stage each, so pass two
devices for the tutorial's setting); ``--devices cuda:0 cuda:1 cuda:2 cuda:3`` runs four
stages, with ``torch pipelining`` on four NCCL processes. With one GPU the default is two
stages on it (``torch pipelining`` is skipped: NCCL needs one device per process).
"""

import argparse
import copy
import math
import os
import queue
import socket
import statistics
import sys
import time
from collections import OrderedDict
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from _plots import bars, curves, gantt  # benchmarks/ is on sys.path when a script here runs
from torch import nn

import shardpipe as sp
from shardpipe._blocks import _blocks

# The main job's choice of devices, so that the benchmark and the example agree.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from resnet50_pipeline import default_devices  # noqa: E402


def synchronize(devices):
    for device in {torch.device(d) for d in devices}:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def make_batches(args, input_device, label_device, seed=1):
    """The tutorial's data: random images and one-hot labels, made before any timing."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(args.batches):
        images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator)
        labels = torch.randint(0, args.classes, (args.batch,), generator=generator)
        one_hot = F.one_hot(labels, args.classes).float()
        batches.append((images.to(input_device), one_hot.to(label_device)))
    return batches


def split_size(batch, chunks):
    return math.ceil(batch / chunks)


def stage_modules(model, balance, devices, nested):
    """The model's blocks cut by ``balance`` as ``shardpipe.Pipeline`` cuts them (the same
    private helper), stage s moved to devices[s]."""
    blocks = _blocks(sp.sequentialize(model), nested)
    stages, start = [], 0
    for size, device in zip(balance, devices):
        stages.append(nn.Sequential(*[block for _, block in blocks[start:start + size]]))
        stages[-1].to(device)
        start += size
    return stages


class HandPipelinedResNet50(nn.Module):
    """The tutorial's pattern: the stages in one module, the batch cut into splits in forward.

    At every tick each stage that has work takes its split, the later stages first, so that
    (on asynchronous devices) stage s computes split t - s while stage s - 1 already starts
    on the next one. With one split it is the tutorial's plain model-parallel class.
    """

    def __init__(self, model, balance, devices, split_size, nested):
        super().__init__()
        self.devices = [torch.device(d) for d in devices]
        self.stages = nn.ModuleList(stage_modules(model, balance, self.devices, nested))
        self.split_size = split_size

    def forward(self, x):
        splits = list(x.split(self.split_size))
        inbox = [[] for _ in self.stages]  # per stage: splits waiting, already on its device
        inbox[0] = splits
        outputs = []
        for tick in range(len(splits) + len(self.stages) - 1):
            for s in reversed(range(len(self.stages))):
                if not 0 <= tick - s < len(splits):
                    continue
                y = self.stages[s](inbox[s][tick - s])
                if s + 1 < len(self.stages):
                    inbox[s + 1].append(y.to(self.devices[s + 1]))
                else:
                    outputs.append(y)
        return torch.cat(outputs)


def timed_run(threads, step, batches, devices):
    """A run of ``step`` over all batches with ``threads`` intra-op threads; returns seconds."""
    def run():
        if threads is not None:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        for images, labels in batches:
            step(images, labels)
        synchronize(devices)
        return time.perf_counter() - start

    return run


def measure_interleaved(ways, repeats):
    """Seconds per run of all batches for every way: one warm-up run each, then ``repeats``
    rounds that time each way once in turn, so that a busy spell of the machine spreads
    over all ways instead of spoiling one. ``ways`` holds (way, split, chunks, run) rows,
    ``run()`` returning the seconds of one run; returns (way, split, chunks, samples) rows."""
    for *_, run in ways:
        run()
    samples = [[] for _ in ways]
    for _ in range(repeats):
        for (*_, run), times in zip(ways, samples):
            times.append(run())
    return [(way, split, chunks, times) for (way, split, chunks, _), times in zip(ways, samples)]


def module_step(module, lr):
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)

    def step(images, labels):
        optimizer.zero_grad()
        F.mse_loss(module(images), labels).backward()
        optimizer.step()

    return step


def hand_step(hand, split, lr):
    """A step of the hand-written pipeline with the given split size."""
    step = module_step(hand, lr)

    def run(images, labels):
        hand.split_size = split
        step(images, labels)

    return run


def pipeline_step(pipe, lr):
    optimizer = torch.optim.SGD(pipe.parameters(), lr=lr)

    def step(images, labels):
        optimizer.zero_grad()
        pipe.train_step(images, labels, F.mse_loss)
        optimizer.step()

    return step


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_process_worker(rank, port, args, balance, chunk_list, commands, results, kind):
    """One stage of a pipeline with one process per stage, kept alive between runs:
    ``torch.distributed.pipelining`` (ScheduleGPipe; kind "torch") or
    ``shardpipe.Pipeline(..., group=)`` with GPipe (kind "shardpipe").

    It builds one schedule (pipeline) per chunk count, warms each up, says it is ready, then
    runs one timed run of all batches for every chunk count that ``commands`` names, until
    None; rank 0 reports the seconds (or the error) on ``results``."""
    devices = [torch.device(d) for d in args.devices]
    device = devices[rank]
    world = len(devices)
    try:
        if device.type == "cpu":
            torch.set_num_threads(1)
        else:
            torch.cuda.set_device(device)
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl",
                                init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=args.peer_timeout))
        torch.manual_seed(args.seed)
        model = torchvision.models.resnet50(num_classes=args.classes)
        batches = make_batches(args, device, device)
        if kind == "torch":
            from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

            module = stage_modules(model, balance, devices, args.nested)[rank]
            del model
            schedules = {chunks: ScheduleGPipe(PipelineStage(module, rank, world, device),
                                               chunks, loss_fn=F.mse_loss)
                         for chunks in chunk_list}

            def step(chunks, images, labels):
                if rank == 0:
                    schedules[chunks].step(images, return_outputs=False)
                elif rank == world - 1:
                    schedules[chunks].step(target=labels, return_outputs=False)
                else:
                    schedules[chunks].step(return_outputs=False)
        else:
            pipes = {chunks: sp.Pipeline(sp.sequentialize(model), group=dist.group.WORLD,
                                         chunks=chunks, balance=balance, nested=args.nested,
                                         timeout=args.peer_timeout)
                     for chunks in chunk_list}
            module = pipes[chunk_list[0]]

            def step(chunks, images, labels):
                pipes[chunks].train_step(images, labels, F.mse_loss)
        optimizer = torch.optim.SGD(module.parameters(), lr=args.lr)

        def run(chunks):
            dist.barrier()
            start = time.perf_counter()
            for images, labels in batches:
                optimizer.zero_grad()
                step(chunks, images, labels)
                optimizer.step()
            synchronize([device])
            dist.barrier()
            return time.perf_counter() - start

        for chunks in chunk_list:
            run(chunks)
        if rank == 0:
            results.put(("ready", None))
        while (chunks := commands.get()) is not None:
            seconds = run(chunks)
            if rank == 0:
                results.put(("seconds", seconds))
    except BaseException as error:
        results.put(("error", f"rank {rank}: {type(error).__name__}: {error}"))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class StageProcessPeer:
    """A pipeline on one process per stage (``kind``: "torch" for
    ``torch.distributed.pipelining``, "shardpipe" for ``Pipeline(group=)``), driven run by run
    from here so that its runs take turns with the in-process ways (see
    ``measure_interleaved``)."""

    def __init__(self, args, balance, chunk_list, kind):
        self.name = "torch pipelining" if kind == "torch" else "shardpipe, process per stage"
        context = mp.get_context("spawn")
        self.timeout = args.peer_timeout
        self.results = context.Queue()
        self.commands = [context.Queue() for _ in args.devices]
        port = free_port()
        self.processes = [
            context.Process(target=stage_process_worker,
                            args=(rank, port, args, balance, chunk_list, commands, self.results,
                                  kind))
            for rank, commands in enumerate(self.commands)]
        for process in self.processes:
            process.start()
        self._receive("ready")

    def _receive(self, expected):
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                kind, value = self.results.get(timeout=1)
            except queue.Empty:
                dead = [p.exitcode for p in self.processes if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"{self.name}: a stage process exited with "
                                       f"{dead[0]}") from None
                continue
            if kind == "error":
                raise RuntimeError(f"{self.name} failed: {value}")
            assert kind == expected, (kind, expected)
            return value
        raise TimeoutError(f"{self.name}: no answer within --peer-timeout {self.timeout} s")

    def runner(self, chunks):
        """A ``run()`` for ``measure_interleaved``: one timed run of all batches."""
        def run():
            for commands in self.commands:
                commands.put(chunks)
            return self._receive("seconds")

        return run

    def close(self):
        for commands in self.commands:
            commands.put(None)
        for process in self.processes:
            process.join(timeout=60)
            if process.is_alive():
                process.terminate()
                process.join()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=None,
                        help="one device per stage (default: all GPUs, two stages on a single "
                             "GPU, or two CPU stages)")
    parser.add_argument("--batch", type=int, default=120)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=3, help="training steps per run")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per way")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--chunks", type=int, nargs="+", default=None,
                        help="micro-batch counts to sweep (default 1, 2, 4, ... up to batch)")
    parser.add_argument("--balance", type=int, nargs="+", default=None,
                        help="blocks per stage (default: shardpipe.balance_by_time)")
    parser.add_argument("--no-nested", dest="nested", action="store_false",
                        help="cut between top-level children only (11 for ResNet-50) instead "
                             "of blocks (23: layer1..layer4 opened, Pipeline(nested=True))")
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-torch-pipelining", dest="torch_pipelining", action="store_false",
                        help="skip the torch.distributed.pipelining peer")
    parser.add_argument("--peer-timeout", type=float, default=600,
                        help="seconds a torch.distributed.pipelining process waits on another")
    parser.add_argument("--autotune", action="store_true",
                        help="also run shardpipe.autotune's choice and the default Pipeline, "
                             "and compare them with the best of the sweep")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = parser.parse_args()
    for name in ("batch", "image_size", "batches", "repeats", "classes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    args.devices = [str(torch.device(d)) for d in (args.devices or default_devices())]
    if len(args.devices) < 2:
        parser.error("--devices needs at least two devices (one per stage)")
    if args.chunks is None:
        args.chunks = [2 ** k for k in range(args.batch.bit_length()) if 2 ** k <= args.batch]
    if any(c < 1 or c > args.batch for c in args.chunks):
        parser.error(f"--chunks must lie between 1 and the batch ({args.batch})")
    return args


def main():
    args = parse_args()
    devices = args.devices
    on_cpu = all(torch.device(d).type == "cpu" for d in devices)
    stages = len(devices)
    os.makedirs(args.out, exist_ok=True)

    torch.manual_seed(args.seed)
    initial = torchvision.models.resnet50(num_classes=args.classes)
    batches = make_batches(args, devices[0], devices[-1])
    single_batches = [(x, y.to(devices[0])) for x, y in batches]

    def fresh():
        return copy.deepcopy(initial)

    threads = torch.get_num_threads()
    # Every CPU stage (worker thread or process) runs with one intra-op thread, profiling too.
    stage_threads = 1 if on_cpu else None
    if on_cpu:
        torch.set_num_threads(1)
    # Profiled on a micro-batch of the middle of the sweep: the stage times that matter.
    middle = sorted(args.chunks)[len(args.chunks) // 2]
    sample = batches[0][0][:split_size(args.batch, middle)]
    start = time.perf_counter()
    balance = args.balance or sp.balance_by_time(initial, sample, stages, device=devices[0],
                                                 nested=args.nested)
    balance_s = time.perf_counter() - start

    def way(name, split, chunks, threads, step, way_batches):
        return name, split, chunks, timed_run(threads, step, way_batches, devices)

    ways = [way(f"single device ({stages} threads)" if on_cpu else "single device", None, None,
                stages if on_cpu else None, module_step(fresh().to(devices[0]), args.lr),
                single_batches)]
    if on_cpu:
        ways.append(way("single device, 1 thread", None, None, 1,
                        module_step(fresh().to(devices[0]), args.lr), single_batches))
    hand = HandPipelinedResNet50(fresh(), balance, devices, args.batch, args.nested)
    ways.append(way("naive split", args.batch, 1, stage_threads,
                    hand_step(hand, args.batch, args.lr), batches))
    for chunks in args.chunks:
        if chunks > 1:  # one split is the naive split itself
            split = split_size(args.batch, chunks)
            ways.append(way("hand-written", split, chunks, stage_threads,
                            hand_step(hand, split, args.lr), batches))
    pipes = {}
    plan = None
    if args.autotune:
        # Same data, same chunk counts and cuts as the sweep; one intra-op thread per stage.
        plan = sp.autotune(fresh(), batches[0][0], batches[0][1], F.mse_loss, devices,
                           chunks=args.chunks, nested=args.nested)
        kwargs = plan.kwargs
        pipe = sp.Pipeline(sp.sequentialize(fresh()), devices, **kwargs)
        pipes["autotuned"] = pipe
        ways.append(way("shardpipe autotuned", split_size(args.batch, kwargs["chunks"]),
                        kwargs["chunks"], stage_threads, pipeline_step(pipe, args.lr), batches))
        pipe = sp.Pipeline(sp.sequentialize(fresh()), devices)
        pipes["default"] = pipe
        ways.append(way("shardpipe default", args.batch, pipe.chunks, stage_threads,
                        pipeline_step(pipe, args.lr), batches))
    for schedule in ("gpipe", "1f1b"):
        for chunks in args.chunks:
            pipe = sp.Pipeline(sp.sequentialize(fresh()), devices, chunks=chunks,
                               balance=balance, schedule=schedule, nested=args.nested)
            pipes[schedule, chunks] = pipe
            ways.append(way(f"shardpipe {schedule}", split_size(args.batch, chunks), chunks,
                            stage_threads, pipeline_step(pipe, args.lr), batches))

    peers, notes = [], []
    if not args.torch_pipelining:
        notes.append("torch pipelining: skipped (--no-torch-pipelining)")
    elif len(set(devices)) < len(devices) and not on_cpu:
        notes.append("torch pipelining: skipped (NCCL needs one device per process)")
    else:
        even = [c for c in args.chunks if args.batch % c == 0]
        peers.append(StageProcessPeer(args, balance, even, "torch"))
        ways += [(peers[-1].name, split_size(args.batch, c), c, peers[-1].runner(c))
                 for c in even]
    if on_cpu:
        peers.append(StageProcessPeer(args, balance, list(args.chunks), "shardpipe"))
        ways += [(peers[-1].name, split_size(args.batch, c), c, peers[-1].runner(c))
                 for c in args.chunks]
    else:
        notes.append("shardpipe, process per stage: skipped (CPU only here: its CUDA stages "
                     "have not run on a GPU yet)")
    peer_note = "\n".join(notes) or None
    try:
        rows = measure_interleaved(ways, args.repeats)
    finally:
        for peer in peers:
            peer.close()
    if 1 in args.chunks:
        naive = next(r for r in rows if r[0] == "naive split")
        rows.insert(rows.index(naive) + 1, ("hand-written",) + naive[1:])

    # The timeline of 1F1B's best chunk count, preferring one that pipelines (chunks > 1).
    candidates = [r for r in rows if r[0] == "shardpipe 1f1b" and r[2] > 1] or \
        [r for r in rows if r[0] == "shardpipe 1f1b"]
    best_chunks = min(candidates, key=lambda r: statistics.mean(r[3]))[2]
    timelines = []
    for schedule in ("gpipe", "1f1b"):
        pipe = pipes[schedule, best_chunks]
        with pipe.record_trace() as trace:
            pipeline_step(pipe, args.lr)(*batches[0])
        synchronize(devices)
        path = os.path.join(args.out, f"resnet50_timeline_{schedule}")
        trace.save(path + ".json")
        gantt(trace, path + ".png", f"shardpipe {schedule}: ResNet-50, {stages} stages, "
              f"{best_chunks} micro-batches (bubble {trace.bubble_fraction():.2f})")
        timelines.append((schedule, trace.bubble_fraction()))
    for pipe in pipes.values():
        pipe.close()
    torch.set_num_threads(threads)

    report(args, rows, balance, timelines, peer_note)
    if plan is not None:
        report_autotune(args, rows, plan, pipes, balance, balance_s)


def report_autotune(args, rows, plan, pipes, balance, balance_s):
    """The autotuned configuration beside the best of the sweep and the default, from the
    same interleaved runs, with what finding each cost."""
    print(plan)
    sweep = [r for r in rows if r[0] in ("shardpipe gpipe", "shardpipe 1f1b")]
    # What the sweep cost: the balance, then per configuration its warm-up and timed runs
    # (the warm-up taken as long as an average run).
    sweep_s = balance_s + sum(sum(r[3]) + statistics.mean(r[3]) for r in sweep)
    best = min(sweep, key=lambda r: statistics.mean(r[3]))
    auto = next(r for r in rows if r[0] == "shardpipe autotuned")
    default = next(r for r in rows if r[0] == "shardpipe default")
    kw = plan.kwargs
    lines = [
        ("autotuned", kw["schedule"], kw["chunks"], kw["checkpoint"], kw["balance"], auto,
         f"{plan.total_s:.1f} (autotune)"),
        ("best of sweep", best[0].split()[-1], best[2], "never", balance, best,
         f"{sweep_s:.1f} (sweep)"),
        ("default", pipes["default"].schedule, pipes["default"].chunks,
         pipes["default"].checkpoint, pipes["default"].balance, default, ""),
    ]
    best_mean = statistics.mean(best[3])
    print(f"{'configuration':<14} {'schedule':<12} {'chunks':>6} {'checkpoint':<12} "
          f"{'balance':<10} {'mean s':>8} {'std s':>7} {'vs sweep best':>13} "
          f"{'found in s':>18}")
    for name, schedule, chunks, checkpoint, bal, row, found in lines:
        mean = statistics.mean(row[3])
        print(f"{name:<14} {schedule:<12} {chunks:>6} {checkpoint:<12} {str(bal):<10} "
              f"{mean:>8.3f} {statistics.pstdev(row[3]):>7.3f} {best_mean / mean:>12.2f}x "
              f"{found:>18}")
    sys.stdout.flush()


def report(args, rows, balance, timelines, peer_note):
    single = statistics.mean(rows[0][3])
    if all(d == "cpu" for d in args.devices):
        where = f"CPU, {os.cpu_count()} cores"
    else:
        where = ", ".join(torch.cuda.get_device_name(torch.device(d))
                          for d in dict.fromkeys(args.devices) if d != "cpu")
    print(f"ResNet-50, batch {args.batch}, {args.image_size}x{args.image_size} images, "
          f"{args.classes} classes, {args.batches} batches per run, {args.repeats} runs; "
          f"stages on {', '.join(args.devices)} ({where}); balance {balance}")
    print(f"{'way':<28} {'split':>6} {'chunks':>6} {'mean s':>9} {'std s':>8} {'vs single':>10}")
    for way, split, chunks, samples in rows:
        mean = statistics.mean(samples)
        std = statistics.pstdev(samples)
        print(f"{way:<28} {split or '':>6} {chunks or '':>6} {mean:>9.3f} {std:>8.3f} "
              f"{single / mean:>9.2f}x")
    if peer_note:
        print(peer_note)
    for schedule, bubble in timelines:
        print(f"bubble fraction, shardpipe {schedule} (one step, traced): {bubble:.2f}")

    best = OrderedDict()
    for way, split, chunks, samples in rows:
        if way not in best or statistics.mean(samples) < statistics.mean(best[way][3]):
            best[way] = (way, split, chunks, samples)
    print("best of each way: " + "; ".join(
        f"{way} {single / statistics.mean(r[3]):.2f}x" + (f" (split {r[1]})" if r[2] else "")
        for way, r in best.items()))
    bars([way + (f"\nsplit {r[1]}" if r[2] and r[2] > 1 else "") for way, r in best.items()],
         [statistics.mean(r[3]) for r in best.values()],
         [statistics.pstdev(r[3]) for r in best.values()],
         os.path.join(args.out, "resnet50_ways.png"),
         f"ResNet-50 training, {len(args.devices)} stages, batch {args.batch}, "
         f"{args.image_size}px", f"seconds per {args.batches} batches")
    series = OrderedDict()
    for way, split, _, samples in rows:
        if way in ("hand-written", "shardpipe gpipe", "shardpipe 1f1b", "torch pipelining",
                   "shardpipe, process per stage"):
            xs, means, stds = series.setdefault(way, ([], [], []))
            xs.append(split)
            means.append(statistics.mean(samples))
            stds.append(statistics.pstdev(samples))
    curves(series, os.path.join(args.out, "resnet50_split_size.png"),
           f"ResNet-50, batch {args.batch}: time against split size", "split size (images)",
           f"seconds per {args.batches} batches", reference=(rows[0][0], single))
    print(f"plots in {args.out}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
