"""How the values between pipeline stages nest around their tensors.

The C++ engine carries tensors; what surrounds them (tuples, lists, dicts, and values that
are not tensors: a flag, an absent mask, a length) travels beside them unchanged, described
here with ``torch.utils._pytree``. A bare tensor and a flat tuple of several tensors are
handled in C++ without calling in here.
"""

import torch
from torch.utils import _pytree as pytree

__all__ = []


def flatten(value):
    """``(tensors, spec)`` for any value; ``unflatten(tensors, spec)`` gives it back.

    ``spec`` is None for one bare tensor and ``tuple`` for a flat tuple of tensors."""
    if isinstance(value, torch.Tensor):
        return [value], None
    if type(value) is tuple and value and all(isinstance(v, torch.Tensor) for v in value):
        return list(value), tuple
    leaves, treespec = pytree.tree_flatten(value)
    is_tensor = tuple(isinstance(leaf, torch.Tensor) for leaf in leaves)
    others = tuple(leaf for leaf, t in zip(leaves, is_tensor) if not t)
    tensors = [leaf for leaf, t in zip(leaves, is_tensor) if t]
    return tensors, (treespec, is_tensor, others)


def unflatten(tensors, spec):
    """The value ``flatten`` described, with ``tensors`` in place of its tensors."""
    if spec is None:
        return tensors[0]
    if spec is tuple:
        return tuple(tensors)
    treespec, is_tensor, others = spec
    tensors, others = iter(tensors), iter(others)
    leaves = [next(tensors) if t else next(others) for t in is_tensor]
    return pytree.tree_unflatten(leaves, treespec)
