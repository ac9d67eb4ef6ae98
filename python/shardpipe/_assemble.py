"""Assembling the ``Sequential`` that ``sequentialize`` returns, keeping the model's keys.

Both ways of splitting a model (the torchvision family rules and the ``torch.fx`` split)
end here: the children in forward order, the model's root-level parameters and buffers
registered on the ``Sequential`` itself, and tensors that another module saves left out of
a child's ``state_dict``.
"""

import functools
from collections import OrderedDict

from torch import nn

__all__ = []


def _hide_from_state_dict(module, keys):
    """Leave ``keys`` (relative to ``module``) out of its ``state_dict``; loading skips them.

    For tensors that another module saves: the ``Sequential`` owns root-level parameters,
    and fx constants are no state of the model.
    """
    keys = tuple(keys)
    if keys:
        module.register_state_dict_post_hook(functools.partial(_drop_keys, keys=keys))
        module.register_load_state_dict_pre_hook(functools.partial(_keep_current, keys=keys))


def _drop_keys(module, state_dict, prefix, local_metadata, keys):
    for key in keys:
        state_dict.pop(prefix + key, None)


def _keep_current(module, state_dict, prefix, *args, keys):
    # Loading the tensor onto itself: no missing key, and the owner's value (loaded by the
    # Sequential, which comes first) stays.
    for key in keys:
        module_path, _, name = key.rpartition(".")
        owner = module.get_submodule(module_path)
        state_dict[prefix + key] = getattr(owner, name)


def _assemble(model, children, root_tensors):
    seq = nn.Sequential(OrderedDict(children))
    # Glue made here follows the model's mode; the model's own modules keep theirs.
    known = {id(m) for m in model.modules()}
    for child in seq.children():
        if id(child) not in known:
            child.training = model.training
    for name, tensor in root_tensors.items():
        if isinstance(tensor, nn.Parameter):
            seq.register_parameter(name, tensor)
        else:
            seq.register_buffer(
                name, tensor, persistent=name not in model._non_persistent_buffers_set
            )
    return seq
