"""The parts of a ``Pipeline(..., group=)`` that only Python can do: checking that the ranks
agree, materialising this rank's stage, and the collective state dicts. The pipeline itself
(the schedule, the messages between ranks, faults) runs in the C++ engine."""

import hashlib
import itertools
from collections import OrderedDict

import torch
from torch import nn

from ._checks import as_device_list

__all__ = []


def check_group(group, name="group"):
    """``group`` if it is a usable torch.distributed ProcessGroup holding this process."""
    import torch.distributed as dist

    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup, got "
                        f"{type(group).__name__}")
    if not dist.is_initialized():
        raise ValueError(f"{name}: torch.distributed is not initialised; call "
                         "dist.init_process_group() first")
    if group.rank() < 0:
        raise ValueError(f"{name} must contain this process (its rank in {name} is -1)")
    return group


def check_cpu_backend(group):
    """Refuses a pipeline's ``group`` without a CPU backend: every hand-off between ranks goes
    through gloo, a CUDA stage's too (through host memory)."""
    import torch.distributed as dist

    if torch.device("cpu") not in group._device_types:
        raise ValueError(f"group: its backend ({dist.get_backend(group)}) has no CPU side; a "
                         "pipeline over ranks hands its tensors over through gloo, also "
                         "between GPUs: make the group with backend 'cpu:gloo,cuda:nccl' (what "
                         "dist.init_process_group() without a backend makes) or 'gloo'")


def check_orthogonal(group, data_parallel_group):
    """The pipeline's group and its data-parallel group may share only this process: the
    data-parallel peers hold the same stage in other replicas of the pipeline."""
    import torch.distributed as dist

    pipeline = set(dist.get_process_group_ranks(group))
    replicas = set(dist.get_process_group_ranks(data_parallel_group))
    if pipeline & replicas != {dist.get_rank()}:
        raise ValueError(
            f"data_parallel_group (global ranks {sorted(replicas)}) must share only this rank "
            f"with group (global ranks {sorted(pipeline)}): its ranks hold the same stage of "
            "other copies of the pipeline; sp.mesh(dp=, pp=) makes such groups")


def mesh_groups(mesh):
    """``(group, data_parallel_group)`` of a DeviceMesh with dims named "pp" and/or "dp" (a
    dim of size 1, or missing, gives None)."""
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch.distributed.device_mesh.DeviceMesh (sp.mesh makes "
                        f"one), got {type(mesh).__name__}")
    names = mesh.mesh_dim_names or ()
    unknown = [n for n in names if n not in ("dp", "pp", "tp")]
    if not names or unknown:
        raise ValueError(f"mesh: its dims must be named from 'dp', 'pp', 'tp' (sp.mesh names "
                         f"them), got {names}")

    def group_of(name):
        if name not in names or mesh[name].size() == 1:
            return None
        return mesh[name].get_group()

    return group_of("pp"), group_of("dp")


def rank_device(devices):
    """This rank's device: ``devices=[d]``, else ``cuda:LOCAL_RANK`` with CUDA, else the CPU.
    Between ranks every tensor travels through host memory and the group's CPU backend
    (gloo), a CUDA stage's too."""
    import os

    if devices is not None:
        listed = as_device_list(devices, "devices")
        if len(listed) != 1:
            raise ValueError(f"devices: with group= give this rank's one device, e.g. "
                             f"devices=['cuda:0'] or ['cpu'], got {len(listed)}")
        return listed[0]
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if local >= count:
        raise ValueError(f"devices: this rank's device would be cuda:LOCAL_RANK = cuda:{local}, "
                         f"but only {count} CUDA device(s) exist; give devices=['cuda:0'] or "
                         "devices=['cpu']")
    return torch.device("cuda", local)


def _structure_digest(blocks):
    described = [(name, type(block).__qualname__,
                  [(n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in
                   itertools.chain(block.named_parameters(), block.named_buffers())])
                 for name, block in blocks]
    return hashlib.sha256(repr(described).encode()).hexdigest()[:16]


def check_ranks_agree(group, blocks, settings, argument="group"):
    """Raises ``ValueError`` on every rank, naming what differs, unless every rank of
    ``group`` (the argument ``argument``) builds the same pipeline (``settings``: name -> value)
    of the same model."""
    import torch.distributed as dist

    mine = dict(settings, model=_structure_digest(blocks))
    everyone = [None] * group.size()
    dist.all_gather_object(everyone, mine, group=group)
    differ = [name for name in mine if any(other[name] != mine[name] for other in everyone)]
    if differ:
        lines = "; ".join(
            f"{name}: " + ", ".join(f"rank {r} {other[name]!r}" for r, other in enumerate(everyone))
            for name in differ)
        what = " (the model's structure: block names, types, tensor shapes, requires_grad)" \
            if "model" in differ else ""
        raise ValueError(f"{argument}: the ranks build different pipelines{what}: {lines}")


def materialise(blocks, device):
    """Moves this rank's blocks to ``device``; blocks on the meta device get storage there and
    are initialised as their modules' own ``reset_parameters`` does."""
    for _, block in blocks:
        tensors = itertools.chain(block.parameters(), block.buffers())
        if any(t.is_meta for t in tensors):
            block.to_empty(device=device)
            with torch.no_grad():
                for module in block.modules():
                    reset = getattr(module, "reset_parameters", None)
                    if callable(reset):
                        reset()
        else:
            block.to(device)


def register_blocks(owner, blocks):
    """Registers ``blocks`` (dotted names, as ``_blocks`` gives them) on ``owner`` under those
    names, so that its ``state_dict`` holds exactly these blocks under the model's keys."""
    for name, block in blocks:
        *path, leaf = name.split(".")
        parent = owner
        for part in path:
            child = parent._modules.get(part)
            if child is None:
                child = nn.Sequential()
                parent.add_module(part, child)
            parent = child
        parent.add_module(leaf, block)


def full_state_dict(local, group, keys):
    """Every rank's ``local`` state dict gathered (collective), on the CPU, in the model's key
    order ``keys``."""
    import torch.distributed as dist

    mine = OrderedDict((k, v.detach().cpu()) for k, v in local.items())
    everyone = [None] * group.size()
    dist.all_gather_object(everyone, mine, group=group)
    merged = {}
    for part in everyone:
        merged.update(part)
    return OrderedDict((k, merged[k]) for k in keys if k in merged)
