"""Turn a model into an ``nn.Sequential`` of its own blocks, keeping its ``state_dict`` keys.

A pipeline cuts an ``nn.Sequential`` between children. ``sequentialize`` produces one from
a model whose forward is a chain: torchvision's chain-of-blocks families by rule, anything
else by cutting a ``torch.fx`` trace of its forward, carrying skipped values through the
blocks in between (in ``_fx_split``). This module holds the public function, the family
rules and the glue modules they use; ``_assemble`` builds the ``Sequential`` for both.

The children are the model's own modules (shared, not copied), named as in the model, so
``state_dict()`` keys stay the same. Glue that the model's forward does functionally
(``torch.flatten``, ViT's reshape/permute and class token) becomes parameter-free modules.
Parameters the model registers on itself (ViT's ``class_token``) are registered on the
returned ``Sequential`` under the same name; the child that uses them holds them too, so
they follow that child to its device, but leaves them out of its own ``state_dict``.
"""

import torch
from torch import nn

from ._assemble import _assemble, _hide_from_state_dict
from ._blocks import _plain_sequential
from ._checks import check_instance
from ._fx_split import _split_with_fx

__all__ = ["sequentialize"]


class ToTokens(nn.Module):
    """Reshape a grid of patch embeddings ``(N, C, H, W)`` into tokens ``(N, H * W, C)``.

    ViT's ``_process_input`` after its ``conv_proj``, as a module.

    Example::

        >>> ToTokens()(torch.zeros(2, 32, 4, 4)).shape
        torch.Size([2, 16, 32])
    """

    def forward(self, x):
        n, c, h, w = x.shape
        return x.reshape(n, c, h * w).permute(0, 2, 1)


class PrependClassToken(nn.Module):
    """Prepend a learned token to a sequence ``(N, L, C)`` → ``(N, L + 1, C)``.

    The token is the model's own ``class_token`` parameter. The ``Sequential`` made by
    ``sequentialize`` owns it in its ``state_dict`` (key ``class_token``, as in the model),
    so this module leaves it out of its own.

    Example::

        >>> token = nn.Parameter(torch.zeros(1, 1, 8))
        >>> PrependClassToken(token)(torch.ones(2, 5, 8)).shape
        torch.Size([2, 6, 8])
    """

    def __init__(self, token):
        super().__init__()
        self.token = token
        _hide_from_state_dict(self, ["token"])

    def forward(self, x):
        return torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1)


class SelectClassToken(nn.Module):
    """Take the first token of a sequence: ``(N, L, C)`` → ``(N, C)``.

    Example::

        >>> SelectClassToken()(torch.arange(12.0).reshape(1, 3, 4))
        tensor([[0., 1., 2., 3.]])
    """

    def forward(self, x):
        return x[:, 0]


