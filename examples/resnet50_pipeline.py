"""Train torchvision's ResNet-50 as a shardpipe pipeline, checked against the one-device run.

The model is the stock ``torchvision.models.resnet50`` (random init, nothing downloaded); the
data are synthetic ImageNet-shaped batches. Wrapping it takes three lines (``nested=True``
lets a stage end inside ``layer3``, which balances two stages better)::

    model = torchvision.models.resnet50(num_classes=1000)
    balance = shardpipe.balance_by_time(model, sample, len(devices), nested=True)
    pipe = shardpipe.Pipeline(model, devices, chunks=4, balance=balance, nested=True)
    loss = pipe.train_step(images, labels, F.cross_entropy); optimizer.step()

Devices: every GPU when there are several, two stages on the GPU when there is one, else two
CPU stages (a worker thread each, sharing the cores; ``--devices`` chooses by hand).

The same model (a ``copy.deepcopy`` taken before wrapping) is then trained on one device on
the same batches with the same SGD, and the script prints the largest difference of the
losses and of the final parameters and buffers. BatchNorm in train mode normalises each
micro-batch with its own statistics in a pipeline, so the reference is not the full-batch
run but the micro-batched one: the same micro-batches one after another, each loss weighted
by its share of the batch (gradient accumulation), which updates BatchNorm's running
statistics micro-batch by micro-batch in the same order too. On CPU, with each operator
given the same number of threads as in a stage, it matches the pipeline bit for bit, so any
difference there is a bug. On GPUs expect rounding-sized differences that grow from step to
step: BatchNorm over small micro-batches and max-pooling's arg-max magnify them.

    python examples/resnet50_pipeline.py                    # about a minute on 2 CPU cores
    python examples/resnet50_pipeline.py --image-size 224 --batch 64 --chunks 8 --steps 20
    python examples/resnet50_pipeline.py --json             # last line: the numbers as JSON
    python examples/resnet50_pipeline.py --autotune         # balance, chunks, schedule and
                                                            # checkpointing by shardpipe.autotune
"""

import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import shardpipe as sp


def default_devices():
    gpus = torch.cuda.device_count()
    if gpus > 1:
        return [f"cuda:{i}" for i in range(gpus)]
    if gpus == 1:
        return ["cuda:0", "cuda:0"]
    return ["cpu", "cpu"]


def synthetic_batches(steps, batch, image_size, classes, seed):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, image_size, image_size, generator=generator),
             torch.randint(0, classes, (batch,), generator=generator)) for _ in range(steps)]


def synchronize(devices):
    for device in {torch.device(d) for d in devices}:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def max_difference(got, want):
    """Largest |got - want| over the tensors of two name -> tensor dicts with the same names
    (integer buffers count as floats)."""
    return max(((got[name].detach().double().cpu() - tensor.detach().double().cpu())
                .abs().max().item() for name, tensor in want.items()), default=0.0)


def train_pipeline(model, devices, batches, args):
    """Returns the pipeline, its losses, the seconds of the timed steps and one step's trace.
    With ``--autotune`` the configuration is ``shardpipe.autotune``'s, written into ``args``
    (chunks, schedule, checkpoint) so that the baseline cuts the same micro-batches."""
    if args.autotune:
        images, labels = batches[0]
        plan = sp.autotune(model, images.to(devices[0]), labels.to(devices[-1]),
                           F.cross_entropy, devices, nested=True)
        print(plan)
        kwargs = plan.kwargs
        args.chunks, args.schedule = kwargs["chunks"], kwargs["schedule"]
        args.checkpoint = kwargs["checkpoint"]
    else:
        micro = -(-args.batch // args.chunks)  # the first micro-batch, as torch.chunk cuts it
        sample = batches[0][0][:micro].to(devices[0])
        balance = sp.balance_by_time(model, sample, len(devices), device=devices[0],
                                     nested=True)
        kwargs = dict(chunks=args.chunks, balance=balance, schedule=args.schedule,
                      checkpoint=args.checkpoint, nested=True)
    pipe = sp.Pipeline(sp.sequentialize(model), devices, **kwargs)
    optimizer = torch.optim.SGD(pipe.parameters(), lr=args.lr, momentum=0.9)

    losses, seconds, trace = [], 0.0, None
    progress = tqdm(batches, desc=f"pipeline ({len(devices)} stages)", unit="step",
                    file=sys.stderr)
    for step, (images, labels) in enumerate(progress):
        images, labels = images.to(devices[0]), labels.to(devices[-1])
        synchronize(devices)
        start = time.perf_counter()
        if step == len(batches) - 1:
            with pipe.record_trace() as trace:
                loss = pipe.train_step(images, labels, F.cross_entropy)
        else:
            loss = pipe.train_step(images, labels, F.cross_entropy)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(devices)
        # The first step pays for allocations and one-time set-up; leave it out when we can.
        if step > 0 or len(batches) == 1:
            seconds += time.perf_counter() - start
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.4f}")
    return pipe, losses, seconds, trace


