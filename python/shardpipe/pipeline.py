"""``Pipeline``: a drop-in ``nn.Module`` that runs a sequential model as a pipeline."""

import atexit
import contextlib
import itertools
import operator
import weakref
from collections import OrderedDict

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import _C, _ranks, _structure, skip
from ._blocks import _blocks
from ._checks import as_device_list, check_bool, check_choice, check_int, check_number
from .batchnorm import DeferredBatchNorm
from .trace import Trace

__all__ = ["Pipeline", "NoChunk"]

LOSS_REDUCTIONS = ("mean", "sum")

_live = weakref.WeakSet()
# Every module some pipeline's stages run: sp.parallelize refuses them, since a pipeline's
# stages would keep running the layers it replaced.
_in_pipeline = weakref.WeakSet()


def in_pipeline(module):
    """Whether ``module`` or one of its submodules is run by a Pipeline's stages."""
    return isinstance(module, Pipeline) or any(m in _in_pipeline for m in module.modules())


def _refuse_fully_sharded(module):
    """FSDP2 over a stage's modules would all-gather and reduce-scatter in every
    micro-batch's forward and backward, from the stages' threads, in an order that differs
    from rank to rank; the pipeline averages gradients itself instead."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without torch.distributed
        return
    for name, m in module.named_modules():
        if isinstance(m, FSDPModule):
            where = f"{name!r} is" if name else "the model is"
            raise TypeError(
                f"module: {where} wrapped by fully_shard (FSDP2), which a Pipeline cannot run: "
                "its collectives would run per micro-batch on the stage threads, in an order "
                "that differs between ranks. Build the Pipeline from the plain model and give "
                "data_parallel_group= (or mesh=sp.mesh(dp=..., pp=...)) to average the "
                "gradients over data-parallel ranks")


def _refuse_inside_ddp():
    from torch.nn.parallel import DistributedDataParallel

    if getattr(DistributedDataParallel, "_active_ddp_module", None) is not None:
        raise TypeError(_DDP_REFUSAL)


_DDP_REFUSAL = (
    "DistributedDataParallel cannot wrap a shardpipe Pipeline (or a model holding one): its "
    "gradient hooks fire on the pipeline's worker threads, once per micro-batch, which gives "
    "wrong gradients. Give the pipeline data_parallel_group= instead: "
    "sp.Pipeline(model, devices, data_parallel_group=dist.group.WORLD) averages every stage's "
    "gradients over that group itself, overlapped with the pipeline's drain")


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


def _devices_of(blocks, balance):
    """``(devices, balance)`` read from where the blocks already are, for a pipeline made
    without ``devices``: a block's device is that of its parameters and buffers (one with
    none joins the block before it); a stage is cut wherever the device changes, or, with a
    ``balance``, each stage's blocks must share one device."""
    placed = []
    for name, block in blocks:
        found = {t.device for t in itertools.chain(block.parameters(), block.buffers())}
        if len(found) > 1:
            raise ValueError(f"block {name!r} has tensors on several devices "
                             f"({', '.join(sorted(map(str, found)))}); give devices=")
        placed.append(found.pop() if found else None)
    known = [d for d in placed if d is not None]
    current = known[0] if known else torch.device("cpu")
    for k, device in enumerate(placed):
        if device is not None:
            current = device
        placed[k] = current
    if balance is None:
        devices, balance = [], []
        for device in placed:
            if devices and devices[-1] == device:
                balance[-1] += 1
            else:
                devices.append(device)
                balance.append(1)
        return devices, balance
    devices, start = [], 0
    for s, size in enumerate(balance):
        found = set(placed[start:start + size])
        if len(found) > 1:
            raise ValueError(f"balance puts blocks on {', '.join(sorted(map(str, found)))} into "
                             f"stage {s}; without devices= each stage's blocks must share one "
                             "device")
        devices.append(found.pop() if found else torch.device("cpu"))
        start += size
    return devices, balance


