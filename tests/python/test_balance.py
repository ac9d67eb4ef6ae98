"""Balancing: the C++ partitioner against brute force, and the profiling helpers."""

import itertools
import random

import pytest
import torch
from torch import nn

import shardpipe
from shardpipe import _C


def compositions(n, parts):
    """Every way to write n as an ordered sum of `parts` positive sizes."""
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = (0, *cuts, n)
        yield [bounds[i + 1] - bounds[i] for i in range(parts)]


def group_costs(costs, balance):
    out, start = [], 0
    for size in balance:
        total = 0.0
        for c in costs[start : start + size]:  # left to right, as documented
            total += c
        out.append(total)
        start += size
    return out


def brute_force(costs, parts):
    # The documented order: smallest largest group, then most even sizes, then
    # lexicographically smallest balance.
    return min(
        compositions(len(costs), parts),
        key=lambda b: (max(group_costs(costs, b)), sum(s * s for s in b), b),
    )


@pytest.mark.parametrize("kind", ["integers", "reals"])
def test_partition_matches_brute_force(kind):
    rng = random.Random(0 if kind == "integers" else 1)
    for n in range(1, 10):
        for _ in range(15):
            # Small integers make ties (and zero costs) common.
            if kind == "integers":
                costs = [float(rng.randint(0, 3)) for _ in range(n)]
            else:
                costs = [rng.uniform(0, 10) for _ in range(n)]
            for parts in range(1, n + 1):
                assert _C.balance_partition(costs, parts) == brute_force(costs, parts), (
                    costs,
                    parts,
                )


def test_partition_rejects_bad_arguments():
    with pytest.raises(ValueError, match="partitions"):
        _C.balance_partition([1.0, 2.0], 0)
    with pytest.raises(ValueError, match="partitions"):
        _C.balance_partition([1.0, 2.0], 3)
    with pytest.raises(ValueError, match="non-negative"):
        _C.balance_partition([1.0, -2.0], 1)
    with pytest.raises(ValueError, match="finite"):
        _C.balance_partition([1.0, float("nan")], 1)


def heavy_model():
    """Five children, the middle one far heavier than the rest together (time and size)."""
    torch.manual_seed(0)
    heavy = nn.Sequential(nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 64))
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(inplace=True), heavy, nn.Linear(64, 64), nn.ReLU()
    )


@pytest.fixture
def one_thread():
    # Timings on a shared 2-core machine: one intra-op thread is not held up by another
    # process taking the second core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("balance_by", [shardpipe.balance_by_time, shardpipe.balance_by_size])
def test_valid_balances_and_heavy_child_alone(balance_by, one_thread):
    model = heavy_model()
    sample = torch.randn(64, 64)
    for partitions in range(1, len(model) + 1):
        balance = balance_by(model, sample, partitions)
        assert len(balance) == partitions
        assert sum(balance) == len(model) and min(balance) >= 1
    # With three stages the heavy child can stand alone, and must.
    assert balance_by(model, sample, 3) == [2, 1, 2]


