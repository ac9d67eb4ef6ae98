"""Sharded linear layers in one process ("cpu" shards, each on its own thread).

Every check compares against nn.Linear with the same weights, computed in the same test.
"""

import pytest
import torch
from torch import nn

import shardpipe
from shardpipe import ColumnParallelLinear, RowParallelLinear, ShardedTensor

SHARDS = [1, 2, 3]
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def cpus(n):
    return ["cpu"] * n


def twin(make_sharded, make_linear, seed=0):
    """A sharded layer and an nn.Linear drawn from the same seed."""
    torch.manual_seed(seed)
    sharded = make_sharded()
    torch.manual_seed(seed)
    return sharded, make_linear()


def leaf(t):
    return t.detach().clone().requires_grad_()


def full_grad(layer, name):
    """The gradient of the full parameter, assembled from the shard gradients."""
    if name == "bias" and isinstance(layer, RowParallelLinear):
        return layer.bias.grad
    shards = layer.weight_shards if name == "weight" else layer.bias_shards
    dim = 1 if (name == "weight" and isinstance(layer, RowParallelLinear)) else 0
    return torch.cat([s.grad for s in shards], dim)


# --- construction ------------------------------------------------------------------------


@pytest.mark.parametrize("n", SHARDS)
@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_initialisation_equals_nn_linear_with_the_same_seed(cls, n):
    sharded, linear = twin(lambda: cls(7, 5, devices=cpus(n)), lambda: nn.Linear(7, 5))
    state = sharded.state_dict()
    assert list(state) == list(linear.state_dict())
    for key, value in linear.state_dict().items():
        assert torch.equal(state[key], value), key


def test_default_placement_without_a_process_group_is_one_shard_like_nn_linear():
    sharded, linear = twin(lambda: ColumnParallelLinear(6, 4), lambda: nn.Linear(6, 4))
    assert sharded.devices == (torch.device("cpu"),) and sharded.group is None
    x = torch.randn(3, 6)
    assert torch.equal(sharded(x), linear(x))


def test_shard_sizes_differ_by_at_most_one():
    col = ColumnParallelLinear(4, 7, devices=cpus(3))
    assert col.shard_sizes == (3, 2, 2)
    assert [tuple(w.shape) for w in col.weight_shards] == [(3, 4), (2, 4), (2, 4)]
    row = RowParallelLinear(8, 2, devices=cpus(3))
    assert [tuple(w.shape) for w in row.weight_shards] == [(2, 3), (2, 3), (2, 2)]


# --- forward and backward against nn.Linear ---------------------------------------------


