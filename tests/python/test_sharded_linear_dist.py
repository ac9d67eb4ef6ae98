"""Sharded linear layers over a torch.distributed process group: gloo on 2 and 4 local ranks.

One spawn per world size runs every ``check_*`` below on all ranks (dist_harness.py); each
test then reports its own check. Baselines are nn.Linear with the same
weights, computed on every rank in the same check. Every wait has a timeout.
"""

import os
import subprocess
import sys

import dist_harness
import pytest
import torch
import torch.distributed as dist
from torch import nn

REPO = dist_harness.REPO
WORLDS = [2, 4]
SPAWN_TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)


# --- helpers used inside the ranks ------------------------------------------------------


def world_group():
    return dist.group.WORLD


def leaf(t):
    return t.detach().clone().requires_grad_()


def same_input(*shape, dtype=torch.float32, seed=1):
    """The same tensor on every rank."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=dtype)


def my_slice(layer, full, dim):
    """This rank's slice of a full tensor, as the layer shards it."""
    rank = dist.get_rank(layer.group)
    offset = sum(layer.shard_sizes[:rank])
    return full.narrow(dim, offset, layer.shard_sizes[rank])


def close(actual, expected, **tol):
    torch.testing.assert_close(actual, expected, **tol)


def count_events(prof, name):
    return sum(1 for e in prof.events() if e.name == name)


