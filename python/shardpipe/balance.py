"""Balancing helpers: how many consecutive children each pipeline stage gets.

Both helpers measure one cost per child of the (sequentialized) model and hand the costs to
the exact partitioner in C++ (``shardpipe._C.balance_partition``), which minimises the
largest stage cost. Among equally good splits it takes the one with the most even number
of children per stage, then the lexicographically smallest balance (earlier stages
smaller), so the result is deterministic for given costs.
"""

import copy
import time

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import _C
from ._blocks import _blocks
from ._checks import as_device, check_instance, check_int, check_number
from .sequentialize import sequentialize
from .skip import _Stage

__all__ = ["balance_by_size", "balance_by_time"]


def balance_by_time(model, sample, partitions, device=None, repeats=5, nested=False):
    """Balance a pipeline by the time each child takes for forward and backward.

    Each child of ``model`` (of ``sequentialize(model)`` if it is not an ``nn.Sequential``)
    is copied to ``device`` in train mode and run forward and backward on what the children
    before it made of ``sample``; its cost is the fastest of ``repeats`` timed runs after one
    untimed warm-up (noise only adds time). The model itself, its gradients and the global
    RNG state are left untouched. The balance minimises the slowest stage.

    Args:
        model: an ``nn.Sequential``, or a model ``sequentialize`` accepts.
        sample: an input batch, typically one micro-batch: a Tensor, or a tuple of them
            when the first block takes several inputs (as ``pipe(x, mask)`` passes them).
        partitions: the number of stages.
        device: where to profile; defaults to ``sample``'s device.
        repeats: timed runs per child.
        nested: balance blocks instead of children, as ``Pipeline(..., nested=True)``
            cuts them (a child that is a plain ``nn.Sequential`` counts as its children).

    Returns:
        list[int]: children (blocks) per stage, summing to their number, none zero.

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4096),
        ...                       nn.Linear(4096, 64), nn.ReLU())
        >>> shardpipe.balance_by_time(model, torch.rand(32, 64), partitions=2)  # doctest: +SKIP
        [3, 2]
    """
    check_int(repeats, "repeats", 1)
    layers, sample, partitions, device = _check(model, sample, partitions, device, nested)

    def cost(layer, x):
        _forward_backward(layer, _fresh(x))  # warm-up: first-call allocations, kernel choice
        times = []
        for _ in range(repeats):
            fresh = _fresh(x)
            _synchronize(device)
            start = time.perf_counter()
            out = _forward_backward(layer, fresh)
            _synchronize(device)
            times.append(time.perf_counter() - start)
        # Noise (other processes, descheduled threads) only ever adds time.
        return min(times), out

    return _C.balance_partition(_profile(layers, sample, device, cost), partitions)


def _saved_by_backward(run, excluded):
    """``(run(), {storage: bytes})``: the storages the backward of what ``run`` makes keeps
    alive (what autograd saves, and the tensors the forward made with requires_grad=True,
    leaves of its graph that no function saved), those in ``excluded`` not counted."""
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        made = run()
    for leaf in _graph_leaves(made):
        storage = leaf.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
    return made, saved