@pytest.mark.parametrize("n", SHARDS)
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7), (7,), (0, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_column_parallel_matches_nn_linear(n, shape, bias):
    col, lin = twin(
        lambda: ColumnParallelLinear(7, 8, bias=bias, devices=cpus(n)),
        lambda: nn.Linear(7, 8, bias=bias),
    )
    x = torch.randn(shape)
    xs, xl = leaf(x), leaf(x)
    y, expected = col(xs), lin(xl)
    torch.testing.assert_close(y, expected)
    grad = torch.randn_like(expected)
    y.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(xs.grad, xl.grad)
    torch.testing.assert_close(full_grad(col, "weight"), lin.weight.grad)
    if bias:
        torch.testing.assert_close(full_grad(col, "bias"), lin.bias.grad)


@pytest.mark.parametrize("n", SHARDS)
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7), (7,), (0, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_row_parallel_matches_nn_linear(n, shape, bias):
    row, lin = twin(
        lambda: RowParallelLinear(7, 4, bias=bias, devices=cpus(n)),
        lambda: nn.Linear(7, 4, bias=bias),
    )
    x = torch.randn(shape)
    xs, xl = leaf(x), leaf(x)
    y, expected = row(xs), lin(xl)
    torch.testing.assert_close(y, expected)
    grad = torch.randn_like(expected)
    y.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(xs.grad, xl.grad)
    torch.testing.assert_close(full_grad(row, "weight"), lin.weight.grad)
    if bias:
        torch.testing.assert_close(full_grad(row, "bias"), lin.bias.grad)


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_one_shard_is_exactly_nn_linear(cls):
    layer, lin = twin(lambda: cls(64, 48, devices=["cpu"]), lambda: nn.Linear(64, 48))
    x = torch.randn(2, 16, 64)
    xs, xl = leaf(x), leaf(x)
    y, expected = layer(xs), lin(xl)
    assert torch.equal(y, expected)
    grad = torch.randn_like(y)
    y.backward(grad)
    expected.backward(grad)
    assert torch.equal(xs.grad, xl.grad)
    assert torch.equal(layer.weight_shards[0].grad, lin.weight.grad)
    assert torch.equal(full_grad(layer, "bias"), lin.bias.grad)


def mlp_pair(n, d_in=6, hidden=11, d_out=5, dtype=torch.float32, act=torch.relu):
    """A column->act->row MLP on n shards and the same MLP of two nn.Linear."""
    torch.manual_seed(0)
    col = ColumnParallelLinear(d_in, hidden, gather_output=False, devices=cpus(n), dtype=dtype)
    row = RowParallelLinear(hidden, d_out, input_is_parallel=True, devices=cpus(n), dtype=dtype)
    torch.manual_seed(0)
    fc1 = nn.Linear(d_in, hidden, dtype=dtype)
    fc2 = nn.Linear(hidden, d_out, dtype=dtype)
    return (lambda x: row(act(col(x)))), (lambda x: fc2(act(fc1(x)))), (col, row, fc1, fc2)


@pytest.mark.parametrize("n", SHARDS)
@pytest.mark.parametrize("act", [torch.relu, nn.functional.gelu, torch.tanh])
def test_column_then_row_mlp_matches_two_nn_linear(n, act):
    sharded, plain, (col, row, fc1, fc2) = mlp_pair(n, act=act)
    x = torch.randn(4, 3, 6)
    xs, xl = leaf(x), leaf(x)
    y, expected = sharded(xs), plain(xl)
    assert type(y) is torch.Tensor
    torch.testing.assert_close(y, expected)
    y.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(xs.grad, xl.grad)
    for layer, lin in ((col, fc1), (row, fc2)):
        torch.testing.assert_close(full_grad(layer, "weight"), lin.weight.grad)
        torch.testing.assert_close(full_grad(layer, "bias"), lin.bias.grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 3])
def test_dtypes(dtype, n):
    sharded, plain, (col, row, fc1, fc2) = mlp_pair(n, d_in=16, hidden=24, d_out=8, dtype=dtype)
    assert col.dtype == dtype and row.weight_shards[0].dtype == dtype
    x = torch.randn(4, 16, dtype=dtype)
    xs, xl = leaf(x), leaf(x)
    y, expected = sharded(xs), plain(xl)
    assert y.dtype == dtype
    torch.testing.assert_close(y, expected, **TOL[dtype])
    y.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(xs.grad, xl.grad, **TOL[dtype])
    torch.testing.assert_close(full_grad(col, "weight"), fc1.weight.grad, **TOL[dtype])


def test_input_not_requiring_grad_still_gives_weight_grads():
    col, lin = twin(lambda: ColumnParallelLinear(5, 4, devices=cpus(2)), lambda: nn.Linear(5, 4))
    x = torch.randn(3, 5)
    col(x).sum().backward()
    lin(x).sum().backward()
    torch.testing.assert_close(full_grad(col, "weight"), lin.weight.grad)


# --- the shards really run at the same time ---------------------------------------------


