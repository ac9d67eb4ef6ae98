"""``sp.autotune(..., group=)``: a plan for a pipeline over gloo ranks on loopback, the same on
every rank, each rank profiling its share of the blocks; the pipeline it configures trains
like the plain model computed in the same check."""

import copy

import dist_harness
import pytest
import torch
import torch.distributed as dist
from torch import nn

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)


def mlp(blocks, width=16):
    torch.manual_seed(0)
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers)


def same(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def mse(out, y):
    return nn.functional.mse_loss(out, y)


def check_the_ranks_agree_on_a_plan_that_trains_like_the_model(rank, world):
    import shardpipe

    model = mlp(2 * world)
    x, y = same(16, 16), same(16, 16, seed=2)
    plan = shardpipe.autotune(model, x, y, mse, group=dist.group.WORLD, chunks=[1, 4],
                              schedules=["gpipe", "1f1b", "zb1p", "interleaved"],
                              checkpoints=["never", "always"], measure=2, steps=1, repeats=1,
                              progress=False)
    everyone = [None] * world
    dist.all_gather_object(everyone, (plan.kwargs, plan.reason))
    assert all(other == everyone[0] for other in everyone), everyone
    # Each rank profiled its share of the blocks: every rank took part.
    assert sorted(set(plan.profile["profiled_by"])) == list(range(world))
    assert sum(row["measured_s"] is not None for row in plan.table) == 2
    assert all(set(row["predicted_bytes"]) == {f"cpu:{r}" for r in range(world)}
               for row in plan.table if row["schedule"] == "1f1b")
    baseline = copy.deepcopy(model)
    pipe = shardpipe.Pipeline(model, group=dist.group.WORLD, **plan.kwargs)
    loss = pipe.train_step(x, y, mse)
    expected = mse(baseline(x), y)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    grads = dict(baseline.named_parameters())
    for name, param in pipe.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, msg=name)


def check_bad_arguments_are_refused(rank, world):
    import shardpipe

    x, y = same(8, 16), same(8, 16, seed=2)
    with pytest.raises(ValueError, match="give devices or group"):
        shardpipe.autotune(mlp(2), x, y, mse, ["cpu"], group=dist.group.WORLD)
    with pytest.raises(TypeError, match="bytes per rank"):
        shardpipe.autotune(mlp(2), x, y, mse, group=dist.group.WORLD, max_memory={"cpu": 1})
    with pytest.raises(TypeError, match="needs devices"):
        shardpipe.autotune(mlp(2), x, y, mse)
    with pytest.raises(ValueError, match="group: the ranks build different pipelines"):
        shardpipe.autotune(mlp(2), x, y, mse, group=dist.group.WORLD, chunks=[1 + rank],
                           progress=False)


CHECKS = [name for name in list(globals()) if name.startswith("check_")]

results = dist_harness.checks_fixture(__name__, CHECKS, [2, 3], 300)


@pytest.mark.parametrize("check", CHECKS)
def test_check(results, check):
    dist_harness.assert_passed(results, check)
