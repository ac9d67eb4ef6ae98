"""The pipeline over torch.distributed ranks (``Pipeline(..., group=)``): gloo on 2 and 3
local ranks, against the plain model computed on every rank in the same check.

Every schedule and checkpoint mode, uneven and changing shapes, eval, tuples between ranks,
state dicts, the meta device, input errors on one rank, a raising stage at each kind of
position (the others raise within seconds, and the next step is right again), ranks that
disagree, and a rank killed mid-step. Every wait has a timeout (dist_harness.py).
"""

import copy
import os
import subprocess
import sys
import time

import dist_harness
import pytest
import torch
import torch.distributed as dist
from pipeline_helpers import Sleep
from torch import nn

WORLDS = [2, 3, 4]
SPAWN_TIMEOUT_S = 300
PIPE_TIMEOUT_S = 30  # what a pipeline waits for a peer; faults must surface well before
FAULT_DEADLINE_S = 5  # ... within this

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)


# --- helpers used inside the ranks ------------------------------------------------------


def group():
    return dist.group.WORLD


def mlp(blocks, width=6, seed=0, device=None):
    """``blocks`` Linear+Tanh pairs as one flat Sequential, the same on every rank."""
    torch.manual_seed(seed)
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width, device=device), nn.Tanh()]
    return nn.Sequential(*layers)


