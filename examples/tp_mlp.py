"""Train a tensor-parallel MLP with torchrun, and check it against the plain model.

    torchrun --nproc-per-node 2 examples/tp_mlp.py                  # CPU: gloo
    torchrun --nproc-per-node 2 examples/tp_mlp.py --hidden 4096    # NCCL when every rank has a GPU

Every rank builds the same MLP (same seed), then ``shardpipe.parallelize`` swaps its two
``nn.Linear`` for a column- and a row-parallel layer over the process group: each rank holds
1/world of both weights, the input and the loss are the same on every rank, and a training
step needs one all-reduce forward and one backward. The unsharded MLP trains alongside on
every rank as the reference; the script prints both losses and exits non-zero if they part.
"""

import argparse
import copy
import gc
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import shardpipe


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=256, help="model width")
    parser.add_argument("--hidden", type=int, default=1024, help="MLP hidden width (sharded)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument(
        "--backend", choices=["auto", "gloo", "nccl"], default="auto",
        help="auto: NCCL when every local rank has its own GPU, else gloo on CPU",
    )
    return parser.parse_args()


def main():
    args = parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.device_count() >= local_world else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)
    reference = nn.Sequential(
        nn.Linear(args.dim, args.hidden), nn.GELU(), nn.Linear(args.hidden, args.dim)
    ).to(device)
    model = shardpipe.parallelize(
        copy.deepcopy(reference), {"0": "column", "2": "row"}, group=dist.group.WORLD
    )
    if rank == 0:
        print(f"{world} ranks, {backend}; rank 0 holds {model[0]}")

    torch.manual_seed(1)
    x = torch.randn(args.batch, args.dim, device=device)
    target = torch.randn(args.batch, args.dim, device=device)
    optimizers = [torch.optim.SGD(m.parameters(), lr=args.lr) for m in (model, reference)]
    worst = 0.0
    for step in range(args.steps):
        losses = []
        for m, optimizer in zip((model, reference), optimizers):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(m(x), target)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        worst = max(worst, abs(losses[0] - losses[1]))
        if rank == 0:
            print(f"step {step}: loss {losses[0]:.6f} (tensor parallel)  {losses[1]:.6f} (plain)")

    # Every rank calls state_dict(): over a group it gathers the shards (a collective).
    state = model.state_dict()
    weights_apart = max(
        (state[k] - v).abs().max().item() for k, v in reference.state_dict().items()
    )
    ok = worst < 1e-4 and weights_apart < 1e-4
    if rank == 0:
        verdict = "OK" if ok else "MISMATCH"
        print(f"{verdict}: largest loss difference {worst:.2e}, weight difference "
              f"{weights_apart:.2e}")
    # Drop the layers (which hold the process group) and finish every collective while Python
    # still runs: gloo's threads must not be left to finish work during interpreter exit.
    del model, optimizers
    gc.collect()  # layers caught in reference cycles would otherwise outlive the group
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
