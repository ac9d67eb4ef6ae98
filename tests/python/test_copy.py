"""shardpipe.copy_to against Tensor.to, computed in the same test."""

import collections
import math

import pytest
import torch

import shardpipe as sp

cuda = pytest.mark.cuda

# (source, destination) pairs; the ones with a CUDA device are marked.
PAIRS = [
    pytest.param("cpu", "cpu", id="cpu-cpu"),
    pytest.param("cpu", "cuda", id="cpu-cuda", marks=cuda),
    pytest.param("cuda", "cpu", id="cuda-cpu", marks=cuda),
    pytest.param("cuda", "cuda", id="cuda-cuda", marks=cuda),
]

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.bool]


def settle():
    # A non-blocking copy to the host is only readable once the stream that waits on it
    # has finished.
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make(shape, dtype, device="cpu"):
    """Random values of `dtype`, with NaN, infinities, -0.0 and a subnormal among floats."""
    if dtype == torch.bool:
        return (torch.rand(shape) > 0.5).to(device)
    if not dtype.is_floating_point:
        return torch.randint(-(2**40), 2**40, shape, dtype=dtype).to(device)
    x = torch.randn(shape, dtype=torch.float64) * 1e3
    flat = x.view(-1)
    specials = [math.nan, math.inf, -math.inf, -0.0, 1e-310]
    flat[: min(len(specials), flat.numel())] = torch.tensor(specials[: flat.numel()])
    return x.to(dtype).to(device)


