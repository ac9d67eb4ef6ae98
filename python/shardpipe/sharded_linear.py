"""Tensor-parallel drop-ins for ``nn.Linear``: ColumnParallelLinear and RowParallelLinear.

The math, the communication and its overlap are C++ operators (``torch.ops.shardpipe.*``,
csrc/shardpipe/tensor_parallel/); this module checks arguments and holds the parameters.

Placement: ``devices`` (several devices of this process, "cpu" may repeat; one thread per
shard) or ``group`` (a ``torch.distributed`` process group, one shard per rank). Exactly one
may be given; with neither, the layer uses the default process group when one is initialised
and otherwise one shard on the default device (then it is exactly ``nn.Linear``).

State dicts hold the full, unsharded ``weight`` and ``bias`` under ``nn.Linear``'s keys, so
checkpoints move freely between sharded and plain models. Over a process group, saving gathers
the shards with an all-gather, so **every rank must call** ``state_dict()`` (each gets the full
tensors; save on one rank afterwards). ``sharded_state_dict()`` never communicates. Loading
never communicates: every rank takes its slice of the full tensors.

Faults over a group: every collective waits at most ``timeout`` seconds (120 by default, one
value per group). A rank whose layer raises tells its peers through the group's store, and
the peers stop waiting at once with an error naming that rank and its exception; a rank that
dies, hangs or never comes is named once the wait expires (or its connection drops). After
such a fault the layers over that group raise at once on every rank: make a new group.
An argument error that every rank meets alike breaks nothing.
"""

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from . import _C
from ._checks import as_device_list, check_bool, check_dtype, check_int, check_number
from .sharded_tensor import ShardedTensor, assemble, disassemble, gather_onto

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "Shard"]

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class Shard(NamedTuple):
    """One piece of a sharded parameter, as ``sharded_state_dict()`` gives it.

    ``tensor`` equals ``full[offsets[0]:offsets[0] + tensor.shape[0], offsets[1]:...]`` of
    the full parameter of shape ``full_shape``.

    Example::

        >>> col = shardpipe.ColumnParallelLinear(4, 3, devices=["cpu", "cpu"])
        >>> [(s.offsets, tuple(s.tensor.shape)) for s in col.sharded_state_dict()["weight"]]
        [((0, 0), (2, 4)), ((2, 0), (1, 4))]
    """

    tensor: torch.Tensor
    offsets: tuple
    full_shape: tuple


