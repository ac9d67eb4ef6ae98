"""ShardedTensor: a tensor split along its last dim over devices of one process.

It is what ``ColumnParallelLinear(gather_output=False, devices=[...])`` returns with more than
one device: the activation between a column- and a row-parallel layer, each device holding
its own slice of the features, so ``row(torch.relu(col(x)))`` needs no communication in the
middle. Element-wise operations (activations, dropout, arithmetic with scalars or with another
ShardedTensor of the same layout) run shard by shard on the shards' own devices and return a
ShardedTensor. Anything else gathers the shards onto the tensor's device first (correct, but
it costs the copies the sharding avoided) and returns an ordinary tensor.
"""

import torch
from torch.utils import _pytree as pytree

__all__ = ["ShardedTensor"]

aten = torch.ops.aten

# Operations that act on each element independently without carrying the pointwise tag.
_SHARDWISE = {
    aten.detach.default,
    aten.alias.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.empty_like.default,
    aten.full_like.default,
    aten.fill_.Scalar,
    aten.zero_.default,
    aten.native_dropout.default,
    aten.bernoulli.p,
    aten.bernoulli_.float,  # dropout of a tensor subclass draws its mask with this
    aten._to_copy.default,
}
# Keyword arguments that would move or re-lay a shard instead of acting on its elements.
_PLACEMENT_KWARGS = ("device", "layout")


