"""Train with data, pipeline and tensor parallelism at once (DP x PP x TP) against the plain model.

    torchrun --nproc-per-node 8 examples/hybrid_3d.py                 # dp=2, pp=2, tp=2, gloo
    torchrun --nproc-per-node 4 examples/hybrid_3d.py --dp 2 --tp 1

``shardpipe.mesh`` lays the ranks out as a DeviceMesh (tensor parallel innermost); every rank
builds the same model (same seed), shards its MLP blocks over ``mesh["tp"]`` with
``shardpipe.parallelize``, and wraps it in ``shardpipe.Pipeline(model, mesh=mesh)``: the
stages run over the "pp" ranks and every stage's gradients are averaged over the "dp" ranks,
each as soon as its last backward is done. Each replica trains on its share of the global
batch; the plain model trains alongside on the whole batch as the reference, and the script
exits non-zero if the loss or the parameters (gathered with ``full_state_dict()``) part from it.
"""

import argparse
import copy
import sys

import torch
import torch.distributed as dist
from torch import nn

import shardpipe


class Block(nn.Module):
    """A residual MLP block: fc1 is sharded by columns, fc2 by rows (one all-reduce)."""

    def __init__(self, width):
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dp", type=int, default=None, help="default: what pp x tp leaves")
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="global batch, over all replicas")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b", "zb1p"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05)
    return parser.parse_args()


def main():
    args = parse_args()
    mesh = shardpipe.mesh(dp=args.dp, pp=args.pp, tp=args.tp)
    dp_size, dp_index = mesh["dp"].size(), mesh["dp"].get_local_rank()
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(args.width) for _ in range(args.blocks)])
    reference = copy.deepcopy(model)
    shardpipe.parallelize(model, {"*.fc1": "column", "*.fc2": "row"},
                          group=mesh["tp"].get_group())
    pipe = shardpipe.Pipeline(model, mesh=mesh, chunks=args.chunks, schedule=args.schedule)
    opt = torch.optim.SGD(pipe.parameters(), lr=args.lr)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=args.lr)
    loss_fn = nn.functional.mse_loss
    worst = 0.0
    for step in range(args.steps):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(args.batch, args.width, generator=generator)
        y = torch.randn(args.batch, args.width, generator=generator)
        opt.zero_grad()
        ref_opt.zero_grad()
        # This replica's share; train_step returns its loss, the mean over replicas is the
        # global batch's.
        loss = pipe.train_step(x.chunk(dp_size)[dp_index], y.chunk(dp_size)[dp_index], loss_fn)
        dist.all_reduce(loss, group=mesh["dp"].get_group())
        loss /= dp_size
        ref_loss = loss_fn(reference(x), y)
        ref_loss.backward()
        worst = max(worst, abs(loss.item() - ref_loss.item()))
        opt.step()
        ref_opt.step()
        if dist.get_rank() == 0:
            print(f"step {step}: loss {loss.item():.6f} (plain model {ref_loss.item():.6f})")
    full = pipe.full_state_dict()
    for name, value in reference.state_dict().items():
        worst = max(worst, (full[name] - value).abs().max().item())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, worst)
    ok = max(everyone) < 1e-5
    if dist.get_rank() == 0:
        verdict = "OK" if ok else "FAILED"
        shape = dict(zip(mesh.mesh_dim_names, mesh.shape))
        print(f"{verdict}: loss and parameters follow the plain model on every rank "
              f"(largest difference {max(everyone):.2e}); mesh {shape}")
    pipe.close()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