def test_each_cpu_shard_computes_on_its_own_thread():
    col = ColumnParallelLinear(64, 96, devices=cpus(3))
    x = torch.randn(32, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        col(x)
    threads = {e.thread for e in prof.events() if e.name == "aten::linear"}
    assert len(threads) == 3


# --- ShardedTensor, the activation between the layers -----------------------------------


def test_elementwise_ops_stay_sharded_and_others_gather():
    col = ColumnParallelLinear(4, 7, gather_output=False, devices=cpus(3))
    x = torch.randn(2, 4)
    h = col(x)
    assert isinstance(h, ShardedTensor) and h.shard_sizes == (3, 2, 2)
    full = h.full_tensor()
    a = torch.relu(h) * 2 + 1
    assert isinstance(a, ShardedTensor) and a.shard_sizes == h.shard_sizes
    torch.testing.assert_close(a.full_tensor(), torch.relu(full) * 2 + 1)
    s = h.sum(dim=-1)
    assert type(s) is torch.Tensor
    torch.testing.assert_close(s, full.sum(dim=-1))
    h2 = h.detach().clone()
    h2.relu_()
    torch.testing.assert_close(h2.full_tensor(), torch.relu(full))


def test_gathering_fallback_is_differentiable():
    torch.manual_seed(0)
    col = ColumnParallelLinear(4, 7, gather_output=False, devices=cpus(2))
    lin = col.to_linear()
    x = torch.randn(3, 4)
    w = torch.randn(7, 2)
    (torch.tanh(col(x)) @ w).square().sum().backward()
    (torch.tanh(lin(x)) @ w).square().sum().backward()
    torch.testing.assert_close(full_grad(col, "weight"), lin.weight.grad)


def test_dropout_runs_per_shard():
    col = ColumnParallelLinear(4, 6, gather_output=False, devices=cpus(2))
    h = nn.functional.dropout(col(torch.randn(50, 4)), p=0.5, training=True)
    assert isinstance(h, ShardedTensor)
    zeros = (h.full_tensor() == 0).float().mean().item()
    assert 0.3 < zeros < 0.7
    h.sum().backward()
    assert col.weight_shards[1].grad is not None


def test_gathered_output_lands_on_the_input_device_and_is_a_plain_tensor():
    col = ColumnParallelLinear(4, 6, devices=cpus(2))
    y = col(torch.randn(3, 4))
    assert type(y) is torch.Tensor and y.shape == (3, 6)


# --- state dicts, conversion, parallelize ------------------------------------------------


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_state_dict_round_trips_between_shard_counts_and_nn_linear(cls):
    torch.manual_seed(0)
    two = cls(7, 5, devices=cpus(2))
    lin = nn.Linear(7, 5)
    lin.load_state_dict(two.state_dict())
    three = cls(7, 5, devices=cpus(3))
    three.load_state_dict(lin.state_dict())
    x = torch.randn(4, 7)
    torch.testing.assert_close(three(x), lin(x))
    torch.testing.assert_close(two(x), lin(x))
    for key, value in lin.state_dict().items():
        assert torch.equal(three.state_dict()[key], value)


def test_load_state_dict_reports_missing_unexpected_and_mismatched_keys():
    col = ColumnParallelLinear(4, 3, devices=cpus(2))
    with pytest.raises(RuntimeError, match="Missing key.*bias"):
        col.load_state_dict({"weight": torch.zeros(3, 4)})
    with pytest.raises(RuntimeError, match="Unexpected key.*extra"):
        col.load_state_dict({"weight": torch.zeros(3, 4), "bias": torch.zeros(3), "extra": 1})
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        col.load_state_dict({"weight": torch.zeros(4, 4), "bias": torch.zeros(3)})
    result = col.load_state_dict({"weight": torch.ones(3, 4)}, strict=False)
    assert result.missing_keys == ["bias"]
    assert torch.equal(col.state_dict()["weight"], torch.ones(3, 4))


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_sharded_state_dict_round_trip_and_offsets(cls):
    a = cls(7, 5, devices=cpus(3))
    b = cls(7, 5, devices=cpus(3))
    sharded = a.sharded_state_dict(prefix="layer.")
    full = a.state_dict()["weight"]
    for shard in sharded["layer.weight"]:
        rows, cols = shard.tensor.shape
        r, c = shard.offsets
        assert torch.equal(full[r : r + rows, c : c + cols], shard.tensor)
        assert shard.full_shape == (5, 7)
    b.load_sharded_state_dict(sharded, prefix="layer.")
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value)
    other = cls(7, 5, devices=cpus(2))
    with pytest.raises(ValueError, match="another sharding"):
        other.load_sharded_state_dict(sharded, prefix="layer.")


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_from_linear_and_to_linear(cls):
    lin = nn.Linear(9, 4)
    sharded = cls.from_linear(lin, devices=cpus(3))
    x = torch.randn(2, 9)
    torch.testing.assert_close(sharded(x), lin(x))
    back = sharded.to_linear()
    assert isinstance(back, nn.Linear)
    assert torch.equal(back.weight, lin.weight) and torch.equal(back.bias, lin.bias)
    with torch.no_grad():
        lin.weight.zero_()
    assert not torch.equal(sharded.state_dict()["weight"], lin.weight)  # copied, not shared


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 6)

    def forward(self, x):
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


