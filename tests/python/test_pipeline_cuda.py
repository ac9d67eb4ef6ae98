"""The CUDA path of the pipeline: several stages on one GPU (streams), skipped without one."""

import pytest
import torch
from torch import nn

import shardpipe as sp

pytestmark = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


@needs_cuda
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("checkpoint", ["never", "always"])
def test_two_stages_on_one_gpu_equal_the_model(schedule, checkpoint):
    # The backward of pipe(x) runs on autograd's thread for cuda:0, and both stages live on
    # cuda:0: if the engine handed their autograd calls to its own workers, they would wait
    # for that thread forever. This test hangs (and times out) if that trap is not handled.
    net = model().cuda()
    x = torch.randn(32, 64, device="cuda", requires_grad=True)
    target = torch.randint(0, 10, (32,), device="cuda")
    loss = nn.functional.cross_entropy(net(x), target)
    loss.backward()
    want = [p.grad.clone() for p in net.parameters()]
    want_x = x.grad.clone()
    net.zero_grad()
    x.grad = None

    pipe = sp.Pipeline(net, ["cuda:0", "cuda:0"], chunks=4, balance=[3, 2], schedule=schedule,
                       checkpoint=checkpoint)
    out = pipe(x)
    assert out.device == torch.device("cuda:0")
    nn.functional.cross_entropy(out, target).backward()
    for g, w in zip((p.grad for p in net.parameters()), want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(x.grad, want_x, atol=1e-5, rtol=1e-4)

    net.zero_grad()
    fused = pipe.train_step(x.detach(), target, nn.functional.cross_entropy)
    torch.testing.assert_close(fused, loss.detach(), atol=1e-5, rtol=1e-4)
    for g, w in zip((p.grad for p in net.parameters()), want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@needs_cuda
def test_cpu_input_to_gpu_stages_and_back():
    net = model(1).cuda()
    x = torch.randn(16, 64, requires_grad=True)
    want = net(x.cuda())
    want.sum().backward()
    want_x = x.grad.clone()
    x.grad = None
    pipe = sp.Pipeline(net, ["cuda:0", "cuda:0"], chunks=2, balance=[2, 3])
    out = pipe(x)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    assert x.grad.device.type == "cpu"
    torch.testing.assert_close(x.grad, want_x)


@needs_cuda
def test_stage_error_on_gpu_keeps_its_type():
    class Fail(nn.Module):
        def forward(self, x):
            raise IndexError("gpu stage failed")

    pipe = sp.Pipeline(nn.Sequential(nn.Linear(4, 4), Fail()).cuda(), ["cuda:0", "cuda:0"],
                       chunks=2, balance=[1, 1])
    with pytest.raises(IndexError, match="stage 1"):
        pipe(torch.randn(4, 4, device="cuda"))


@needs_cuda
@pytest.mark.parametrize("devices", [["cuda:0", "cpu"], ["cpu", "cuda:0"]])
def test_stages_on_a_gpu_and_the_host_equal_the_model(devices):
    net = model(2)
    x = torch.randn(16, 64, requires_grad=True)
    want = net(x)
    want.sum().backward()
    want_grads = [p.grad.clone() for p in net.parameters()]
    want_x = x.grad.clone()
    net.zero_grad()
    x.grad = None
    pipe = sp.Pipeline(net, devices, chunks=4, balance=[3, 2])
    out = pipe(x)
    torch.testing.assert_close(out.cpu(), want)
    out.sum().backward()
    torch.testing.assert_close(x.grad, want_x)
    for p, g in zip(net.parameters(), want_grads):
        torch.testing.assert_close(p.grad.cpu(), g)


@needs_cuda
def test_gpu_input_still_being_computed_and_a_host_input_together():
    # x comes out of kernels still queued on the caller's stream when the pipeline starts;
    # the host input makes the engine take its copy path for both, which must still wait
    # for the caller's stream.
    class Scale(nn.Module):
        def forward(self, inputs):
            x, weight = inputs
            return x * weight.to(x.device)

    net = nn.Sequential(Scale(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).cuda()
    pipe = sp.Pipeline(net, ["cuda:0", "cuda:0"], chunks=4, balance=[2, 2])
    weight = torch.rand(64)
    big = torch.randn(4096, 4096, device="cuda")
    for _ in range(8):
        big = torch.tanh(big @ big / 64)
    x = big[:32, :64].contiguous()
    out = pipe(x, sp.NoChunk(weight))
    torch.testing.assert_close(out, net((x, weight.cuda())))


@needs_cuda
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_training_loop_on_one_gpu_matches_the_micro_batched_model(schedule):
    # optimizer.step() writes parameters on the caller's stream; every step's stages must
    # read them after that, and the caller must read the gradients after the stages.
    net = model(3).cuda()
    baseline = __import__("copy").deepcopy(net)
    pipe = sp.Pipeline(net, ["cuda:0", "cuda:0"], chunks=4, balance=[3, 2], schedule=schedule)
    opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(baseline.parameters(), lr=0.1)
    loss_fn = nn.functional.cross_entropy
    for step in range(5):
        torch.manual_seed(step)
        x = torch.randn(32, 64, device="cuda")
        y = torch.randint(0, 10, (32,), device="cuda")
        pipe.train_step(x, y, loss_fn)
        opt.step()
        opt.zero_grad()
        for part, part_y in zip(x.chunk(4), y.chunk(4)):
            (loss_fn(baseline(part), part_y) * part.shape[0] / 32).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for p, q in zip(net.parameters(), baseline.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
