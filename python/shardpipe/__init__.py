"""shardpipe: model-parallel primitives for PyTorch.

The public surface at a glance:

- ``copy_to(x, device, non_blocking=True)``: async, differentiable device copies.
- ``Pipeline(module, devices, chunks, balance, schedule, checkpoint, deferred_batch_norm)``:
  a drop-in ``nn.Module`` running a sequential model as a pipeline; ``NoChunk`` marks inputs
  passed whole; ``DeferredBatchNorm``; ``Trace``.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.shardpipe.*)
from . import _fake  # noqa: F401
from .batchnorm import DeferredBatchNorm
from .copy import copy_to
from .pipeline import NoChunk, Pipeline
from .trace import Trace

__all__ = ["copy_to", "Pipeline", "NoChunk", "DeferredBatchNorm", "Trace"]
__version__ = "0.1.0"
