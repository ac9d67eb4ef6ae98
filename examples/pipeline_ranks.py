"""Train a pipeline with one stage per process under torchrun, and check it against the plain model.

    torchrun --nproc-per-node 2 examples/pipeline_ranks.py                 # 2 stages, gloo
    torchrun --nproc-per-node 4 examples/pipeline_ranks.py --schedule zb1p

Every rank builds the same MLP (same seed) and wraps it in ``shardpipe.Pipeline(model,
group=dist.group.WORLD)``: rank r keeps and runs stage r only, activations and gradients
travel between the ranks as torch.distributed point-to-point messages, and ``train_step``
returns the loss on every rank. The plain model trains alongside on every rank as the
reference; the script exits non-zero if the loss or this rank's gradients part from it.
"""

import argparse
import copy
import sys

import torch
import torch.distributed as dist
from torch import nn

import shardpipe


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=8, help="Linear+ReLU blocks")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--schedule", default="1f1b",
                        choices=["gpipe", "1f1b", "interleaved", "zb1p", "zbv"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.05)
    return parser.parse_args()


def main():
    args = parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    layers = []
    for _ in range(args.blocks):
        layers += [nn.Linear(args.width, args.width), nn.ReLU()]
    model = nn.Sequential(*layers)
    reference = copy.deepcopy(model)
    pipe = shardpipe.Pipeline(model, group=dist.group.WORLD, chunks=args.chunks,
                              schedule=args.schedule)
    opt = torch.optim.SGD(pipe.parameters(), lr=args.lr)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=args.lr)
    loss_fn = nn.functional.mse_loss
    expected_grads = dict(reference.named_parameters())
    worst = 0.0
    for step in range(args.steps):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(args.batch, args.width, generator=generator)
        y = torch.randn(args.batch, args.width, generator=generator)
        opt.zero_grad()
        ref_opt.zero_grad()
        loss = pipe.train_step(x, y, loss_fn)
        ref_loss = loss_fn(reference(x), y)
        ref_loss.backward()
        worst = max(worst, abs(loss.item() - ref_loss.item()))
        for name, param in pipe.named_parameters():
            worst = max(worst, (param.grad - expected_grads[name].grad).abs().max().item())
        opt.step()
        ref_opt.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.6f} (plain model {ref_loss.item():.6f})")
    ok = worst < 1e-5
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (ok, worst))
    if rank == 0:
        worst_all = max(w for _, w in everyone)
        verdict = "OK" if all(o for o, _ in everyone) else "FAILED"
        print(f"{verdict}: loss and gradients equal the plain model's on every rank "
              f"(largest difference {worst_all:.2e}); stages on ranks {pipe.stage_ranks}")
    pipe.close()
    dist.destroy_process_group()
    return 0 if all(o for o, _ in everyone) else 1


if __name__ == "__main__":
    sys.exit(main())
