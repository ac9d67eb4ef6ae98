"""shardpipe: model-parallel primitives for PyTorch.

The public surface at a glance:

- ``copy_to(x, device, non_blocking=True)``: async, differentiable device copies.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import (
    _C,  # noqa: F401  (registers torch.ops.shardpipe.*)
    _fake,  # noqa: F401
)
from .copy import copy_to

__all__ = ["copy_to"]
__version__ = "0.1.0"
