"""Data parallel over pipelines (``data_parallel_group=``) and hybrid meshes (``mesh=``):
gloo on loopback, every result compared with the plain model trained on the whole global
batch in the same check.

DP 2 over one-process pipelines (every schedule, ``train_step`` and ``pipe(x)`` +
``backward()``); ``no_sync`` accumulation; DDP refused on every rank alike; the reduction
overlapping the drain; a failing replica; replicas that disagree; FSDP2 refused; DP 2 x PP 2,
PP 2 x TP 2 and DP 2 x PP 2 x TP 2 from ``sp.mesh``; the hybrid example under torchrun.
"""

import copy
import os
import subprocess
import sys
import time

import dist_harness
import pytest
import torch
import torch.distributed as dist
from torch import nn

SPAWN_TIMEOUT_S = 300
PIPE_TIMEOUT_S = 30
FAULT_DEADLINE_S = 5

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)


# --- helpers used inside the ranks ------------------------------------------------------


def mlp(blocks, width=6, seed=0):
    torch.manual_seed(seed)
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers)


class Block(nn.Module):
    """An MLP block that sp.parallelize shards Megatron-style (fc1 column, fc2 row)."""

    def __init__(self, width):
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


def blocks(count, width=8, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[Block(width) for _ in range(count)])


def same(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def mse(out, y):
    return nn.functional.mse_loss(out, y)


def share(tensor, index, parts):
    """This replica's rows of the global batch."""
    return tensor.chunk(parts)[index]


def mean_over(value, group):
    value = value.detach().clone()
    dist.all_reduce(value, group=group)
    return value / group.size()


def expect_params(pipe, baseline):
    """Every parameter this rank holds equals the baseline's (by the model's names)."""
    expected = dict(baseline.named_parameters())
    names = [name for name, _ in pipe.named_parameters()]
    assert names, "this rank holds no parameters"
    for name, param in pipe.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name].detach(), msg=name)


def expect_grads(pipe, expected):
    for name, param in pipe.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], msg=name)