def _group_device(group):
    """The device a group communicates on: the current CUDA device for NCCL, else the CPU."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Placement:
    """Where the shards of one layer live: devices of this process, or ranks of a group."""

    def __init__(self, devices, group, default_device):
        if devices is not None and group is not None:
            raise ValueError("give exactly one of devices= and group=, got both")
        if devices is None and group is None:
            if dist.is_available() and dist.is_initialized():
                group = dist.group.WORLD
            else:
                devices = [default_device]
        self.group = group
        if group is not None:
            if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
                raise TypeError(
                    f"group must be a torch.distributed ProcessGroup, got {type(group).__name__}"
                )
            self.rank = dist.get_rank(group)
            if self.rank < 0:
                raise ValueError("group must contain this process (its rank in group is -1)")
            self.num_shards = dist.get_world_size(group)
            self.group_name = group.group_name
            self.device = _group_device(group)
            self.devices = None
            self.local = [self.rank]
            self.local_devices = [self.device]
        else:
            self.devices = tuple(as_device_list(devices, "devices"))
            self.num_shards = len(self.devices)
            self.device = self.devices[0]
            self.local = list(range(self.num_shards))
            self.local_devices = list(self.devices)

    def __deepcopy__(self, memo):
        # Immutable, and a ProcessGroup cannot be copied: a copied layer shares the placement.
        return self


class _ParallelLinear(nn.Module):
    """What column- and row-parallel layers share: placement, parameters, state dicts."""

    _split_dim = 0  # the weight dim that is split: 0 (rows) column-parallel, 1 row-parallel
    _bias_sharded = True
    _flag_name = ""  # gather_output / input_is_parallel

    def _build(self, in_features, out_features, bias, flag, devices, group, dtype, chunks,
               source, timeout):
        """Set the layer up; ``source`` is (weight, bias) to copy, or None to draw them."""
        cls = type(self).__name__
        self.in_features = check_int(in_features, "in_features", 1)
        self.out_features = check_int(out_features, "out_features", 1)
        check_bool(bias, "bias")
        setattr(self, self._flag_name, check_bool(flag, self._flag_name))
        dtype = check_dtype(dtype, _DTYPES)
        self.chunks = check_int(chunks, "chunks", 1)
        default_device = source[0].device if source is not None else torch.empty(0).device
        placement = _Placement(devices, group, default_device)
        split_total = self.out_features if self._split_dim == 0 else self.in_features
        split_name = "out_features" if self._split_dim == 0 else "in_features"
        if placement.num_shards > split_total:
            raise ValueError(
                f"{cls} cannot split {split_name}={split_total} over {placement.num_shards} "
                f"shards: there must be at most as many shards as {split_name}"
            )
        if chunks > 1 and placement.group is None:
            raise ValueError(
                f"chunks={chunks} needs group=: it pipelines the forward collective of a "
                "process group; with devices= use chunks=1"
            )
        if timeout is not None:
            check_number(timeout, "timeout", minimum=1e-3)
            if placement.group is None:
                raise ValueError(
                    f"timeout={timeout} needs group=: it bounds the waits of a process group's "
                    "collectives; layers over devices= do not wait for peers"
                )
        self._placement = placement
        if placement.group is not None:
            self._check_group_agrees(bias, dtype, cls)
            if timeout is not None:
                _C.set_collective_timeout(placement.group_name, float(timeout))
        self.shard_sizes = tuple(_C.shard_sizes(split_total, placement.num_shards))
        self._offsets = tuple(sum(self.shard_sizes[:i]) for i in range(placement.num_shards))

        if source is None:
            # Drawn exactly as nn.Linear draws it, on the same device, then split.
            full = nn.Linear(self.in_features, self.out_features, bias=bias, dtype=dtype)
            weight, full_bias = full.weight.detach(), full.bias
            full_bias = full_bias.detach() if full_bias is not None else None
        else:
            weight, full_bias = source
            weight = weight.detach().to(dtype)
            full_bias = full_bias.detach().to(dtype) if full_bias is not None else None
        if placement.group is not None:
            weight, full_bias = self._broadcast_from_first_rank(weight, full_bias)

        self._weight_names = []
        self._bias_names = []
        for index, device in zip(placement.local, placement.local_devices):
            name = f"weight_shard_{index}"
            self.register_parameter(name, nn.Parameter(self._slice(weight, index, device)))
            self._weight_names.append(name)
            if full_bias is not None and self._bias_sharded:
                name = f"bias_shard_{index}"
                self.register_parameter(name, nn.Parameter(self._slice(full_bias, index, device)))
                self._bias_names.append(name)
        if full_bias is not None and not self._bias_sharded:
            self.bias = nn.Parameter(full_bias.to(placement.device, copy=True))
        elif not self._bias_sharded:
            self.register_parameter("bias", None)
        self._has_bias = full_bias is not None

    # --- placement -------------------------------------------------------------------------

    @property
    def devices(self):
        """The devices of the shards (one process), or None over a process group."""
        return self._placement.devices

    @property
    def group(self):
        """The process group the shards are spread over, or None (one process)."""
        return self._placement.group

    @property
    def num_shards(self):
        """How many shards the weight is split into."""
        return self._placement.num_shards

    @property
    def weight_shards(self):
        """The weight shards held by this process (all of them with ``devices``)."""
        return tuple(getattr(self, n) for n in self._weight_names)

    def _slice(self, full, index, device):
        dim = self._split_dim if full.dim() == 2 else 0
        piece = full.narrow(dim, self._offsets[index], self.shard_sizes[index])
        return piece.to(device, copy=True).contiguous()

    def forward(self, x):
        """The layer's output for ``x`` (see the class docstring)."""
        try:
            return self._forward(x)
        except Exception as error:
            p = self._placement
            if p.group is not None and p.num_shards > 1:
                # The peers may be waiting in this layer's collective: they stop at once.
                _C.note_collective_failure(p.group_name, f"{type(error).__name__}: {error}")
            raise

    def _check_group_agrees(self, bias, dtype, cls):
        """Fail on every rank, instead of hanging later, when ranks build different layers."""
        p = self._placement
        # chunks sets how many collectives a forward makes: ranks must agree on it too.
        mine = (cls, self.in_features, self.out_features, bias, str(dtype),
                getattr(self, self._flag_name), self.chunks)
        everyone = [None] * p.num_shards
        dist.all_gather_object(everyone, mine, group=p.group)
        if any(other != mine for other in everyone):
            fields = ("layer", "in_features", "out_features", "bias", "dtype", self._flag_name,
                      "chunks")
            lines = "; ".join(
                f"rank {r}: " + ", ".join(f"{k}={v}" for k, v in zip(fields, sig))
                for r, sig in enumerate(everyone)
            )
            raise ValueError(f"the ranks of group disagree on the layer's shape: {lines}")

    def _broadcast_from_first_rank(self, weight, bias):
        """Every rank starts from the group's first rank's values (whatever its seed was)."""
        p = self._placement
        src = dist.get_global_rank(p.group, 0)
        weight = weight.to(p.device, copy=True).contiguous()
        dist.broadcast(weight, src=src, group=p.group)
        if bias is not None:
            bias = bias.to(p.device, copy=True).contiguous()
            dist.broadcast(bias, src=src, group=p.group)
        return weight, bias

    # --- full tensors and state dicts ------------------------------------------------------

    def _bias_parts(self):
        if not self._has_bias:
            return None
        if self._bias_sharded:
            return [getattr(self, n) for n in self._bias_names]
        return [self.bias]

    def _gather(self, parts, dim):
        """The full tensor from the local pieces along ``dim`` (collective over a group)."""
        p = self._placement
        parts = [t.detach() for t in parts]
        if p.group is None:
            return gather_onto(parts, p.device, dim)
        return _C.gather_shards(parts[0], dim, list(self.shard_sizes), p.group_name)

    def _full_parameters(self):
        weight = self._gather(self.weight_shards, self._split_dim)
        bias = None
        if self._has_bias:
            bias = self._gather(self._bias_parts(), 0) if self._bias_sharded else self.bias
            bias = bias.detach().clone()
        return weight, bias

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Full tensors under nn.Linear's keys (new tensors, also with keep_vars=True).
        weight, bias = self._full_parameters()
        destination[prefix + "weight"] = weight
        if bias is not None:
            destination[prefix + "bias"] = bias

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ):
        expected = {"weight": (self.out_features, self.in_features)}
        if self._has_bias:
            expected["bias"] = (self.out_features,)
        for name, shape in expected.items():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            full = state_dict[key]
            if not isinstance(full, torch.Tensor) or tuple(full.shape) != shape:
                got = tuple(full.shape) if isinstance(full, torch.Tensor) else type(full).__name__
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {got} from checkpoint, "
                    f"the shape in current model is {shape}."
                )
                continue
            self._load_full(name, full)
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and key[len(prefix):].split(".", 1)[0] not in expected:
                    unexpected_keys.append(key)

    @torch.no_grad()
    def _load_full(self, name, full):
        if name == "weight":
            for index, param in zip(self._placement.local, self.weight_shards):
                param.copy_(self._slice(full, index, param.device))
        elif self._bias_sharded:
            for index, pname in zip(self._placement.local, self._bias_names):
                param = getattr(self, pname)
                param.copy_(self._slice(full, index, param.device))
        else:
            self.bias.copy_(full)

    def sharded_state_dict(self, prefix=""):
        """The shards held by this process, without communication.

        Returns ``{prefix + "weight": [Shard, ...], prefix + "bias": [Shard, ...]}``: every
        shard with its offsets into the full parameter (see ``Shard``). Over a process group
        each rank returns its own shard; a row-parallel bias is whole on every rank. Load it
        back with ``load_sharded_state_dict``.

        Example::

            >>> row = shardpipe.RowParallelLinear(5, 2, devices=["cpu", "cpu"])
            >>> [s.offsets for s in row.sharded_state_dict()["weight"]]
            [(0, 0), (0, 3)]
        """
        out = {}
        weight_shape = (self.out_features, self.in_features)
        out[prefix + "weight"] = [
            Shard(w.detach(), self._shard_offsets(index, 2), weight_shape)
            for index, w in zip(self._placement.local, self.weight_shards)
        ]
        if self._has_bias:
            if self._bias_sharded:
                out[prefix + "bias"] = [
                    Shard(getattr(self, n).detach(), (self._offsets[index],), (self.out_features,))
                    for index, n in zip(self._placement.local, self._bias_names)
                ]
            else:
                out[prefix + "bias"] = [Shard(self.bias.detach(), (0,), (self.out_features,))]
        return out

    def _shard_offsets(self, index, dims):
        offsets = [0] * dims
        offsets[self._split_dim] = self._offsets[index]
        return tuple(offsets)

    @torch.no_grad()
    def load_sharded_state_dict(self, sharded, prefix=""):
        """Copy the shards of ``sharded`` (as ``sharded_state_dict`` returns) into this layer.

        Every local parameter shard needs an entry with the same offsets and shape; raises
        ``ValueError`` naming the key otherwise (load a full ``state_dict`` to re-shard).

        Example::

            >>> a = shardpipe.ColumnParallelLinear(4, 3, devices=["cpu", "cpu"])
            >>> b = shardpipe.ColumnParallelLinear(4, 3, devices=["cpu", "cpu"])
            >>> b.load_sharded_state_dict(a.sharded_state_dict())
            >>> torch.equal(a.state_dict()["weight"], b.state_dict()["weight"])
            True
        """
        if not isinstance(sharded, dict):
            raise TypeError(
                f"sharded must be a dict of lists of Shard, got {type(sharded).__name__}"
            )
        for key, mine in self.sharded_state_dict(prefix).items():
            if key not in sharded:
                raise ValueError(f"sharded has no entry {key!r}")
            given = {(tuple(s.offsets), tuple(s.tensor.shape)): s.tensor for s in sharded[key]}
            for shard in mine:
                match = given.get((shard.offsets, tuple(shard.tensor.shape)))
                if match is None:
                    raise ValueError(
                        f"sharded[{key!r}] has no shard at offsets {shard.offsets} with shape "
                        f"{tuple(shard.tensor.shape)}: it was saved with another sharding; "
                        "load a full state_dict instead"
                    )
                shard.tensor.copy_(match)

    def to_linear(self):
        """One ``nn.Linear`` with the gathered weight and bias (a copy).

        It lives on the first device (``devices``) or the group's device; over a process group
        this is a collective: every rank must call it, and every rank gets the full layer.
        """
        weight, bias = self._full_parameters()
        linear = nn.Linear(
            self.in_features, self.out_features, bias=bias is not None, device="meta",
            dtype=weight.dtype,
        )
        linear.weight = nn.Parameter(weight)
        if bias is not None:
            linear.bias = nn.Parameter(bias)
        return linear

    @property
    def dtype(self):
        """The dtype of the parameters."""
        return self.weight_shards[0].dtype

    def _check_dtype_of(self, x):
        if x.dtype != self.dtype:
            raise TypeError(f"x has dtype {x.dtype}, but the layer's parameters are {self.dtype}")

    def _check_device_of(self, x):
        p = self._placement
        if p.group is not None and x.device != p.device:
            raise ValueError(
                f"x is on {x.device}, but this rank's shard of the layer is on {p.device}"
            )

    def extra_repr(self):
        where = (
            f"devices={[str(d) for d in self.devices]}" if self.devices is not None
            else f"group={self._placement.group_name!r}, rank={self._placement.rank}"
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self._has_bias}, {self._flag_name}={getattr(self, self._flag_name)}, "
            f"{where}, shard_sizes={self.shard_sizes}"
            + (f", chunks={self.chunks}" if self.chunks > 1 else "")
        )


