"""``autotune``: choose a pipeline's balance, chunks, schedule and checkpointing by measuring.

The model is profiled once, block by block; the C++ cost model (``_C.predict_step``, over
``csrc/shardpipe/pipeline/cost_model.h``) replays every candidate's schedule with those costs
and predicts its step time and peak memory; the best few that fit the memory limit run for
real and the fastest wins. Python only enumerates the candidates and formats the table.
"""

import copy
import math
import time

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from . import _C, _ranks
from ._blocks import _blocks
from ._checks import as_device, as_device_list, check_bool, check_instance, check_int, check_number
from .balance import _check_sample, _detach, _fresh, _saved_by_backward, _synchronize
from .pipeline import Pipeline
from .sequentialize import sequentialize
from .skip import _Stage

__all__ = ["Plan", "autotune"]

# Schedules that run two stages per device: the others run one.
_TWO_STAGES_PER_DEVICE = ("interleaved", "zbv")


def _size(n):
    """Bytes for a table: B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


class Plan:
    """What :func:`autotune` chose, and why.

    Attributes:
        kwargs: the keyword arguments for ``shardpipe.Pipeline(model, devices, **kwargs)``:
            ``balance``, ``chunks``, ``schedule``, ``checkpoint`` (and ``nested`` when the
            blocks were cut inside nested Sequentials).
        table: every candidate, one dict each, fastest predicted first: ``schedule``,
            ``chunks``, ``checkpoint``, ``balance``, ``predicted_s``, ``bubble``,
            ``predicted_bytes`` (peak per device), ``fits`` (within ``max_memory``),
            ``measured_s`` (None where not run) and ``measured_bytes`` (CUDA only).
        profile: the per-block measurements, reusable as ``autotune(..., profile=...)``.
        profile_s, measure_s, total_s: seconds spent profiling, measuring and in all.
        reason: why the winner won.
        projection: the predicted scaling table (``target_devices=``), or None.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> x, y = torch.randn(16, 8), torch.randn(16, 4)
        >>> plan = shardpipe.autotune(model, x, y, nn.functional.mse_loss, ["cpu", "cpu"],
        ...                           chunks=[2, 4], measure=1, steps=1, progress=False)
        >>> sorted(plan.kwargs)
        ['balance', 'checkpoint', 'chunks', 'schedule']
        >>> pipe = shardpipe.Pipeline(model, ["cpu", "cpu"], **plan.kwargs)
        >>> print(plan)  # doctest: +SKIP
    """

    def __init__(self, kwargs, table, profile, profile_s, measure_s, total_s, reason,
                 projection=None):
        self.kwargs = kwargs
        self.table = table
        self.profile = profile
        self.profile_s = profile_s
        self.measure_s = measure_s
        self.total_s = total_s
        self.reason = reason
        self.projection = projection

    def __repr__(self):
        return f"Plan({self.kwargs})"

    def _calibration(self):
        """How far the model was off where it can be checked: measured over predicted."""
        ratios = [r["measured_s"] / r["predicted_s"] for r in self.table
                  if r["measured_s"] is not None and r["predicted_s"] > 0]
        if not ratios:
            return []
        return [f"  measured / predicted over the {len(ratios)} measured: "
                f"{min(ratios):.2f} to {max(ratios):.2f}"]

    def __str__(self):
        lines = [f"autotune: {self.kwargs}",
                 f"  {self.reason}",
                 f"  profile {self.profile_s:.2f} s (its cost), measuring {self.measure_s:.2f} s, "
                 f"total {self.total_s:.2f} s",
                 *self._calibration(),
                 f"{'schedule':<12} {'chunks':>6} {'checkpoint':<12} {'balance':<16} "
                 f"{'pred s':>9} {'bubble':>6} {'pred peak':>14} {'fits':>4} "
                 f"{'meas s':>9} {'meas peak':>10}"]
        for row in self.table:
            measured = "" if row["measured_s"] is None else f"{row['measured_s']:.4f}"
            meas_mem = "" if not row["measured_bytes"] else \
                _size(max(row["measured_bytes"].values()))
            lines.append(
                f"{row['schedule']:<12} {row['chunks']:>6} {row['checkpoint']:<12} "
                f"{str(row['balance']):<16} {row['predicted_s']:>9.4f} {row['bubble']:>6.2f} "
                f"{_size(max(row['predicted_bytes'].values())):>14} "
                f"{'yes' if row['fits'] else 'no':>4} {measured:>9} {meas_mem:>10}")
        if self.projection is not None:
            lines.append(self.projection)
        return "\n".join(lines)


def autotune(model, sample, target, loss_fn, devices=None, max_memory=None, *, group=None,
             chunks=None, schedules=None, checkpoints=None, measure=3, steps=2, repeats=3,
             nested=False, progress=True, profile=None, target_devices=None, device_flops=None,
             link_bandwidth=None, link_latency=10e-6):
    """Choose ``balance``, ``chunks``, ``schedule`` and ``checkpoint`` for a training step.

    1. Profiles each block once (on ``devices[0]``, in train mode, on copies, the RNG state
       restored; on CPU with each CPU stage's share of ``torch.get_num_threads()``):
       forward, input-gradient and weight-gradient seconds (the fastest of
       ``repeats`` after a warm-up; noise only adds time) and bytes of its input, output,
       saved activations, parameters (counted twice: their gradients) and buffers, at the
       full batch and at the smallest micro-batch; the loss is timed with the last block.
       Its cost is reported (``plan.profile_s``).
    2. Enumerates candidates: every schedule in ``schedules`` (one stage per device, two with
       ``"interleaved"`` and ``"zbv"``), balance from the exact partitioner
       (``_C.balance_partition``) over the measured block times, every count in ``chunks``
       and mode in ``checkpoints``; the C++ cost model replays each one's schedule with the
       profile, the engine's per-task cost (timed on a pipeline of stages that do next to
       nothing; ``_C._engine_overhead`` is its C++ share) and the copies between
       devices, predicting step time, bubble and peak memory per device.
    3. Drops candidates over ``max_memory``, runs the ``measure`` fastest predicted for
       real (``steps`` timed ``train_step`` calls after a warm-up, on the executor's worker
       threads, on copies of the model) and returns the fastest measured. Ties and order are
       deterministic given the measurements.

    Memory counts parameters, gradients, buffers and the activations the schedule holds;
    not optimizer state, nor what a forward makes and frees on its way.

    With ``group`` (a collective: every rank of the group calls it alike) the plan is for
    ``Pipeline(model, group=group, **plan.kwargs)``: each rank profiles its share of the
    blocks (running the ones before it only to get their input) and the ranks pool the
    profiles; the engine's per-task cost and the hand-off between ranks (gloo point-to-point)
    are measured over the group, and each candidate run for real is a pipeline over the group,
    timed by its slowest rank. Every rank computes the same table and returns the same plan.
    The table's devices are then ``cpu:r`` for rank r.

    Args:
        model: an ``nn.Sequential``, or a model :func:`shardpipe.sequentialize` accepts.
        sample: one mini-batch (a Tensor, or a tuple of them), as ``train_step`` gets it.
        target: the matching target for ``loss_fn(output, target)``.
        loss_fn: the loss, mean-reduced as ``train_step``'s default expects.
        devices: the pipeline's devices (``"cpu"`` may repeat); not with ``group``.
        max_memory: None, bytes for every device, or ``{device: bytes}`` (devices not
            named have no limit; with ``group`` bytes per rank only). Below what every
            candidate needs: ``ValueError`` saying the smallest that fits.
        group: a ``torch.distributed`` ProcessGroup: plan a pipeline over its ranks (CPU
            stages, gloo) instead of over ``devices``.
        chunks: micro-batch counts to try (default 1, 2, 4, ... up to the batch, at most 64).
        schedules: schedule names to try (default all of them).
        checkpoints: checkpoint modes to try (default all of them).
        measure: how many of the fastest predicted to run for real (0: trust the model).
        steps: timed steps per measured candidate.
        repeats: timed runs per block and phase while profiling.
        nested: cut inside nested Sequentials (``Pipeline(nested=True)``).
        progress: show a progress bar (tqdm).
        profile: ``plan.profile`` of an earlier call (or measured elsewhere): skip step 1.
        target_devices: also predict, for 2, 4, ... up to this many devices (or for a list
            of device counts), the best configuration on hardware that is not here:
            ``device_flops`` FLOP/s achieved per device (block times become the block's
            counted FLOPs over it) and ``link_bandwidth`` bytes/s between devices (plus
            ``link_latency`` s per copy). Printed in ``str(plan)``; a prediction only.

    Returns:
        Plan: ``plan.kwargs`` for ``shardpipe.Pipeline``; ``print(plan)`` shows the table.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> x, y = torch.randn(16, 8), torch.randn(16, 4)
        >>> plan = shardpipe.autotune(model, x, y, nn.functional.mse_loss, ["cpu", "cpu"],
        ...                           chunks=[1, 4], schedules=["gpipe", "1f1b"], measure=1,
        ...                           steps=1, progress=False)
        >>> plan.kwargs["schedule"] in ("gpipe", "1f1b")
        True

    Over the ranks of a group (every rank calls it; under ``torchrun``)::

        >>> plan = shardpipe.autotune(model, x, y, nn.functional.mse_loss,
        ...                           group=dist.group.WORLD)               # doctest: +SKIP
        >>> pipe = shardpipe.Pipeline(model, group=dist.group.WORLD,
        ...                           **plan.kwargs)                        # doctest: +SKIP
    """
    started = time.perf_counter()
    check_instance(model, "model", nn.Module, "a torch.nn.Module")
    _check_sample(sample)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if group is not None:
        if devices is not None:
            raise ValueError("devices: with group= each rank's stage runs on that rank's CPU; "
                             "give devices or group, not both")
        group = _ranks.check_group(group)
        if isinstance(max_memory, dict):
            raise TypeError("max_memory: with group= give bytes per rank (a number), not a dict")
        # One pseudo-device per rank: the cost model charges a hand-off between ranks.
        devices = [torch.device("cpu", r) for r in range(group.size())]
    elif devices is None:
        raise TypeError("autotune needs devices=[...] (or group= for a pipeline over ranks)")
    else:
        devices = as_device_list(devices, "devices")
    batch = _batch_rows(sample)
    chunks = _check_list(chunks, "chunks", [2**k for k in range(7) if 2**k <= batch],
                         lambda c, name: check_int(c, name, 1, batch))
    schedules = _check_names(schedules, "schedules", _C.schedule_names())
    checkpoints = _check_names(checkpoints, "checkpoints", _C.checkpoint_names())
    check_int(measure, "measure", 0)
    check_int(steps, "steps", 1)
    check_int(repeats, "repeats", 1)
    check_bool(nested, "nested")
    check_bool(progress, "progress")
    limits = _check_max_memory(max_memory, devices)
    projecting = _check_projection(target_devices, device_flops, link_bandwidth, link_latency)

    module = model if isinstance(model, nn.Sequential) else sequentialize(model)
    named = _blocks(module, nested)
    layers = [block for _, block in named]
    if group is not None:
        _ranks.check_ranks_agree(group, named, dict(
            batch=batch, chunks=chunks, schedules=schedules, checkpoints=checkpoints,
            measure=measure, steps=steps, repeats=repeats, nested=nested,
            max_memory=max_memory, profile_given=profile is not None))
        progress = progress and group.rank() == 0
    # Two profiled sizes per block, then a warm-up and the timed steps per measured candidate.
    bar = _progress_bar(2 * len(layers) + measure * (steps + 1), progress)
    try:
        profile_start = time.perf_counter()
        if profile is None:
            profile = _profile(layers, sample, target, loss_fn, devices,
                               math.ceil(batch / max(chunks)), repeats, bar, group)
        elif not isinstance(profile, dict) or len(profile.get("blocks", ())) != len(layers):
            raise ValueError(f"profile must be plan.profile of a model with {len(layers)} "
                             "blocks")
        else:
            bar.update(2 * len(layers))
        profile_s = time.perf_counter() - profile_start

        bar.set_description("autotune: predict")
        overhead = profile["task_overhead"]
        bandwidth, latency = _link(devices) if group is None else _rank_link(group)
        table = []
        for schedule in schedules:
            stages = len(devices) * (2 if schedule in _TWO_STAGES_PER_DEVICE else 1)
            if stages > len(layers):
                continue
            balance = list(_C.balance_partition(profile["block_seconds"], stages))
            for c in chunks:
                for checkpoint in checkpoints:
                    prediction = _C.predict_step(
                        profile["blocks"], schedule, balance, [str(d) for d in devices], batch,
                        c, checkpoint, overhead, bandwidth, latency)
                    peak = prediction["peak_memory"]
                    table.append(dict(
                        schedule=schedule, chunks=c, checkpoint=checkpoint, balance=balance,
                        predicted_s=prediction["step_time"], bubble=prediction["bubble"],
                        predicted_bytes=peak, fits=_fits(peak, limits), measured_s=None,
                        measured_bytes=None))
        if not table:
            raise ValueError(f"the model has {len(layers)} blocks, fewer than any of the "
                             f"schedules {schedules} needs stages on {len(devices)} devices")
        # Stable: equal predictions keep the enumeration's order, so the choice is the same
        # for the same measurements.
        table.sort(key=lambda row: row["predicted_s"])
        fitting = [row for row in table if row["fits"]]
        if not fitting:
            smallest = min(table, key=lambda row: max(row["predicted_bytes"].values()))
            need = ", ".join(f"{d}: {math.ceil(b)} bytes"
                             for d, b in smallest["predicted_bytes"].items())
            raise ValueError(
                f"max_memory={max_memory!r} is below what every candidate needs; the smallest "
                f"that fits needs {need} (schedule={smallest['schedule']!r}, "
                f"chunks={smallest['chunks']}, checkpoint={smallest['checkpoint']!r})")

        bar.set_description("autotune: measure")
        measure_start = time.perf_counter()
        for row in fitting[:measure]:
            row["measured_s"], row["measured_bytes"] = _measure(
                module, devices, sample, target, loss_fn, row, nested, steps, bar, group)
        measure_s = time.perf_counter() - measure_start
    finally:
        bar.close()

    measured = [row for row in fitting if row["measured_s"] is not None]
    if measured:
        winner = min(measured, key=lambda row: row["measured_s"])
        others = sorted(r["measured_s"] for r in measured if r is not winner)
        reason = (f"fastest measured of the {len(measured)} fastest predicted that fit "
                  f"({winner['measured_s']:.4f} s per step, predicted "
                  f"{winner['predicted_s']:.4f} s, rank {fitting.index(winner) + 1} of "
                  f"{len(fitting)} predicted" +
                  (f"; the next measured {others[0]:.4f} s)" if others else ")"))
    else:
        winner = fitting[0]
        reason = (f"fastest predicted of the {len(fitting)} that fit "
                  f"({winner['predicted_s']:.4f} s per step; measure=0)")
    if limits:
        reason += f"; {len(table) - len(fitting)} of {len(table)} candidates over max_memory"
    kwargs = dict(balance=list(winner["balance"]), chunks=winner["chunks"],
                  schedule=winner["schedule"], checkpoint=winner["checkpoint"])
    if nested:
        kwargs["nested"] = True
    projection = None
    if projecting:
        projection = _project(profile, batch, chunks, schedules, checkpoints, limits,
                              target_devices, device_flops, link_bandwidth, link_latency,
                              len(layers))
    return Plan(kwargs, table, profile, profile_s, measure_s, time.perf_counter() - started,
                reason, projection)


class _NoBar:
    def update(self, n=1):
        pass

    def set_description(self, desc):
        pass

    def close(self):
        pass


def _progress_bar(total, enabled):
    """tqdm's bar when asked for and installed (it is no dependency of shardpipe's), else one
    that shows nothing."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return _NoBar()
        return tqdm(total=total, desc="autotune: profile", leave=False)
    return _NoBar()


