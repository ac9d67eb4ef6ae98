"""Skip connections a pipeline may cut: a U-Net through sequentialize's torch.fx split, and
the same U-Net written by hand with Stash / Pop, against the model computed in the same
test, cut at every position."""

import copy
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from pipeline_helpers import micro_batched
from torch import nn

import shardpipe as sp

CHUNKS = 3


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    # The convolutions are tiny: threads inside each op only contend with the stages' own
    # (on a loaded two-core machine, a step takes seconds instead of milliseconds).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class DoubleConv(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv2(F.relu(self.bn(self.conv1(x)))))


class TinyUNet(nn.Module):
    """Two levels down, a bottleneck, two levels up, each joined to its skip by torch.cat."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.down1 = DoubleConv(3, 4)
        self.pool1 = nn.MaxPool2d(2)
        self.down2 = DoubleConv(4, 8)
        self.pool2 = nn.MaxPool2d(2)
        self.bottom = DoubleConv(8, 8)
        self.drop = nn.Dropout(dropout)
        self.up2 = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.dec2 = DoubleConv(16, 8)
        self.up1 = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.dec1 = DoubleConv(8, 4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        d1 = self.down1(x)
        d2 = self.down2(self.pool1(d1))
        b = self.drop(self.bottom(self.pool2(d2)))
        u2 = self.dec2(torch.cat([self.up2(b), d2], 1))
        u1 = self.dec1(torch.cat([self.up1(u2), d1], 1))
        return self.head(u1)


def concat(x, skip):
    return torch.cat([x, skip], 1)


def stash_pop(model):
    """The U-Net's forward written as a SkipSequential of its own modules."""
    blocks = [
        ("down1", model.down1), ("stash_d1", sp.Stash("d1")), ("pool1", model.pool1),
        ("down2", model.down2), ("stash_d2", sp.Stash("d2")), ("pool2", model.pool2),
        ("bottom", model.bottom), ("drop", model.drop), ("up2", model.up2),
        ("pop_d2", sp.Pop("d2", merge=concat)), ("dec2", model.dec2), ("up1", model.up1),
        ("pop_d1", sp.Pop("d1", merge=concat)), ("dec1", model.dec1), ("head", model.head),
    ]  # fmt: skip
    return sp.SkipSequential(OrderedDict(blocks))


def unet_and_sequential(kind, dropout=0.0):
    torch.manual_seed(0)
    model = TinyUNet(dropout)
    if kind == "fx":
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every key kept: no warning
            return model, sp.sequentialize(model)
    return model, stash_pop(model)


def images(batch=6, seed=1):
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["fx", "stash"])
def test_unet_as_a_sequential_keeps_blocks_keys_and_values(kind):
    model, seq = unet_and_sequential(kind, dropout=0.3)
    names = [name for name, _ in seq.named_children()]
    # Every top-level module is a child of its own, under its own name.
    assert [n for n in names if n in dict(model.named_children())] == [
        n for n, _ in model.named_children()
    ]
    if kind == "fx":
        assert names == ["down1", "pool1", "down2", "pool2", "bottom", "drop", "up2", "cat",
                         "dec2", "up1", "cat_1", "dec1", "head"]
        assert seq.down1 is model.down1 and seq.head is model.head
    assert list(seq.state_dict()) == list(model.state_dict())
    assert [n for n, _ in seq.named_parameters()] == [n for n, _ in model.named_parameters()]
    seq.load_state_dict(model.state_dict())  # strict

    x = images()
    for mode in (True, False, True):  # dropout follows the mode it is in when run
        model.train(mode)
        seq.train(mode)
        outputs, grads = [], []
        for module in (model, seq):
            with torch.random.fork_rng():
                torch.manual_seed(3)
                out = module(x)
            outputs.append(out)
            if mode:
                out.square().mean().backward()
                grads.append([p.grad.clone() for p in model.parameters()])
                model.zero_grad(set_to_none=True)
        assert torch.equal(outputs[0], outputs[1]), mode
        if mode:
            assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_fx_blocks_take_and_return_what_crosses_their_boundaries():
    model, seq = unet_and_sequential("fx")
    value = images()
    crossing = []
    for block in seq:
        value = block(value)
        crossing.append(len(value) if isinstance(value, tuple) else 1)
    # main value first, then d1 (and d2) in the order they were made
    assert crossing == [1, 2, 2, 3, 3, 3, 3, 2, 2, 2, 1, 1, 1]
    d1 = seq.down1(images())
    main, skip = seq.pool1(d1)
    assert skip is d1 and main.shape == (6, 4, 4, 4)