def train_both(pipe, baseline, x, y, dp_index, dp_size, dp_group, steps=3, step=None):
    """``steps`` SGD steps of the pipeline on its share and of the baseline on the whole
    batch; the data-parallel mean of the pipeline's loss and its parameters must follow."""
    opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
    base_opt = torch.optim.SGD(baseline.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        base_opt.zero_grad()
        if step is None:
            loss = pipe.train_step(share(x, dp_index, dp_size), share(y, dp_index, dp_size), mse)
        else:
            loss = step(pipe, share(x, dp_index, dp_size), share(y, dp_index, dp_size))
        expected = mse(baseline(x), y)
        expected.backward()
        if dp_group is not None:
            loss = mean_over(loss, dp_group)
        torch.testing.assert_close(loss, expected.detach())
        opt.step()
        base_opt.step()
        expect_params(pipe, baseline)


def forward_backward(pipe, x, y):
    loss = mse(pipe(x), y)
    loss.backward()
    return loss.detach()


# --- DP over one-process pipelines (2 ranks) --------------------------------------------


def check_dp_over_one_process_pipelines(rank, world):
    import shardpipe

    group = dist.group.WORLD
    x, y = same(16, 6), same(16, 6, seed=2)
    for schedule, stages in (("gpipe", 2), ("1f1b", 4), ("interleaved", 4), ("zb1p", 2),
                             ("zbv", 4)):
        devices = ["cpu"] * (2 if schedule in ("interleaved", "zbv") else stages)
        model = mlp(4)
        baseline = copy.deepcopy(model)
        pipe = shardpipe.Pipeline(model, devices, chunks=4, schedule=schedule,
                                  balance=[8 // stages] * stages, data_parallel_group=group,
                                  timeout=PIPE_TIMEOUT_S)
        train_both(pipe, baseline, x, y, rank, world, group)
    # pipe(x) and backward(), with checkpointing
    model = mlp(4)
    baseline = copy.deepcopy(model)
    pipe = shardpipe.Pipeline(model, ["cpu", "cpu"], chunks=4, checkpoint="except_last",
                              data_parallel_group=group, timeout=PIPE_TIMEOUT_S)
    train_both(pipe, baseline, x, y, rank, world, group, step=forward_backward)


def check_unused_parameters_stay_without_gradient(rank, world):
    import shardpipe


    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = nn.Sequential(Skip(), nn.Linear(4, 4))
    pipe = shardpipe.Pipeline(model, ["cpu", "cpu"], chunks=2,
                              data_parallel_group=dist.group.WORLD, timeout=PIPE_TIMEOUT_S)
    pipe.train_step(same(4, 4, seed=rank), same(4, 4, seed=5), mse)
    assert model[0].unused.weight.grad is None
    assert model[0].used.weight.grad is not None


def check_no_sync_accumulates_then_syncs_everything(rank, world):
    import shardpipe

    group = dist.group.WORLD
    a, ya = same(8, 6, seed=3), same(8, 6, seed=4)
    b, yb = same(8, 6, seed=5), same(8, 6, seed=6)
    model = mlp(2)
    baseline = copy.deepcopy(model)
    local = copy.deepcopy(model)
    pipe = shardpipe.Pipeline(model, ["cpu", "cpu"], chunks=2, data_parallel_group=group,
                              timeout=PIPE_TIMEOUT_S)
    with pipe.no_sync():
        pipe.train_step(share(a, rank, world), share(ya, rank, world), mse)
    # Inside no_sync nothing went out: the gradients are this replica's own.
    mse(local(share(a, rank, world)), share(ya, rank, world)).backward()
    expect_grads(pipe, {n: p.grad for n, p in local.named_parameters()})
    assert pipe._engine.gradient_sync
    pipe.train_step(share(b, rank, world), share(yb, rank, world), mse)
    # One synced step on both global batches.
    (mse(baseline(a), ya) + mse(baseline(b), yb)).backward()
    expect_grads(pipe, {n: p.grad for n, p in baseline.named_parameters()})


def check_ddp_over_a_pipeline_is_refused_on_every_rank(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    import shardpipe

    pipe = shardpipe.Pipeline(mlp(2), ["cpu", "cpu"], chunks=2)
    with pytest.raises(TypeError, match="data_parallel_group"):
        DDP(pipe)

    class Holder(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.head = nn.Linear(6, 6)

        def forward(self, x):
            return self.head(self.inner(x))

    wrapped = DDP(Holder(shardpipe.Pipeline(mlp(2), ["cpu", "cpu"], chunks=2)))
    with pytest.raises(TypeError, match="data_parallel_group"):
        wrapped(same(4, 6))
    # Nobody was left inside a collective: the group still works.
    flag = torch.ones(1)
    dist.all_reduce(flag)
    assert flag.item() == world


def check_reduction_overlaps_the_drain(rank, world):
    import shardpipe

    stages = 3
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.Tanh()) for _ in range(stages)])
    pipe = shardpipe.Pipeline(model, ["cpu"] * stages, chunks=4,
                              data_parallel_group=dist.group.WORLD, timeout=PIPE_TIMEOUT_S)
    x, y = same(256, 256, seed=rank), same(256, 256, seed=9)
    pipe.train_step(x, y, mse)  # warm
    pipe._engine.threads = "workers"
    with pipe.record_trace() as trace:
        pipe.train_step(x, y, mse)
    tasks = [e for e in trace.events if e["phase"] == "backward"]
    reduce = {e["stage"]: e for e in trace.events if e["phase"] == "reduce"}
    assert sorted(reduce) == list(range(stages)), trace.events
    last_backward = {s: max(e["end_us"] for e in tasks if e["stage"] == s) for s in range(stages)}
    last_start = {s: max(e["start_us"] for e in tasks if e["stage"] == s) for s in range(stages)}
    for s in range(stages):
        # Each stage goes out during or after its own last backward ...
        assert reduce[s]["start_us"] >= last_start[s]
    # ... the last stage's while the first stage is still draining.
    assert reduce[stages - 1]["start_us"] < last_backward[0], (reduce, last_backward)
    waits = [e for e in trace.events if e["phase"] == "reduce_wait"]
    assert len(waits) == 1 and waits[0]["start_us"] >= max(last_backward.values())
    chrome = trace.to_chrome()["traceEvents"]
    assert {e["name"] for e in chrome if e["cat"] == "reduce"} == {f"R{s}" for s in range(stages)}
    assert 0.0 <= trace.bubble_fraction() < 1.0


def check_a_bucket_goes_out_during_its_stages_last_backward(rank, world):
    import shardpipe

    # Two 4 MiB layers per stage: two buckets each, the later layer's final first.
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)])
    pipe = shardpipe.Pipeline(model, ["cpu", "cpu"], chunks=2,
                              data_parallel_group=dist.group.WORLD, timeout=PIPE_TIMEOUT_S)
    x, y = same(128, 1024, seed=rank), same(128, 1024, seed=9)
    pipe.train_step(x, y, mse)
    with pipe.record_trace() as trace:
        pipe.train_step(x, y, mse)
    first_stage = [e for e in trace.events if e["stage"] == 0 and e["phase"] == "backward"]
    last = max(first_stage, key=lambda e: e["end_us"])
    reduce = next(e for e in trace.events if e["phase"] == "reduce" and e["stage"] == 0)
    assert last["start_us"] <= reduce["start_us"] < last["end_us"], (last, reduce)