class ColumnParallelLinear(_ParallelLinear):
    """``nn.Linear`` with its weight split by output features (rows) over shards.

    Every shard computes its slice of the output features from the whole input. With
    ``gather_output=True`` the slices are concatenated, so the layer is a drop-in
    ``nn.Linear``; with ``False`` the output stays sharded along the last dim, for a
    following ``RowParallelLinear(input_is_parallel=True)`` (no communication in between).
    In backward the partial input gradients are summed: over a process group by an
    all-reduce that runs while the weight gradient is computed.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        gather_output: concatenate the output slices (True) or leave them sharded.
        devices: devices of this process, one shard each ("cpu" may repeat). The gathered
            output lands on the input's device; a sharded output is a ``ShardedTensor``
            (with one device, a plain tensor).
        group: a ``torch.distributed`` process group, one shard per rank (gloo on CPU, NCCL
            on GPU). Inputs and outputs are ordinary tensors on this rank's device; a sharded
            output is this rank's slice.
        dtype: float32, float64, bfloat16 or float16 (default: torch's default dtype).
        chunks: over a process group with ``gather_output=True``, split the batch (all dims
            but the last, flattened) into this many pieces, so that the all-gather of one
            piece runs while the next piece is multiplied. 1 (the default): one all-gather.
        timeout: over a process group, the seconds a collective waits for its peers before
            every rank raises, naming the rank at fault (see "Faults over a group" in the
            module docs). It belongs to the group (every layer over it shares the latest
            value); None keeps the group's (120 s unless set).

    ``out_features`` need not divide by the number of shards: shard sizes then differ by at
    most one, the first shards being the larger. Parameters are drawn as ``nn.Linear`` draws
    them (same seed, same values) and split; over a group, every rank starts from the first
    rank's draw.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> col = shardpipe.ColumnParallelLinear(8, 6, devices=["cpu", "cpu"])
        >>> _ = torch.manual_seed(0)
        >>> lin = torch.nn.Linear(8, 6)  # the same values
        >>> x = torch.randn(4, 8)
        >>> torch.allclose(col(x), lin(x))
        True
    """

    _split_dim = 0
    _bias_sharded = True
    _flag_name = "gather_output"

    def __init__(self, in_features, out_features, bias=True, gather_output=True, devices=None,
                 group=None, dtype=None, *, chunks=1, timeout=None):
        super().__init__()
        self._build(
            in_features, out_features, bias, gather_output, devices, group, dtype, chunks, None,
            timeout,
        )

    @classmethod
    def from_linear(cls, linear, *, gather_output=True, devices=None, group=None, chunks=1,
                    timeout=None):
        """A column-parallel copy of ``linear`` (an ``nn.Linear``), split over shards.

        With neither ``devices`` nor ``group``: the default process group if one is
        initialised, else ``linear``'s device. Over a group, the first rank's values win.

        Example::

            >>> lin = torch.nn.Linear(8, 6)
            >>> col = shardpipe.ColumnParallelLinear.from_linear(lin, devices=["cpu", "cpu"])
            >>> torch.allclose(col(torch.ones(2, 8)), lin(torch.ones(2, 8)))
            True
        """
        return _from_linear(cls, linear, gather_output, devices, group, chunks, timeout)

    @property
    def bias_shards(self):
        """The bias shards held by this process (empty without a bias)."""
        return tuple(getattr(self, n) for n in self._bias_names)

    def _forward(self, x):
        if isinstance(x, ShardedTensor):
            x = x.full_tensor()
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x has shape {tuple(x.shape)}, but in_features is {self.in_features}: "
                "its last dim must equal in_features"
            )
        self._check_dtype_of(x)
        self._check_device_of(x)
        p = self._placement
        if p.group is not None:
            bias = self.bias_shards[0] if self._has_bias else None
            return torch.ops.shardpipe.column_parallel_linear_group(
                x, self.weight_shards[0], bias, self.gather_output, list(self.shard_sizes),
                p.rank, p.group_name, self.chunks,
            )
        outs = torch.ops.shardpipe.column_parallel_linear(
            x, list(self.weight_shards), list(self.bias_shards), self.gather_output
        )
        if len(outs) == 1:
            return outs[0]
        return assemble(outs, x.device)