def bits(t):
    """The bytes of `t` in logical order: equal bits, NaN and -0.0 included."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same_copy(got, x, device):
    want = x.to(device, copy=True)
    assert isinstance(got, torch.Tensor)
    assert got.device == want.device
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.stride() == want.stride()
    assert torch.equal(bits(got), bits(want))
    if x.numel() and got.device == x.device:
        assert got.data_ptr() != x.data_ptr(), "a copy, never a view of the input"


# --- CPU (and the same tests on CUDA pairs) --------------------------------------------------


@pytest.mark.parametrize("src, dst", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_values_equal_to_bit_for_bit(src, dst, dtype):
    x = make((37, 5), dtype, src)
    y = sp.copy_to(x, dst)
    settle()
    assert_same_copy(y, x, dst)


@pytest.mark.parametrize("src, dst", PAIRS)
@pytest.mark.parametrize(
    "view",
    [
        pytest.param(lambda x: x.t(), id="transposed"),
        pytest.param(lambda x: x[::2, 1::3], id="strided"),
        pytest.param(lambda x: x[3], id="offset"),
        pytest.param(lambda x: x[:, :1].expand(-1, 4), id="expanded"),
        pytest.param(lambda x: x.unsqueeze(0).permute(2, 0, 1), id="permuted"),
    ],
)
def test_non_contiguous(src, dst, view):
    x = view(make((8, 9), torch.float32, src))
    y = sp.copy_to(x, dst)
    settle()
    assert_same_copy(y, x, dst)


@pytest.mark.parametrize("src, dst", PAIRS)
@pytest.mark.parametrize("shape", [(0,), (3, 0, 2), ()], ids=str)
def test_empty_and_scalar(src, dst, shape):
    x = make(shape, torch.float32, src)
    y = sp.copy_to(x, dst)
    settle()
    assert_same_copy(y, x, dst)


@pytest.mark.parametrize("src, dst", PAIRS)
def test_gradient_is_moved_back(src, dst):
    a = torch.randn(6, 4, device=src, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, device=src, requires_grad=True)
    wa = torch.randn(6, 4, device=dst)
    wb = torch.randn(5, dtype=torch.float64, device=dst)
    ya, yb = sp.copy_to((a, b), dst)
    ((ya * wa).sum() + (yb * wb).sum()).backward()

    a_ref = a.detach().clone().requires_grad_()
    b_ref = b.detach().clone().requires_grad_()
    ((a_ref.to(dst) * wa).sum() + (b_ref.to(dst) * wb).sum()).backward()
    for got, ref in [(a.grad, a_ref.grad), (b.grad, b_ref.grad)]:
        assert got.device == ref.device and got.dtype == ref.dtype
        assert torch.equal(got, ref)


@pytest.mark.parametrize("src, dst", PAIRS)
def test_requires_grad_and_unused_outputs_follow_to(src, dst):
    a = torch.randn(3, device=src, requires_grad=True)
    b = torch.randn(3, device=src, requires_grad=True)
    plain = torch.randn(3, device=src)
    ints = torch.arange(3, device=src)
    ya, yb, yplain, yints = sp.copy_to([a, b, plain, ints], dst)
    assert ya.requires_grad and yb.requires_grad
    assert not yplain.requires_grad and not yints.requires_grad
    ya.sum().backward()
    assert torch.equal(a.grad, torch.ones(3, device=src))
    assert b.grad is None, "an unused output sends no gradient, like Tensor.to"


@pytest.mark.parametrize("src, dst", PAIRS)
def test_gradcheck(src, dst):
    a = torch.randn(4, 3, dtype=torch.float64, device=src, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, device=src, requires_grad=True)

    # Blocking: gradcheck reads the results on the host right away.
    def flat(a, b):
        return sp.copy_to((a, b), dst, non_blocking=False)

    def nested(a, b):
        out = sp.copy_to({"a": a, "rest": [b]}, dst, non_blocking=False)
        return out["a"], out["rest"][0]

    assert torch.autograd.gradcheck(flat, (a, b))
    assert torch.autograd.gradgradcheck(flat, (a, b))
    assert torch.autograd.gradcheck(nested, (a, b))


@pytest.mark.parametrize("src, dst", PAIRS)
def test_nesting_keeps_structure_and_other_leaves(src, dst):
    Point = collections.namedtuple("Point", ["x", "y"])
    tag, count, nothing = "label", 3, None
    tree = {
        "image": make((2, 3), torch.float32, src),
        "pair": (make((4,), torch.int64, src), tag),
        "list": [make((1,), torch.bool, src), count, [nothing, make((2, 2), torch.bfloat16, src)]],
        "point": Point(make((3,), torch.float64, src), 2.5),
        "empty": [],
    }
    out = sp.copy_to(tree, dst)
    settle()
    assert list(out) == list(tree)
    assert isinstance(out["pair"], tuple) and isinstance(out["list"], list)
    assert type(out["point"]) is Point and out["point"].y == 2.5
    assert out["pair"][1] is tag and out["list"][1] is count and out["list"][2][0] is nothing
    assert out["empty"] == []
    assert_same_copy(out["image"], tree["image"], dst)
    assert_same_copy(out["pair"][0], tree["pair"][0], dst)
    assert_same_copy(out["list"][0], tree["list"][0], dst)
    assert_same_copy(out["list"][2][1], tree["list"][2][1], dst)
    assert_same_copy(out["point"].x, tree["point"].x, dst)


@pytest.mark.parametrize("empty", [(), [], {}], ids=["tuple", "list", "dict"])
def test_empty_containers(empty):
    out = sp.copy_to(empty, "cpu")
    assert out == empty and type(out) is type(empty)


def test_devices_in_every_accepted_form():
    x = torch.randn(3)
    for device in ["cpu", torch.device("cpu")]:
        assert_same_copy(sp.copy_to(x, device), x, "cpu")


@pytest.mark.parametrize("src, dst", PAIRS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(src, dst, requires_grad):
    xs = [
        torch.randn(3, 4, device=src, requires_grad=requires_grad),
        torch.randn(4, 3, dtype=torch.float64, device=src).t().requires_grad_(requires_grad),
        torch.arange(6, device=src),
    ]
    # Blocking: opcheck compares results on the host right away.
    torch.library.opcheck(torch.ops.shardpipe.copy_to.default, (xs, torch.device(dst), False))


def test_torch_compile_traces_copy_to():
    def f(x, y):
        moved = sp.copy_to({"x": x, "y": y}, "cpu")
        return moved["x"] * 2 + moved["y"]

    x, y = torch.randn(4), torch.randn(4)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, y), f(x, y))


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["gpu:0", "nonsense", "cuda:-1x", "meta"])
def test_unknown_device_is_a_value_error_naming_device(device):
    with pytest.raises(ValueError, match=r"\bdevice\b"):
        sp.copy_to(torch.randn(2), device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_is_a_value_error():
    with pytest.raises(ValueError, match=r"\bdevice\b.*no CUDA device"):
        sp.copy_to(torch.randn(2), "cuda")


@pytest.mark.parametrize("device", [1.5, ["cpu"], None])
def test_device_of_the_wrong_type_is_a_type_error(device):
    with pytest.raises(TypeError, match=r"\bdevice\b"):
        sp.copy_to(torch.randn(2), device)


@pytest.mark.parametrize("x", [3, "tensor", None, 2.0], ids=repr)
def test_non_tensor_x_is_a_type_error_naming_x(x):
    with pytest.raises(TypeError, match=r"\bx\b"):
        sp.copy_to(x, "cpu")


def test_meta_tensors_have_nothing_to_copy():
    with pytest.raises(ValueError, match="meta tensor"):
        sp.copy_to(torch.ones(2, device="meta"), "cpu")
    with pytest.raises(ValueError, match="meta tensor"):
        sp.copy_to({"a": torch.ones(2), "b": torch.ones(2, device="meta")}, "cpu")


@pytest.mark.parametrize("non_blocking", [1, "yes", None])
def test_non_bool_non_blocking_is_a_type_error(non_blocking):
    with pytest.raises(TypeError, match="non_blocking"):
        sp.copy_to(torch.randn(2), "cpu", non_blocking=non_blocking)


# --- CUDA only: ordering, allocator safety, the batched path ----------------------------------

# Enough GPU cycles (tens of milliseconds) for a missing wait to show up as wrong values.
SLEEP_CYCLES = 50_000_000


@cuda
@pytest.mark.parametrize("dst", ["cpu", "cuda"])
def test_copy_waits_for_the_kernel_writing_its_source(dst):
    final = torch.randn(1 << 22, device="cuda")
    src = torch.zeros_like(final)
    torch.cuda._sleep(SLEEP_CYCLES)
    src.copy_(final)  # still queued behind the sleep when copy_to is called
    y = sp.copy_to(src, dst, non_blocking=True)
    settle()
    assert torch.equal(y.cpu(), final.cpu())


@cuda
@pytest.mark.parametrize("src", ["cpu", "cuda"])
def test_kernel_after_the_copy_sees_the_copied_values(src):
    x = torch.randn(1 << 24).to(src)  # 64 MiB: a copy that takes a while
    expected = x.cpu()
    user_stream = torch.cuda.Stream()
    with torch.cuda.stream(user_stream):
        y = sp.copy_to(x, "cuda", non_blocking=True)
        z = y * 2  # on the destination's current stream, right after the copy
    settle()
    assert torch.equal(z.cpu(), expected * 2)


@cuda
def test_blocking_copy_to_host_is_readable_at_once():
    x = torch.randn(1 << 22, device="cuda")
    expected = x.cpu()
    torch.cuda._sleep(SLEEP_CYCLES)
    y = sp.copy_to(x * 1, "cpu", non_blocking=False)
    assert torch.equal(y, expected)


@cuda
@pytest.mark.parametrize("dst", ["cpu", "cuda"])
def test_freeing_the_source_right_after_the_copy_is_safe(dst):
    n = 1 << 26  # 256 MiB of float32: the copy is still running when the source is freed
    for _ in range(3):
        src = torch.randn(n, device="cuda")
        expected = src.cpu()
        y = sp.copy_to(src, dst, non_blocking=True)
        del src
        # Same size on the same stream: the caching allocator hands out the freed block
        # unless the copy stream still holds it.
        junk = torch.full((n,), 7.0, device="cuda")
        settle()
        assert torch.equal(y.cpu(), expected)
        del junk


@cuda
def test_freeing_a_pageable_host_source_is_safe():
    x = torch.randn(1 << 24)
    expected = x.clone()
    y = sp.copy_to(x, "cuda", non_blocking=True)
    x.fill_(7.0)  # pageable memory goes through a staging buffer: the copy already owns it
    del x
    settle()
    assert torch.equal(y.cpu(), expected)


@cuda
def test_gradients_across_devices_in_float64():
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: sp.copy_to((a, b), "cuda"), (a, b))
    to_host = lambda a, b: sp.copy_to([a, b], "cpu", non_blocking=False)  # noqa: E731
    assert torch.autograd.gradcheck(to_host, (a, b))


@cuda
def test_gradient_reaching_the_host_is_readable_when_backward_returns():
    a = torch.randn(1 << 22, requires_grad=True)
    w = torch.randn(1 << 22, device="cuda")
    y = sp.copy_to(a, "cuda")
    # Delays the stream that produces y's gradient, so a non-blocking copy back to the host
    # would still be running when backward() returns.
    y.register_hook(lambda grad: (torch.cuda._sleep(SLEEP_CYCLES), grad)[1])
    (y * w).sum().backward()
    assert torch.equal(a.grad, w.cpu())


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_between_two_gpus():
    packed = _many_small("cuda:0")
    for xs in [packed, packed + [make((64, 33), torch.float32, "cuda:0").t()]]:
        ys = sp.copy_to(xs, "cuda:1")
        settle()
        for y, x in zip(ys, xs):
            assert_same_copy(y, x, "cuda:1")
    a = torch.randn(8, 3, dtype=torch.float64, device="cuda:0", requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: sp.copy_to(a, "cuda:1"), (a,))


def _many_small(device):
    """130 small contiguous tensors of every dtype and odd byte sizes: the packed path, in
    more than one launch of 64."""
    shapes = [(i % 7 + 1, i % 5 + 1) for i in range(130)]
    dtypes = [DTYPES[i % len(DTYPES)] for i in range(len(shapes))]
    return [make(shape, dtype, device) for shape, dtype in zip(shapes, dtypes)]


@cuda
@pytest.mark.parametrize("src, dst", [("cpu", "cuda"), ("cuda", "cpu"), ("cuda", "cuda")])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "with-empty-and-strided"])
def test_batched_path_equals_to(src, dst, packed):
    xs = _many_small(src)
    if not packed:  # one empty and one strided tensor send the list down the per-tensor path
        xs += [make((0, 3), torch.float32, src), make((6, 4), torch.float64, src).t()]
    ys = sp.copy_to(xs, dst)
    settle()
    for y, x in zip(ys, xs):
        assert_same_copy(y, x, dst)


@cuda
def test_batched_outputs_are_independent_and_differentiable():
    xs = [torch.randn(16, requires_grad=True) for _ in range(64)]
    ys = sp.copy_to(xs, "cuda")
    ys[0].add_(1.0)  # results may share one allocation, but never overlap
    assert torch.equal(ys[1].cpu(), xs[1].detach())
    weights = [torch.randn(16, device="cuda") for _ in ys]
    sum((y * w).sum() for y, w in zip(ys[1:], weights[1:])).backward()
    for x, w in zip(xs[1:], weights[1:]):
        assert torch.equal(x.grad, w.cpu())


@cuda
def test_mixed_source_devices_in_one_call():
    xs = [torch.randn(5), torch.randn(5, device="cuda"), torch.arange(4), torch.randn(3, 4).t()]
    ys = sp.copy_to(xs, "cuda")
    settle()
    for y, x in zip(ys, xs):
        assert_same_copy(y, x, "cuda")
