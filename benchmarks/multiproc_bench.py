"""The pipeline over ranks (``Pipeline(group=)``) against raw gloo and one process; prints ratios.

    python benchmarks/multiproc_bench.py
    python benchmarks/multiproc_bench.py --width 2048 --steps 20

Spawns two gloo ranks on loopback (one intra-op thread each). Sections:

1. Hand-off cost: a two-stage pipeline (an identity stage, then one that keeps a column of
   its input), ``pipe(x)`` under ``torch.no_grad()`` with ``--chunks`` micro-batches, per
   micro-batch, against raw gloo sends of the same tensor timed in the same processes: one
   at a time (a ping-pong, halved), and ``--chunks`` in flight at once into buffers allocated
   before the clock starts, as the pipeline's hand-offs are. The pipeline's figure holds the
   prefix of each hand-off (packed with the tensor up to 256 KiB, a message of its own above)
   and, per step, the small records between the ranks (the batch from the first stage's rank
   before the phase, every rank's outcome after it), spread over the micro-batches.
   The last stage keeps one column so that the output's concatenation, which is the
   pipeline's and not the hand-off's, stays out of the figure.
2. Training throughput: an MLP of ``--blocks`` Linear+ReLU blocks, ``train_step`` with 1F1B,
   over two ranks against the one-process pipeline on two CPU stages (``["cpu", "cpu"]``,
   one thread each) and the plain model on one thread; the same batch and seed everywhere.

Times are medians over interleaved rounds; ratios are against the baseline named in each
row. Nothing here asserts on time.
"""

import argparse
import copy
import datetime
import functools
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
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 16384, 262144, 1048576],
                        help="floats per hand-off (section 1)")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024, help="MLP width (section 2)")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    return parser.parse_args()


def median_time(fn, steps, rounds):
    return interleaved_medians([fn], steps, rounds)[0][0]


def interleaved_medians(fns, steps, rounds):
    """Per function, the medians over `rounds` of its wall time and of this process's CPU time
    (all its threads) per call; the rounds of the functions alternate, so that a slower spell
    of the machine reaches them all alike."""
    for fn in fns:
        fn()
    walls = [[] for _ in fns]
    cpus = [[] for _ in fns]
    for _ in range(rounds):
        for fn, wall, cpu in zip(fns, walls, cpus):
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                fn()
            wall.append((time.perf_counter() - start) / steps)
            cpu.append((time.process_time() - start_cpu) / steps)
    return [(statistics.median(w), statistics.median(c)) for w, c in zip(walls, cpus)]


def across_ranks(seconds, op):
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.item()


slowest = functools.partial(across_ranks, op=dist.ReduceOp.MAX)
both_ranks = functools.partial(across_ranks, op=dist.ReduceOp.SUM)


def forward_no_grad(pipe, x):
    with torch.no_grad():
        pipe(x)


def raw_send_recv(rank, x):
    """A gloo send of ``x`` from rank 0 to rank 1 and back (a call's time is twice one way)."""
    buf = torch.empty_like(x)

    def ping_pong():
        if rank == 0:
            dist.send(x, 1)
            dist.recv(buf, 1)
        else:
            dist.recv(buf, 0)
            dist.send(x, 0)

    return ping_pong


def raw_in_flight(rank, x):
    """The rows of ``x`` sent from rank 0 to rank 1 all at once, received into buffers made
    beforehand, then a one-element reply (as the pipeline's outcome round)."""
    rows = [x[i:i + 1] for i in range(x.shape[0])]
    bufs = [torch.empty_like(r) for r in rows]
    reply = torch.zeros(1)

    def stream():
        if rank == 0:
            works = [dist.isend(r, 1, tag=i) for i, r in enumerate(rows)]
            for w in works:
                w.wait()
            dist.recv(reply, 1, tag=len(rows))
        else:
            works = [dist.irecv(b, 0, tag=i) for i, b in enumerate(bufs)]
            for w in works:
                w.wait()
            dist.send(reply, 0, tag=len(rows))

    return stream


class KeepColumn(nn.Module):
    """The last stage of the hand-off pipeline: a view of one column, so that concatenating
    the micro-batches' outputs costs next to nothing."""

    def forward(self, x):
        return x[:, :1]


def mlp(args):
    torch.manual_seed(0)
    layers = []
    for _ in range(args.blocks):
        layers += [nn.Linear(args.width, args.width), nn.ReLU()]
    return nn.Sequential(*layers)