def test_parallelize_keeps_keys_outputs_and_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block(), nn.LayerNorm(6))
    reference = nn.Sequential(Block(), Block(), nn.LayerNorm(6))
    reference.load_state_dict(model.state_dict())
    keys = list(model.state_dict())
    out = shardpipe.parallelize(model, {"*.fc1": "column", "*.fc2": "row"}, devices=cpus(2))
    assert out is model
    assert isinstance(model[1].fc1, ColumnParallelLinear) and not model[1].fc1.gather_output
    assert isinstance(model[0].fc2, RowParallelLinear) and model[0].fc2.input_is_parallel
    assert list(model.state_dict()) == keys
    x = torch.randn(3, 6)
    torch.testing.assert_close(model(x), reference(x))
    model(x).sum().backward()
    reference(x).sum().backward()
    torch.testing.assert_close(full_grad(model[0].fc1, "weight"), reference[0].fc1.weight.grad)
    reference.load_state_dict(model.state_dict())


def test_parallelize_with_explicit_flags():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    shardpipe.parallelize(
        model, {"0": {"style": "column", "gather_output": True}, "1": "row"}, devices=cpus(2)
    )
    assert model[0].gather_output and model[1].input_is_parallel
    model[1].input_is_parallel = False
    assert model(torch.randn(2, 4)).shape == (2, 3)


@pytest.mark.parametrize(
    "plan, error, match",
    [
        ({"nope": "column"}, ValueError, "matches no submodule"),
        ({"1": "column"}, TypeError, "only nn.Linear"),
        ({"0": "diagonal"}, ValueError, "'column' or 'row'"),
        ({"0": 3}, TypeError, "must be 'column', 'row' or a dict"),
        ({"0": {"style": "row", "gather_output": True}}, ValueError, "unknown keys"),
        ({"0": "column", "*": "row"}, ValueError, "matches both"),
    ],
)
def test_parallelize_errors(plan, error, match):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(error, match=match):
        shardpipe.parallelize(model, plan, devices=cpus(2))


def test_parallelize_refuses_what_it_would_silently_break():
    class TiedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    with pytest.raises(ValueError, match="shares a parameter with \\['embed.weight'\\]"):
        shardpipe.parallelize(TiedHead(), {"head": "column"}, devices=cpus(2))
    shared = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="also registered as"):
        shardpipe.parallelize(nn.Sequential(shared, nn.ReLU(), shared), {"2": "column"},
                              devices=cpus(2))
    # MultiheadAttention reads out_proj.weight itself; its out_proj is an nn.Linear subclass.
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    with pytest.raises(TypeError, match="not subclasses"):
        shardpipe.parallelize(layer, {"self_attn.out_proj": "column"}, devices=cpus(2))


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(in_features=0), ValueError, "in_features must be at least 1"),
        (dict(in_features="8"), TypeError, "in_features must be an int"),
        (dict(out_features=2, devices=cpus(3)), ValueError, "at most as many shards"),
        (dict(bias="yes"), TypeError, "bias must be a bool"),
        (dict(gather_output=1), TypeError, "gather_output must be a bool"),
        (dict(devices="cpu"), TypeError, "devices must be a list"),
        (dict(devices=[]), ValueError, "at least one device"),
        (dict(devices=["gpu"]), ValueError, r"devices\[0\]"),
        (dict(devices=cpus(2), group=object()), ValueError, "exactly one of devices= and group="),
        (dict(devices=None, group=object()), TypeError, "group must be a torch.distributed"),
        (dict(dtype=torch.int32), ValueError, "dtype must be one of"),
        (dict(dtype="float32"), TypeError, "dtype must be a torch.dtype"),
        (dict(chunks=0), ValueError, "chunks must be at least 1"),
        (dict(chunks=2.0), TypeError, "chunks must be an int"),
        (dict(chunks=2), ValueError, "chunks=2 needs group="),
    ],
)
def test_constructor_errors(kwargs, error, match):
    args = dict(in_features=8, out_features=6, devices=cpus(2))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ColumnParallelLinear(**args)


