"""The blocks a pipeline cuts into stages: a ``Sequential``'s children, nested ones opened.

Shared by ``Pipeline`` and the balancing helpers, so that ``balance`` counts exactly what the
pipeline cuts.
"""

from torch import nn

from ._checks import check_bool
from .skip import SkipSequential, _check_stashes

__all__ = []


def _blocks(module, nested):
    """The (name, module) pairs a pipeline cuts into stages: ``module``'s children, and with
    ``nested`` the children of each child that is a plain ``nn.Sequential`` (named
    ``"layer3.0"``...) in its place, so a stage boundary can fall inside it. The children
    stay where they are, so ``state_dict`` keys do not change. Raises ValueError unless
    every ``Stash`` among them has its ``Pop`` later on (the stages carry what is stashed
    between them)."""
    check_bool(nested, "nested")
    blocks = []
    # Every position, as nn.Sequential runs them: a module used twice is two blocks
    # (named_children() would list it once).
    for name, child in module._modules.items():
        if nested and _plain_sequential(child) and len(child) > 0:
            blocks += [(f"{name}.{sub}", grandchild) for sub, grandchild in child._modules.items()]
        else:
            blocks.append((name, child))
    _check_stashes(blocks)
    return blocks


def _plain_sequential(module):
    # A subclass with its own forward does more than run its children in order; a
    # SkipSequential does just that, its stashes carried by whoever runs its children.
    return isinstance(module, nn.Sequential) and (
        type(module).forward in (nn.Sequential.forward, SkipSequential.forward))
