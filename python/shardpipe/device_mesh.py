"""``mesh``: the torch DeviceMesh a hybrid (data x pipeline x tensor parallel) job runs on."""

import torch

from ._checks import check_int

__all__ = ["mesh"]

DIMS = ("dp", "pp", "tp")


def mesh(dp=None, pp=None, tp=None):
    """A ``torch.distributed.device_mesh.DeviceMesh`` over every rank, with dims named
    ``"dp"``, ``"pp"`` and ``"tp"`` in that order: tensor parallel innermost, so a
    tensor-parallel group is neighbouring ranks (one machine's GPUs), then the pipeline, then
    the data-parallel replicas outermost.

    A dim left out has size 1, except ``dp``, which then takes what the world size leaves
    (``mesh(pp=2)`` on 8 ranks is ``dp=4, pp=2, tp=1``); every dim is in the mesh either way,
    so ``mesh["tp"]`` always works. The product must equal the world size. Uses CUDA (NCCL)
    when CUDA is available and the default process group (initialised here if it is not yet,
    as ``"cpu:gloo,cuda:nccl"`` with CUDA) has NCCL, else the CPU (gloo). Give it to
    ``Pipeline(model, mesh=...)``, and ``mesh["tp"].get_group()`` to
    :func:`shardpipe.parallelize`. Collective: every rank calls it alike.

    Example, one process (a world of one rank)::

        >>> import tempfile, torch.distributed as dist
        >>> dist.init_process_group("gloo", store=dist.FileStore(tempfile.mktemp(), 1),
        ...                         rank=0, world_size=1)
        >>> m = shardpipe.mesh()
        >>> m.mesh_dim_names, tuple(m.shape)
        (('dp', 'pp', 'tp'), (1, 1, 1))
        >>> dist.destroy_process_group()

    Under ``torchrun --nproc-per-node 8``::

        >>> m = shardpipe.mesh(dp=2, pp=2, tp=2)                            # doctest: +SKIP
        >>> m.mesh_dim_names, m.shape                                       # doctest: +SKIP
        (('dp', 'pp', 'tp'), (2, 2, 2))
        >>> shardpipe.parallelize(model, {"*.fc1": "column", "*.fc2": "row"},
        ...                       group=m["tp"].get_group())                # doctest: +SKIP
        >>> pipe = shardpipe.Pipeline(model, mesh=m, chunks=4)              # doctest: +SKIP
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    sizes = {}
    for name, value in zip(DIMS, (dp, pp, tp)):
        sizes[name] = None if value is None else check_int(value, name, 1)
    if not dist.is_available():
        raise RuntimeError("mesh needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        # With CUDA both backends: tensor parallel runs on NCCL, a pipeline over ranks hands
        # its tensors over through gloo.
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    world = dist.get_world_size()
    inner = (sizes["pp"] or 1) * (sizes["tp"] or 1)
    if sizes["dp"] is None:
        if world % inner:
            raise ValueError(f"mesh: pp x tp = {inner} does not divide the world size {world}; "
                             "give dp= too")
        sizes["dp"] = world // inner
    shape = tuple(sizes[name] or 1 for name in DIMS)
    if shape[0] * shape[1] * shape[2] != world:
        given = ", ".join(f"{name}={size}" for name, size in zip(DIMS, shape))
        raise ValueError(f"mesh: {given} makes {shape[0] * shape[1] * shape[2]} ranks, but the "
                         f"world has {world}")
    nccl = "nccl" in str(dist.get_backend()).lower()
    device_type = "cuda" if torch.cuda.is_available() and nccl else "cpu"
    return init_device_mesh(device_type, shape, mesh_dim_names=DIMS)
