"""Pipelines of real models: torchvision ResNet (nested cuts too) and ViT against their
micro-batched baselines, and stages that start with an in-place layer."""

import copy

import pytest
import torch
from pipeline_helpers import CHECKPOINTS, assert_grads_close, grads, micro_batched
from torch import nn

import shardpipe as sp


def test_resnet_train_mode_equals_micro_batched_baseline_and_eval_equals_model():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(12)
    model = torchvision.models.resnet18(num_classes=5)
    baseline = copy.deepcopy(model)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 5, (6,))

    nn.functional.cross_entropy(micro_batched(baseline, x, 3), y).backward()
    pipe = sp.Pipeline(sp.sequentialize(model), ["cpu", "cpu"], chunks=3)
    assert list(pipe.state_dict()) == list(baseline.state_dict())
    nn.functional.cross_entropy(pipe(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), baseline.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=name)
    for (name, a), b in zip(pipe.state_dict().items(), baseline.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)  # BN running stats

    pipe.eval()
    baseline.eval()
    with torch.no_grad():
        torch.testing.assert_close(pipe(x), baseline(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_nested_cuts_inside_a_sequential_child_and_keeps_the_keys(schedule):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(15)
    model = torchvision.models.resnet18(num_classes=5)
    baseline = copy.deepcopy(model)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 5, (6,))
    loss_fn = nn.functional.cross_entropy

    loss_fn(micro_batched(baseline, x, 3), y).backward()
    # 4 stem children + 2 blocks in each of layer1..layer4 + avgpool, flatten, fc: 15 blocks;
    # the stages meet between layer3.0 and layer3.1.
    pipe = sp.Pipeline(model, ["cpu", "cpu"], chunks=3, balance=[9, 6], schedule=schedule,
                       nested=True)
    assert "layer3.0\nstage 1 on cpu: layer3.1," in pipe.extra_repr()
    assert list(pipe.state_dict()) == list(baseline.state_dict())
    assert pipe.stages[0][-1] is model.layer3[0] and pipe.stages[1][0] is model.layer3[1]
    pipe.train_step(x, y, loss_fn)
    for (name, p), q in zip(model.named_parameters(), baseline.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=name)
    for (name, a), b in zip(pipe.state_dict().items(), baseline.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)

    with pytest.raises(ValueError, match="15 blocks"):
        sp.Pipeline(baseline, ["cpu", "cpu"], balance=[6, 5], nested=True)
    # Without nested the same model has 11 children, and the default balance counts blocks.
    assert sum(sp.Pipeline(baseline, ["cpu", "cpu"], nested=True).balance) == 15
    assert sum(sp.Pipeline(baseline, ["cpu", "cpu"]).balance) == 11


def test_nested_leaves_sequential_subclasses_whole():
    class Residual(nn.Sequential):
        def forward(self, x):
            return x + super().forward(x)

    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(4, 4), Residual(nn.Linear(4, 4), nn.ReLU()),
                          nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
    x = torch.randn(8, 4)
    pipe = sp.Pipeline(model, ["cpu", "cpu"], chunks=2, balance=[2, 2], nested=True)
    assert pipe.stages[0][1] is model[1]  # the subclass stays one block
    torch.testing.assert_close(pipe(x), model(x))


def test_vit_class_token_stays_in_the_state_dict():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(13)
    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2,
                                               num_heads=2, hidden_dim=16, mlp_dim=32,
                                               num_classes=3).eval()
    x = torch.randn(4, 3, 16, 16)
    want = vit(x)
    pipe = sp.Pipeline(sp.sequentialize(vit), ["cpu", "cpu"], chunks=2)
    assert list(pipe.state_dict()) == list(vit.state_dict())
    torch.testing.assert_close(pipe(x), want)
    pipe(x).sum().backward()
    assert vit.class_token.grad is not None


class DoubleInPlace(nn.Module):
    def forward(self, x):
        return x.mul_(2)


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_a_stage_may_start_with_an_in_place_layer(checkpoint):
    torch.manual_seed(14)
    # Doubling is not idempotent: a recomputation fed the modified input would be off.
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 8),
                          DoubleInPlace(), nn.Linear(8, 2))
    x = torch.randn(6, 8)
    model(x).sum().backward()
    want = grads(model)
    model.zero_grad()
    pipe = sp.Pipeline(model, ["cpu"] * 3, chunks=3, balance=[1, 2, 2], checkpoint=checkpoint)
    pipe(x).sum().backward()
    assert_grads_close(grads(model), want)