def profiled(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return prof, result


# --- checks (each runs on every rank) ---------------------------------------------------


def check_column_matches_nn_linear(rank, world):
    import shardpipe

    for out_f in (2 * world - 1, 3 * world):  # uneven and even shards
        torch.manual_seed(0)
        lin = nn.Linear(5, out_f)
        col = shardpipe.ColumnParallelLinear.from_linear(lin, group=world_group())
        x = same_input(3, 4, 5)
        xs, xl = leaf(x), leaf(x)
        y, expected = col(xs), lin(xl)
        close(y, expected)
        grad = same_input(*expected.shape, seed=2)
        y.backward(grad)
        expected.backward(grad)
        close(xs.grad, xl.grad)
        close(col.weight_shards[0].grad, my_slice(col, lin.weight.grad, 0))
        close(col.bias_shards[0].grad, my_slice(col, lin.bias.grad, 0))


def check_row_matches_nn_linear(rank, world):
    import shardpipe

    for in_f in (2 * world + 1, 2 * world):
        torch.manual_seed(0)
        lin = nn.Linear(in_f, 3)
        row = shardpipe.RowParallelLinear.from_linear(lin, group=world_group())
        x = same_input(6, in_f)
        xs, xl = leaf(x), leaf(x)
        y, expected = row(xs), lin(xl)
        close(y, expected)
        y.square().sum().backward()
        expected.square().sum().backward()
        close(xs.grad, xl.grad)
        close(row.weight_shards[0].grad, my_slice(row, lin.weight.grad, 1))
        close(row.bias.grad, lin.bias.grad)


def make_mlp(world, dtype=torch.float32, hidden=None):
    import shardpipe

    hidden = hidden or 4 * world + 1  # uneven
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(6, hidden, dtype=dtype), nn.Linear(hidden, 5, dtype=dtype)
    col = shardpipe.ColumnParallelLinear.from_linear(fc1, gather_output=False, group=world_group())
    row = shardpipe.RowParallelLinear.from_linear(fc2, input_is_parallel=True, group=world_group())
    return col, row, fc1, fc2


def check_mlp_matches_two_nn_linear(rank, world):
    col, row, fc1, fc2 = make_mlp(world)
    x = same_input(4, 6)
    xs, xl = leaf(x), leaf(x)
    h = col(xs)
    assert h.shape == (4, col.shard_sizes[rank])
    y = row(torch.relu(h))
    expected = fc2(torch.relu(fc1(xl)))
    close(y, expected)
    y.square().sum().backward()
    expected.square().sum().backward()
    close(xs.grad, xl.grad)
    close(col.weight_shards[0].grad, my_slice(col, fc1.weight.grad, 0))
    close(row.weight_shards[0].grad, my_slice(row, fc2.weight.grad, 1))
    close(row.bias.grad, fc2.bias.grad)


def check_mlp_needs_one_all_reduce_forward_and_one_backward(rank, world):
    col, row, _, _ = make_mlp(world)
    x = leaf(same_input(4, 6))
    prof, y = profiled(lambda: row(torch.relu(col(x))))
    assert count_events(prof, "c10d::allreduce_") == 1
    assert count_events(prof, "c10d::allgather_") == 0
    assert count_events(prof, "gloo:all_reduce") == 1
    prof, _ = profiled(lambda: y.sum().backward())
    assert count_events(prof, "c10d::allreduce_") == 1
    assert count_events(prof, "gloo:all_reduce") == 1
    # An input that needs no gradient needs no backward reduction at all.
    y = row(torch.relu(col(same_input(4, 6))))
    prof, _ = profiled(lambda: y.sum().backward())
    assert count_events(prof, "gloo:all_reduce") == 0


def check_overlap_off_gives_the_same_gradients(rank, world):
    import shardpipe

    assert shardpipe._C._collective_overlap()  # the default
    grads = []
    try:
        for overlap in (True, False):
            shardpipe._C._set_collective_overlap(overlap)
            col, row, _, _ = make_mlp(world)
            x = leaf(same_input(4, 6))
            row(torch.relu(col(x))).sum().backward()
            grads.append((x.grad, col.weight_shards[0].grad, row.weight_shards[0].grad))
    finally:
        shardpipe._C._set_collective_overlap(True)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def check_dtypes(rank, world):
    tol = {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
    }
    for dtype, t in tol.items():
        col, row, fc1, fc2 = make_mlp(world, dtype=dtype, hidden=8 * world + 1)
        x = same_input(4, 6, dtype=dtype)
        xs, xl = leaf(x), leaf(x)
        y, expected = row(torch.relu(col(xs))), fc2(torch.relu(fc1(xl)))
        assert y.dtype == dtype
        close(y, expected, **t)
        y.sum().backward()
        expected.sum().backward()
        close(xs.grad, xl.grad, **t)


def check_chunked_forward_pipelines_its_collectives(rank, world):
    import shardpipe

    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(6, 2 * world + 1), nn.Linear(2 * world + 1, 4)
    col = shardpipe.ColumnParallelLinear.from_linear(
        fc1, gather_output=True, group=world_group(), chunks=2
    )
    row = shardpipe.RowParallelLinear.from_linear(fc2, group=world_group(), chunks=3)
    for shape, pieces in (((2, 5, 6), (2, 3)), ((2, 6), (2, 2)), ((6,), (1, 1))):
        x = same_input(*shape)
        xs, xl = leaf(x), leaf(x)
        prof, y = profiled(lambda xs=xs: row(torch.relu(col(xs))))
        assert count_events(prof, "c10d::allgather_") == pieces[0]
        assert count_events(prof, "c10d::allreduce_") == pieces[1]
        expected = fc2(torch.relu(fc1(xl)))
        close(y, expected)
        y.sum().backward()
        expected.sum().backward()
        close(xs.grad, xl.grad)


def check_gathered_column_then_whole_input_row(rank, world):
    import shardpipe

    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(6, 2 * world + 1), nn.Linear(2 * world + 1, 4)
    col = shardpipe.ColumnParallelLinear.from_linear(fc1, gather_output=True, group=world_group())
    row = shardpipe.RowParallelLinear.from_linear(fc2, input_is_parallel=False, group=world_group())
    x = same_input(3, 6)
    xs, xl = leaf(x), leaf(x)
    prof, y = profiled(lambda: row(torch.tanh(col(xs))))
    assert count_events(prof, "c10d::allgather_") == 1
    expected = fc2(torch.tanh(fc1(xl)))
    close(y, expected)
    y.sum().backward()
    expected.sum().backward()
    close(xs.grad, xl.grad)


def check_state_dicts(rank, world):
    import shardpipe

    for cls in (shardpipe.ColumnParallelLinear, shardpipe.RowParallelLinear):
        torch.manual_seed(0)
        layer = cls(7, 2 * world + 1, group=world_group()) if cls is shardpipe.RowParallelLinear \
            else cls(2 * world + 1, 7, group=world_group())
        torch.manual_seed(0)
        lin = nn.Linear(layer.in_features, layer.out_features)
        state = layer.state_dict()  # a collective: every rank calls it
        assert list(state) == ["weight", "bias"]
        for key, value in lin.state_dict().items():
            assert torch.equal(state[key], value), key
        other = cls(layer.in_features, layer.out_features, group=world_group())
        other.load_state_dict(lin.state_dict())  # no communication
        x = same_input(2, layer.in_features)
        close(other(x), lin(x))
        sharded = layer.sharded_state_dict()
        weight_shard = sharded["weight"][0]
        dim = 0 if cls is shardpipe.ColumnParallelLinear else 1
        assert torch.equal(weight_shard.tensor, my_slice(layer, lin.weight.detach(), dim))
        assert weight_shard.offsets[dim] == sum(layer.shard_sizes[:rank])
        fresh = cls(layer.in_features, layer.out_features, group=world_group())
        fresh.load_sharded_state_dict(sharded)
        for key, value in fresh.state_dict().items():
            assert torch.equal(value, state[key])
        back = layer.to_linear()
        assert torch.equal(back.weight, lin.weight)


def check_first_rank_values_win_whatever_the_seeds(rank, world):
    import shardpipe

    torch.manual_seed(100 + rank)
    col = shardpipe.ColumnParallelLinear(5, 2 * world, group=world_group())
    row = shardpipe.RowParallelLinear(2 * world, 3, group=world_group())
    torch.manual_seed(100)  # rank 0's seed
    expected_col = nn.Linear(5, 2 * world)
    expected_row = nn.Linear(2 * world, 3)
    for layer, lin in ((col, expected_col), (row, expected_row)):
        for key, value in layer.state_dict().items():
            assert torch.equal(value, lin.state_dict()[key]), key


def check_parallelize_keeps_keys_and_outputs(rank, world):
    import shardpipe

    def block():
        return nn.Sequential(nn.Linear(6, 4 * world + 2), nn.GELU(), nn.Linear(4 * world + 2, 6))

    torch.manual_seed(0)
    model = nn.Sequential(block(), nn.LayerNorm(6), block())
    reference = nn.Sequential(block(), nn.LayerNorm(6), block())
    reference.load_state_dict(model.state_dict())
    keys = list(model.state_dict())
    shardpipe.parallelize(model, {"*.0": "column", "*.2": "row"}, group=world_group())
    assert isinstance(model[2][0], shardpipe.ColumnParallelLinear)
    assert list(model.state_dict()) == keys
    x = same_input(3, 6)
    close(model(x), reference(x))


def check_sub_groups(rank, world):
    import shardpipe

    # Two groups of world/2 ranks, each sharding its own layer (the other half's values).
    halves = [list(range(world // 2)), list(range(world // 2, world))]
    groups = [dist.new_group(ranks) for ranks in halves]
    mine = groups[0] if rank < world // 2 else groups[1]
    torch.manual_seed(0 if rank < world // 2 else 1)
    lin = nn.Linear(5, world + 1)
    col = shardpipe.ColumnParallelLinear.from_linear(lin, group=mine)
    row = shardpipe.RowParallelLinear.from_linear(nn.Linear(world + 1, 2), group=mine)
    x = leaf(same_input(3, 5))
    close(col(x), lin(x))
    row(col(x)).sum().backward()
    assert x.grad is not None


def check_disagreeing_ranks_raise_instead_of_hanging(rank, world):
    import shardpipe

    with pytest.raises(ValueError, match="disagree on the layer's shape"):
        shardpipe.ColumnParallelLinear(4 + (rank % 2), 2 * world, group=world_group())
    with pytest.raises(ValueError, match="disagree"):
        shardpipe.RowParallelLinear(2 * world, 3, input_is_parallel=rank == 0,
                                    group=world_group())
    # Different chunk counts mean different collectives: gloo would abort the process.
    with pytest.raises(ValueError, match="chunks=1.*chunks=2"):
        shardpipe.RowParallelLinear(2 * world, 3, chunks=1 + rank % 2, group=world_group())


def check_errors(rank, world):
    import shardpipe

    with pytest.raises(ValueError, match=f"out_features={world - 1} over {world} shards"):
        shardpipe.ColumnParallelLinear(4, world - 1, group=world_group())
    col = shardpipe.ColumnParallelLinear(4, 2 * world, group=world_group())
    with pytest.raises(ValueError, match=r"x has shape \(2, 5\), but in_features is 4"):
        col(torch.randn(2, 5))
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        col(torch.randn(2, 4, dtype=torch.float64))
    row = shardpipe.RowParallelLinear(2 * world, 3, input_is_parallel=True, group=world_group())
    with pytest.raises(ValueError, match="this rank's input shard is 2 of in_features"):
        row(torch.randn(2, 2 * world))
    with pytest.raises(ValueError, match="exactly one of devices= and group="):
        shardpipe.ColumnParallelLinear(4, 4, devices=["cpu"], group=world_group())


def check_default_placement_is_the_default_group(rank, world):
    import shardpipe

    col = shardpipe.ColumnParallelLinear(4, 2 * world)
    assert col.group is dist.group.WORLD and col.num_shards == world
    assert len(col.weight_shards) == 1


def check_empty_batch(rank, world):
    col, row, fc1, fc2 = make_mlp(world)
    x = leaf(torch.randn(0, 6))
    y = row(torch.relu(col(x)))
    assert y.shape == (0, 5)
    y.sum().backward()
    assert torch.equal(col.weight_shards[0].grad, torch.zeros_like(col.weight_shards[0]))


def check_opcheck_group_operators(rank, world):
    name = dist.group.WORLD.group_name
    torch.manual_seed(0)
    sizes = [2] * (world - 1) + [1]
    mine = sizes[rank]
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(mine, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(mine, dtype=torch.float64, requires_grad=True)
    ops = torch.ops.shardpipe
    for gather in (True, False):
        torch.library.opcheck(
            ops.column_parallel_linear_group.default, (x, w, b, gather, sizes, rank, name)
        )
    xr = torch.randn(3, sum(sizes), dtype=torch.float64, requires_grad=True)
    wr = torch.randn(5, mine, dtype=torch.float64, requires_grad=True)
    br = torch.randn(5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(
        ops.row_parallel_linear_group.default, (xr, wr, br, False, sizes, rank, name)
    )
    mask = [True, True, True]
    grad = torch.randn(3, sum(sizes), dtype=torch.float64)
    torch.library.opcheck(
        ops._column_parallel_linear_group_backward.default,
        (grad, x.detach(), w.detach(), True, True, sizes, rank, name, mask),
    )
    torch.library.opcheck(
        ops._row_parallel_linear_group_backward.default,
        (torch.randn(3, 5, dtype=torch.float64), xr.detach(), wr.detach(), True, False, sizes,
         rank, name, mask),
    )


CHECKS = [name for name in list(globals()) if name.startswith("check_")]


# --- spawning --------------------------------------------------------------------------


results = dist_harness.checks_fixture(__name__, CHECKS, WORLDS, SPAWN_TIMEOUT_S)


@pytest.mark.parametrize("check", CHECKS)
def test_check(results, check):
    dist_harness.assert_passed(results, check)


# --- the example under torchrun ---------------------------------------------------------


def test_example_runs_under_torchrun():
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"), OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(REPO / "examples" / "tp_mlp.py"), "--dim", "32", "--hidden", "64", "--steps", "3",
        "--backend", "gloo",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: largest loss difference" in done.stdout