class RowParallelLinear(_ParallelLinear):
    """``nn.Linear`` with its weight split by input features (columns) over shards.

    Every shard multiplies its slice of the input features; the partial outputs are summed
    (one all-reduce over a process group) and the bias, held whole, is added once. With
    ``input_is_parallel=True`` the input is already sharded (the output of a
    ``ColumnParallelLinear(gather_output=False)``); with ``False`` every shard takes its slice
    of the whole input.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        input_is_parallel: the input is sharded along its last dim (see above).
        devices: devices of this process, one shard each ("cpu" may repeat). A sharded input
            is a ``ShardedTensor``; the output lands on the input's device (for a
            ShardedTensor, its ``device``). The bias lives on the first device.
        group: a ``torch.distributed`` process group, one shard per rank; a sharded input is
            this rank's slice of the features.
        dtype: float32, float64, bfloat16 or float16.
        chunks: over a process group, split the batch (all dims but the last, flattened) into
            this many pieces, so that the all-reduce of one piece runs while the next piece is
            multiplied. 1 (the default): one all-reduce per forward.
        timeout: over a process group, as for ``ColumnParallelLinear``.

    Example (the tensor-parallel MLP: one reduction forward, one backward)::

        >>> col = shardpipe.ColumnParallelLinear(8, 16, gather_output=False,
        ...                                      devices=["cpu", "cpu"])
        >>> row = shardpipe.RowParallelLinear(16, 8, input_is_parallel=True,
        ...                                   devices=["cpu", "cpu"])
        >>> row(torch.relu(col(torch.randn(4, 8)))).shape
        torch.Size([4, 8])
    """

    _split_dim = 1
    _bias_sharded = False
    _flag_name = "input_is_parallel"

    def __init__(self, in_features, out_features, bias=True, input_is_parallel=False,
                 devices=None, group=None, dtype=None, *, chunks=1, timeout=None):
        super().__init__()
        self._build(
            in_features, out_features, bias, input_is_parallel, devices, group, dtype, chunks,
            None, timeout,
        )

    @classmethod
    def from_linear(cls, linear, *, input_is_parallel=False, devices=None, group=None, chunks=1,
                    timeout=None):
        """A row-parallel copy of ``linear`` (an ``nn.Linear``), split over shards.

        Defaults as ``ColumnParallelLinear.from_linear``.

        Example::

            >>> lin = torch.nn.Linear(8, 6)
            >>> row = shardpipe.RowParallelLinear.from_linear(lin, devices=["cpu", "cpu"])
            >>> torch.allclose(row(torch.ones(2, 8)), lin(torch.ones(2, 8)))
            True
        """
        return _from_linear(cls, linear, input_is_parallel, devices, group, chunks, timeout)

    def _forward(self, x):
        p = self._placement
        sharded_in = self.input_is_parallel and p.num_shards > 1
        if isinstance(x, ShardedTensor) and not (sharded_in and p.group is None):
            x = x.full_tensor()
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
        if sharded_in and p.group is None:
            return self._forward_sharded_input(x)
        width = self.shard_sizes[p.rank] if sharded_in else self.in_features
        if x.dim() == 0 or x.shape[-1] != width:
            what = (
                f"this rank's input shard is {width} of in_features={self.in_features} wide"
                if sharded_in else f"in_features is {self.in_features}"
            )
            raise ValueError(
                f"x has shape {tuple(x.shape)}, but {what}: its last dim must equal that"
            )
        self._check_dtype_of(x)
        self._check_device_of(x)
        if p.group is not None:
            return torch.ops.shardpipe.row_parallel_linear_group(
                x, self.weight_shards[0], self.bias, self.input_is_parallel,
                list(self.shard_sizes), p.rank, p.group_name, self.chunks,
            )
        return torch.ops.shardpipe.row_parallel_linear(
            [x], list(self.weight_shards), self.bias, False, x.device
        )

    def _forward_sharded_input(self, x):
        if not isinstance(x, ShardedTensor):
            raise TypeError(
                "x must be the ShardedTensor of a ColumnParallelLinear(gather_output=False) "
                f"with shard widths {self.shard_sizes} (input_is_parallel=True over "
                f"{self.num_shards} devices), got a {type(x).__name__} of shape {tuple(x.shape)}"
            )
        if x.shard_sizes != self.shard_sizes:
            raise ValueError(
                f"x is sharded into widths {x.shard_sizes}, but this layer's input shards are "
                f"{self.shard_sizes} (in_features={self.in_features})"
            )
        self._check_dtype_of(x)
        return torch.ops.shardpipe.row_parallel_linear(
            list(disassemble(x)), list(self.weight_shards), self.bias, True, x.device
        )


def _from_linear(cls, linear, flag, devices, group, chunks, timeout):
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    layer._build(
        linear.in_features, linear.out_features, linear.bias is not None, flag, devices, group,
        linear.weight.dtype, chunks, (linear.weight, linear.bias), timeout,
    )
    return layer