def balance_by_size(model, sample, partitions, device=None, param_scale=2.0, nested=False):
    """Balance a pipeline by the memory each child holds during training.

    A child's cost is ``param_scale`` times the bytes of its parameters, plus the bytes of
    its buffers, plus its activation memory: the bytes of every tensor its backward keeps
    alive on ``sample`` (each storage once, parameters excluded): what its forward saves for
    backward, measured with ``torch.autograd.graph.saved_tensors_hooks`` so it works on any
    device, and the tensors it creates with ``requires_grad=True`` (leaves of its graph).
    Children are run as copies in train mode; the model and the global RNG state are left
    untouched.
    The balance minimises the largest stage.

    Args:
        model: an ``nn.Sequential``, or a model ``sequentialize`` accepts.
        sample: an input batch, typically one micro-batch: a Tensor, or a tuple of them
            when the first block takes several inputs (as ``pipe(x, mask)`` passes them).
        partitions: the number of stages.
        device: where to run the forward; defaults to ``sample``'s device.
        param_scale: bytes per parameter byte: 2.0 counts weights and their gradients;
            use 4.0 for Adam (two moments more).
        nested: balance blocks instead of children (see :func:`balance_by_time`).

    Returns:
        list[int]: children (blocks) per stage, summing to their number, none zero.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4096), nn.Linear(4096, 8),
        ...                       nn.ReLU(), nn.Linear(8, 8))
        >>> shardpipe.balance_by_size(model, torch.rand(4, 8), partitions=3)
        [2, 1, 2]
    """
    check_number(param_scale, "param_scale", 0)
    layers, sample, partitions, device = _check(model, sample, partitions, device, nested)

    def cost(layer, x):
        params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
        fresh = _fresh(x)
        out, saved = _saved_by_backward(lambda: layer(fresh), params)
        weights = sum(p.numel() * p.element_size() for p in layer.parameters())
        buffers = sum(b.numel() * b.element_size() for b in layer.buffers())
        return float(param_scale * weights + buffers + sum(saved.values())), out

    return _C.balance_partition(_profile(layers, sample, device, cost), partitions)


def _graph_leaves(value):
    """The tensors at the leaves of the autograd graph behind ``value``'s tensors."""
    leaves, seen = [], set()
    stack = [t.grad_fn for t in pytree.tree_leaves(value)
             if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad: holds its leaf
            leaves.append(node.variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def _check_sample(sample):
    """``sample`` as given (a Tensor, or a non-empty tuple/list holding tensors, as a pipeline
    with several inputs gets them) and the device of its first tensor."""
    if isinstance(sample, torch.Tensor):
        return sample.device
    tensors = [t for t in pytree.tree_leaves(sample) if isinstance(t, torch.Tensor)]
    if not isinstance(sample, (tuple, list)) or not tensors:
        raise TypeError("sample must be a torch.Tensor or a tuple of them (a first stage's "
                        f"several inputs), got {type(sample).__name__}")
    return tensors[0].device


def _check(model, sample, partitions, device, nested):
    check_instance(model, "model", nn.Module, "a torch.nn.Module")
    sample_device = _check_sample(sample)
    check_int(partitions, "partitions")
    layers = [block for _, block in _blocks(sequentialize(model), nested)]
    what = "blocks" if nested else "children"
    if not 1 <= partitions <= len(layers):
        raise ValueError(
            f"partitions must be between 1 and {len(layers)} (the number of {what} of "
            f"the sequentialized model), got {partitions}"
        )
    device = sample_device if device is None else as_device(device, "device")
    return layers, sample, partitions, device


def _profile(layers, sample, device, cost):
    """One cost per layer, each measured on a train-mode copy fed by the layers before it."""
    devices = [device] if device.type == "cuda" else []
    costs = []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        x = pytree.tree_map(
            lambda t: t.detach().to(device) if isinstance(t, torch.Tensor) else t, sample)
        for i, layer in enumerate(layers):
            # Run as a one-block stage, so that stashed values flow on to their Pop.
            layer = _Stage(copy.deepcopy(layer)).to(device).train()
            # Later stages also compute their input's gradient; the first one does not.
            x = _detach(x, requires_grad=i > 0)
            value, out = cost(layer, x)
            costs.append(value)
            x = out
    return costs


def _detach(value, requires_grad):
    def detach(t):
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach()
        return t.requires_grad_() if requires_grad and t.is_floating_point() else t

    return pytree.tree_map(detach, value)


def _fresh(value):
    # A copy per run: in-place layers (ReLU(inplace=True)) may then modify their input, which
    # is not a leaf any more, without changing what the next run sees.
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, value)


def _forward_backward(layer, x):
    out = layer(x)
    tensors = [
        t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad
    ]
    if tensors:
        torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])
    return out


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
