"""shardpipe: model-parallel primitives for PyTorch.

The public surface at a glance:

- ``copy_to(x, device, non_blocking=True)``: async, differentiable device copies.
- ``Pipeline(module, devices, chunks, balance, schedule, checkpoint, deferred_batch_norm)``:
  a drop-in ``nn.Module`` running a sequential model as a pipeline; ``NoChunk`` marks inputs
  passed whole; ``DeferredBatchNorm``; ``Trace``.
- ``sequentialize(model)``: a model as an ``nn.Sequential`` of its own blocks, same keys.
- ``balance_by_time(model, sample, partitions)`` / ``balance_by_size(...)``: children per
  pipeline stage, minimising the slowest / largest stage.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.shardpipe.*)
from . import _fake  # noqa: F401
from .balance import balance_by_size, balance_by_time
from .batchnorm import DeferredBatchNorm
from .copy import copy_to
from .pipeline import NoChunk, Pipeline
from .sequentialize import sequentialize
from .trace import Trace

__all__ = ["copy_to", "Pipeline", "NoChunk", "DeferredBatchNorm", "Trace", "sequentialize",
           "balance_by_time", "balance_by_size"]
__version__ = "0.1.0"