def test_row_more_shards_than_input_features():
    with pytest.raises(ValueError, match="in_features=2 over 3 shards"):
        RowParallelLinear(2, 8, devices=cpus(3))


def test_forward_errors_name_the_numbers():
    col = ColumnParallelLinear(8, 6, gather_output=False, devices=cpus(2))
    with pytest.raises(ValueError, match=r"x has shape \(3, 7\), but in_features is 8"):
        col(torch.randn(3, 7))
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        col(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a Tensor"):
        col([1.0] * 8)
    row = RowParallelLinear(6, 4, input_is_parallel=True, devices=cpus(2))
    with pytest.raises(TypeError, match="must be the ShardedTensor"):
        row(torch.randn(3, 6))
    other = ColumnParallelLinear(8, 6, gather_output=False, devices=cpus(3))
    with pytest.raises(ValueError, match=r"sharded into widths \(2, 2, 2\)"):
        row(other(torch.randn(3, 8)))
    plain_row = RowParallelLinear(6, 4, devices=cpus(2))
    with pytest.raises(ValueError, match="in_features is 6"):
        plain_row(torch.randn(3, 5))


def test_deepcopy_gives_an_independent_equal_layer():
    import copy

    col = ColumnParallelLinear(4, 6, devices=cpus(2))
    twin_col = copy.deepcopy(col)
    x = torch.randn(2, 4)
    assert torch.equal(twin_col(x), col(x))
    with torch.no_grad():
        twin_col.weight_shards[0].zero_()
    assert not torch.equal(twin_col(x), col(x))


def test_from_linear_needs_a_linear():
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        ColumnParallelLinear.from_linear(nn.Conv1d(2, 2, 1), devices=cpus(2))


# --- operators: gradcheck and opcheck ----------------------------------------------------


def double_leaves(*shapes):
    torch.manual_seed(0)
    return [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]


def test_gradcheck_column_parallel_linear():
    x, w0, w1, b0, b1 = double_leaves((3, 4), (2, 4), (3, 4), (2,), (3,))
    for gather in (True, False):
        torch.autograd.gradcheck(
            lambda x, w0, w1, b0, b1, g=gather: torch.ops.shardpipe.column_parallel_linear(
                x, [w0, w1], [b0, b1], g
            ),
            (x, w0, w1, b0, b1),
        )


def test_gradcheck_row_parallel_linear():
    x0, x1, w0, w1, b = double_leaves((3, 2), (3, 3), (4, 2), (4, 3), (4,))
    cpu = torch.device("cpu")
    torch.autograd.gradcheck(
        lambda x0, x1, w0, w1, b: torch.ops.shardpipe.row_parallel_linear(
            [x0, x1], [w0, w1], b, True, cpu
        ),
        (x0, x1, w0, w1, b),
    )
    x = torch.cat([x0, x1], -1).detach().requires_grad_()
    torch.autograd.gradcheck(
        lambda x, w0, w1, b: torch.ops.shardpipe.row_parallel_linear([x], [w0, w1], b, False, cpu),
        (x, w0, w1, b),
    )


def test_opcheck_column_parallel_linear():
    x, w0, w1, b0, b1 = double_leaves((3, 4), (2, 4), (3, 4), (2,), (3,))
    for gather in (True, False):
        torch.library.opcheck(
            torch.ops.shardpipe.column_parallel_linear.default, (x, [w0, w1], [b0, b1], gather)
        )


def test_opcheck_column_parallel_linear_backward():
    x, w0, w1 = (t.detach() for t in double_leaves((3, 4), (2, 4), (3, 4)))
    torch.library.opcheck(
        torch.ops.shardpipe._column_parallel_linear_backward.default,
        ([torch.randn(3, 5, dtype=torch.float64)], x, [w0, w1], True, True, [True, True, True]),
    )


def test_opcheck_row_parallel_linear():
    x0, x1, w0, w1, b = double_leaves((3, 2), (3, 3), (4, 2), (4, 3), (4,))
    torch.library.opcheck(
        torch.ops.shardpipe.row_parallel_linear.default,
        ([x0, x1], [w0, w1], b, True, torch.device("cpu")),
    )


def test_opcheck_row_parallel_linear_backward():
    x0, x1, w0, w1 = (t.detach() for t in double_leaves((3, 2), (3, 3), (4, 2), (4, 3)))
    torch.library.opcheck(
        torch.ops.shardpipe._row_parallel_linear_backward.default,
        (torch.randn(3, 4, dtype=torch.float64), [x0, x1], [w0, w1], True, True,
         [True, True, True]),
    )


# --- CUDA (skipped without a GPU) --------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and shardpipe._C.cuda_compiled()),
    reason="needs a CUDA device and a CUDA build of shardpipe",
)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("x_device", ["cpu", "cuda:0"])
def test_cuda_mlp_matches_two_nn_linear(x_device):
    devices = [f"cuda:{i % torch.cuda.device_count()}" for i in range(2)]
    torch.manual_seed(0)
    col = ColumnParallelLinear(32, 64, gather_output=False, devices=devices)
    row = RowParallelLinear(64, 16, input_is_parallel=True, devices=devices)
    fc1, fc2 = col.to_linear().to(x_device), row.to_linear().to(x_device)
    x = torch.randn(8, 32, device=x_device)
    xs, xl = leaf(x), leaf(x)
    y = row(torch.relu(col(xs)))
    expected = fc2(torch.relu(fc1(xl)))
    assert y.device == torch.device(x_device)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(xs.grad, xl.grad)
    torch.testing.assert_close(full_grad(col, "weight").to(x_device), fc1.weight.grad)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("devices", [["cpu", "cuda:0"], ["cuda:0", "cpu"]])
def test_shards_on_the_host_and_a_gpu_match_nn_linear(devices):
    # Copies towards the host are read there at once (concatenation, sums, state_dict), so
    # they must be finished first: a GPU-to-host copy left in flight gives stale values.
    torch.manual_seed(0)
    col = ColumnParallelLinear(32, 64, gather_output=False, devices=devices)
    row = RowParallelLinear(64, 16, input_is_parallel=True, devices=devices)
    fc1, fc2 = col.to_linear().cpu(), row.to_linear().cpu()
    x = torch.randn(8, 32)
    xs, xl = leaf(x), leaf(x)
    hidden = col(xs)
    torch.testing.assert_close(hidden.full_tensor().cpu(), fc1(x))
    y = row(torch.relu(hidden))
    expected = fc2(torch.relu(fc1(xl)))
    torch.testing.assert_close(y.cpu(), expected)
    y.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(xs.grad, xl.grad)
    torch.testing.assert_close(full_grad(col, "weight").cpu(), fc1.weight.grad)
    torch.testing.assert_close(full_grad(row, "weight").cpu(), fc2.weight.grad)
    for key, value in col.state_dict().items():
        torch.testing.assert_close(value.cpu(), fc1.state_dict()[key])