def _batch_rows(sample):
    first = sample if isinstance(sample, torch.Tensor) else next(
        t for t in pytree.tree_leaves(sample) if isinstance(t, torch.Tensor))
    if first.dim() == 0 or first.shape[0] < 1:
        raise ValueError("sample must have a batch dimension with at least one row")
    return first.shape[0]


def _check_list(value, name, default, check):
    if value is None:
        return default
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} must not be empty")
    return sorted(dict.fromkeys(check(v, f"{name}[{i}]") for i, v in enumerate(value)))


def _check_names(value, name, allowed):
    allowed = list(allowed)

    def one(v, where):
        if not isinstance(v, str) or v not in allowed:
            raise ValueError(f"{where} must be one of {allowed}, got {v!r}")
        return v

    chosen = set(_check_list(value, name, allowed, one))
    return [n for n in allowed if n in chosen]  # the docs' order, whatever order was given


def _check_max_memory(max_memory, devices):
    """``{device: bytes}`` for the devices that have a limit."""
    if max_memory is None:
        return {}
    if isinstance(max_memory, dict):
        limits = {}
        for key, value in max_memory.items():
            device = as_device(key, f"max_memory's key {key!r}")
            limits[device] = check_number(value, f"max_memory[{key!r}]", 0)
        unknown = [str(d) for d in limits if d not in devices]
        if unknown:
            raise ValueError(f"max_memory names {', '.join(unknown)}, not in devices "
                             f"{[str(d) for d in devices]}")
        return limits
    check_number(max_memory, "max_memory", 0)
    return {d: max_memory for d in devices}


