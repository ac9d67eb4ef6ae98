"""The pipeline over ranks with CUDA stages: 2 gloo ranks on loopback, each with its stage on
a GPU (``cuda:<rank>`` where there are two, both on ``cuda:0`` where there is one), against
the plain model on the same GPU in the same check. The hand-offs go through host memory (the
group's gloo backend), so one GPU suffices. Skipped without CUDA; ``benchmarks/gpu_check.sh``
runs them (``pytest -m cuda``).
"""

import copy
import os

import dist_harness
import pytest
import torch
import torch.distributed as dist
from test_pipeline_dist import PIPE_TIMEOUT_S, SPAWN_TIMEOUT_S, ScaleMaskInPlace, Strided, mse
from torch import nn

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="needs torch.distributed gloo"),
]

WORLDS = [2]


def device_of(rank):
    return torch.device("cuda", rank % torch.cuda.device_count())


def on_gpu(rank, *shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device_of(rank))


def cuda_pipeline(model, rank, **kwargs):
    import shardpipe

    kwargs.setdefault("timeout", PIPE_TIMEOUT_S)
    kwargs.setdefault("devices", [device_of(rank)])
    return shardpipe.Pipeline(model, group=dist.group.WORLD, **kwargs)


def steps_match(pipe, baseline, rank, batches):
    """Per batch, one step of both from no gradients: the same loss, on this rank's GPU, and
    the same gradient for every parameter this rank holds; then an SGD step of both."""
    device = device_of(rank)
    expected_params = dict(baseline.named_parameters())
    opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
    base_opt = torch.optim.SGD(baseline.parameters(), lr=0.1)
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        base_opt.zero_grad(set_to_none=True)
        loss = pipe.train_step(x, y, mse)
        expected = mse(baseline(x), y)
        expected.backward()
        assert loss.device == device, loss.device
        torch.testing.assert_close(loss, expected.detach())
        names = [name for name, _ in pipe.named_parameters()]
        assert names, "this rank holds no parameters"
        for name, param in pipe.named_parameters():
            assert param.device == device, (name, param.device)
            torch.testing.assert_close(param.grad, expected_params[name].grad, msg=name)
        opt.step()
        base_opt.step()


def mlp_on(rank, blocks, width=6):
    torch.manual_seed(0)
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.Tanh()]
    model = nn.Sequential(*layers)  # built on the CPU: the pipeline moves this rank's stage
    return model, copy.deepcopy(model).to(device_of(rank))


# --- checks (each runs on every rank) ---------------------------------------------------


def check_every_schedule_and_checkpoint_matches_the_plain_model_on_the_gpu(rank, world):
    x, y = on_gpu(rank, 12, 6), on_gpu(rank, 12, 6, seed=2)
    for schedule in ("gpipe", "1f1b", "interleaved", "zb1p"):
        for checkpoint in ("never", "always"):
            model, baseline = mlp_on(rank, 2 * world)
            pipe = cuda_pipeline(model, rank, chunks=4, schedule=schedule, checkpoint=checkpoint)
            steps_match(pipe, baseline, rank, [(x, y), (x, y)])
            pipe.close()


def check_hand_offs_above_and_below_the_packing_size_on_the_gpu(rank, world):
    # 300 KiB hand-offs (the prefix, then the tensor) and 32 KiB ones (packed with it), strided
    # views, in turn: each change of size is a wrong guess.
    torch.manual_seed(0)
    layers = []
    for _ in range(world):
        layers += [nn.Linear(256, 256), nn.Tanh(), Strided()]
    model = nn.Sequential(*layers)
    baseline = copy.deepcopy(model).to(device_of(rank))
    pipe = cuda_pipeline(model, rank, chunks=2, schedule="1f1b", balance=[3] * world)
    batches = [(on_gpu(rank, rows, 256, seed=s), on_gpu(rank, rows, 256, seed=s + 10))
               for s, rows in enumerate((600, 600, 64, 64, 600))]
    steps_match(pipe, baseline, rank, batches)
    pipe.close()


class WithMaskHere(nn.Module):
    """Returns (x, a mask on x's device that needs no gradient)."""

    def forward(self, x):
        return x, torch.ones(x.shape[0], 1, device=x.device)


def check_a_tuple_with_a_mask_crosses_on_the_gpu(rank, world):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), WithMaskHere(), ScaleMaskInPlace(), nn.Linear(4, 4))
    baseline = copy.deepcopy(model).to(device_of(rank))
    pipe = cuda_pipeline(model, rank, chunks=2, balance=[2, 2])
    x, y = on_gpu(rank, 4, 4), on_gpu(rank, 4, 4, seed=2)
    steps_match(pipe, baseline, rank, [(x, y)] * 3)  # from the second step on, packed
    pipe.close()


def check_eval_forward_returns_on_the_last_ranks_gpu(rank, world):
    model, baseline = mlp_on(rank, world)
    pipe = cuda_pipeline(model, rank, chunks=3)
    x = on_gpu(rank, 5, 6)
    with torch.no_grad():
        for _ in range(2):  # the second call goes as guessed
            out = pipe(x)
            if rank == pipe.stage_ranks[-1]:
                assert out.device == device_of(rank)
                torch.testing.assert_close(out, baseline(x))
            else:
                assert out is None
    pipe.close()


def check_the_default_device_is_cuda_local_rank(rank, world):
    os.environ["LOCAL_RANK"] = str(device_of(rank).index)
    model, baseline = mlp_on(rank, world)
    pipe = cuda_pipeline(model, rank, chunks=2, devices=None)
    assert pipe.devices == [device_of(rank)]
    full = pipe.full_state_dict()
    assert all(v.device.type == "cpu" for v in full.values())
    for key, value in baseline.state_dict().items():
        torch.testing.assert_close(full[key], value.cpu(), msg=key)
    pipe.close()


CHECKS = [name for name in list(globals()) if name.startswith("check_")]


results = dist_harness.checks_fixture(__name__, CHECKS, WORLDS, SPAWN_TIMEOUT_S)


@pytest.mark.parametrize("check", CHECKS)
def test_check(results, check):
    dist_harness.assert_passed(results, check)
