"""Long runs: resident memory and thread count stay flat after warm-up, and the last step's
gradients still equal the baseline's."""

import gc
import json
import os
import pathlib
import sys

import pytest
import torch
from stress_settings import LONG
from torch import nn

import shardpipe as sp

STEPS = 20_000 if LONG else 2_000
RANK_STEPS = 20_000 if LONG else 1_000  # over two ranks each step costs a few hand-offs more


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def threads():
    return len(os.listdir("/proc/self/task"))


def small(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 4))


def run_flat(step, steps, warmup=200):
    """Runs ``step`` ``steps`` times; returns (rss growth in bytes, thread growth) after the
    warm-up."""
    for _ in range(warmup):
        step()
    gc.collect()
    rss, count = rss_bytes(), threads()
    for _ in range(steps - warmup):
        step()
    gc.collect()
    return rss_bytes() - rss, threads() - count


@pytest.mark.parametrize("threads_mode", ["workers", "caller"])
def test_a_pipeline_trains_long_with_flat_memory_and_threads(threads_mode):
    net = small()
    pipe = sp.Pipeline(net, ["cpu", "cpu"], chunks=4, balance=[3, 2], schedule="1f1b",
                       checkpoint="except_last")
    pipe._engine.threads = threads_mode
    optimizer = torch.optim.SGD(pipe.parameters(), lr=1e-3)
    x, y = torch.randn(16, 16), torch.randn(16, 4)

    def step():
        optimizer.zero_grad()
        pipe.train_step(x, y, nn.functional.mse_loss)
        optimizer.step()

    grown, new_threads = run_flat(step, STEPS)
    assert new_threads == 0
    assert grown < 8 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB"
    # The last step's gradients equal the plain model's at the same parameters.
    reference = small()
    reference.load_state_dict(net.state_dict())
    optimizer.zero_grad()
    pipe.train_step(x, y, nn.functional.mse_loss)
    for part, target in zip(x.chunk(4), y.chunk(4)):
        (nn.functional.mse_loss(reference(part), target) / 4).backward()
    for got, want in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-4)


def test_a_tensor_parallel_mlp_trains_long_with_flat_memory_and_threads():
    torch.manual_seed(0)
    col = sp.ColumnParallelLinear(16, 32, gather_output=False, devices=["cpu", "cpu"])
    row = sp.RowParallelLinear(32, 16, input_is_parallel=True, devices=["cpu", "cpu"])
    params = list(col.parameters()) + list(row.parameters())
    optimizer = torch.optim.SGD(params, lr=1e-3)
    x, y = torch.randn(8, 16), torch.randn(8, 16)

    def step():
        optimizer.zero_grad()
        nn.functional.mse_loss(row(torch.tanh(col(x))), y).backward()
        optimizer.step()

    grown, new_threads = run_flat(step, STEPS)
    assert new_threads == 0
    assert grown < 8 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB"
    reference = nn.Sequential(col.to_linear(), nn.Tanh(), row.to_linear())
    optimizer.zero_grad()
    nn.functional.mse_loss(row(torch.tanh(col(x))), y).backward()
    nn.functional.mse_loss(reference(x), y).backward()
    torch.testing.assert_close(col.state_dict()["weight"], reference[0].weight.detach())
    grads = torch.cat([p.grad for p in col.weight_shards])
    torch.testing.assert_close(grads, reference[0].weight.grad, atol=1e-5, rtol=1e-4)


def _two_ranks(rank, world, port, out_dir):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python"))
    import dist_harness
    import torch.distributed as dist

    dist_harness.init_loopback(rank, world, port)
    net = small()
    pipe = sp.Pipeline(net, group=dist.group.WORLD, chunks=4, schedule="1f1b", timeout=60)
    optimizer = torch.optim.SGD(pipe.parameters(), lr=1e-3)
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.randn(16, 4, generator=torch.Generator().manual_seed(2))

    def step():
        optimizer.zero_grad()
        pipe.train_step(x, y, nn.functional.mse_loss)
        optimizer.step()

    grown, new_threads = run_flat(step, RANK_STEPS)
    # The last step's gradients equal the plain model's at the same parameters.
    reference = small()
    reference.load_state_dict(pipe.full_state_dict())
    optimizer.zero_grad()
    pipe.train_step(x, y, nn.functional.mse_loss)
    nn.functional.mse_loss(reference(x), y).backward()
    want = dict(reference.named_parameters())
    worst = max((p.grad - want[n].grad).abs().max().item() for n, p in pipe.named_parameters())
    pathlib.Path(out_dir, f"rank{rank}.json").write_text(
        json.dumps(dict(grown=grown, threads=new_threads, worst=worst)))
    pipe.close()
    dist.destroy_process_group()


def test_a_pipeline_over_two_ranks_trains_long_with_flat_memory_and_threads(tmp_path):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python"))
    import dist_harness

    codes = dist_harness.spawn(_two_ranks, 2, (2, dist_harness.free_port(), str(tmp_path)),
                               600 if not LONG else 7200)
    assert codes == [0, 0], codes
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["threads"] == 0, (rank, result)
        assert result["grown"] < 8 * 2**20, (rank, result)
        assert result["worst"] < 1e-5, (rank, result)