def _check_projection(target_devices, device_flops, link_bandwidth, link_latency):
    if target_devices is None:
        return False
    if isinstance(target_devices, int) and not isinstance(target_devices, bool):
        check_int(target_devices, "target_devices", 2)
    else:
        _check_list(target_devices, "target_devices", None,
                    lambda v, name: check_int(v, name, 1))
    if device_flops is None or link_bandwidth is None:
        raise ValueError("target_devices needs device_flops (FLOP/s per device) and "
                         "link_bandwidth (bytes/s between devices)")
    check_number(device_flops, "device_flops", 1)
    check_number(link_bandwidth, "link_bandwidth", 1)
    check_number(link_latency, "link_latency", 0)
    return True


def _fits(peak, limits):
    return all(bytes_ <= limits.get(torch.device(d), math.inf) for d, bytes_ in peak.items())


def _tensors(value):
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _nbytes(value):
    return float(sum(t.numel() * t.element_size() for t in _tensors(value)))


def _profile(layers, sample, target, loss_fn, devices, small_rows, repeats, bar, group=None):
    """Per block, the measurements (with its FLOPs, for projections) at the full batch and at
    ``small_rows`` rows, the times to balance by, and the engine's per-task cost. With
    ``group`` each rank measures its share of the blocks and every rank gets all of them."""
    device = torch.device("cpu") if group is not None else devices[0]
    batch = _batch_rows(sample)
    sizes = [batch] if small_rows >= batch else [small_rows, batch]
    owned = range(len(layers))
    if group is not None:
        r, n = group.rank(), group.size()
        owned = range(r * len(layers) // n, (r + 1) * len(layers) // n)
    # CPU stages of one process run at once and share the intra-op threads: profile with one
    # stage's share. (With all of them, a block waits for threads that other processes hold;
    # it measures scheduler stalls of several milliseconds instead of its own work.) Over
    # ranks each stage is a process with threads of its own.
    threads = torch.get_num_threads()
    cpu_stages = sum(d.type == "cpu" for d in devices) if group is None else 1
    if cpu_stages > 1:
        torch.set_num_threads(max(1, threads // cpu_stages))
    try:
        per_size = {rows: _profile_rows(layers, sample, target, loss_fn, device, rows, repeats,
                                        lambda: bar.update(2 // len(sizes)), owned)
                    for rows in sizes}
    finally:
        torch.set_num_threads(threads)
    if group is not None:
        import torch.distributed as dist

        everyone = [None] * group.size()
        dist.all_gather_object(everyone, per_size, group=group)
        profiled_by = [next(r for r, part in enumerate(everyone) if part[sizes[0]][k])
                       for k in range(len(layers))]
        per_size = {rows: [everyone[profiled_by[k]][rows][k] for k in range(len(layers))]
                    for rows in sizes}
    else:
        profiled_by = [0] * len(layers)
    blocks = []
    for k, layer in enumerate(layers):
        state = sum(p.numel() * p.element_size() for p in layer.parameters())
        state = 2.0 * state + sum(b.numel() * b.element_size() for b in layer.buffers())
        blocks.append(dict(small=per_size[sizes[0]][k], large=per_size[batch][k],
                           resident_bytes=state))
    # Balanced by each block's time on the full batch: all of its work, fixed parts diluted.
    seconds = [b["large"]["forward"] + b["large"]["backward"] + b["large"]["weight"]
               for b in blocks]
    overhead = _task_overhead(max(2, len(devices))) if group is None else \
        _task_overhead(group.size(), group=group)
    return dict(blocks=blocks, block_seconds=seconds, task_overhead=overhead, device=str(device),
                profiled_by=profiled_by)


class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.weight


def _task_overhead(stages, chunks=8, group=None):
    """Seconds the engine adds to a task: a train_step of CPU stages that do next to nothing,
    over its task count. ``_C._engine_overhead`` gives the C++ engine's own share; a Python
    stage adds the GIL and the call, several times as much, so a Python one is timed. With
    ``group`` the stages are its ranks (a task then includes its hand-off between ranks) and
    every rank gets the slowest's figure."""
    model = nn.Sequential(*[_Scale() for _ in range(stages)])
    if group is None:
        pipe = Pipeline(model, ["cpu"] * stages, chunks=chunks, schedule="1f1b")
        pipe._engine.threads = "workers"  # as the candidates are measured (see _measure)
    else:
        pipe = Pipeline(model, group=group, chunks=chunks, schedule="1f1b")
    try:
        x, y = torch.zeros(chunks, 1), torch.zeros(chunks, 1)
        for _ in range(2):
            pipe.train_step(x, y, nn.functional.mse_loss)
        best = math.inf
        for _ in range(5):
            start = time.perf_counter()
            pipe.train_step(x, y, nn.functional.mse_loss)
            best = min(best, time.perf_counter() - start)
    finally:
        pipe.close()
    if group is not None:
        import torch.distributed as dist

        slowest = torch.tensor([best], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
        best = slowest.item()
    # On paper the step is (chunks + stages - 1) tasks of F + B long: that is what it costs.
    return best / (2 * (chunks + stages - 1))


def _rank_link(group):
    """(bytes/s, s per message) of a gloo send between the group's first two ranks (half a
    ping-pong), the same on every rank."""
    import torch.distributed as dist

    result = torch.zeros(2, dtype=torch.float64)
    rank = group.rank()
    if group.size() >= 2 and rank < 2:
        peer = dist.get_global_rank(group, 1 - rank)

        def one_way(t):
            best = math.inf
            for _ in range(4):
                start = time.perf_counter()
                if rank == 0:
                    dist.send(t, peer, group=group)
                    dist.recv(t, peer, group=group)
                else:
                    dist.recv(t, peer, group=group)
                    dist.send(t, peer, group=group)
                best = min(best, (time.perf_counter() - start) / 2)
            return best

        latency = one_way(torch.zeros(1, dtype=torch.uint8))
        big = torch.zeros(4 * 2**20, dtype=torch.uint8)
        result = torch.tensor([big.numel() / max(one_way(big) - latency, 1e-9), latency],
                              dtype=torch.float64)
    dist.broadcast(result, dist.get_global_rank(group, 0), group=group)
    return result[0].item(), result[1].item()


def _profile_rows(layers, sample, target, loss_fn, device, rows, repeats, done, owned):
    """One sample dict per block (BlockSample's fields, cost_model.h) at ``rows`` rows, None
    for the blocks not in ``owned`` (only run, for the next block's input); ``done()`` after
    each block measured."""
    devices = [device] if device.type == "cuda" else []
    out = []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        x = pytree.tree_map(
            lambda t: t[:rows].detach().to(device) if isinstance(t, torch.Tensor) else t,
            sample)
        y = target[:rows].to(device)
        for k, layer in enumerate(layers):
            layer = _Stage(copy.deepcopy(layer)).to(device).train()
            x = _detach(x, requires_grad=k > 0)
            if k not in owned:
                if k < owned.stop:
                    with torch.no_grad():
                        x = layer(_fresh(x))
                out.append(None)
                continue
            last = k == len(layers) - 1
            times, made = _time_block(layer, x, y if last else None, loss_fn, device, repeats)
            forward, backward, weight, saved, flops = times
            out.append(dict(rows=rows, forward=forward, backward=backward, weight=weight,
                            input_bytes=_nbytes(x), output_bytes=_nbytes(made),
                            saved_bytes=saved, flops=flops))
            x = made
            done()
    return out


def _time_block(layer, x, target, loss_fn, device, repeats):
    """(forward s, input-gradient s, weight-gradient s, saved bytes, FLOPs) of one block and
    its output; with ``target``, the loss counts as part of the block."""
    params = [p for p in layer.parameters() if p.requires_grad]
    param_storages = {p.untyped_storage().data_ptr() for p in params}

    def run():
        fresh = _fresh(x)
        inputs = [t for t in _tensors(fresh) if t.requires_grad]
        start = time.perf_counter()
        made = layer(fresh)
        roots = _tensors(made) if target is None else [loss_fn(made, target)]
        roots = [t for t in roots if t.requires_grad]
        _synchronize(device)
        forward = time.perf_counter() - start
        grads = [torch.ones_like(t) for t in roots]
        backward = whole = 0.0
        if roots:
            if inputs:
                start = time.perf_counter()
                torch.autograd.grad(roots, inputs, grads, retain_graph=True, allow_unused=True)
                _synchronize(device)
                backward = time.perf_counter() - start
            start = time.perf_counter()
            torch.autograd.backward(roots, grads, inputs=params + inputs or None)
            _synchronize(device)
            whole = time.perf_counter() - start
        layer.zero_grad(set_to_none=True)
        return (forward, backward, max(0.0, whole - backward)), made

    run()  # warm-up: first-call allocations, kernel choice
    samples = [run()[0] for _ in range(repeats)]
    best = tuple(min(s[i] for s in samples) for i in range(3))

    fresh = _fresh(x)
    input_storages = {t.untyped_storage().data_ptr() for t in _tensors(fresh)}
    counter = FlopCounterMode(display=False)
    losses = []

    def forward():
        made = layer(fresh)
        losses.extend(_tensors(made) if target is None else [loss_fn(made, target)])
        return made

    with counter:
        made, saved = _saved_by_backward(forward, param_storages)
        roots = [t for t in losses if t.requires_grad]
        if roots:
            torch.autograd.backward(roots, [torch.ones_like(t) for t in roots])
    layer.zero_grad(set_to_none=True)
    # The stage input is counted once per stage by the cost model, not in every block.
    saved_bytes = float(sum(n for p, n in saved.items() if p not in input_storages))
    return best + (saved_bytes, float(counter.get_total_flops())), _detach(made, False)


def _link(devices):
    """(bytes/s, s per copy) between two of ``devices``; copies within one device are free
    (the cost model skips them), so only distinct devices are timed."""
    distinct = list(dict.fromkeys(devices))
    if len(distinct) < 2:
        return 0.0, 0.0
    a, b = distinct[0], distinct[1]
    big = torch.empty(4 * 2**20, dtype=torch.uint8, device=a)
    small = torch.empty(1, dtype=torch.uint8, device=a)

    def seconds(t):
        best = math.inf
        for _ in range(4):
            _synchronize(a)
            start = time.perf_counter()
            t.to(b)
            _synchronize(b)
            best = min(best, time.perf_counter() - start)
        return best

    latency = seconds(small)
    return big.numel() / max(seconds(big) - latency, 1e-9), latency


def _measure(module, devices, sample, target, loss_fn, row, nested, steps, bar, group=None):
    """(fastest of ``steps`` timed train_steps in s, peak bytes per CUDA device or None);
    with ``group`` a pipeline over its ranks, each step timed by the slowest rank."""
    if group is not None:
        return _measure_over(module, sample, target, loss_fn, row, nested, steps, bar, group)
    cuda = [d for d in dict.fromkeys(devices) if d.type == "cuda"]
    with torch.random.fork_rng(devices=cuda):
        pipe = Pipeline(copy.deepcopy(module), devices, balance=row["balance"],
                        chunks=row["chunks"], schedule=row["schedule"],
                        checkpoint=row["checkpoint"], nested=nested)
        try:
            # The executor's 'auto' threads mode tries the caller's thread in its first runs;
            # the model assumes the workers (what it settles on when stages do real work).
            pipe._engine.threads = "workers"
            x = pytree.tree_map(
                lambda t: t.to(devices[0]) if isinstance(t, torch.Tensor) else t, sample)
            y = target.to(pipe.devices[-1])
            pipe.train_step(x, y, loss_fn)
            bar.update(1)
            for d in cuda:
                torch.cuda.reset_peak_memory_stats(d)
            best = math.inf
            for _ in range(steps):
                pipe.zero_grad(set_to_none=True)
                for d in dict.fromkeys(pipe.devices):
                    _synchronize(d)
                start = time.perf_counter()
                pipe.train_step(x, y, loss_fn)
                for d in dict.fromkeys(pipe.devices):
                    _synchronize(d)
                best = min(best, time.perf_counter() - start)
                bar.update(1)
            memory = {str(d): float(torch.cuda.max_memory_allocated(d)) for d in cuda} or None
        finally:
            pipe.close()
    return best, memory


def _measure_over(module, sample, target, loss_fn, row, nested, steps, bar, group):
    import torch.distributed as dist

    with torch.random.fork_rng(devices=[]):
        pipe = Pipeline(copy.deepcopy(module), group=group, balance=row["balance"],
                        chunks=row["chunks"], schedule=row["schedule"],
                        checkpoint=row["checkpoint"], nested=nested)
        try:
            pipe._engine.threads = "workers"  # as in _measure
            pipe.train_step(sample, target, loss_fn)
            bar.update(1)
            seconds = []
            for _ in range(steps):
                pipe.zero_grad(set_to_none=True)
                dist.barrier(group=group)
                start = time.perf_counter()
                pipe.train_step(sample, target, loss_fn)
                seconds.append(time.perf_counter() - start)
                bar.update(1)
        finally:
            pipe.close()
    slowest = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    return slowest.min().item(), None


def _project(profile, batch, chunks, schedules, checkpoints, limits, target_devices,
             device_flops, link_bandwidth, link_latency, blocks):
    """The scaling table: per device count, the fastest predicted candidate on hardware
    described by FLOP/s and link bandwidth (block times = counted FLOPs / device_flops)."""
    counts = target_devices if not isinstance(target_devices, int) else sorted(
        {2**k for k in range(1, target_devices.bit_length()) if 2**k <= target_devices} |
        {target_devices})
    projected = []
    for block in profile["blocks"]:
        scaled = {}
        for size in ("small", "large"):
            s = dict(block[size])
            measured = s["forward"] + s["backward"] + s["weight"]
            flops = s["flops"]
            # FLOPs fix the total; the measured shares split it into F, B and W.
            for phase in ("forward", "backward", "weight"):
                share = s[phase] / measured if measured > 0 else 1 / 3
                s[phase] = flops * share / device_flops
            scaled[size] = s
        projected.append(dict(small=scaled["small"], large=scaled["large"],
                              resident_bytes=block["resident_bytes"]))
    seconds = [b["large"]["forward"] + b["large"]["backward"] + b["large"]["weight"]
               for b in projected]
    lines = [f"PREDICTION (not measured) for hardware that is not here: each device "
             f"{device_flops:.3g} FLOP/s achieved on the counted FLOPs, links "
             f"{link_bandwidth:.3g} bytes/s + {link_latency:.3g} s per copy, the engine's "
             f"per-task cost as measured here ({profile['task_overhead'] * 1e6:.0f} us), "
             f"batch {batch}; memory as the cost model counts it",
             f"{'devices':>7} {'schedule':<12} {'chunks':>6} {'checkpoint':<12} "
             f"{'pred step s':>12} {'bubble':>6} {'peak per device':>16}"]
    for n in counts:
        names = [f"cuda:{k}" for k in range(n)]
        best = None
        for schedule in schedules:
            stages = n * (2 if schedule in _TWO_STAGES_PER_DEVICE else 1)
            if stages > blocks:
                continue
            balance = list(_C.balance_partition(seconds, stages))
            for c in chunks:
                for checkpoint in checkpoints:
                    p = _C.predict_step(projected, schedule, balance, names, batch, c,
                                        checkpoint, profile["task_overhead"], link_bandwidth,
                                        link_latency)
                    peak = max(p["peak_memory"].values())
                    if limits and peak > min(limits.values()):
                        continue
                    if best is None or p["step_time"] < best[0]["step_time"]:
                        best = (p, schedule, c, checkpoint, peak)
        if best is None:
            lines.append(f"{n:>7} (no candidate: too few blocks or over max_memory)")
            continue
        p, schedule, c, checkpoint, peak = best
        lines.append(f"{n:>7} {schedule:<12} {c:>6} {checkpoint:<12} {p['step_time']:>12.6f} "
                     f"{p['bubble']:>6.2f} {_size(peak):>16}")
    return "\n".join(lines)