def sequentialize(model):
    """Return ``model`` as an ``nn.Sequential`` whose children keep the model's names.

    The ``Sequential``'s forward runs the same operations in the same order as
    ``model.forward`` (so it equals it bit for bit, also in train mode under the same RNG
    seed), and its ``state_dict()`` has the model's keys. The children are the model's own
    modules, not copies: parameters are shared.

    - An ``nn.Sequential`` is returned as is.
    - torchvision ResNet (ResNeXt, Wide ResNet), VGG, MobileNet v2/v3, EfficientNet v1/v2,
      ConvNeXt and VisionTransformer: their top-level blocks in forward order, with
      ``flatten`` (and ViT's token handling) as parameter-free children.
    - Any other model: its forward is traced with ``torch.fx`` (top-level children, and the
      elements of top-level ``ModuleList``/``ModuleDict``, are not traced into) and cut
      between any two operations. Values that skip blocks (a U-Net's skip connections, a
      residual's input) are carried through the blocks in between: where several values
      are alive, a child returns them as one tuple (the value made last first, then the
      others in the order they were made) and the next child takes that tuple, so a
      pipeline may cut anywhere inside a skip. A top-level module is never split across
      children, so that its keys keep their prefix; glue inside its span (an add of one of
      its buffers) joins its child, whose forward is then traced into, as is the forward
      of a module with state that values skip around (its child hands them on; a module
      without state is held as it is, and each of its uses, a U-Net's one pooling layer,
      gets a child: it has no keys). Modules that cannot get a child of their own (one
      with state called again after another module; one with state that would be traced
      into but is called with several arguments, cannot be traced, or branches on
      ``self.training``, which a trace would fix) share one, and their keys get its name
      as a prefix; a warning says so. Python-level branches of the model's forward, e.g.
      on ``self.training``, are fixed as they are when ``sequentialize`` is called.

    Granularity follows the model's top-level attributes: a ``features`` block stays one
    child (its keys ``features.0...`` need the name ``features``).

    Parameters and buffers that the model registers on itself (ViT's ``class_token``) are
    registered on the ``Sequential`` under the same name, which keeps their keys; the child
    that uses them holds them as well (so they move with it) but leaves them out of its own
    ``state_dict``. Whoever splits the ``Sequential`` into stages must keep
    ``named_parameters(recurse=False)`` / ``named_buffers(recurse=False)`` of it.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or its forward cannot be cut into a
            chain (it cannot be traced, e.g. control flow on tensor values, or it takes
            several inputs). The message names the module whose forward stopped the trace;
            the remedy is to write the ``nn.Sequential`` by hand.

    Example::

        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> seq = shardpipe.sequentialize(model)
        >>> list(seq.named_children())[-3:]  # doctest: +ELLIPSIS
        [('avgpool', ...), ('flatten', Flatten(...)), ('fc', Linear(...))]
        >>> x = torch.rand(2, 3, 32, 32)
        >>> torch.equal(seq(x), model(x)), seq.state_dict().keys() == model.state_dict().keys()
        (True, True)
    """
    check_instance(model, "model", nn.Module, "a torch.nn.Module")
    if _plain_sequential(model):
        return model
    family = _torchvision_family(model)
    if family is not None:
        children, root_tensors = family(model)
        return _assemble(model, children, root_tensors)
    return _split_with_fx(model)


# --- torchvision families -------------------------------------------------------------------


def _children(model, *names):
    return [(name, getattr(model, name)) for name in names]


def _resnet(model):
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    children = _children(model, *names, "avgpool")
    return children + [("flatten", nn.Flatten(1)), ("fc", model.fc)], {}


def _vgg(model):
    children = _children(model, "features", "avgpool")
    return children + [("flatten", nn.Flatten(1)), ("classifier", model.classifier)], {}


def _mobilenet_v2(model):
    # Its forward pools with F.adaptive_avg_pool2d(x, (1, 1)): the same op as a module.
    children = [("features", model.features), ("avgpool", nn.AdaptiveAvgPool2d((1, 1)))]
    return children + [("flatten", nn.Flatten(1)), ("classifier", model.classifier)], {}


def _pooled_classifier(model):
    # MobileNet v3 and EfficientNet: features, avgpool, flatten, classifier.
    children = _children(model, "features", "avgpool")
    return children + [("flatten", nn.Flatten(1)), ("classifier", model.classifier)], {}


def _convnext(model):
    # Its classifier starts with LayerNorm2d and Flatten already.
    return _children(model, "features", "avgpool", "classifier"), {}


def _vision_transformer(model):
    children = [
        ("conv_proj", model.conv_proj),
        ("to_tokens", ToTokens()),
        ("prepend_class_token", PrependClassToken(model.class_token)),
        # The encoder adds its pos_embedding itself: reusing it keeps encoder.pos_embedding.
        ("encoder", model.encoder),
        ("select_class_token", SelectClassToken()),
        ("heads", model.heads),
    ]
    return children, {"class_token": model.class_token}


def _torchvision_family(model):
    """The builder for ``model``'s torchvision family, if its forward is torchvision's own."""
    try:
        from torchvision import models
    except ImportError:  # torchvision is optional
        return None
    rules = [
        (models.ResNet, ("forward", "_forward_impl"), _resnet),
        (models.VGG, ("forward",), _vgg),
        (models.MobileNetV2, ("forward", "_forward_impl"), _mobilenet_v2),
        (models.MobileNetV3, ("forward", "_forward_impl"), _pooled_classifier),
        (models.EfficientNet, ("forward", "_forward_impl"), _pooled_classifier),
        (models.ConvNeXt, ("forward", "_forward_impl"), _convnext),
        (models.VisionTransformer, ("forward", "_process_input"), _vision_transformer),
    ]
    for cls, methods, builder in rules:
        # A subclass that overrides the forward (e.g. a quantizable variant) is not the chain
        # the rule knows; it goes through torch.fx instead.
        if isinstance(model, cls) and all(
            getattr(type(model), m) is getattr(cls, m) for m in methods
        ):
            return builder
    return None