def test_balance_by_time_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    model.eval()
    sample = torch.randn(4, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    shardpipe.balance_by_time(model, sample, 2, repeats=2)
    shardpipe.balance_by_size(model, sample, 2)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(torch.get_rng_state(), rng)


def test_helpers_sequentialize_other_models(one_thread):
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = models.resnet18(num_classes=10)
    sample = torch.randn(2, 3, 32, 32)
    children = len(shardpipe.sequentialize(model))
    for balance in (
        shardpipe.balance_by_time(model, sample, 3, repeats=1),
        shardpipe.balance_by_size(model, sample, 3),
    ):
        assert len(balance) == 3 and sum(balance) == children and min(balance) >= 1


def test_nested_balances_blocks_as_the_pipeline_cuts_them(one_thread):
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = models.resnet18(num_classes=10)
    sample = torch.randn(2, 3, 32, 32)
    blocks = 15  # ResNet-18: 4 stem children, 4 layers of 2 blocks, avgpool, flatten, fc
    for balance in (
        shardpipe.balance_by_time(model, sample, 3, repeats=1, nested=True),
        shardpipe.balance_by_size(model, sample, 3, nested=True),
    ):
        assert len(balance) == 3 and sum(balance) == blocks and min(balance) >= 1
        shardpipe.Pipeline(model, ["cpu"] * 3, balance=balance, nested=True).close()
    with pytest.raises(ValueError, match="between 1 and 15 .*blocks"):
        shardpipe.balance_by_size(model, sample, 16, nested=True)
    with pytest.raises(TypeError, match="nested must be a bool"):
        shardpipe.balance_by_time(model, sample, 2, nested=None)


def test_param_scale_weighs_parameters_against_activations():
    class Expand(nn.Module):
        # No parameters, a large activation saved for backward.
        def forward(self, x):
            return torch.sigmoid(x.repeat(1, 64))

    torch.manual_seed(0)
    # 4 MiB of weights, small activations | a ReLU | no weights, 2 MiB of activations.
    model = nn.Sequential(nn.Linear(1024, 1024, bias=False), nn.ReLU(), Expand())
    sample = torch.randn(8, 1024)
    assert shardpipe.balance_by_size(model, sample, 2) == [1, 2]
    assert shardpipe.balance_by_size(model, sample, 2, param_scale=0.0) == [2, 1]


def test_bad_arguments_name_the_argument():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    sample = torch.randn(2, 4)
    for balance_by in (shardpipe.balance_by_time, shardpipe.balance_by_size):
        with pytest.raises(ValueError, match="partitions must be between 1 and 2"):
            balance_by(model, sample, 0)
        with pytest.raises(ValueError, match="partitions must be between 1 and 2"):
            balance_by(model, sample, 3)
        with pytest.raises(TypeError, match="partitions must be an int"):
            balance_by(model, sample, 1.5)
        with pytest.raises(TypeError, match="sample must be a torch.Tensor"):
            balance_by(model, "x", 1)
        with pytest.raises(TypeError, match="sample must be a torch.Tensor"):
            balance_by(model, [], 1)
        with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
            balance_by(len, sample, 1)
        with pytest.raises(ValueError, match="device"):
            balance_by(model, sample, 1, device="cuda:99")
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        shardpipe.balance_by_time(model, sample, 1, repeats=0)
    with pytest.raises(TypeError, match="repeats must be an int"):
        shardpipe.balance_by_time(model, sample, 1, repeats=2.0)
    with pytest.raises(ValueError, match="param_scale must be at least 0"):
        shardpipe.balance_by_size(model, sample, 1, param_scale=-1.0)
    with pytest.raises(TypeError, match="param_scale must be a number"):
        shardpipe.balance_by_size(model, sample, 1, param_scale="2")


class TwoInputs(nn.Module):
    def forward(self, inputs):
        x, mask = inputs
        return x * mask


class MakesALeaf(nn.Module):
    """Creates a large tensor with requires_grad=True in forward: the graph keeps it alive
    although no autograd function saves it."""

    def forward(self, x):
        scale = torch.ones(x.shape[0], 4096, requires_grad=True)
        return (x.sum(1, keepdim=True) + scale).sum(1, keepdim=True).expand(-1, 8)


def test_a_tuple_sample_feeds_a_first_block_with_several_inputs():
    model = nn.Sequential(TwoInputs(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    sample = (torch.randn(4, 8), torch.ones(4, 8))
    for balance_by in (shardpipe.balance_by_time, shardpipe.balance_by_size):
        balance = balance_by(model, sample, 2)
        assert sum(balance) == 4 and len(balance) == 2
    pipe = shardpipe.Pipeline(model, ["cpu", "cpu"], chunks=2, balance=balance)
    torch.testing.assert_close(pipe(*sample), model(sample))


def test_size_counts_tensors_a_forward_creates_with_requires_grad():
    model = nn.Sequential(nn.Linear(8, 8), MakesALeaf(), nn.Linear(8, 8), nn.Linear(8, 8))
    sample = torch.randn(16, 8)
    # 16 x 4096 floats kept by the graph of the second block outweigh everything else.
    assert shardpipe.balance_by_size(model, sample, 2, param_scale=0.0) == [2, 2]
    assert shardpipe.balance_by_size(model, sample, 3, param_scale=0.0)[1] == 1
