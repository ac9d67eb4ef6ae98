"""Faults inside tensor-parallel layers over a process group: gloo on 2 and 3 local ranks.

Rank 1 is the rank at fault in every check: it raises in a layer (the peers learn it at
once), raises between the layers or in backward, or never comes (the peers' bounded wait
expires), or is killed. Every other rank must raise within the timeout, naming rank 1; the
group then refuses further collectives, and a new group trains equal to the plain model. An
argument error every rank meets alike must break nothing. Each check makes its own groups, so
one check's fault does not reach the next.
"""

import pathlib
import sys
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python"))
import dist_harness  # noqa: E402

TIMEOUT_S = 3.0
# What a survivor may take beyond the timeout: the census of the peers and the store's I/O.
SLACK_S = 3.0
WORLDS = [2, 3]

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)


# --- helpers used inside the ranks ------------------------------------------------------


def same(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def plain_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8))


def tp_mlp(group):
    import shardpipe

    model = plain_mlp()
    return shardpipe.parallelize(model, {"0": "column", "2": "row"}, group=group,
                                 timeout=TIMEOUT_S)


def step(model, x):
    model(x).square().mean().backward()


def new_group(world):
    return dist.new_group(list(range(world)))


def survive(rank, world, fault, raises, within_s):
    """Runs ``fault(model, x)`` on rank 1 (which raises ``raises``) and a training step on the
    others, in a new group;
    the others must raise within ``within_s`` naming rank 1, and then refuse at once. Then a
    second new group must train equal to the plain model."""
    group = new_group(world)
    model = tp_mlp(group)
    x = same(4, 8).requires_grad_()  # so that the column layer's backward all-reduces too
    dist.barrier()
    if rank == 1:
        with pytest.raises(raises):
            fault(model, x)
    else:
        start = time.monotonic()
        with pytest.raises(RuntimeError) as caught:
            step(model, x)
        took = time.monotonic() - start
        message = str(caught.value)
        assert took < within_s, f"took {took:.1f} s: {message}"
        assert "rank 1" in message, message
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="stopped after a fault"):
            step(model, x)
        assert time.monotonic() - start < 1.0
    dist.barrier()
    trains_equal_to_plain_model(new_group(world))


def trains_equal_to_plain_model(group):
    model, reference = tp_mlp(group), plain_mlp()
    x = same(4, 8, seed=3)
    step(model, x)
    step(reference, x)
    torch.testing.assert_close(model(x), reference(x))
    col = model[0]
    rank = dist.get_rank(group)
    offset = sum(col.shard_sizes[:rank])
    want = reference[0].weight.grad.narrow(0, offset, col.shard_sizes[rank])
    torch.testing.assert_close(col.weight_shards[0].grad, want)


# --- checks (each runs on every rank) ---------------------------------------------------


def check_a_bad_input_on_one_rank_is_named_at_once(rank, world):
    def fault(model, x):
        model(x[:, :5])  # ValueError in the column layer: the peers wait in the row layer

    survive(rank, world, fault, ValueError, within_s=TIMEOUT_S / 2)


def check_a_rank_raising_between_the_layers_is_named_when_the_wait_expires(rank, world):
    def fault(model, x):
        model[1].register_forward_hook(lambda *_: (_ for _ in ()).throw(KeyError("between")))
        model(x)

    survive(rank, world, fault, KeyError, within_s=TIMEOUT_S + SLACK_S)


def check_a_rank_raising_in_backward_is_named_when_the_wait_expires(rank, world):
    def fault(model, x):
        out = model[1](model[0](x))
        out.register_hook(lambda grad: (_ for _ in ()).throw(ArithmeticError("in backward")))
        model[2](out).square().mean().backward()

    survive(rank, world, fault, ArithmeticError, within_s=TIMEOUT_S + SLACK_S)


def check_a_rank_that_never_comes_is_named(rank, world):
    def fault(model, x):
        time.sleep(TIMEOUT_S + SLACK_S)
        raise TimeoutError("stayed away")

    survive(rank, world, fault, TimeoutError, within_s=TIMEOUT_S + SLACK_S)


def check_an_argument_error_on_every_rank_breaks_nothing(rank, world):
    group = new_group(world)
    model, reference = tp_mlp(group), plain_mlp()
    x = same(4, 8)
    for _ in range(2):
        with pytest.raises(ValueError, match="in_features"):
            model(x[:, :5])
    # Rank 1 comes late: the others wait past the moment their watch reads the notes, and
    # rank 1's note of the failure they shared must not end their wait.
    if rank == 1:
        time.sleep(0.8)
    step(model, x)
    step(reference, x)
    col = model[0]
    offset = sum(col.shard_sizes[:dist.get_rank(group)])
    want = reference[0].weight.grad.narrow(0, offset, col.shard_sizes[dist.get_rank(group)])
    torch.testing.assert_close(col.weight_shards[0].grad, want)


CHECKS = [name for name in dict(globals()) if name.startswith("check_")]
results = dist_harness.checks_fixture(__name__, CHECKS, WORLDS, timeout_s=240)


@pytest.mark.parametrize("check", CHECKS)
def test_tensor_parallel_faults(results, check):
    dist_harness.assert_passed(results, check)


# --- a killed rank ------------------------------------------------------------------------


def _killed(rank, world, port, out_dir):
    dist_harness.init_loopback(rank, world, port)
    model = tp_mlp(dist.group.WORLD)
    model.insert(2, dist_harness.KillRank1())  # between the column and the row layer
    dist_harness.record_outcome(out_dir, rank, lambda: step(model, same(4, 8)))


@pytest.mark.parametrize("world", WORLDS)
def test_a_killed_rank_makes_every_survivor_raise_naming_it(tmp_path, world):
    codes = dist_harness.spawn(_killed, world, (world, dist_harness.free_port(), str(tmp_path)),
                               90)
    assert codes[1] == -9, codes
    for survivor in [r for r in range(world) if r != 1]:
        outcome = pathlib.Path(tmp_path, f"rank{survivor}.txt").read_text()
        seconds = float(outcome.split(" s:")[0]) if " s:" in outcome else None
        assert seconds is not None and seconds < TIMEOUT_S + SLACK_S, outcome
        assert "rank 1" in outcome, outcome