def rank_main(rank, world, port, args, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            init_method=f"tcp://127.0.0.1:{port}",
                            timeout=datetime.timedelta(seconds=120))
    rows = []
    pipe = shardpipe.Pipeline(nn.Sequential(nn.Identity(), KeepColumn()), group=dist.group.WORLD,
                              chunks=args.chunks)
    for size in args.sizes:
        x = torch.randn(args.chunks, size)  # one row, `size` floats, per micro-batch
        times = interleaved_medians([raw_send_recv(rank, x[:1].contiguous()),
                                     raw_in_flight(rank, x),
                                     functools.partial(forward_no_grad, pipe, x)],
                                    args.steps, args.rounds)
        raw, flight, per = (slowest(wall) for wall, _ in times)
        flight_cpu, per_cpu = (both_ranks(cpu) for _, cpu in times[1:])
        rows.append((size * 4, raw / 2, flight / args.chunks, per / args.chunks,
                     per_cpu / flight_cpu))
    pipe.close()

    model = mlp(args)
    x = torch.randn(args.batch, args.width)
    y = torch.randn(args.batch, args.width)
    pipe = shardpipe.Pipeline(copy.deepcopy(model), group=dist.group.WORLD, chunks=args.chunks,
                              schedule="1f1b")
    loss_fn = nn.functional.mse_loss
    ranks_time = slowest(median_time(lambda: pipe.train_step(x, y, loss_fn), args.steps,
                                     args.rounds))
    before = pipe._engine.bytes_sent
    pipe.train_step(x, y, loss_fn)
    sent = torch.tensor([pipe._engine.bytes_sent - before], dtype=torch.float64)
    dist.all_reduce(sent)  # both directions: activations down, gradients up
    pipe.close()
    if rank == 0:
        queue.put((rows, ranks_time, int(sent.item())))
    dist.barrier()
    dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process(args):
    torch.set_num_threads(1)
    model = mlp(args)
    x = torch.randn(args.batch, args.width)
    y = torch.randn(args.batch, args.width)
    loss_fn = nn.functional.mse_loss
    pipe = shardpipe.Pipeline(copy.deepcopy(model), ["cpu", "cpu"], chunks=args.chunks,
                              schedule="1f1b")
    local = median_time(lambda: pipe.train_step(x, y, loss_fn), args.steps, args.rounds)
    pipe.close()

    def plain():
        model.zero_grad()
        loss_fn(model(x), y).backward()

    return local, median_time(plain, args.steps, args.rounds)


def main():
    args = parse_args()
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(rank_main, args=(2, free_port(), args, queue), nprocs=2,
                       start_method="spawn")
    rows, ranks_time, sent = queue.get()
    local, plain = one_process(args)

    print("1. Hand-off between two ranks, per micro-batch (gloo on loopback; us)")
    print(f"{'bytes':>10} {'raw, 1 at a time':>17} {f'raw, {args.chunks} in flight':>18} "
          f"{'shardpipe':>10} {'ratio to 1':>11} {f'ratio to {args.chunks}':>11} "
          f"{f'CPU ratio to {args.chunks}':>15}")
    for nbytes, raw, flight, per, cpu_ratio in rows:
        print(f"{nbytes:>10} {raw * 1e6:>17.1f} {flight * 1e6:>18.1f} {per * 1e6:>10.1f} "
              f"{per / raw:>11.2f} {per / flight:>11.2f} {cpu_ratio:>15.2f}")
    print("(CPU: both ranks' process CPU time, all threads; on a VM whose host takes its cores "
          "away now and then it varies less than the wall times)")
    print()
    print(f"2. Training step, MLP {args.blocks}x{args.width}, batch {args.batch}, "
          f"chunks {args.chunks}, 1f1b")
    print(f"{'configuration':<34} {'ms/step':>8} {'vs plain':>9} {'vs 1 process':>13}")
    for name, t in (("plain model, 1 thread", plain),
                    ("one process, 2 CPU stages", local),
                    ("2 ranks, 1 stage each", ranks_time)):
        print(f"{name:<34} {t * 1e3:>8.1f} {plain / t:>8.2f}x {local / t:>12.2f}x")
    print("(x: throughput relative to the column's baseline; above 1 is faster)")
    # What must cross between the two ranks per step: each micro-batch's activations down and
    # its gradients up; `sent` is what the ranks' transports posted, headers and records too.
    data = 2 * args.batch * args.width * 4
    print(f"bytes per step between the ranks: activations + gradients {data}, sent {sent} "
          f"(headers and records {sent - data}): {sent / data:.4f}x the tensors' bytes")

if __name__ == "__main__":
    main()
