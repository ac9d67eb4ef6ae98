"""shardpipe: model-parallel primitives for PyTorch.

The public surface at a glance:

- ``copy_to(x, device, non_blocking=True)``: async, differentiable device copies.
- ``ColumnParallelLinear``, ``RowParallelLinear``: tensor-parallel ``nn.Linear`` drop-ins over
  devices of one process or ranks of a process group; ``parallelize(model, plan)`` swaps
  them into an existing model; ``ShardedTensor`` is the activation between them (one process).
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.shardpipe.*)
from . import _fake  # noqa: F401
from .copy import copy_to
from .parallelize import parallelize
from .sharded_linear import ColumnParallelLinear, RowParallelLinear, Shard
from .sharded_tensor import ShardedTensor

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "Shard",
    "ShardedTensor",
    "copy_to",
    "parallelize",
]
__version__ = "0.1.0"
