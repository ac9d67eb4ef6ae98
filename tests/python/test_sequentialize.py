"""sequentialize: the Sequential computes what the model computes and keeps its keys."""

import copy
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shardpipe

models = pytest.importorskip("torchvision.models")
from torchvision.models import convnext, efficientnet  # noqa: E402
from torchvision.models.resnet import Bottleneck, ResNet  # noqa: E402

# Smallest variants, random init (nothing is downloaded), 10 classes.
FAMILIES = {
    "resnet18": lambda: models.resnet18(num_classes=10),
    "resnext": lambda: ResNet(
        Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=8, num_classes=10
    ),
    "wide_resnet": lambda: ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=128, num_classes=10),
    "vgg11": lambda: models.vgg11(num_classes=10),
    "mobilenet_v2": lambda: models.mobilenet_v2(num_classes=10),
    "mobilenet_v3_small": lambda: models.mobilenet_v3_small(num_classes=10),
    "efficientnet_v1": lambda: efficientnet.EfficientNet(
        [
            efficientnet.MBConvConfig(1, 3, 1, 16, 16, 1),
            efficientnet.MBConvConfig(6, 5, 2, 16, 24, 2),
        ],
        dropout=0.2,
        stochastic_depth_prob=0.3,
        num_classes=10,
    ),
    "efficientnet_v2": lambda: efficientnet.EfficientNet(
        [
            efficientnet.FusedMBConvConfig(1, 3, 1, 16, 16, 1),
            efficientnet.FusedMBConvConfig(4, 3, 2, 16, 32, 2),
            efficientnet.MBConvConfig(4, 3, 2, 32, 48, 1),
        ],
        dropout=0.2,
        stochastic_depth_prob=0.3,
        num_classes=10,
        last_channel=128,
    ),
    "convnext": lambda: convnext.ConvNeXt(
        [convnext.CNBlockConfig(16, 32, 1), convnext.CNBlockConfig(32, None, 2)],
        stochastic_depth_prob=0.3,
        num_classes=10,
    ),
    "vit": lambda: models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        dropout=0.2,
        attention_dropout=0.2,
        num_classes=10,
    ),
}

# torchvision models that no rule knows: they go through torch.fx.
FX_MODELS = {
    "shufflenet_v2": lambda: models.shufflenet_v2_x0_5(num_classes=10),
    "squeezenet": lambda: models.squeezenet1_1(num_classes=10),
    "googlenet": lambda: models.googlenet(num_classes=10, aux_logits=False, init_weights=False),
}


def make(factory, seed=0):
    torch.manual_seed(seed)
    model = factory()
    if isinstance(model, models.VisionTransformer):
        # torchvision zero-initialises the head; random values make the comparison stronger.
        nn.init.normal_(model.heads.head.weight)
        nn.init.normal_(model.class_token)
    return model


