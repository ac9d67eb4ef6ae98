"""DP 2 x PP 2 against DistributedDataParallel over the plain model, 4 CPU processes; prints ratios.

    python benchmarks/hybrid_bench.py
    python benchmarks/hybrid_bench.py --width 1024 --blocks 8 --batch 64 --steps 10

Spawns four gloo ranks on loopback (one intra-op thread each); every configuration trains the
same MLP on the same global batch of ``--batch`` rows:

1. DDP: ``DistributedDataParallel`` over the plain model on 4 ranks, a quarter of the batch
   each (its buckets all-reduced during the backward, overlapped with it).
2. DP 2 x PP 2: ``Pipeline(model, mesh=shardpipe.mesh(dp=2, pp=2), chunks=--chunks,
   schedule="1f1b")``: two replicas of a two-stage pipeline, half the batch each.
3. The same pipeline under ``no_sync()``: the step without any gradient averaging.

The reduction alone: each rank all-reduces buffers the size of its stage's gradients over its
data-parallel group, by itself. How much of it the pipeline hides behind its drain:
``1 - exposed / alone``, with ``exposed`` the step time with the reduction minus the step
under ``no_sync`` (row "from step times"), and the caller's wait for the reduction after the
pipeline's last task as the trace records it (row "from the trace"). Times are medians over
interleaved rounds, of the slowest rank. Nothing here asserts on time.
"""

import argparse
import datetime
import pathlib
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from multiproc_bench import free_port, mlp, slowest  # noqa: E402 (this folder, as a script's)

import shardpipe  # noqa: E402

WORLD = 4
BUCKET_BYTES = 4 << 20  # the engine's bucket size (GradientReducer::kBucketBytes)
SCHEDULES = ("1f1b", "interleaved")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=8, help="Linear+ReLU blocks")
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    return parser.parse_args()


def timed(fn, steps):
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return slowest((time.perf_counter() - start) / steps)


def gather(value):
    """Every rank's ``value`` (a float), in rank order."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def bucket_sizes(params):
    """The element counts of the engine's buckets for ``params`` (one stage, one dtype)."""
    sizes, current = [], 0
    for p in reversed(list(params)):
        if current and current * 4 >= BUCKET_BYTES:
            sizes.append(current)
            current = 0
        current += p.numel() + 1  # and its presence flag
    return sizes + [current]


def rank_main(rank, port, args, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            init_method=f"tcp://127.0.0.1:{port}",
                            timeout=datetime.timedelta(seconds=300))
    loss_fn = nn.functional.mse_loss
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.width, generator=generator)
    y = torch.randn(args.batch, args.width, generator=generator)

    ddp = nn.parallel.DistributedDataParallel(mlp(args))
    x4, y4 = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]

    def ddp_step():
        ddp.zero_grad()
        loss_fn(ddp(x4), y4).backward()

    mesh = shardpipe.mesh(dp=2, pp=2)
    dp_group, dp_index = mesh["dp"].get_group(), mesh["dp"].get_local_rank()
    x2, y2 = x.chunk(2)[dp_index], y.chunk(2)[dp_index]
    configs = {"ddp": ddp_step}
    pipes = {}
    for schedule in SCHEDULES:
        pipe = shardpipe.Pipeline(mlp(args), mesh=mesh, chunks=args.chunks, schedule=schedule)
        pipes[schedule] = pipe

        def step(pipe=pipe):
            pipe.zero_grad()
            pipe.train_step(x2, y2, loss_fn)

        def step_no_sync(pipe=pipe, step=step):
            with pipe.no_sync():
                step()

        # The reduction alone: this rank's stages' gradients in the engine's buckets, in the
        # order it issues them.
        buffers = [torch.randn(n) for stage in reversed(pipe.stages)
                   for n in bucket_sizes(stage.parameters())]

        def alone(buffers=buffers):
            works = [dist.all_reduce(b, group=dp_group, async_op=True) for b in buffers]
            for w in works:
                w.wait()

        configs.update({schedule: step, f"{schedule} no_sync": step_no_sync,
                        f"{schedule} alone": alone})
    for fn in configs.values():
        fn()  # warm
    samples = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, fn in configs.items():
            samples[name].append(timed(fn, args.steps))
    times = {name: statistics.median(s) for name, s in samples.items()}
    per_rank = {}
    for schedule, pipe in pipes.items():
        with pipe.record_trace() as trace:
            for _ in range(args.steps):
                configs[schedule]()
        waits = [e["end_us"] - e["start_us"] for e in trace.events if e["phase"] == "reduce_wait"]
        alone_here = statistics.median(samples[f"{schedule} alone"])
        per_rank[schedule] = gather((statistics.median(waits) * 1e-6, alone_here,
                                     pipe.stage_ranks.index(pipe._rank)))
    if rank == 0:
        queue.put((times, per_rank))
    for pipe in pipes.values():
        pipe.close()
    dist.barrier()
    dist.destroy_process_group()


def main():
    args = parse_args()
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(rank_main, args=(free_port(), args, queue), nprocs=WORLD,
                       start_method="spawn")
    times, per_rank = queue.get()
    ddp = times["ddp"]
    print(f"MLP {args.blocks}x{args.width}, global batch {args.batch}, chunks {args.chunks}; "
          f"{WORLD} gloo ranks on loopback, 1 thread each")
    print(f"{'configuration':<38} {'ms/step':>8} {'vs DDP':>7} {'no_sync ms':>11} "
          f"{'exposed ms':>11}")
    print(f"{'DDP over the plain model, 4 ranks':<38} {ddp * 1e3:>8.1f} {1.0:>6.2f}x")
    for schedule in SCHEDULES:
        t, quiet = times[schedule], times[f"{schedule} no_sync"]
        print(f"{'shardpipe DP 2 x PP 2, ' + schedule:<38} {t * 1e3:>8.1f} {ddp / t:>6.2f}x "
              f"{quiet * 1e3:>11.1f} {max(0.0, t - quiet) * 1e3:>11.1f}")
    print("(exposed: the step with the reduction minus the step under no_sync)")
    print()
    print("share of each rank's gradient reduction hidden behind the drain (from the trace: "
          "1 - the caller's wait after the last task / the reduction alone)")
    print(f"{'schedule':<13} {'rank':>4} {'first stage':>12} {'alone ms':>9} {'waited ms':>10} "
          f"{'hidden':>7}")
    for schedule in SCHEDULES:
        shares = []
        for rank, (wait, alone, first) in enumerate(per_rank[schedule]):
            hidden = max(0.0, 1.0 - wait / alone) if alone > 0 else 0.0
            shares.append(hidden)
            print(f"{schedule:<13} {rank:>4} {first:>12} {alone * 1e3:>9.1f} "
                  f"{wait * 1e3:>10.1f} {hidden:>6.0%}")
        print(f"{schedule:<13} {'mean':>4} {'':>12} {'':>9} {'':>10} "
              f"{sum(shares) / len(shares):>6.0%}")
    if torch.cuda.device_count() >= WORLD:
        print("GPU scaling: not measured; the pipeline over ranks runs on the CPU (gloo) so far")
    else:
        print(f"GPU scaling: skipped ({torch.cuda.device_count()} GPUs here; needs {WORLD})")


if __name__ == "__main__":
    main()
