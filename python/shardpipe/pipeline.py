"""``Pipeline``: a drop-in ``nn.Module`` that runs a sequential model as a pipeline."""

import atexit
import contextlib
import weakref
from collections import OrderedDict

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import _C, _structure, skip
from ._blocks import _blocks
from ._checks import as_device_list, check_bool, check_choice, check_int
from .batchnorm import DeferredBatchNorm
from .trace import Trace

__all__ = ["Pipeline", "NoChunk"]

LOSS_REDUCTIONS = ("mean", "sum")

_live = weakref.WeakSet()


@atexit.register
def _close_all():
    for pipe in list(_live):
        pipe.close()


class NoChunk:
    """Marks a pipeline input that every micro-batch gets whole instead of a slice of.

    A stage that takes several inputs gets them as one tuple.

    Example::

        >>> class Scale(nn.Module):
        ...     def forward(self, inputs):
        ...         x, weight = inputs
        ...         return x * weight
        >>> pipe = shardpipe.Pipeline(nn.Sequential(Scale(), nn.Linear(4, 2)), ["cpu", "cpu"],
        ...                           chunks=4)
        >>> x, weight = torch.randn(8, 4), torch.randn(4)
        >>> out = pipe(x, shardpipe.NoChunk(weight))   # x is split, weight is not
        >>> out.shape
        torch.Size([8, 2])
    """

    def __init__(self, tensor):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"NoChunk wraps a Tensor, got {type(tensor).__name__}")
        self.tensor = tensor

    def __repr__(self):
        return f"NoChunk({tuple(self.tensor.shape)})"


def _default_balance(blocks, stages):
    # Even split by parameter count; every block also counts one, so parameter-free layers
    # are spread out too.
    costs = [1.0 + sum(p.numel() for p in block.parameters()) for _, block in blocks]
    return list(_C.balance_partition(costs, stages))


def _stage_module(blocks):
    # Stage modules live outside the module tree, so their child names are free; a nested
    # block's dotted name gets underscores (a child name cannot hold a dot), made unique.
    # A stage runs its blocks as a SkipSequential does: values stashed by a Stash in an
    # earlier stage arrive with its input and what is still stashed leaves with its output.
    named = OrderedDict()
    for name, block in blocks:
        name = name.replace(".", "_")
        while name in named:
            name += "_"
        named[name] = block
    return skip._Stage(named)


def _flatten_inputs(inputs):
    """``(tensors, batched, spec)`` of a pipeline's positional inputs: one input is given to
    the first stage as it is, several as a tuple; ``NoChunk`` tensors are not split."""
    value = inputs[0] if len(inputs) == 1 else tuple(inputs)
    leaves, treespec = pytree.tree_flatten(value)
    tensors, batched = [], []
    for leaf in leaves:
        if isinstance(leaf, (torch.Tensor, NoChunk)):
            tensors.append(leaf.tensor if isinstance(leaf, NoChunk) else leaf)
            batched.append(not isinstance(leaf, NoChunk))
    if not any(batched):
        kinds = ", ".join(f"input {k} is a {type(x).__name__}" for k, x in enumerate(inputs))
        raise TypeError("a pipeline's inputs must hold at least one Tensor to split into "
                        f"micro-batches (not wrapped in NoChunk); {kinds}")
    if any(isinstance(leaf, NoChunk) for leaf in leaves):
        value = pytree.tree_unflatten(
            [leaf.tensor if isinstance(leaf, NoChunk) else leaf for leaf in leaves], treespec)
    _, spec = _structure.flatten(value)
    return tensors, batched, spec


