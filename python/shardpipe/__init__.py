"""shardpipe: model-parallel primitives for PyTorch.

The public surface at a glance:

- ``copy_to(x, device, non_blocking=True)``: async, differentiable device copies.
- ``Pipeline(module, devices, chunks, balance, schedule, checkpoint, deferred_batch_norm,
  nested)``: a drop-in ``nn.Module`` running a sequential model as a pipeline; ``NoChunk``
  marks inputs passed whole; ``DeferredBatchNorm``; ``Trace``.
- ``Pipeline(..., group=, data_parallel_group=, mesh=)``: one stage per rank of a
  ``torch.distributed`` group, gradients averaged over data-parallel replicas;
  ``mesh(dp=, pp=, tp=)`` makes the ``DeviceMesh`` of a hybrid job.
- ``sequentialize(model)``: a model as an ``nn.Sequential`` of its own blocks, same keys
  (values that skip blocks carried through the blocks in between).
- ``Stash(name)`` / ``Pop(name, merge)`` in a ``SkipSequential``: skip connections in a
  hand-written Sequential that a pipeline may cut anywhere (``shardpipe.skip``).
- ``balance_by_time(model, sample, partitions)`` / ``balance_by_size(...)``: children (or
  blocks, ``nested=True``) per pipeline stage, minimising the slowest / largest stage.
- ``autotune(model, sample, target, loss_fn, devices, max_memory)``: a ``Plan`` whose
  ``kwargs`` (balance, chunks, schedule, checkpoint) give the fastest measured step within
  the memory limit, chosen by a cost model over one profile of the model.
- ``ColumnParallelLinear`` / ``RowParallelLinear``: ``nn.Linear`` drop-ins sharded over
  devices or a ``torch.distributed`` group; ``ShardedTensor`` (the activation between
  them in one process), ``Shard``; ``parallelize(model, plan, ...)`` swaps layers in place.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C, _fake  # noqa: F401  (register torch.ops.shardpipe.* and their fakes)
from .autotune import Plan, autotune
from .balance import balance_by_size, balance_by_time
from .batchnorm import DeferredBatchNorm
from .copy import copy_to
from .device_mesh import mesh
from .parallelize import parallelize
from .pipeline import NoChunk, Pipeline
from .sequentialize import sequentialize
from .sharded_linear import ColumnParallelLinear, RowParallelLinear, Shard
from .sharded_tensor import ShardedTensor
from .skip import Pop, SkipSequential, Stash
from .trace import Trace

__all__ = [
    "ColumnParallelLinear",
    "DeferredBatchNorm",
    "NoChunk",
    "Pipeline",
    "Plan",
    "Pop",
    "RowParallelLinear",
    "Shard",
    "ShardedTensor",
    "SkipSequential",
    "Stash",
    "Trace",
    "autotune",
    "balance_by_size",
    "balance_by_time",
    "copy_to",
    "mesh",
    "parallelize",
    "sequentialize",
]
__version__ = "0.1.0"