def same(*shape, seed=1, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def pipeline(model, **kwargs):
    import shardpipe

    kwargs.setdefault("timeout", PIPE_TIMEOUT_S)
    return shardpipe.Pipeline(model, group=group(), **kwargs)


def expect_same_gradients(pipe, baseline):
    """Every parameter this rank holds has the baseline's gradient (by the model's names)."""
    expected = dict(baseline.named_parameters())
    names = [name for name, _ in pipe.named_parameters()]
    assert names, "this rank holds no parameters"
    for name, param in pipe.named_parameters():
        torch.testing.assert_close(param.grad, expected[name].grad, msg=name)


def mse(out, y):
    return nn.functional.mse_loss(out, y)


def train_and_compare(pipe, baseline, x, y, steps=2):
    opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
    base_opt = torch.optim.SGD(baseline.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        base_opt.zero_grad()
        loss = pipe.train_step(x, y, mse)
        expected = mse(baseline(x), y)
        expected.backward()
        torch.testing.assert_close(loss, expected.detach())
        expect_same_gradients(pipe, baseline)
        opt.step()
        base_opt.step()


def step_from_zero_gradients_and_compare(pipe, baseline, x, y):
    """One step of both from no gradients: the same loss and gradients."""
    for p in list(pipe.parameters()) + list(baseline.parameters()):
        p.grad = None
    loss = pipe.train_step(x, y, mse)
    expected = mse(baseline(x), y)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    expect_same_gradients(pipe, baseline)


# --- checks (each runs on every rank) ---------------------------------------------------


def check_every_schedule_and_checkpoint_matches_the_plain_model(rank, world):
    x, y = same(12, 6), same(12, 6, seed=2)
    for schedule in ("gpipe", "1f1b", "interleaved", "zb1p", "zbv"):
        for checkpoint in ("never", "except_last", "always"):
            model = mlp(2 * world)
            baseline = copy.deepcopy(model)
            pipe = pipeline(model, chunks=4, schedule=schedule, checkpoint=checkpoint)
            stages = 2 * world if schedule in ("interleaved", "zbv") else world
            assert len(pipe.stage_ranks) == stages
            train_and_compare(pipe, baseline, x, y)
            pipe.close()


def check_uneven_batches_and_changing_shapes(rank, world):
    model = mlp(world)
    baseline = copy.deepcopy(model)
    pipe = pipeline(model, chunks=3, schedule="1f1b")
    # 7 rows in 3 micro-batches (3, 3, 1), then 2 rows (2 micro-batches), then a sequence
    # dimension whose length changes from step to step. Receivers guess each message's layout
    # from the last time it came: the repeats take the guessed path (packed, as these are
    # small), the changes the other (the header fills the packed receive).
    for x in (same(7, 6), same(7, 6, seed=6), same(2, 6, seed=3), same(5, 4, 6, seed=4),
              same(5, 9, 6, seed=5), same(5, 9, 6, seed=7), same(7, 6, seed=8)):
        y = torch.zeros_like(x)
        step_from_zero_gradients_and_compare(pipe, baseline, x, y)


class Strided(nn.Module):
    """x itself, as a view that is not contiguous (every other element of [x, x] interleaved)."""

    def forward(self, x):
        return torch.stack([x, x], dim=2)[:, :, 0]


def check_hand_offs_above_and_below_the_packing_size(rank, world):
    # Width 256, 2 micro-batches: 300 rows a micro-batch are 300 KiB a hand-off (as guessed: a
    # two-word prefix, then the tensor, apart), 32 rows 32 KiB (packed into one message with
    # the prefix). Each change of size is a wrong guess of the other kind: empty messages
    # answer the tensor receives, or the header fills the packed one. What crosses down is a
    # strided view, which each path must send as its values.
    torch.manual_seed(0)
    layers = []
    for _ in range(world):
        layers += [nn.Linear(256, 256), nn.Tanh(), Strided()]
    model = nn.Sequential(*layers)
    baseline = copy.deepcopy(model)
    pipe = pipeline(model, chunks=2, schedule="1f1b", balance=[3] * world)
    for seed, rows in enumerate((600, 600, 64, 64, 600, 600, 64)):
        x, y = same(rows, 256, seed=seed), same(rows, 256, seed=seed + 10)
        step_from_zero_gradients_and_compare(pipe, baseline, x, y)
    pipe.close()


def check_repeated_layouts_send_only_a_prefix_beside_the_tensors(rank, world):
    # The header (88 bytes for a 2-D tensor) goes only when a message's layout changes; a
    # repeat carries a 16-byte prefix. Beside the hand-offs the first stage's rank sends each
    # peer the batch before the phase, and every rank sends each peer its outcome after it (9
    # words a record when nothing failed).
    pipe = pipeline(mlp(world), chunks=4, schedule="1f1b")
    x, y = same(8, 6), same(8, 6, seed=2)
    first = pipe._engine.bytes_sent
    pipe.train_step(x, y, mse)
    second = pipe._engine.bytes_sent
    pipe.train_step(x, y, mse)
    third = pipe._engine.bytes_sent
    stage = pipe.stage_ranks.index(rank)
    messages = 4 * ((stage < world - 1) + (stage > 0))  # outputs down, gradients up
    tensor_bytes = messages * 2 * 6 * 4  # 2 rows of 6 floats a micro-batch
    records = (1 + (stage == 0)) * (world - 1) * 9 * 8
    assert third - second == tensor_bytes + 16 * messages + records
    assert second - first > third - second  # the first step's headers
    pipe.close()


class ToDouble(nn.Module):
    def forward(self, x):
        return x.double()


class ToFloat(nn.Module):
    def forward(self, x):
        return x.float()


def check_dtypes_change_between_stages(rank, world):
    # float32 then float64 across every rank boundary: [Linear, ToDouble | Linear64, ToFloat,
    # Linear, ToDouble | ... | Linear64, ToFloat].
    torch.manual_seed(0)
    layers = [nn.Linear(4, 4), ToDouble()]
    for _ in range(world - 2):
        layers += [nn.Linear(4, 4, dtype=torch.float64), ToFloat(), nn.Linear(4, 4), ToDouble()]
    layers += [nn.Linear(4, 4, dtype=torch.float64), ToFloat()]
    model = nn.Sequential(*layers)
    baseline = copy.deepcopy(model)
    pipe = pipeline(model, chunks=2, balance=[2] + [4] * (world - 2) + [2])
    train_and_compare(pipe, baseline, same(6, 4), same(6, 4, seed=2), steps=1)


def check_eval_forward_returns_on_the_last_rank(rank, world):
    model = mlp(world)
    baseline = copy.deepcopy(model)
    pipe = pipeline(model, chunks=3)
    x = same(5, 6)
    with torch.no_grad():
        out = pipe(x)
    if rank == pipe.stage_ranks[-1]:
        torch.testing.assert_close(out, baseline(x))
    else:
        assert out is None
    pipe.eval()
    for _ in range(2):  # eval mode runs without autograd; the second call goes as guessed
        out = pipe(x)
        assert (out is None) == (rank != pipe.stage_ranks[-1])
        if out is not None:
            torch.testing.assert_close(out, baseline(x))
    pipe.train()
    with pytest.raises(RuntimeError, match="train_step"):
        pipe(x)


class Pair(nn.Module):
    """Returns (x, a second tensor): a tuple that crosses to the next rank."""

    def forward(self, x):
        return x, x.sum(dim=1, keepdim=True)


class PairLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, pair):
        x, s = pair
        return self.linear(x), s


class Join(nn.Module):
    def forward(self, pair):
        x, s = pair
        return x * s


class AsDict(nn.Module):
    def forward(self, x):
        return {"x": x}


def train_a_model_that_passes_tuples(world, first, last, steps):
    """[Linear, first] on the first rank, a PairLinear on each middle one, [last, Linear] on
    the last: a 2-tuple crosses every rank boundary."""
    torch.manual_seed(0)
    layers = [nn.Linear(4, 4), first] + [PairLinear() for _ in range(world - 2)]
    layers += [last, nn.Linear(4, 4)]
    model = nn.Sequential(*layers)
    baseline = copy.deepcopy(model)
    pipe = pipeline(model, chunks=2, balance=[2] + [1] * (world - 2) + [2])
    train_and_compare(pipe, baseline, same(4, 4), same(4, 4, seed=2), steps=steps)
    pipe.close()


class ToSparse(nn.Module):
    def forward(self, x):
        return x.to_sparse()


def check_tuples_cross_and_nested_values_and_sparse_tensors_are_refused(rank, world):
    train_a_model_that_passes_tuples(world, Pair(), Join(), steps=1)

    expected = TypeError if rank == 0 else RuntimeError
    for refused, message in ((AsDict(), "flat tuple of Tensors"),
                             (ToSparse(), "is a Sparse tensor; only dense")):
        model = nn.Sequential(nn.Linear(4, 4), refused, *[nn.Identity() for _ in range(world - 1)])
        pipe = pipeline(model, chunks=2, balance=[2] + [1] * (world - 1))
        # Refused before anything was sent, so the ranks stay in step: the same again, not a
        # broken connection, on the next step.
        for _ in range(2):
            with pytest.raises(expected, match=f"{message}|rank 0 failed"):
                pipe.train_step(same(4, 4), same(4, 4), lambda out, y: out.sum())
        pipe.close()


class WithMask(nn.Module):
    """Returns (x, a mask that needs no gradient)."""

    def forward(self, x):
        return x, torch.ones(x.shape[0], 1)


class ScaleMaskInPlace(nn.Module):
    """Saves x for backward, then changes the mask in place: were the two tensors of one
    message views of one buffer, the mask's change would count as a change to x."""

    def forward(self, pair):
        x, mask = pair
        h = x * x
        mask.mul_(2)
        return h * mask


def check_a_received_tensor_changed_in_place_leaves_the_others_alone(rank, world):
    # From the second step on, the tuple goes packed into one message.
    train_a_model_that_passes_tuples(world, WithMask(), ScaleMaskInPlace(), steps=3)


def check_state_dicts(rank, world):
    import shardpipe

    model = mlp(world)
    full = copy.deepcopy(model.state_dict())
    pipe = pipeline(model)
    mine = pipe.state_dict()
    assert mine and set(mine) < set(full) or world == 1
    for key, value in mine.items():
        assert torch.equal(value, full[key])
    gathered = pipe.full_state_dict()
    assert list(gathered) == list(full)
    for key in full:
        assert torch.equal(gathered[key], full[key])
    # A full state dict from elsewhere (another seed) loads rank by rank...
    other = mlp(world, seed=7).state_dict()
    pipe.load_state_dict(other)
    for key, value in pipe.full_state_dict().items():
        assert torch.equal(value, other[key])
    # ... and what the ranks saved loads into the plain model and a one-process pipeline.
    plain = mlp(world, seed=3)
    plain.load_state_dict(pipe.full_state_dict())
    local = shardpipe.Pipeline(mlp(world, seed=4), ["cpu", "cpu"])
    local.load_state_dict(pipe.full_state_dict())
    x = same(3, 6)
    with torch.no_grad():
        out = pipe(x)
        if out is not None:
            torch.testing.assert_close(out, plain(x))
            torch.testing.assert_close(out, local(x))
    with pytest.raises(RuntimeError, match="unexpected keys"):
        pipe.load_state_dict(dict(other, extra=torch.zeros(1)))
    with pytest.raises(TypeError, match="cannot be copied or pickled"):
        copy.deepcopy(pipe)


def check_state_dicts_across_world_sizes(rank, world):
    # Saved by a pipeline over every rank, loaded by one over the first two ranks (a
    # sub-group), and back.
    import shardpipe

    full = pipeline(mlp(2 * world)).full_state_dict()
    pair = dist.new_group([0, 1])
    if rank > 1:
        return
    two = shardpipe.Pipeline(mlp(2 * world, seed=9), group=pair, timeout=PIPE_TIMEOUT_S)
    assert len(two.stage_ranks) == 2
    two.load_state_dict(full)
    again = two.full_state_dict()
    assert list(again) == list(full)
    assert all(torch.equal(again[k], full[k]) for k in full)
    plain = mlp(2 * world, seed=3)
    plain.load_state_dict(full)
    x = same(3, 6)
    with torch.no_grad():
        out = two(x)
    if rank == 1:
        torch.testing.assert_close(out, plain(x))


def check_bad_arguments_are_refused_on_every_rank(rank, world):
    import shardpipe

    with pytest.raises(ValueError, match="devices: with group= give this rank's one device"):
        pipeline(mlp(world), devices=["cpu", "cpu"])
    with pytest.raises(ValueError, match="balance"):
        pipeline(mlp(world), balance=[1] * (2 * world))  # more stages than ranks
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        shardpipe.Pipeline(mlp(world), group="WORLD")
    with pytest.raises(ValueError, match="timeout must be at least"):
        pipeline(mlp(world), timeout=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available"):
            pipeline(mlp(world), devices=["cuda:0"])
    # Hand-offs go through the group's CPU backend: a group with none is refused up front.
    cuda_only = dist.new_group(list(range(world)), backend="cuda:gloo")
    with pytest.raises(ValueError, match="group: its backend .cuda:gloo. has no CPU side"):
        shardpipe.Pipeline(mlp(world), group=cuda_only, devices=["cpu"])


def check_meta_device_materialises_only_this_ranks_stage(rank, world):
    with torch.device("meta"):
        model = mlp(2 * world, width=8)
    pipe = pipeline(model)
    own = [p for p in pipe.parameters()]
    assert all(p.device.type == "cpu" for p in own)
    # A rank holds its stage's share of the parameters: 2 of the 2 * world Linear layers.
    assert sum(p.numel() for p in own) == 2 * (8 * 8 + 8)
    # Initialised as reset_parameters does: within nn.Linear's bound, not all equal.
    weights = [p for name, p in pipe.named_parameters() if name.endswith("weight")]
    assert all(w.abs().max() <= 8 ** -0.5 and w.std() > 0 for w in weights)
    reference = mlp(2 * world, width=8, seed=5)
    pipe.load_state_dict(reference.state_dict())
    train_and_compare(pipe, reference, same(4, 8), same(4, 8, seed=2), steps=1)


def check_ranks_that_disagree_are_refused(rank, world):
    with pytest.raises(ValueError, match=r"chunks: rank 0 2, rank 1 3"):
        pipeline(mlp(world), chunks=2 + rank % 2)
    with pytest.raises(ValueError, match="model's structure"):
        pipeline(mlp(world, width=6 + (rank == world - 1)))


def check_bad_input_on_one_rank_makes_every_rank_raise(rank, world):
    model = mlp(world)
    baseline = copy.deepcopy(model)
    pipe = pipeline(model, chunks=2)
    last = pipe.stage_ranks[-1]
    x, y = same(4, 6), same(4, 6, seed=2)
    # The input is read on rank 0 only, the target on the last stage's rank only.
    bad_x = "not a tensor" if rank == 0 else x
    start = time.monotonic()
    with pytest.raises(TypeError if rank == 0 else RuntimeError, match="Tensor|rank 0 failed"):
        pipe.train_step(bad_x, y, mse)
    bad_y = same(3, 6) if rank == last else y
    with pytest.raises(ValueError if rank == last else RuntimeError,
                       match=f"batch size 4|rank {last} failed"):
        pipe.train_step(x, bad_y, mse)
    # Refused in Python on the last stage's rank, after the batch went out: that rank fails
    # the phase, with the TypeError itself.
    with pytest.raises(TypeError if rank == last else RuntimeError,
                       match=f"target must be|rank {last} failed outside any stage: TypeError"):
        pipe.train_step(x, "not a tensor" if rank == last else y, mse)
    assert time.monotonic() - start < FAULT_DEADLINE_S
    train_and_compare(pipe, baseline, x, y, steps=1)


class Fault(nn.Module):
    """Raises ValueError when armed, in the forward or the backward of one micro-batch."""

    def __init__(self):
        super().__init__()
        self.where = None  # ("forward" | "backward", micro-batch index)
        self.calls = 0

    def forward(self, x):
        index = self.calls
        self.calls += 1
        if self.where == ("forward", index):
            raise ValueError(f"injected forward fault, micro-batch {index}")
        if self.where is not None and self.where[0] == "backward" and self.where[1] == index:
            return _RaiseInBackward.apply(x, index)
        return x


class _RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index):
        ctx.index = index
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise ValueError(f"injected backward fault, micro-batch {ctx.index}")


def check_a_raising_stage_makes_every_rank_raise_and_the_next_step_is_right(rank, world):
    chunks = 3
    x, y = same(6, 6), same(6, 6, seed=2)
    for schedule in ("gpipe", "1f1b", "zb1p"):
        torch.manual_seed(0)
        layers = []
        for _ in range(world):
            layers += [nn.Linear(6, 6), Fault()]
        model = nn.Sequential(*layers)
        baseline = copy.deepcopy(model)
        pipe = pipeline(model, chunks=chunks, schedule=schedule)
        fault = [m for m in pipe.modules() if isinstance(m, Fault)][0]
        for bad_rank in range(world):
            for where in (("forward", 0), ("forward", chunks - 1), ("backward", 1),
                          ("backward", chunks - 1)):
                fault.calls = 0
                fault.where = where if rank == bad_rank else None
                start = time.monotonic()
                expected = ValueError if rank == bad_rank else RuntimeError
                place = f"rank {bad_rank}, stage {bad_rank}, micro-batch {where[1]}" \
                    if rank == bad_rank else \
                    f"rank {bad_rank} failed in stage {bad_rank}, micro-batch {where[1]}"
                with pytest.raises(expected, match=place):
                    pipe.train_step(x, y, mse)
                assert time.monotonic() - start < FAULT_DEADLINE_S, (schedule, bad_rank, where)
        fault.where = None
        for p in list(pipe.parameters()) + list(baseline.parameters()):
            p.grad = None
        train_and_compare(pipe, baseline, x, y, steps=1)
        pipe.close()


def check_a_raising_loss_makes_every_rank_raise(rank, world):
    pipe = pipeline(mlp(world), chunks=2)
    last = pipe.stage_ranks[-1]

    def loss(out, y):
        raise KeyError("no such target")

    with pytest.raises(KeyError if rank == last else RuntimeError,
                       match="no such target"):
        pipe.train_step(same(4, 6), same(4, 6), loss)


def check_a_phase_longer_than_the_timeout_trains_while_messages_flow(rank, world):
    # Under GPipe the first stage's rank posts its first gradient receive at the start of
    # the phase and gets it only after every forward: about 9 x 0.15 s, longer than the
    # timeout. The timeout bounds silence, not the phase, so this step must succeed.
    torch.manual_seed(0)
    layers = []
    for _ in range(world):
        layers += [nn.Linear(6, 6), Sleep(0.15)]
    model = nn.Sequential(*layers)
    baseline = copy.deepcopy(model)
    pipe = pipeline(model, chunks=8, schedule="gpipe", timeout=1.0)
    x, y = same(16, 6), same(16, 6, seed=2)
    start = time.monotonic()
    loss = pipe.train_step(x, y, mse)
    assert time.monotonic() - start > 1.0  # the phase did outlast the timeout
    expected = mse(baseline(x), y)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    expect_same_gradients(pipe, baseline)
    pipe.close()


CHECKS = [name for name in list(globals()) if name.startswith("check_")]


results = dist_harness.checks_fixture(__name__, CHECKS, WORLDS, SPAWN_TIMEOUT_S)


@pytest.mark.parametrize("check", CHECKS)
def test_check(results, check):
    dist_harness.assert_passed(results, check)


# --- a rank that dies ---------------------------------------------------------------------


def _killed_rank(rank, world, port, out_dir):
    dist_harness.init_loopback(rank, world, port)
    import shardpipe

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), dist_harness.KillRank1(),
                          nn.Linear(4, 4))
    pipe = shardpipe.Pipeline(model, group=group(), chunks=2, balance=[2, 2], timeout=5)
    dist_harness.record_outcome(out_dir, rank, lambda: pipe.train_step(same(4, 4), same(4, 4),
                                                                        mse))


