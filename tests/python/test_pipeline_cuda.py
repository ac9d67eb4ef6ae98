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