def train_baseline(model, device, batches, args):
    """The same steps on one device: the same micro-batches one after another, each loss
    weighted by its share of the batch (gradient accumulation), as the pipeline does."""
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    losses = []
    for images, labels in tqdm(batches, desc="baseline (1 device)", unit="step",
                               file=sys.stderr):
        images, labels = images.to(device), labels.to(device)
        loss = 0.0
        for part, target in zip(images.chunk(args.chunks), labels.chunk(args.chunks)):
            share = F.cross_entropy(model(part), target) * (part.shape[0] / images.shape[0])
            share.backward()
            loss = loss + share.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, losses


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    parser.add_argument("--image-size", type=int, default=64, help="height = width")
    parser.add_argument("--steps", type=int, default=5, help="SGD steps")
    parser.add_argument("--chunks", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--schedule", choices=["gpipe", "1f1b"], default="1f1b")
    parser.add_argument("--devices", nargs="+", default=None,
                        help="one device per stage (default: see above)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true",
                        help="print the results as one JSON line at the end")
    parser.add_argument("--autotune", action="store_true",
                        help="let shardpipe.autotune choose balance, chunks, schedule and "
                             "checkpointing (overrides --chunks and --schedule)")
    args = parser.parse_args()
    for name in ("batch", "image_size", "steps", "chunks", "classes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    devices = args.devices or default_devices()
    args.checkpoint = "never"

    torch.manual_seed(args.seed)
    model = torchvision.models.resnet50(num_classes=args.classes)
    baseline = copy.deepcopy(model)
    batches = synthetic_batches(args.steps, args.batch, args.image_size, args.classes, args.seed)

    # CPU stages share the cores: each worker gets its share of the intra-op threads. The
    # baseline runs with the same count, so that every operator computes exactly what it
    # computes in a stage (BatchNorm on small micro-batches magnifies rounding differences
    # from step to step; the timing against one device is benchmarks/resnet50.py's job).
    cpu_stages = sum(torch.device(d).type == "cpu" for d in devices)
    if cpu_stages:
        torch.set_num_threads(max(1, torch.get_num_threads() // cpu_stages))
    pipe, losses, seconds, trace = train_pipeline(model, devices, batches, args)
    baseline, base_losses = train_baseline(baseline, devices[0], batches, args)

    state, base_state = pipe.state_dict(), baseline.state_dict()
    if list(state) != list(base_state):
        raise SystemExit("the pipeline's state_dict keys differ from the model's")
    timed_steps = max(1, args.steps - 1)
    results = {
        "devices": [str(d) for d in pipe.devices],
        "balance": pipe.balance,
        "chunks": args.chunks,
        "schedule": args.schedule,
        "checkpoint": args.checkpoint,
        "images_per_s": args.batch * timed_steps / seconds,
        "bubble_fraction": trace.bubble_fraction(),
        "loss": losses,
        "baseline_loss": base_losses,
        "max_loss_difference": max(abs(a - b) for a, b in zip(losses, base_losses)),
        "max_parameter_difference": max_difference(dict(pipe.named_parameters()),
                                                   dict(baseline.named_parameters())),
        "max_buffer_difference": max_difference(dict(pipe.named_buffers()),
                                                dict(baseline.named_buffers())),
        "max_parameter_magnitude": max(p.detach().abs().max().item()
                                       for p in baseline.parameters()),
    }
    pipe.close()

    print(f"devices: {', '.join(results['devices'])}  (CPU: {os.cpu_count()} cores)")
    chosen_by = "shardpipe.autotune" if args.autotune else "balance_by_time"
    print(f"balance (blocks per stage, by {chosen_by}): {results['balance']}")
    print(f"throughput: {results['images_per_s']:.1f} images/s ({args.schedule}, "
          f"{args.chunks} micro-batches of {args.image_size}x{args.image_size} images, "
          f"{torch.get_num_threads()} intra-op thread(s) per CPU stage)")
    print(f"bubble fraction (last step's trace): {results['bubble_fraction']:.2f}")
    print(f"loss after {args.steps} steps: {losses[-1]:.6f} (baseline {base_losses[-1]:.6f})")
    print(f"largest difference from the one-device baseline: loss "
          f"{results['max_loss_difference']:.2e}, parameters "
          f"{results['max_parameter_difference']:.2e} (largest parameter "
          f"{results['max_parameter_magnitude']:.2f}), buffers "
          f"{results['max_buffer_difference']:.2e}")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