def images(batch=2, size=32, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def check_same_keys(model, seq):
    assert list(seq.state_dict()) == list(model.state_dict())
    assert [n for n, _ in seq.named_parameters()] == [n for n, _ in model.named_parameters()]
    for key, value in model.state_dict().items():
        assert torch.equal(seq.state_dict()[key], value), key
    seq.load_state_dict(model.state_dict())  # strict


def check_shares_modules(model, seq):
    for name, child in seq.named_children():
        if isinstance(getattr(model, name, None), nn.Module) and type(child) is not type(seq):
            assert child is getattr(model, name) or isinstance(child, torch.fx.GraphModule)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_equal_and_same_keys(family):
    model = make(FAMILIES[family]).eval()
    seq = shardpipe.sequentialize(model)
    assert isinstance(seq, nn.Sequential) and len(seq) > 1
    check_same_keys(model, seq)
    check_shares_modules(model, seq)
    x = images()
    with torch.no_grad():
        assert torch.equal(seq(x), model(x))

    # Train mode: dropout / stochastic depth draw the same masks only if the same ops run
    # in the same order.
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(5)
        expected = model(x)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        actual = seq(x)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("family", ["resnet18", "vit"])
def test_family_gradients_equal(family):
    model = make(FAMILIES[family]).train()
    seq = shardpipe.sequentialize(model)
    x = images()

    def grads(module):
        model.zero_grad(set_to_none=True)
        with torch.random.fork_rng():
            torch.manual_seed(7)
            module(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    expected, actual = grads(model), grads(seq)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_resnet_children_in_forward_order():
    seq = shardpipe.sequentialize(make(FAMILIES["resnet18"]))
    names = [name for name, _ in seq.named_children()]
    assert names == [
        "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
        "avgpool", "flatten", "fc",
    ]  # fmt: skip


def test_vit_class_token_is_owned_by_the_sequential():
    model = make(FAMILIES["vit"])
    seq = shardpipe.sequentialize(model)
    assert seq.class_token is model.class_token
    assert seq.prepend_class_token.token is model.class_token
    assert seq.encoder is model.encoder
    assert "prepend_class_token.token" not in seq.state_dict()
    # Loading through the Sequential reaches the token the child uses.
    other = make(FAMILIES["vit"], seed=3)
    seq.load_state_dict(other.state_dict())
    assert torch.equal(model.class_token, other.class_token)
    # Converting keeps child and Sequential on one tensor.
    seq.to(torch.float64)
    assert seq.prepend_class_token.token is seq.class_token
    assert seq.class_token.dtype == torch.float64


def test_sequential_returned_as_is():
    seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert shardpipe.sequentialize(seq) is seq


def test_subclass_with_own_forward_goes_through_fx():
    class Shifted(ResNet):
        def forward(self, x):
            return super().forward(x) + 1

    torch.manual_seed(0)
    model = Shifted(Bottleneck, [1, 1, 1, 1], num_classes=4).eval()
    seq = shardpipe.sequentialize(model)
    x = images()
    with torch.no_grad():
        assert torch.equal(seq(x), model(x))
    check_same_keys(model, seq)


@pytest.mark.parametrize("name", sorted(FX_MODELS))
def test_torchvision_models_through_fx(name):
    model = make(FX_MODELS[name]).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # keys kept: no warning
        seq = shardpipe.sequentialize(model)
    assert len(seq) > 1
    check_same_keys(model, seq)
    x = images()
    with torch.no_grad():
        assert torch.equal(seq(x), model(x))


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("shift", torch.full((dim,), 0.1), persistent=False)

    def forward(self, x):
        return self.norm(F.gelu(self.fc(x)))


class Custom(nn.Module):
    """Functional glue, root-level parameter and buffers, a residual around a top-level
    module, a ModuleList loop, dropout and an optional argument."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
        self.register_buffer("scratch", torch.zeros(1), persistent=False)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1))
        self.res = Block(8 * 16)
        self.blocks = nn.ModuleList([Block(8 * 16) for _ in range(2)])
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8 * 16, 5)

    def forward(self, x, return_features=False):
        x = self.stem(x - self.mean)
        x = F.relu(x) * self.scale
        x = F.adaptive_avg_pool2d(x, 4).flatten(1)
        x = x + self.res(x) + self.res.shift
        for block in self.blocks:
            x = block(x)
        if return_features:
            return x
        return self.head(self.drop(x))


def test_fx_split_of_a_custom_model():
    torch.manual_seed(0)
    model = Custom()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seq = shardpipe.sequentialize(model)
    names = [name for name, _ in seq.named_children()]
    # Every top-level module keeps its name; the glue in between gets its own children.
    assert [n for n in names if hasattr(model, n)] == ["stem", "res", "blocks", "drop", "head"]
    assert len(names) > 6
    assert seq.stem is model.stem and seq.head is model.head
    assert seq.scale is model.scale and seq.mean is model.mean
    # Tracing and splitting leave the model as it was.
    assert not hasattr(model, "_tensor_constant0")
    assert model.res._non_persistent_buffers_set == {"shift"}
    check_same_keys(model, seq)

    x = images(size=8)
    model.eval()
    with torch.no_grad():
        assert torch.equal(seq(x), model(x))
    model.train()
    for module in (model, seq):
        with torch.random.fork_rng():
            torch.manual_seed(3)
            module(x).sum().backward()
        if module is model:
            expected = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, expected[name]), name

    # Deep copies are independent and keep the keys.
    clone = copy.deepcopy(seq)
    assert list(clone.state_dict()) == list(model.state_dict())
    assert clone.scale is not model.scale


class TwoAndHead(nn.Module):
    """Linears a and b and a head, for forwards that combine them in different ways."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)


def test_fx_modules_whose_results_meet_get_children_of_their_own():
    class Parallel(TwoAndHead):
        def forward(self, x):
            return self.head(self.a(x) + self.b(x))

    torch.manual_seed(0)
    model = Parallel()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seq = shardpipe.sequentialize(model)
    # x is carried past a, a's result past b: (a(x), x), then (b(x), a(x)).
    assert [name for name, _ in seq.named_children()] == ["a", "b", "add", "head"]
    check_same_keys(model, seq)
    x = torch.randn(3, 4)
    assert torch.equal(seq(x), model(x))
    assert [t.shape for t in seq.a(x)] == [(3, 4), (3, 4)]


def test_fx_modules_that_cannot_be_separated_share_a_child_with_a_warning():
    class Twice(TwoAndHead):
        """a runs before and after b: one child must hold both."""

        def forward(self, x):
            return self.head(self.a(self.b(self.a(x))))

    torch.manual_seed(0)
    model = Twice()
    with pytest.warns(UserWarning, match="prefix"):
        seq = shardpipe.sequentialize(model)
    assert [name for name, _ in seq.named_children()] == ["a_b", "head"]
    assert "a_b.a.weight" in seq.state_dict()
    x = torch.randn(3, 4)
    assert torch.equal(seq(x), model(x))


def test_fx_module_following_train_and_eval_is_not_traced_into():
    class Damped(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.rand(4))

        def forward(self, x):
            return x * self.scale if self.training else x * self.scale / 2

    class Around(nn.Module):
        """x skips a module whose traced forward would keep the mode of the trace."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.damped = Damped()
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            x = self.fc(x)
            return self.head(x + self.damped(x))

    torch.manual_seed(0)
    model = Around()
    with pytest.warns(UserWarning, match="prefix"):
        seq = shardpipe.sequentialize(model)
    assert "damped.damped.scale" in seq.state_dict()
    x = torch.randn(6, 4)
    for mode in (True, False, True):
        model.train(mode)
        seq.train(mode)
        assert torch.equal(seq(x), model(x)), mode


def test_data_dependent_control_flow_is_a_type_error():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else self.b(x)

    with pytest.raises(TypeError, match=r"Gate\.forward.*nn\.Sequential"):
        shardpipe.sequentialize(Gate())

    # A module traced into is named by its path.
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.wrap = nn.Module()
            self.wrap.gate = Gate()

        def forward(self, x):
            return self.wrap.gate(x)

    with pytest.raises(TypeError, match=r"wrap\.gate \(Gate\)"):
        shardpipe.sequentialize(Outer())

    # A top-level child is never traced into, so its control flow is fine.
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = Gate()

        def forward(self, x):
            return self.gate(x).relu()

    wrapper = Wrapper()
    seq = shardpipe.sequentialize(wrapper)
    assert seq.gate is wrapper.gate
    x = torch.randn(2, 4)
    assert torch.equal(seq(x), wrapper(x))


def test_forward_with_several_inputs_is_a_type_error():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x, y):
            return self.a(x) + y

    with pytest.raises(TypeError, match="several inputs"):
        shardpipe.sequentialize(Two())


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        shardpipe.sequentialize(lambda x: x)


def test_hand_written_split_is_accepted_as_is():
    # What the TypeError recommends.
    seq = nn.Sequential(OrderedDict([("a", nn.Linear(4, 4)), ("act", nn.ReLU())]))
    assert shardpipe.sequentialize(seq) is seq