def _refuse_sharing_across_devices(blocks, balance, stage_devices):
    """A module or tensor used by stages on two devices (or ranks) cannot be on both: moving
    it for the second stage would take it from the first (over ranks, each rank's copy would
    get only its own stage's share of the gradient)."""
    owner = {}
    start = 0
    for s, (size, device) in enumerate(zip(balance, stage_devices)):
        for name, block in blocks[start:start + size]:
            held = [(block, name)]
            held += [(t, f"{name}.{n}") for n, t in
                     itertools.chain(block.named_parameters(), block.named_buffers())]
            for obj, where in held:
                first = owner.setdefault(id(obj), (s, device, where))
                if first[1] != device:
                    raise ValueError(
                        f"{where} (stage {s}, on {device}) is also used as {first[2]} by stage "
                        f"{first[0]} on {first[1]}: a module or parameter shared by stages on "
                        "different devices cannot live on both; put those stages on one device "
                        "or give each its own copy")
        start += size


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


def _as_targets(target):
    if isinstance(target, torch.Tensor):
        return [target]
    if isinstance(target, (tuple, list)) and target and all(
            isinstance(t, torch.Tensor) for t in target):
        return list(target)
    what = "an empty " if isinstance(target, (tuple, list)) and not target else ""
    raise TypeError("target must be a Tensor or a non-empty tuple of Tensors, got "
                    f"{what}{type(target).__name__}")