class Boom(nn.Module):
    def __init__(self, on):
        super().__init__()
        self.on = on
        self.armed = True

    def forward(self, x):
        if self.armed and dist.get_rank() == self.on:
            raise ValueError(f"boom on rank {self.on}")
        return x


def check_a_failing_replica_makes_every_replica_raise(rank, world):
    import shardpipe

    group = dist.group.WORLD
    model = mlp(2)
    boom = Boom(on=1)
    model.append(boom)
    baseline = copy.deepcopy(model)
    baseline[-1].armed = False
    pipe = shardpipe.Pipeline(model, ["cpu", "cpu"], chunks=2, data_parallel_group=group,
                              timeout=PIPE_TIMEOUT_S)
    x, y = same(8, 6), same(8, 6, seed=2)
    start = time.monotonic()
    if rank == 1:
        with pytest.raises(ValueError, match="boom on rank 1"):
            pipe.train_step(share(x, rank, world), share(y, rank, world), mse)
    else:
        with pytest.raises(RuntimeError, match="data-parallel rank 1 failed"):
            pipe.train_step(share(x, rank, world), share(y, rank, world), mse)
    assert time.monotonic() - start < FAULT_DEADLINE_S
    # A bad target on one replica only: the same.
    bad = share(y, rank, world)[:1] if rank == 0 else share(y, rank, world)
    boom.armed = False
    pipe.zero_grad()
    if rank == 0:
        with pytest.raises(ValueError, match="target"):
            pipe.train_step(share(x, rank, world), bad, mse)
    else:
        with pytest.raises(RuntimeError, match="data-parallel rank 0 failed"):
            pipe.train_step(share(x, rank, world), bad, mse)
    # The collectives stayed in step: the next steps are right.
    pipe.zero_grad()
    train_both(pipe, baseline, x, y, rank, world, group, steps=1)


def check_replicas_that_disagree_are_refused(rank, world):
    import shardpipe

    with pytest.raises(ValueError, match="data_parallel_group.*chunks: rank 0 2, rank 1 3"):
        shardpipe.Pipeline(mlp(2), ["cpu", "cpu"], chunks=2 + rank,
                           data_parallel_group=dist.group.WORLD)
    model = mlp(2)
    model[0].weight.requires_grad_(rank == 0)
    with pytest.raises(ValueError, match="requires_grad"):
        shardpipe.Pipeline(model, ["cpu", "cpu"], data_parallel_group=dist.group.WORLD)