class Pipeline(nn.Module):
    """Run an ``nn.Sequential`` as a pipeline over devices, micro-batch by micro-batch.

    The model's children are split into consecutive stages (``balance`` children each), each
    stage moved to its device and run by a worker thread of the C++ engine; every mini-batch
    is split into ``chunks`` micro-batches along dim 0 (like ``torch.chunk``) that flow
    through the stages under ``schedule``. ``pipe(x)`` returns the output on the last stage's
    device and ``loss.backward()`` runs a pipelined backward, so a training loop stays as it
    is. Gradients equal those of the same model run on the same micro-batches one after
    another (without batch-dependent layers: the full-batch gradients).

    Args:
        module: an ``nn.Sequential``, or a model that :func:`shardpipe.sequentialize` can
            turn into one. Its children are registered on the pipeline under their own
            names, so ``state_dict()`` keys are the model's.
        devices: one device per stage. ``"cpu"`` may repeat (each CPU stage gets its own
            worker thread), and so may a GPU (its stages overlap on separate streams). With
            ``schedule="interleaved"``, ``balance`` may list several stages per device:
            stage ``s`` runs on ``devices[s % len(devices)]``.
        chunks: micro-batches per mini-batch; a smaller batch runs one sample per
            micro-batch.
        balance: how many children (blocks, with ``nested=True``) each stage gets
            (default: an even split by parameter count; :func:`shardpipe.balance_by_time`
            computes a better one).
        schedule: ``"gpipe"`` (fill-drain), ``"1f1b"`` (with :meth:`train_step`: at most
            ``stages`` micro-batches of activations alive per stage) or ``"interleaved"``
            (1F1B over several virtual stages per device; default two per device).
        checkpoint: ``"never"``, ``"except_last"`` or ``"always"``: recompute a stage's
            forward during backward instead of keeping its activations, replaying the
            random-number state so dropout agrees.
        deferred_batch_norm: replace BatchNorm layers by :class:`DeferredBatchNorm`, so the
            running statistics after a step equal those of one full-batch step.
        nested: cut at a finer grain: a child that is a plain ``nn.Sequential`` (ResNet's
            ``layer3``, VGG's ``features``) counts as its own children, so a stage boundary
            may fall inside it and ``balance`` counts these blocks (ResNet-50: 23 instead
            of 11). Keys and values of ``state_dict()`` are unchanged; hooks on the opened
            ``Sequential`` itself do not run, its children's do.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> pipe = shardpipe.Pipeline(model, devices=["cpu", "cpu"], chunks=4)
        >>> out = pipe(torch.randn(32, 8))
        >>> out.sum().backward()

    Cutting inside ResNet's ``layer1``..``layer4`` (ResNet-18: 15 blocks, not 11 children;
    on GPUs give ``["cuda:0", "cuda:1"]``)::

        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> x = torch.randn(8, 3, 32, 32)
        >>> balance = shardpipe.balance_by_time(model, x[:2], 2, nested=True)
        >>> pipe = shardpipe.Pipeline(model, ["cpu", "cpu"], chunks=4, balance=balance,
        ...                           nested=True)
        >>> sum(pipe.balance), pipe(x).shape
        (15, torch.Size([8, 10]))
    """

    def __init__(self, module, devices, chunks=1, balance=None, schedule="gpipe",
                 checkpoint="never", deferred_batch_norm=False, nested=False):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if not isinstance(module, nn.Sequential):
            from .sequentialize import sequentialize

            module = sequentialize(module)
        devices = as_device_list(devices, "devices")
        chunks = check_int(chunks, "chunks", 1, 2**31 - 1)
        schedule = check_choice(schedule, "schedule", _C.schedule_names())
        checkpoint = check_choice(checkpoint, "checkpoint", _C.checkpoint_names())
        check_bool(deferred_batch_norm, "deferred_batch_norm")

        blocks = _blocks(module, nested)
        what = "blocks (children, nested Sequentials opened)" if nested else "children"
        if balance is None:
            stages = _C.default_stage_count(schedule, len(devices), len(blocks), what)
            balance = _default_balance(blocks, stages)
        if not isinstance(balance, (list, tuple)):
            raise TypeError(f"balance must be a list of ints, got {type(balance).__name__}")
        balance = [check_int(b, f"balance[{i}]") for i, b in enumerate(balance)]
        _C.check_balance(balance, len(blocks), what, len(devices), schedule)

        if deferred_batch_norm:
            module = DeferredBatchNorm.convert(module)
            blocks = _blocks(module, nested)
        children = list(module.named_children())
        # Parameters and buffers that sequentialize keeps on the Sequential itself (ViT's
        # class token) stay under their own names too; the child using them holds the same
        # objects, so they move with its stage.
        for name, param in module.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in module.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in
                                 module._non_persistent_buffers_set)
        for name, child in children:
            self.add_module(name, child)

        stage_devices, workers = _C.place(schedule, len(balance), [str(d) for d in devices])
        stage_devices = [torch.device(d) for d in stage_devices]
        stages, start = [], 0
        for size, device in zip(balance, stage_devices):
            stages.append(_stage_module(blocks[start:start + size]).to(device))
            start += size
        # Stages share the children registered above; kept out of the module tree so that
        # state_dict keys stay the model's.
        self.__dict__["_stages"] = tuple(stages)
        self._devices = stage_devices
        self._block_names = [name for name, _ in blocks]
        self._balance = list(balance)
        self._chunks = chunks
        self._schedule = schedule
        self._checkpoint = checkpoint
        self._deferred = [m for m in self.modules() if isinstance(m, DeferredBatchNorm)]
        self._engine = _C.Engine(list(stages), [str(d) for d in stage_devices], workers, chunks,
                                 schedule, checkpoint)
        _live.add(self)

    @property
    def stages(self):
        """The stages, as ``nn.Sequential`` modules sharing the pipeline's children."""
        return self._stages

    @property
    def devices(self):
        """The device of each stage."""
        return list(self._devices)

    @property
    def balance(self):
        """How many children (blocks, with ``nested=True``) each stage holds."""
        return list(self._balance)

    @property
    def chunks(self):
        return self._chunks

    def extra_repr(self):
        parts = []
        start = 0
        names = self._block_names
        for s, (size, device) in enumerate(zip(self._balance, self._devices)):
            parts.append(f"stage {s} on {device}: {', '.join(names[start:start + size])}")
            start += size
        head = (f"chunks={self._chunks}, schedule={self._schedule!r}, "
                f"checkpoint={self._checkpoint!r}, balance={self._balance}")
        return head + "\n" + "\n".join(parts)

    def forward(self, *inputs):
        """Run the pipeline; returns the last stage's output (a Tensor or a tuple)."""
        tensors, batched, spec = _flatten_inputs(inputs)
        output = self._engine.forward(tensors, batched, spec, self.training)
        if self._deferred:
            self._commit_batch_norm()
        return output

    def train_step(self, input, target, loss_fn, loss_reduction="mean"):
        """Forward and backward of one mini-batch, fused under the schedule.

        ``loss_fn(output, target)`` is computed per micro-batch on the last stage and its
        backward starts at once, which is what lets ``schedule="1f1b"`` keep at most
        ``stages`` micro-batches of activations per stage. Returns the detached loss: the
        micro-batch losses weighted by their share of the batch (``loss_reduction="mean"``,
        so a mean-reduced loss gives the full-batch loss) or summed (``"sum"``). Parameter
        gradients are those of the returned value; call ``optimizer.step()`` next. With
        checkpointing, ``loss_fn`` runs again when a checkpointed micro-batch is recomputed,
        so it should have no side effects.

        Example::

            >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
            >>> pipe = shardpipe.Pipeline(model, ["cpu", "cpu"], chunks=4, schedule="1f1b")
            >>> optimizer = torch.optim.SGD(pipe.parameters(), lr=0.1)
            >>> x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
            >>> loss = pipe.train_step(x, y, nn.functional.cross_entropy)
            >>> optimizer.step(); optimizer.zero_grad()
        """
        tensors, batched, spec = _flatten_inputs((input,))
        if isinstance(target, torch.Tensor):
            targets = [target]
        elif isinstance(target, (tuple, list)) and target and all(
                isinstance(t, torch.Tensor) for t in target):
            targets = list(target)
        else:
            what = "an empty " if isinstance(target, (tuple, list)) and not target else ""
            raise TypeError("target must be a Tensor or a non-empty tuple of Tensors, got "
                            f"{what}{type(target).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        check_choice(loss_reduction, "loss_reduction", LOSS_REDUCTIONS)
        loss = self._engine.train_step(tensors, batched, spec, targets, loss_fn,
                                       loss_reduction == "sum", self.training)
        self._commit_batch_norm()
        return loss

    def _commit_batch_norm(self):
        if self.training:
            for bn in self._deferred:
                bn.commit()

    @contextlib.contextmanager
    def record_trace(self):
        """Record when each task ran, for a timeline of the schedule.

        Example::

            >>> pipe = shardpipe.Pipeline(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1)),
            ...                           ["cpu", "cpu"], chunks=4)
            >>> with pipe.record_trace() as trace:
            ...     pipe(torch.randn(16, 8)).sum().backward()
            >>> len(trace.events)   # 2 stages x 4 micro-batches x (forward, backward)
            16
            >>> trace.save("pipeline.json")   # doctest: +SKIP
        """
        trace = Trace()
        self._engine.take_trace()
        self._engine.set_tracing(True)
        try:
            yield trace
        finally:
            self._engine.set_tracing(False)
            trace._extend(self._engine.take_trace())

    def close(self):
        """Stop the worker threads (also done when the pipeline is garbage collected)."""
        engine = self.__dict__.get("_engine")
        if engine is not None:
            engine.shutdown()

    def _refuse_move(self, *args, **kwargs):
        raise TypeError("a Pipeline places its stages itself; move the model before wrapping "
                        "it, or give other devices")

    cuda = _refuse_move
    cpu = _refuse_move

    def to(self, *args, **kwargs):
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None:
            self._refuse_move()
        return super().to(*args, **kwargs)