class ShardedTensor(torch.Tensor):
    """A tensor of shape ``(..., sum of shard widths)`` held as shards on several devices.

    ``shards[i]`` holds features ``[offset_i, offset_i + width_i)`` of the last dim, on its
    own device; the tensor's ``device`` is the device it is gathered onto (the device of the
    input of the layer that made it). Element-wise operations run per shard and keep the
    sharding; other operations gather first. ``full_tensor()`` gathers explicitly
    (differentiably).

    Args:
        shards: the pieces, in order; equal in every dim but the last and in dtype.
        device: the device of the tensor as a whole.

    Example::

        >>> col = shardpipe.ColumnParallelLinear(8, 6, gather_output=False,
        ...                                      devices=["cpu", "cpu"])
        >>> h = torch.relu(col(torch.randn(4, 8)))
        >>> type(h).__name__, tuple(h.shape), h.shard_sizes
        ('ShardedTensor', (4, 6), (3, 3))
        >>> h.full_tensor().shape
        torch.Size([4, 6])
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, shards, device):
        shards = tuple(shards)
        if not shards or not all(isinstance(s, torch.Tensor) for s in shards):
            raise TypeError("shards must be a non-empty sequence of tensors")
        first = shards[0]
        if first.dim() == 0:
            raise ValueError("shards must have at least one dim to split along")
        for i, s in enumerate(shards):
            if s.shape[:-1] != first.shape[:-1] or s.dtype != first.dtype:
                raise ValueError(
                    f"shards[{i}] has shape {tuple(s.shape)} and dtype {s.dtype}; shard 0 has "
                    f"{tuple(first.shape)} and {first.dtype} (all but the last dim must match)"
                )
        shape = (*first.shape[:-1], sum(s.shape[-1] for s in shards))
        self = torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=first.dtype, device=torch.device(device)
        )
        # Detached: the wrapper carries the autograd history, not the shards inside it.
        self._shards = tuple(s.detach() for s in shards)
        return self

    @property
    def shards(self):
        """The shards (a tuple of tensors, without autograd history)."""
        return self._shards

    @property
    def shard_sizes(self):
        """The width of every shard along the last dim."""
        return tuple(s.shape[-1] for s in self._shards)

    @property
    def shard_devices(self):
        """The device of every shard."""
        return tuple(s.device for s in self._shards)

    def full_tensor(self):
        """The whole tensor on ``self.device``; differentiable."""
        return _Gather.apply(self)

    def _gathered(self):
        return gather_onto(self._shards, self.device, -1)

    def __repr__(self, *, tensor_contents=None):
        grad = f", grad_fn={type(self.grad_fn).__name__}" if self.grad_fn is not None else ""
        return (
            f"ShardedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
            f"shard_sizes={self.shard_sizes}, "
            f"shard_devices={[str(d) for d in self.shard_devices]}{grad})"
        )

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        shardwise = func in _SHARDWISE or torch.Tag.pointwise in func.tags
        if shardwise and not any(kwargs.get(k) is not None for k in _PLACEMENT_KWARGS):
            result = _per_shard(func, args, kwargs)
            if result is not NotImplemented:
                return result
        return _gathered_call(func, args, kwargs)


def _per_shard(func, args, kwargs):
    """func applied to every shard, or NotImplemented when the operands do not split alike."""
    flat, spec = pytree.tree_flatten((args, kwargs))
    ref = None
    for a in flat:
        if isinstance(a, ShardedTensor):
            if ref is None:
                ref = a
            elif a.shard_sizes != ref.shard_sizes or a.shard_devices != ref.shard_devices:
                return NotImplemented
        elif isinstance(a, torch.Tensor) and a.numel() != 1:
            # A plain tensor would need splitting the same way (and broadcasting rules).
            return NotImplemented

    def piece(a, i):
        if isinstance(a, ShardedTensor):
            return a._shards[i]
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            return a.to(ref._shards[i].device)
        return a

    outs = []
    for i in range(len(ref._shards)):
        args_i, kwargs_i = pytree.tree_unflatten([piece(a, i) for a in flat], spec)
        outs.append(func(*args_i, **kwargs_i))
    if func._schema.is_mutable:
        return kwargs["out"] if "out" in kwargs else args[0]
    flat_outs = [pytree.tree_flatten(o) for o in outs]
    spec_out = flat_outs[0][1]
    merged = [
        ShardedTensor(parts, ref.device) if isinstance(parts[0], torch.Tensor) else parts[0]
        for parts in zip(*(leaves for leaves, _ in flat_outs))
    ]
    return pytree.tree_unflatten(merged, spec_out)


def _gathered_call(func, args, kwargs):
    if func._schema.is_mutable and any(
        isinstance(a, ShardedTensor) for a in pytree.tree_leaves((args, kwargs))
    ):
        raise TypeError(
            f"{func} would modify a ShardedTensor in a way that does not split by shard; "
            "call .full_tensor() first"
        )
    args, kwargs = pytree.tree_map_only(ShardedTensor, ShardedTensor._gathered, (args, kwargs))
    return func(*args, **kwargs)


def _onto(tensors, device):
    """``tensors`` copied onto ``device``; a copy to the host is finished on return, since the
    host reads it next and no stream would wait for it."""
    return torch.ops.shardpipe.copy_to(list(tensors), device, device.type != "cpu")


def gather_onto(parts, device, dim):
    """``parts`` concatenated along ``dim`` on ``device``."""
    return torch.cat(_onto(parts, device), dim)


def _split_onto(grad, sizes, devices):
    """``grad`` as pieces of the given widths on the given devices (for a backward)."""
    if isinstance(grad, ShardedTensor):
        if grad.shard_sizes == tuple(sizes) and grad.shard_devices == tuple(devices):
            return list(grad.shards)
        grad = grad._gathered()
    return [_onto([part], device)[0] for part, device in zip(grad.split(list(sizes), -1), devices)]


class _Assemble(torch.autograd.Function):
    """Shards with autograd history -> one ShardedTensor carrying it."""

    @staticmethod
    def forward(ctx, device, *shards):
        ctx.sizes = [s.shape[-1] for s in shards]
        ctx.devices = [s.device for s in shards]
        return ShardedTensor(shards, device)

    @staticmethod
    def backward(ctx, grad):
        return (None, *_split_onto(grad, ctx.sizes, ctx.devices))


class _Disassemble(torch.autograd.Function):
    """A ShardedTensor -> its shards, each with autograd history."""

    @staticmethod
    def forward(ctx, sharded):
        ctx.device = sharded.device
        return tuple(s.detach() for s in sharded.shards)

    @staticmethod
    def backward(ctx, *grads):
        return ShardedTensor(grads, ctx.device)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sharded):
        ctx.sizes = sharded.shard_sizes
        ctx.devices = sharded.shard_devices
        ctx.device = sharded.device
        return sharded._gathered()

    @staticmethod
    def backward(ctx, grad):
        return ShardedTensor(_split_onto(grad, ctx.sizes, ctx.devices), ctx.device)


def assemble(shards, device):
    """Differentiably wrap the shard outputs of a layer into a ShardedTensor."""
    return _Assemble.apply(torch.device(device), *shards)


def disassemble(sharded):
    """Differentiably unwrap a ShardedTensor into its shards (a tuple)."""
    return _Disassemble.apply(sharded)