def check_fully_shard_is_refused(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import shardpipe

    mesh = init_device_mesh("cpu", (world,))
    model = mlp(2)
    fully_shard(model[0], mesh=mesh)
    with pytest.raises(TypeError, match="fully_shard.*data_parallel_group"):
        shardpipe.Pipeline(model, ["cpu", "cpu"])
    # Sharded after the pipeline was built: refused at the first step.
    model = mlp(2)
    pipe = shardpipe.Pipeline(model, ["cpu", "cpu"], chunks=2)
    fully_shard(model[2], mesh=mesh)
    with pytest.raises(TypeError, match="fully_shard"):
        pipe.train_step(same(4, 6), same(4, 6), mse)


def check_bad_arguments_are_refused(rank, world):
    import shardpipe

    with pytest.raises(TypeError, match="data_parallel_group must be a torch.distributed"):
        shardpipe.Pipeline(mlp(1), ["cpu"], data_parallel_group="world")
    with pytest.raises(TypeError, match="mesh must be"):
        shardpipe.Pipeline(mlp(1), ["cpu"], mesh="dp")
    mesh = shardpipe.mesh(dp=2)
    assert mesh.mesh_dim_names == ("dp", "pp", "tp") and tuple(mesh.shape) == (2, 1, 1)
    with pytest.raises(ValueError, match="mesh: give mesh= alone"):
        shardpipe.Pipeline(mlp(1), ["cpu"], mesh=mesh, data_parallel_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="makes 4 ranks, but the world has 2"):
        shardpipe.mesh(dp=2, tp=2)
    with pytest.raises(ValueError, match="must share only this rank with group"):
        shardpipe.Pipeline(mlp(2), group=dist.group.WORLD, data_parallel_group=dist.group.WORLD)
    # The dp dim of a mesh with pp=1: data parallel over one-process pipelines.
    pipe = shardpipe.Pipeline(mlp(2), ["cpu", "cpu"], mesh=mesh)
    assert pipe.data_parallel_group is not None and pipe.stage_ranks is None


# --- meshes (4 and 8 ranks) ---------------------------------------------------------------


def check_dp2_x_pp2(rank, world):
    import shardpipe

    mesh = shardpipe.mesh(dp=2, pp=2)
    dp_group, dp_index = mesh["dp"].get_group(), mesh["dp"].get_local_rank()
    x, y = same(16, 6), same(16, 6, seed=2)
    for schedule in ("1f1b", "zb1p", "interleaved"):
        model = mlp(4)
        baseline = copy.deepcopy(model)
        pipe = shardpipe.Pipeline(model, mesh=mesh, chunks=4, schedule=schedule,
                                  timeout=PIPE_TIMEOUT_S)
        assert pipe.stage_ranks is not None and pipe.data_parallel_group is not None
        train_both(pipe, baseline, x, y, dp_index, 2, dp_group)


def hybrid_training(mesh, steps=3):
    """Blocks parallelized over mesh["tp"], then a pipeline over the mesh, trained against the
    plain model on the whole batch; the full state dict must follow the plain model's."""
    import shardpipe

    dp_size = mesh["dp"].size()
    dp_group, dp_index = mesh["dp"].get_group(), mesh["dp"].get_local_rank()
    model = blocks(4)
    baseline = copy.deepcopy(model)
    shardpipe.parallelize(model, {"*.fc1": "column", "*.fc2": "row"},
                          group=mesh["tp"].get_group())
    pipe = shardpipe.Pipeline(model, mesh=mesh, chunks=2, schedule="1f1b",
                              timeout=PIPE_TIMEOUT_S)
    with pytest.raises(TypeError, match="before building the Pipeline"):
        shardpipe.parallelize(pipe, {"*.fc1": "column"}, group=mesh["tp"].get_group())
    opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
    base_opt = torch.optim.SGD(baseline.parameters(), lr=0.1)
    x, y = same(8, 8), same(8, 8, seed=2)
    for _ in range(steps):
        opt.zero_grad()
        base_opt.zero_grad()
        loss = pipe.train_step(share(x, dp_index, dp_size), share(y, dp_index, dp_size), mse)
        expected = mse(baseline(x), y)
        expected.backward()
        if dp_size > 1:
            loss = mean_over(loss, dp_group)
        torch.testing.assert_close(loss, expected.detach())
        opt.step()
        base_opt.step()
    full = pipe.full_state_dict()
    for name, value in baseline.state_dict().items():
        torch.testing.assert_close(full[name], value, msg=name)


def check_pp2_x_tp2(rank, world):
    import shardpipe

    hybrid_training(shardpipe.mesh(pp=2, tp=2))


def check_dp2_x_pp2_x_tp2(rank, world):
    import shardpipe

    hybrid_training(shardpipe.mesh(dp=2, pp=2, tp=2))


_ON_MESHES = {"check_dp2_x_pp2": 4, "check_pp2_x_tp2": 4, "check_dp2_x_pp2_x_tp2": 8}
CHECKS = {2: [], 4: [], 8: []}
for _name in list(globals()):
    if _name.startswith("check_"):
        CHECKS[_ON_MESHES.get(_name, 2)].append(_name)

results = dist_harness.checks_fixture(__name__, CHECKS, list(CHECKS), SPAWN_TIMEOUT_S)


@pytest.mark.parametrize("results,check", dist_harness.cases(CHECKS), indirect=["results"])
def test_check(results, check):
    dist_harness.assert_passed(results, check)


# --- a replica that dies -------------------------------------------------------------------


def _killed_replica(rank, world, port, out_dir):
    dist_harness.init_loopback(rank, world, port)
    import shardpipe

    model = nn.Sequential(nn.Linear(4, 4), dist_harness.KillRank1(), nn.Linear(4, 4))
    pipe = shardpipe.Pipeline(model, ["cpu", "cpu"], chunks=2,
                              data_parallel_group=dist.group.WORLD, timeout=5)
    dist_harness.record_outcome(out_dir, rank, lambda: pipe.train_step(same(4, 4), same(4, 4),
                                                                        mse))


def test_a_killed_replica_makes_the_survivor_raise_within_the_timeout(tmp_path):
    codes = dist_harness.spawn(_killed_replica, 2, (2, dist_harness.free_port(), str(tmp_path)),
                               90)
    dist_harness.assert_survivor_raised(tmp_path, codes, "data-parallel rank 1")


# --- one process ---------------------------------------------------------------------------


def test_parallelize_refuses_a_pipeline_and_its_modules():
    import shardpipe

    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
    pipe = shardpipe.Pipeline(model, ["cpu", "cpu"])
    for target in (pipe, model[0], pipe.stages[0]):
        with pytest.raises(TypeError, match="before building the Pipeline"):
            shardpipe.parallelize(target, {"*": "column"}, devices=["cpu", "cpu"])


def test_no_sync_without_data_parallel_does_nothing():
    import shardpipe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    baseline = copy.deepcopy(model)
    pipe = shardpipe.Pipeline(model, ["cpu", "cpu"], chunks=2)
    x, y = same(4, 4), same(4, 2)
    with pipe.no_sync():
        pipe.train_step(x, y, mse)
    mse(baseline(x), y).backward()
    for (name, p), q in zip(pipe.named_parameters(), baseline.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_hybrid_example_runs_under_torchrun():
    env = dict(os.environ, PYTHONPATH=str(dist_harness.REPO / "python"), OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "8",
        str(dist_harness.REPO / "examples" / "hybrid_3d.py"), "--steps", "2",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: loss and parameters follow the plain model" in done.stdout
