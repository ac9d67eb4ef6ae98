"""Asynchronous, differentiable device-to-device copies."""

import torch
from torch.utils import _pytree as pytree

from ._checks import as_device, check_bool

__all__ = ["copy_to"]


def copy_to(x, device, non_blocking=True):
    """Copy a tensor, or every tensor of a nested tuple/list/dict, to ``device``.

    The values equal ``x.to(device)`` bit for bit and the copy is differentiable: the
    gradient of each result is moved back to the device its input came from. Leaves that
    are not tensors are returned unchanged, and the nesting is kept.

    On CUDA the copy runs on a copy stream of its own per (source, destination) pair: the
    caller's current stream on the destination waits on it (the host does not, unless
    ``non_blocking=False``), and the source memory is not reused by the caching allocator
    before the copy has finished. Between two GPUs the source's stream does not wait, so
    that its next kernels overlap the copy: do not write to the source in place until the
    destination's stream has used the result. Tensors that share a device pair travel as one packed
    transfer; results of one call may then share one allocation.

    Args:
        x: a ``Tensor`` or a tuple/list/dict nesting of them.
        device: the destination: ``"cpu"``, ``"cuda:1"``, an int or a ``torch.device``.
        non_blocking: if ``False``, return only once the copy has finished.

    Example::

        >>> import shardpipe
        >>> batch = {"image": torch.rand(8, 3, 32, 32), "label": torch.arange(8), "id": "a"}
        >>> moved = shardpipe.copy_to(batch, "cpu")
        >>> torch.equal(moved["image"], batch["image"]), moved["id"]
        (True, 'a')
    """
    target = as_device(device, "device")
    check_bool(non_blocking, "non_blocking")
    if isinstance(x, torch.Tensor):
        _check_not_meta(x, target)
        return torch.ops.shardpipe.copy_to([x], target, non_blocking)[0]
    if not isinstance(x, (tuple, list, dict)):
        raise TypeError(
            f"x must be a Tensor or a tuple/list/dict of tensors, got {type(x).__name__}"
        )
    leaves, spec = pytree.tree_flatten(x)
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    for i in positions:
        _check_not_meta(leaves[i], target)
    if positions:
        moved = torch.ops.shardpipe.copy_to([leaves[i] for i in positions], target, non_blocking)
        for i, tensor in zip(positions, moved):
            leaves[i] = tensor
    return pytree.tree_unflatten(leaves, spec)


def _check_not_meta(tensor, target):
    # A meta tensor has no data to copy (Tensor.to raises too); the operator's fake kernel
    # would hand back uninitialised memory.
    if tensor.device.type == "meta" and target.type != "meta":
        raise ValueError(f"x holds a meta tensor, which has no data to copy to {target}")