def test_a_killed_rank_makes_the_survivor_raise_within_the_timeout(tmp_path):
    codes = dist_harness.spawn(_killed_rank, 2, (2, dist_harness.free_port(), str(tmp_path)), 90)
    dist_harness.assert_survivor_raised(tmp_path, codes, "rank 1")


# --- torchrun -------------------------------------------------------------------------------

RAISING_SCRIPT = """
import torch, torch.distributed as dist
from torch import nn
import shardpipe

class Boom(nn.Module):
    def forward(self, x):
        if dist.get_rank() == 1:
            raise ValueError("boom on rank 1")
        return x

dist.init_process_group("gloo")
model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), Boom())
pipe = shardpipe.Pipeline(model, group=dist.group.WORLD, chunks=2, balance=[1, 2], timeout=30)
pipe.train_step(torch.randn(4, 4), torch.randn(4, 4), nn.functional.mse_loss)
"""


def test_a_raising_rank_makes_torchrun_exit_non_zero(tmp_path):
    script = tmp_path / "raising.py"
    script.write_text(RAISING_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(dist_harness.REPO / "python"), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(script)]
    start = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "ValueError: boom on rank 1" in output, output
    assert time.monotonic() - start < 60, output




def test_example_runs_under_torchrun():
    env = dict(os.environ, PYTHONPATH=str(dist_harness.REPO / "python"), OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(dist_harness.REPO / "examples" / "pipeline_ranks.py"), "--steps", "3",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: loss and gradients equal the plain model's" in done.stdout
