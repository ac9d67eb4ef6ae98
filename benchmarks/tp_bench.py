"""Tensor-parallel MLP vs the nn.Linear MLP, measured side by side; prints ratios.

    python benchmarks/tp_bench.py                       # hidden 4096, as in the issue
    python benchmarks/tp_bench.py --dim 512 --hidden 2048 --steps 5

The MLP is ``fc2(gelu(fc1(x)))`` (dim -> hidden -> dim), one training step = forward +
backward. Sections:

1. CPU, gloo over ``--world`` processes (spawned here, one intra-op thread each): the
   tensor-parallel MLP (column -> row, one all-reduce forward and one backward) with the
   backward overlap on and off, and with the forward all-reduce in ``--chunks`` pieces,
   against the nn.Linear MLP timed in the same processes with
   the same one thread. Times are the slowest rank's, median over steps.
2. CPU, one process, ``devices=["cpu"] * world``: the shards on their own threads, against
   nn.Linear in the same process.
3. GPU (when there is one): one shard (``devices=["cuda:0"]``) against nn.Linear: the
   overhead of the operator and its C++ autograd on the same math.

Ratios below 1 mean the tensor-parallel layer is faster. Nothing here asserts on time.
Writes benchmarks/out/tp_bench.png when matplotlib is installed.
"""

import argparse
import datetime
import os
import pathlib
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import shardpipe  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--world", type=int, default=2, help="processes (and CPU shards)")
    parser.add_argument("--chunks", type=int, default=4, help="forward pieces (gloo section)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=2)
    return parser.parse_args()


def plain_mlp(args, device, dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(args.dim, args.hidden, device=device, dtype=dtype),
        nn.GELU(),
        nn.Linear(args.hidden, args.dim, device=device, dtype=dtype),
    )


def step(model, x):
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()


def time_steps(model, x, args, sync):
    """Seconds of each of ``args.steps`` training steps; ``sync`` returns the time all
    workers agree on (called with None before a step, as a barrier)."""
    for _ in range(args.warmup):
        step(model, x)
    times = []
    for _ in range(args.steps):
        sync(None)
        start = time.perf_counter()
        step(model, x)
        times.append(sync(time.perf_counter() - start))
    return times


def compare(configs, x, args, sync):
    """Median step time of every ``{name: (model, before)}``, measured in interleaved rounds
    so that a drift in the machine's load spreads over all of them."""
    times = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, (model, before) in configs.items():
            before()
            times[name] += time_steps(model, x, args, sync)
    return {name: statistics.median(t) for name, t in times.items()}


# --- section 1: gloo over processes -----------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank, world, port, args, queue):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}",
        timeout=datetime.timedelta(minutes=10),
    )

    def slowest_rank(elapsed):
        # Barrier before a step (elapsed None); the slowest rank's time after it.
        value = torch.tensor([0.0 if elapsed is None else elapsed], dtype=torch.float64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value.item()

    x = torch.randn(args.batch, args.dim, generator=torch.Generator().manual_seed(1))
    plain = plain_mlp(args, "cpu")
    parallel = shardpipe.parallelize(
        plain_mlp(args, "cpu"), {"0": "column", "2": "row"}, group=dist.group.WORLD
    )

    def setting(overlap, chunks):
        def before():
            shardpipe._C._set_collective_overlap(overlap)
            parallel[2].chunks = chunks
        return before

    configs = {
        "plain": (plain, lambda: None),
        "overlap on": (parallel, setting(True, 1)),
        "overlap off": (parallel, setting(False, 1)),
        f"overlap on, chunks {args.chunks}": (parallel, setting(True, args.chunks)),
    }
    times = compare(configs, x, args, slowest_rank)
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def gloo_section(args):
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(
        rank_main, args=(args.world, free_port(), args, queue), nprocs=args.world,
        start_method="spawn",
    )
    return queue.get()


# --- sections 2 and 3: one process ---------------------------------------------------------


def local_section(args, devices, device):
    x = torch.randn(args.batch, args.dim, device=device)
    plain = plain_mlp(args, device)
    parallel = shardpipe.parallelize(
        plain_mlp(args, device), {"0": "column", "2": "row"}, devices=devices
    )
    if device.type == "cuda":
        def sync(elapsed):
            torch.cuda.synchronize()
            return elapsed
    else:
        def sync(elapsed):
            return elapsed
    configs = {"plain": (plain, lambda: None), "sharded": (parallel, lambda: None)}
    return compare(configs, x, args, sync)


def main():
    args = parse_args()
    rows = []
    shape = f"batch {args.batch}, {args.dim}->{args.hidden}->{args.dim}, fp32"
    print(f"tensor-parallel MLP, {shape}; median of {args.rounds}x{args.steps} "
          f"training steps (forward + backward), interleaved; {os.cpu_count()} CPU cores")

    gloo = gloo_section(args)
    for mode in ("overlap on", "overlap off", f"overlap on, chunks {args.chunks}"):
        rows.append((f"CPU gloo x{args.world} procs (1 thread each), TP {mode}",
                     gloo["plain"], gloo[mode]))

    local = local_section(args, ["cpu"] * args.world, torch.device("cpu"))
    rows.append((f"CPU 1 process, devices=['cpu']*{args.world} (shard threads)",
                 local["plain"], local["sharded"]))

    if torch.cuda.is_available():
        cuda = torch.device("cuda", 0)
        one = local_section(args, [cuda], cuda)
        rows.append((f"GPU {torch.cuda.get_device_name(0)}: one shard", one["plain"],
                     one["sharded"]))
    else:
        print("(no CUDA device: GPU section skipped)")

    width = max(len(r[0]) for r in rows)
    print(f"\n{'configuration':<{width}}  {'nn.Linear ms':>12}  {'sharded ms':>10}  "
          f"{'ratio':>6}")
    for name, base, sharded in rows:
        print(f"{name:<{width}}  {base * 1e3:>12.2f}  {sharded * 1e3:>10.2f}  "
              f"{sharded / base:>6.3f}")
    on, off = gloo["overlap on"], gloo["overlap off"]
    print(f"\nbackward overlap on / off (gloo): {on / off:.3f}")
    plot(rows)


def plot(rows):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.5))
    ax.barh([r[0] for r in rows], [r[2] / r[1] for r in rows])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("time of the sharded MLP / time of the nn.Linear MLP")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "tp_bench.png", dpi=120)
    print(f"plot: {out / 'tp_bench.png'}")


if __name__ == "__main__":
    main()