def every_balance(n):
    """Every 2-stage balance of n blocks, and 3-stage ones that put the skips' sources, the
    bottleneck and their uses on different stages."""
    two = [[k, n - k] for k in range(1, n)]
    three = [[1, 1, n - 2], [1, n - 2, 1], [n - 2, 1, 1], [2, n // 2, n - 2 - n // 2],
             [n // 3, n // 3, n - 2 * (n // 3)], [3, 3, n - 6]]
    return two + three


def baseline(model, x, target):
    x = x.clone().requires_grad_()
    out = micro_batched(model, x, CHUNKS)
    loss = F.mse_loss(out, target)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.zero_grad(set_to_none=True)
    return out.detach(), loss.detach(), grads, x.grad, buffers


def assert_same_training(pipe, x, target, want, what):
    """Output, loss, gradients and buffers of ``pipe`` equal ``baseline``'s (computed on the
    CPU; ``pipe``'s values are compared where they are, moved to the CPU)."""
    out_want, loss_want, grads_want, x_grad_want, buffers_want = want
    target = target.to(pipe.devices[-1])
    pipe.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = pipe(x)
    torch.testing.assert_close(out.cpu(), out_want, msg=what)
    F.mse_loss(out, target).backward()
    assert_gradients(pipe, x, grads_want, x_grad_want, what)
    for name, buffer in pipe.named_buffers():  # batch-norm statistics moved once per batch
        torch.testing.assert_close(buffer.cpu(), buffers_want[name], msg=f"{what}: {name}")

    pipe.zero_grad(set_to_none=True)
    x.grad = None
    loss = pipe.train_step(x, target, F.mse_loss)
    torch.testing.assert_close(loss.cpu(), loss_want, msg=what)
    assert_gradients(pipe, x, grads_want, x_grad_want, f"{what} (train_step)")


def assert_gradients(pipe, x, grads_want, x_grad_want, what):
    for name, param in pipe.named_parameters():
        torch.testing.assert_close(param.grad.cpu(), grads_want[name], atol=1e-5, rtol=1e-4,
                                   msg=f"{what}: {name}")
    torch.testing.assert_close(x.grad, x_grad_want, atol=1e-6, rtol=1e-5, msg=what)


@pytest.mark.parametrize("checkpoint", ["never", "always"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("kind", ["fx", "stash"])
def test_pipeline_cut_anywhere_inside_the_skips(kind, schedule, checkpoint, make_pipeline):
    model, seq = unet_and_sequential(kind)
    pristine = copy.deepcopy((model, seq))  # copied together: the Sequential still shares
    x, target = images(), torch.randn(6, 2, 8, 8)
    want = baseline(model, x, target)
    for balance in every_balance(len(seq)):
        _, fresh = copy.deepcopy(pristine)
        pipe = make_pipeline(fresh, ["cpu"] * len(balance), chunks=CHUNKS, balance=balance,
                             schedule=schedule, checkpoint=checkpoint)
        assert list(pipe.state_dict()) == list(model.state_dict())
        assert_same_training(pipe, x, target, want, f"balance {balance}")
        pipe.close()


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["fx", "stash"])
def test_skipped_values_move_between_devices(kind, monkeypatch):
    # The skips leave the CPU stage for the GPU ones and their gradients come back.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model, seq = unet_and_sequential(kind)
    pristine = copy.deepcopy((model, seq))
    x, target = images(), torch.randn(6, 2, 8, 8)
    want = baseline(model, x, target)
    n = len(seq)
    for balance in ([2, n - 2], [1, n // 2, n - 1 - n // 2], [n - 2, 1, 1]):
        _, fresh = copy.deepcopy(pristine)
        devices = ["cpu", "cuda:0", "cuda:0"][: len(balance)]
        pipe = sp.Pipeline(fresh, devices, chunks=CHUNKS, balance=balance)
        assert_same_training(pipe, x, target, want, f"balance {balance}")
        pipe.close()


class SharedPool(TinyUNet):
    """One pooling layer for both levels, as U-Nets are often written."""

    def forward(self, x):
        d1 = self.down1(x)
        d2 = self.down2(self.pool1(d1))
        b = self.bottom(self.pool1(d2))
        u2 = self.dec2(torch.cat([self.up2(b), d2], 1))
        return self.head(self.dec1(torch.cat([self.up1(u2), d1], 1)))


def test_fx_module_without_state_used_twice_gets_a_child_per_use(make_pipeline):
    torch.manual_seed(0)
    model = SharedPool()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seq = sp.sequentialize(model)
    names = [name for name, _ in seq.named_children()]
    assert names[:5] == ["down1", "pool1", "down2", "pool1_2", "bottom"]
    assert list(seq.state_dict()) == list(model.state_dict())
    x, target = images(), torch.randn(6, 2, 8, 8)
    assert torch.equal(seq(x), model(x))
    pristine = copy.deepcopy((model, seq))
    want = baseline(model, x, target)
    for k in range(1, len(seq)):
        _, fresh = copy.deepcopy(pristine)
        pipe = make_pipeline(fresh, ["cpu", "cpu"], chunks=CHUNKS, balance=[k, len(seq) - k])
        assert_same_training(pipe, x, target, want, f"cut after {k}")
        pipe.close()


class SharedAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.Tanh()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.act(self.fc(self.act(x)))


def test_fx_module_without_state_used_twice_in_a_chain_is_not_one_child_twice():
    model = SharedAct()
    seq = sp.sequentialize(model)
    # Distinct children: a Sequential (and a pipeline) would drop a repeated one.
    assert [name for name, _ in seq.named_children()] == ["act", "fc", "act_2"]
    assert seq.act is not seq.act_2
    x = torch.randn(3, 4)
    assert torch.equal(seq(x), model(x))


class Carried(nn.Module):
    """``a``'s output reaches the loss only around ``mid`` (which multiplies it by zero)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.zero = Zero()
        self.mid = nn.Linear(4, 4)
        self.more = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        s = self.a(x)
        return self.head(self.more(self.mid(self.zero(s))) + s)


class Zero(nn.Module):
    def forward(self, x):
        return x * 0


@pytest.mark.parametrize("kind", ["fx", "stash"])
def test_gradient_of_a_value_carried_past_a_stage_comes_back_through_it(kind, make_pipeline):
    torch.manual_seed(5)
    model = Carried()
    if kind == "fx":
        seq = sp.sequentialize(model)
        assert [n for n, _ in seq.named_children()] == ["a", "zero", "mid", "more", "add",
                                                        "head"]
    else:
        seq = sp.SkipSequential(OrderedDict([
            ("a", model.a), ("stash", sp.Stash("s")), ("zero", model.zero), ("mid", model.mid),
            ("more", model.more), ("add", sp.Pop("s", merge=torch.add)), ("head", model.head),
        ]))  # fmt: skip
    x = torch.randn(6, 4)
    want = baseline(model, x, torch.zeros(6, 2))
    assert want[2]["a.weight"].abs().sum() > 0  # a's gradient comes around mid only
    # a on stage 0, mid on stage 1, the use of a's output on stage 2
    balance = [1, 3, 2] if kind == "fx" else [2, 3, 2]
    pipe = make_pipeline(seq, ["cpu"] * 3, chunks=CHUNKS, balance=balance)
    assert_same_training(pipe, x, torch.zeros(6, 2), want, kind)


class WithSize(nn.Module):
    """Carries a value that is not a tensor: the micro-batch's size."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        n = x.shape[0]
        return self.head(self.body(x.reshape(n, 2, 3).flatten(1)).reshape(n, -1))


def test_fx_carries_values_that_are_not_tensors(make_pipeline):
    torch.manual_seed(6)
    model = WithSize()
    seq = sp.sequentialize(model)
    x = torch.randn(7, 6)
    want = baseline(model, x, torch.zeros(7, 2))
    assert torch.equal(seq(x), model(x))
    for k in range(1, len(seq)):
        pipe = make_pipeline(seq, ["cpu", "cpu"], chunks=CHUNKS, balance=[k, len(seq) - k])
        assert_same_training(pipe, x, torch.zeros(7, 2), want, f"cut after {k}")
        pipe.close()


# --- Stash and Pop ---------------------------------------------------------------------------


def test_pop_without_merge_hands_both_values_on():
    seq = sp.SkipSequential(sp.Stash("x"), nn.Linear(3, 3), sp.Pop("x"))
    x = torch.randn(2, 3)
    out, skipped = seq(x)
    assert skipped is x and torch.equal(out, seq[1](x))


def test_a_name_may_be_stashed_again_once_popped(make_pipeline):
    torch.manual_seed(7)
    layers = []
    for _ in range(3):  # three residual blocks, one skip name
        layers += [sp.Stash("res"), nn.Linear(4, 4), nn.Tanh(), sp.Pop("res", merge=torch.add)]
    seq = sp.SkipSequential(*layers)
    x = torch.randn(6, 4)
    want = x
    for k in range(3):
        want = want + torch.tanh(layers[4 * k + 1](want))
    assert torch.equal(seq(x), want)
    pipe = make_pipeline(seq, ["cpu"] * 3, chunks=2, balance=[3, 5, 4])
    torch.testing.assert_close(pipe(x), want)


def test_merge_module_is_part_of_the_model(make_pipeline):
    class Fuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 4)

        def forward(self, x, skip):
            return self.proj(torch.cat([x, skip], 1))

    torch.manual_seed(8)
    seq = sp.SkipSequential(nn.Linear(4, 4), sp.Stash("s"), nn.Linear(4, 4),
                            sp.Pop("s", merge=Fuse()))
    assert "3.merge.proj.weight" in seq.state_dict()
    x = torch.randn(4, 4)
    want = seq(x)
    want.sum().backward()
    grad = seq[3].merge.proj.weight.grad.clone()
    seq.zero_grad()
    pipe = make_pipeline(seq, ["cpu", "cpu"], chunks=2, balance=[2, 2])
    out = pipe(x)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    torch.testing.assert_close(seq[3].merge.proj.weight.grad, grad)


def test_nested_opens_a_skip_sequential_child(make_pipeline):
    torch.manual_seed(9)
    inner = sp.SkipSequential(sp.Stash("s"), nn.Linear(4, 4), nn.ReLU(),
                              sp.Pop("s", merge=torch.add))
    model = nn.Sequential(nn.Linear(4, 4), inner, nn.Linear(4, 2))
    x = torch.randn(6, 4)
    pipe = make_pipeline(model, ["cpu", "cpu"], chunks=3, balance=[3, 3], nested=True)
    assert len(pipe.stages[0]) == 3  # the cut falls between the Stash and its Pop
    torch.testing.assert_close(pipe(x), model(x))
    assert list(pipe.state_dict()) == list(model.state_dict())


@pytest.mark.parametrize("make", [
    lambda *blocks: sp.SkipSequential(*blocks),
    lambda *blocks: sp.Pipeline(nn.Sequential(*blocks), ["cpu"]),
], ids=["SkipSequential", "Pipeline"])
def test_unpaired_stash_and_pop_are_refused_naming_the_blocks(make):
    lin = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"Pop\('a'\) \(block '1'\) has no Stash\('a'\) before"):
        make(lin, sp.Pop("a"))
    with pytest.raises(ValueError, match=r"Stash\('a'\) \(block '2'\) stashes 'a' again before "
                                         r"the Pop of the one block '0' stashed"):
        make(sp.Stash("a"), lin, sp.Stash("a"), sp.Pop("a"), sp.Pop("a"))
    with pytest.raises(ValueError, match=r"Stash\('b'\) \(block '2'\) is never popped"):
        make(sp.Stash("a"), lin, sp.Stash("b"), sp.Pop("a"))
    with pytest.raises(ValueError, match=r"Pop\('a'\) \(block '1'\) has no"):
        make(sp.Stash("b"), sp.Pop("a"), sp.Pop("b"))


def test_stash_and_pop_outside_a_skip_sequential_say_how_to_run_them():
    seq = nn.Sequential(sp.Stash("a"), nn.ReLU(), sp.Pop("a", merge=torch.add))
    with pytest.raises(RuntimeError, match=r"Stash\('a'\) runs only inside a "
                                           r"shardpipe.SkipSequential.*SkipSequential\(\.\.\.\)"):
        seq(torch.ones(1))
    assert torch.equal(sp.SkipSequential(*seq)(torch.ones(1)), torch.full((1,), 2.0))


def test_stash_and_pop_check_their_arguments():
    with pytest.raises(TypeError, match="name must be a str, got int"):
        sp.Stash(1)
    with pytest.raises(ValueError, match="name must not be empty"):
        sp.Pop("")
    with pytest.raises(TypeError, match="merge must be callable or None, got str"):
        sp.Pop("a", merge="cat")


@pytest.mark.parametrize("kind", ["fx", "stash"])
def test_balancing_helpers_carry_what_is_stashed(kind, make_pipeline):
    model, seq = unet_and_sequential(kind)
    model.eval()
    x = images()
    balance = sp.balance_by_size(seq, x[:2], 3)
    assert len(balance) == 3 and sum(balance) == len(seq)
    assert len(sp.balance_by_time(seq, x[:2], 3, repeats=1)) == 3
    pipe = make_pipeline(seq, ["cpu"] * 3, chunks=CHUNKS, balance=balance)
    torch.testing.assert_close(pipe(x), model(x))