class Pipeline(nn.Module):
    """Run an ``nn.Sequential`` as a pipeline over devices, micro-batch by micro-batch.

    The model's children are split into consecutive stages (``balance`` children each), each
    stage moved to its device and run by the C++ engine; every mini-batch
    is split into ``chunks`` micro-batches along dim 0 (like ``torch.chunk``) that flow
    through the stages under ``schedule``. ``pipe(x)`` returns the output on the last stage's
    device and ``loss.backward()`` runs a pipelined backward, so a training loop stays as it
    is. Gradients equal those of the same model run on the same micro-batches one after
    another (without batch-dependent layers: the full-batch gradients). As on the
    ``nn.Sequential``, ``len(pipe)``, ``pipe[i]``, slices and iteration give its children;
    what flows between stages keeps its structure (tuples, lists, dicts, values that are not
    tensors); a deep copy or an unpickled pipeline is an independent working one.

    Args:
        module: an ``nn.Sequential``, or a model that :func:`shardpipe.sequentialize` can
            turn into one. Its children are registered on the pipeline under their own
            names, so ``state_dict()`` keys are the model's.
        devices: one device per stage. ``"cpu"`` may repeat (each CPU stage gets its own
            worker thread), and so may a GPU (its stages overlap on separate streams). With
            ``schedule="interleaved"``, ``balance`` may list several stages per device:
            stage ``s`` runs on ``devices[s % len(devices)]``. With ``schedule="zbv"``,
            ``balance`` lists two stages per device, placed in a V: stages ``d`` and
            ``2 * len(devices) - 1 - d`` run on ``devices[d]`` (the first and the last
            stage share ``devices[0]``).
            Omitted: read from where the children already are (their parameters and
            buffers), a stage cut wherever the device changes.
        chunks: micro-batches per mini-batch; a smaller batch runs one sample per
            micro-batch.
        balance: how many children (blocks, with ``nested=True``) each stage gets
            (default: an even split by parameter count; :func:`shardpipe.balance_by_time`
            computes a better one).
        schedule: ``"gpipe"`` (fill-drain), ``"1f1b"`` (with :meth:`train_step`: at most
            ``stages`` micro-batches of activations alive per stage), ``"interleaved"``
            (1F1B over several virtual stages per device; default two per device), or one of
            the zero-bubble schedules, which split each stage's backward into the input
            gradient (sent upstream at once) and the weight gradient (run later, where
            1F1B's workers would wait): ``"zb1p"`` (ZB-H1: every stage holds at most what
            1F1B's first stage holds, the bubble about a third of 1F1B's) and ``"zbv"``
            (ZB-V: two stages per device in a V, the bubble close to zero at the same
            memory). Gradients are the same with every schedule.
        checkpoint: ``"never"``, ``"except_last"`` or ``"always"``: in training mode,
            recompute a stage's forward during backward instead of keeping its activations,
            replaying the random-number state so dropout agrees and the buffers the forward
            saw, which the recomputation leaves as they were.
        deferred_batch_norm: replace BatchNorm layers by :class:`DeferredBatchNorm`, so the
            running statistics after a step equal those of one full-batch step.
        check_finite: check every stage's outputs and gradients for NaN and Inf after each
            task and raise naming the stage and micro-batch where one first appears (forward
            or backward). Off by default: it costs a pass over the tensors (and, on a GPU, a
            wait for it).
        nested: cut at a finer grain: a child that is a plain ``nn.Sequential`` (ResNet's
            ``layer3``, VGG's ``features``) counts as its own children, so a stage boundary
            may fall inside it and ``balance`` counts these blocks (ResNet-50: 23 instead
            of 11). Keys and values of ``state_dict()`` are unchanged; hooks on the opened
            ``Sequential`` itself do not run, its children's do.
        group: a ``torch.distributed`` ProcessGroup: one stage per rank, in rank order
            (two per rank with ``"interleaved"`` by default, and with ``"zbv"``), every rank
            of the group building the same pipeline of the same model (checked: a rank that
            differs makes every rank raise ``ValueError`` naming what differs). Each rank
            keeps and runs only its own stages: ``parameters()`` and ``state_dict()`` are its
            share (under the model's keys), ``full_state_dict()`` gathers the whole model,
            and ``load_state_dict`` takes a full state dict. ``module`` may be built on the
            meta device; this rank's blocks are then made on its device and initialised by
            their ``reset_parameters``. :meth:`train_step` reads the input on the first
            stage's rank and the target on the last's and returns the loss on every rank;
            ``pipe(x)`` runs without autograd (under ``torch.no_grad()`` or in eval mode) and
            returns the output on the last stage's rank, None elsewhere. This rank's stages
            run on ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU (``devices=[d]``
            overrides). Activations and gradients travel as c10d point-to-point messages
            through the group's CPU backend (gloo; a CUDA stage's through host memory), so
            the group needs one (``dist.init_process_group()`` without a backend makes
            ``"cpu:gloo,cuda:nccl"``); their shapes and dtypes may change between
            micro-batches. What crosses a rank boundary must be
            a Tensor or a flat tuple of at most 16 Tensors. A stage that raises makes every
            rank raise: the failing rank its own exception, the others a ``RuntimeError``
            naming the rank, stage and micro-batch.
        timeout: with ``group`` or ``data_parallel_group``, the seconds any rank waits for a
            peer before it raises naming the peer (a rank that died or never came); the
            pipeline is then unusable. Over ``group`` it bounds silence (nothing reaching or
            leaving the rank), not the step: it must exceed the longest single task.
        data_parallel_group: a ``torch.distributed`` ProcessGroup of replicas of this
            pipeline (each fed its own share of the data, every one holding the same stages):
            after each :meth:`train_step`, or ``pipe(x)`` then ``backward()``, every
            parameter's gradient is the mean over the group, as ``DistributedDataParallel``
            makes it. Each stage's gradients go out in buckets, asynchronously, as soon as its
            last micro-batch's backward is done, overlapping the rest of the pipeline's drain;
            the call returns once all have arrived. ``train_step`` still returns this
            replica's loss (as a DDP training loop sees it); :meth:`no_sync` accumulates
            locally. A replica whose step fails makes every replica raise (within ``timeout``
            when ``pipe(x)`` itself failed on it, since the others wait in ``backward``).
            ``DistributedDataParallel(pipe)`` and FSDP2's ``fully_shard`` on its modules are
            refused: this is what replaces them.
        mesh: a ``DeviceMesh`` with dims named ``"dp"``, ``"pp"``, ``"tp"``
            (:func:`shardpipe.mesh` makes one): the pipeline runs over its ``"pp"`` dim
            (``group``) and averages over its ``"dp"`` dim (``data_parallel_group``); a dim of
            size 1 or missing is not used. Tensor-parallel layers inside the stages use its
            ``"tp"`` dim: apply :func:`shardpipe.parallelize` with
            ``group=mesh["tp"].get_group()`` to the model *before* building the pipeline.

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

    One stage per process under ``torchrun --nproc-per-node 4`` (every rank runs this)::

        >>> dist.init_process_group("gloo")                                 # doctest: +SKIP
        >>> pipe = shardpipe.Pipeline(model, group=dist.group.WORLD, chunks=8,
        ...                           schedule="1f1b")                      # doctest: +SKIP
        >>> loss = pipe.train_step(x, y, nn.functional.cross_entropy)      # doctest: +SKIP
        >>> full = pipe.full_state_dict()   # collective: the whole model  # doctest: +SKIP

    Data parallel over pipelines, and DP x PP from a mesh (``torchrun --nproc-per-node 4``)::

        >>> pipe = shardpipe.Pipeline(model, ["cpu", "cpu"], chunks=4,
        ...                           data_parallel_group=dist.group.WORLD)  # doctest: +SKIP
        >>> mesh = shardpipe.mesh(dp=2, pp=2)                               # doctest: +SKIP
        >>> pipe = shardpipe.Pipeline(model, mesh=mesh, chunks=8)           # doctest: +SKIP
    """

    @property
    def _ddp_params_and_buffers_to_ignore(self):
        # DistributedDataParallel reads this before any collective, on every rank alike.
        raise TypeError(_DDP_REFUSAL)

    @_ddp_params_and_buffers_to_ignore.setter
    def _ddp_params_and_buffers_to_ignore(self, value):
        raise TypeError(_DDP_REFUSAL)

    def __init__(self, module, devices=None, chunks=1, balance=None, schedule="gpipe",
                 checkpoint="never", deferred_batch_norm=False, nested=False, check_finite=False,
                 group=None, timeout=120.0, data_parallel_group=None, mesh=None):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if not isinstance(module, nn.Sequential):
            from .sequentialize import sequentialize

            module = sequentialize(module)
        chunks = check_int(chunks, "chunks", 1, 2**31 - 1)
        schedule = check_choice(schedule, "schedule", _C.schedule_names())
        checkpoint = check_choice(checkpoint, "checkpoint", _C.checkpoint_names())
        check_bool(deferred_batch_norm, "deferred_batch_norm")
        check_bool(check_finite, "check_finite")

        if deferred_batch_norm:
            module = DeferredBatchNorm.convert(module)
        blocks = _blocks(module, nested)
        what = "blocks (children, nested Sequentials opened)" if nested else "children"
        if balance is not None:
            if not isinstance(balance, (list, tuple)):
                raise TypeError(f"balance must be a list of ints, got {type(balance).__name__}")
            balance = [check_int(b, f"balance[{i}]") for i, b in enumerate(balance)]
        _refuse_fully_sharded(module)
        if mesh is not None:
            if group is not None or data_parallel_group is not None:
                raise ValueError("mesh: give mesh= alone; its 'pp' dim is the pipeline's group "
                                 "and its 'dp' dim the data_parallel_group")
            group, data_parallel_group = _ranks.mesh_groups(mesh)
        if data_parallel_group is not None:
            data_parallel_group = _ranks.check_group(data_parallel_group, "data_parallel_group")
            check_number(timeout, "timeout", minimum=1e-3)
        ranks = None
        if group is not None:
            group = _ranks.check_group(group)
            _ranks.check_cpu_backend(group)
            check_number(timeout, "timeout", minimum=1e-3)
            if data_parallel_group is not None:
                _ranks.check_orthogonal(group, data_parallel_group)
            if not blocks:
                raise ValueError("module: an empty model has no stages to spread over ranks")
            ranks = group.size()
            devices = [_ranks.rank_device(devices)] * ranks
        elif devices is None:
            devices, balance = _devices_of(blocks, balance)
        else:
            devices = as_device_list(devices, "devices")
        if blocks and balance is None:
            stages = _C.default_stage_count(schedule, len(devices), len(blocks), what)
            balance = _default_balance(blocks, stages)
        if blocks:
            _C.check_balance(balance, len(blocks), what, len(devices), schedule)
            stage_devices, workers = _C.place(schedule, len(balance), [str(d) for d in devices])
            stage_devices = [torch.device(d) for d in stage_devices]
            stage_ranks = [_C.worker_of_stage(schedule, s, workers) for s in range(len(balance))]
            places = stage_devices if ranks is None else [f"rank {r}" for r in stage_ranks]
            _refuse_sharing_across_devices(blocks, balance, places)
        else:
            balance, stage_devices, workers, stage_ranks = [], [], 0, []

        self._group = group
        self._data_parallel_group = data_parallel_group
        self._timeout = timeout
        self._stage_ranks = stage_ranks
        self._rank = None if group is None else group.rank()
        self._model_keys = None
        if group is not None:
            _ranks.check_ranks_agree(group, blocks, dict(
                chunks=chunks, schedule=schedule, balance=list(balance), checkpoint=checkpoint,
                nested=nested, deferred_batch_norm=deferred_batch_norm,
                check_finite=check_finite))
            self._model_keys = list(module.state_dict().keys())
        if data_parallel_group is not None:
            # Every replica must hold the same stages of the same model, or the buckets of
            # their gradients would not line up.
            _ranks.check_ranks_agree(data_parallel_group, blocks, dict(
                chunks=chunks, schedule=schedule, balance=list(balance), checkpoint=checkpoint,
                nested=nested, stages=len(balance), pipeline_rank=self._rank),
                argument="data_parallel_group")
        if group is not None:
            own, start = [], 0
            for size, r in zip(balance, stage_ranks):
                if r == self._rank:
                    own += blocks[start:start + size]
                start += size
            _ranks.materialise(own, stage_devices[0])
            held = {id(t) for _, block in own
                    for t in itertools.chain(block.parameters(), block.buffers())}
            for name, param in module.named_parameters(recurse=False):
                if id(param) in held:
                    self.register_parameter(name, param)
            for name, buffer in module.named_buffers(recurse=False):
                if id(buffer) in held:
                    self.register_buffer(name, buffer, persistent=name not in
                                         module._non_persistent_buffers_set)
            _ranks.register_blocks(self, own)
        else:
            # Parameters and buffers that sequentialize keeps on the Sequential itself (ViT's
            # class token) stay under their own names too; the child using them holds the
            # same objects, so they move with its stage.
            for name, param in module.named_parameters(recurse=False):
                self.register_parameter(name, param)
            for name, buffer in module.named_buffers(recurse=False):
                self.register_buffer(name, buffer, persistent=name not in
                                     module._non_persistent_buffers_set)
            # Every position, a module used twice under each of its names, as in the model's
            # state_dict.
            for name, child in module._modules.items():
                self.add_module(name, child)

        self._devices = stage_devices
        self._block_names = [name for name, _ in blocks]
        self._balance = list(balance)
        self._workers = workers
        self._chunks = chunks
        self._schedule = schedule
        self._checkpoint = checkpoint
        self._check_finite = check_finite
        self._build()

    def _build(self):
        """The stages (nn.Sequential views sharing the registered children, on their
        devices) and the engine; construction, copies and unpickling come here."""
        stages, start = [], 0
        for s, (size, device) in enumerate(zip(self._balance, self._devices)):
            names = self._block_names[start:start + size]
            start += size
            if self._group is not None and self._stage_ranks[s] != self._rank:
                stages.append(None)  # another rank's
                continue
            blocks = [(name, self.get_submodule(name)) for name in names]
            stages.append(_stage_module(blocks).to(device))
        # Kept out of the module tree, so that state_dict keys stay the model's.
        self.__dict__["_stages"] = tuple(s for s in stages if s is not None)
        self.__dict__["_deferred"] = [m for m in self.modules()
                                      if isinstance(m, DeferredBatchNorm)]
        self.__dict__["_stage_modules"] = [m for stage in self._stages for m in stage.modules()]
        _in_pipeline.update(self._stage_modules)
        engine = None
        if stages:
            over_ranks = {} if self._group is None else dict(
                group_name=self._group.group_name, timeout=float(self._timeout))
            if self._data_parallel_group is not None:
                over_ranks.update(data_parallel_group=self._data_parallel_group.group_name,
                                  timeout=float(self._timeout))
            engine = _C.Engine(list(stages), [str(d) for d in self._devices], self._workers,
                               self._chunks, self._schedule, self._checkpoint,
                               self._check_finite, **over_ranks)
        self.__dict__["_engine"] = engine
        _live.add(self)

    def __getstate__(self):
        if self._data_parallel_group is not None:
            raise TypeError("a Pipeline with a data_parallel_group cannot be copied or pickled "
                            "(its gradients are averaged with other processes); save its "
                            "state_dict() instead")
        if self._group is not None:
            raise TypeError("a Pipeline over a process group cannot be copied or pickled (its "
                            "stages live on several processes); save full_state_dict() instead")
        # The engine and its threads are this process's; a copy or an unpickled pipeline
        # makes its own from the same placement.
        state = self.__dict__.copy()
        for name in ("_engine", "_stages", "_deferred", "_stage_modules"):
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._build()

    @property
    def stages(self):
        """The stages, as ``nn.Sequential`` modules sharing the pipeline's children (with
        ``group``: this rank's)."""
        return self._stages

    @property
    def devices(self):
        """The device of each stage (with ``group``: of this rank's stages)."""
        if self._group is None:
            return list(self._devices)
        return [d for d, r in zip(self._devices, self._stage_ranks) if r == self._rank]

    @property
    def stage_ranks(self):
        """With ``group``: the rank (in the group) that runs each stage; else None."""
        return None if self._group is None else list(self._stage_ranks)

    @property
    def balance(self):
        """How many children (blocks, with ``nested=True``) each stage holds."""
        return list(self._balance)

    @property
    def chunks(self):
        """Micro-batches per mini-batch (at most; a smaller batch gives fewer)."""
        return self._chunks

    @property
    def schedule(self):
        """The schedule's name: ``"gpipe"``, ``"1f1b"``, ``"interleaved"``..."""
        return self._schedule

    @property
    def checkpoint(self):
        """The checkpoint mode: ``"never"``, ``"except_last"`` or ``"always"``."""
        return self._checkpoint

    def __len__(self):
        """The number of children of the wrapped ``nn.Sequential`` (not of stages)."""
        return len(self._modules)

    def __iter__(self):
        """The wrapped ``nn.Sequential``'s children, in order."""
        return iter(self._modules.values())

    def __getitem__(self, index):
        """A child by position (negative counts from the end), or an ``nn.Sequential`` of the
        children a slice selects, as on the wrapped ``nn.Sequential``."""
        children = list(self._modules.items())
        if isinstance(index, slice):
            return nn.Sequential(OrderedDict(children[index]))
        index = operator.index(index)
        if not -len(children) <= index < len(children):
            raise IndexError(f"index {index} is out of range for a pipeline of "
                             f"{len(children)} children")
        return children[index][1]

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
        """Run the pipeline; returns the last stage's output as the stage returned it (its
        tensors concatenated over the micro-batches)."""
        if self._engine is None:  # an empty nn.Sequential is the identity
            return inputs[0] if len(inputs) == 1 else inputs
        self._refuse_wrappers()
        if self._group is not None:
            return self._forward_over_ranks(inputs)
        tensors, batched, spec = _flatten_inputs(inputs)
        output = self._engine.forward(tensors, batched, spec, self.training)
        if self._deferred:
            self._commit_batch_norm()
        return output

    def train_step(self, input, target, loss_fn, loss_reduction="mean"):
        """Forward and backward of one mini-batch, fused under the schedule.

        ``loss_fn(output, target)`` is computed per micro-batch on the last stage and its
        backward starts at once, which is what lets ``schedule="1f1b"`` keep at most
        ``stages`` micro-batches of activations per stage (and the zero-bubble schedules
        fill 1F1B's bubbles within that memory; ``pipe(x)`` then ``loss.backward()`` works
        with them too, but keeps every micro-batch alive until the backward, as with
        ``"gpipe"``). Returns the detached loss: the
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
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        check_choice(loss_reduction, "loss_reduction", LOSS_REDUCTIONS)
        if self._engine is not None:
            self._refuse_wrappers()
        if self._group is not None or self._data_parallel_group is not None:
            return self._train_step_collective(input, target, loss_fn, loss_reduction)
        tensors, batched, spec = _flatten_inputs((input,))
        targets = _as_targets(target)
        if self._engine is None:
            loss = loss_fn(input, target)
            loss.backward()
            return loss.detach()
        loss = self._engine.train_step(tensors, batched, spec, targets, loss_fn,
                                       loss_reduction == "sum", self.training)
        self._commit_batch_norm()
        return loss

    def _forward_over_ranks(self, inputs):
        if torch.is_grad_enabled() and self.training:
            raise RuntimeError(
                "a Pipeline over ranks cannot run pipe(x) with autograd in training mode (the "
                "backward would cross processes); train with pipe.train_step(x, y, loss_fn), "
                "or call pipe(x) under torch.no_grad() or in eval mode")
        # Only the rank that reads the input checks it; what it finds wrong reaches every rank.
        tensors, batched, spec, refused = [], [], None, None
        if self._stage_ranks[0] == self._rank:
            try:
                tensors, batched, spec = _flatten_inputs(inputs)
            except (TypeError, ValueError) as error:
                refused = error
        with torch.no_grad():
            output = self._engine.forward(tensors, batched, spec, self.training, refused)
        if self._deferred:
            self._commit_batch_norm()
        return output

    def _train_step_collective(self, input, target, loss_fn, loss_reduction):
        # Over ranks, or with data-parallel peers: a bad argument reaches the engine, which
        # makes every rank raise instead of leaving the others waiting.
        tensors, batched, spec, targets, refused = [], [], None, [], None
        over_ranks = self._group is not None
        try:
            if not over_ranks or self._stage_ranks[0] == self._rank:
                tensors, batched, spec = _flatten_inputs((input,))
            if not over_ranks or self._stage_ranks[-1] == self._rank:
                targets = _as_targets(target)
        except (TypeError, ValueError) as error:
            refused = error
        if self._engine is None:
            if refused is not None:
                raise refused
            loss = loss_fn(input, target)
            loss.backward()
            return loss.detach()
        loss = self._engine.train_step(tensors, batched, spec, targets, loss_fn,
                                       loss_reduction == "sum", self.training, refused)
        self._commit_batch_norm()
        return loss

    def full_state_dict(self):
        """The whole model's state dict under the model's keys, on the CPU. With ``group`` a
        collective (every rank calls it; every rank gets the whole dict); otherwise the same
        as ``state_dict()``.

        Example::

            >>> pipe = shardpipe.Pipeline(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)),
            ...                           ["cpu", "cpu"])
            >>> list(pipe.full_state_dict())
            ['0.weight', '0.bias', '1.weight', '1.bias']
        """
        if self._group is None:
            return OrderedDict((k, v.detach().cpu()) for k, v in self.state_dict().items())
        return _ranks.full_state_dict(self.state_dict(), self._group, self._model_keys)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """As ``nn.Module.load_state_dict``; with ``group`` it takes the whole model's state
        dict (``full_state_dict()``, the plain model's, or one saved with another number of
        ranks) and each rank loads its own stages' keys.

        Example::

            >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
            >>> pipe = shardpipe.Pipeline(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)),
            ...                           ["cpu", "cpu"])
            >>> pipe.load_state_dict(model.state_dict())
            <All keys matched successfully>
        """
        if self._group is None:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        own = set(self.state_dict().keys())
        known = set(self._model_keys)
        missing = [k for k in self.state_dict() if k not in state_dict]
        unexpected = [k for k in state_dict if k not in known]
        if strict and (missing or unexpected):
            raise RuntimeError(f"Error(s) in loading state_dict for Pipeline on rank {self._rank}: "
                               f"missing keys {missing}, unexpected keys {unexpected}")
        super().load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False,
                                assign=assign)
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def _refuse_wrappers(self):
        _refuse_inside_ddp()
        for m in self._stage_modules:
            if type(m).__name__.startswith("FSDP"):
                _refuse_fully_sharded(m)

    @contextlib.contextmanager
    def no_sync(self):
        """With ``data_parallel_group``: steps inside accumulate their gradients locally; the
        first step after it averages everything accumulated (as
        ``DistributedDataParallel.no_sync`` does). Every replica must use it alike. Without a
        data-parallel group there is nothing to hold back and it does nothing.

        Example::

            >>> pipe = shardpipe.Pipeline(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1)),
            ...                           ["cpu", "cpu"], chunks=2)
            >>> x, y = torch.randn(8, 8), torch.randn(8, 1)
            >>> with pipe.no_sync():      # gradient accumulation over two steps
            ...     _ = pipe.train_step(x, y, nn.functional.mse_loss)
            >>> _ = pipe.train_step(x, y, nn.functional.mse_loss)   # syncs both
        """
        engine = self._engine
        if engine is None or self._data_parallel_group is None:
            yield
            return
        previous = engine.gradient_sync
        engine.gradient_sync = False
        try:
            yield
        finally:
            engine.gradient_sync = previous

    @property
    def data_parallel_group(self):
        """The process group the gradients are averaged over, or None."""
        return self._data_parallel_group

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
        if self._engine is None:
            yield trace
            return
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
