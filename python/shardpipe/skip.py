"""Skip connections in a hand-written ``nn.Sequential``: stash a value, pop it blocks later.

``Stash("name")`` keeps the value flowing past it and hands it on unchanged; a later
``Pop("name", merge)`` takes it back and merges it into the value flowing there. Every
block in between sees only the main value. :class:`SkipSequential` runs such a Sequential
as a plain module; :class:`~shardpipe.Pipeline` runs it over stages, and a stage boundary
may fall anywhere between a Stash and its Pop: what is stashed across the boundary travels
with the activations (tensors device to device, with their gradients).
"""

from typing import Any, NamedTuple

from torch import nn

from ._checks import check_instance

__all__ = ["Pop", "SkipSequential", "Stash"]

_OUTSIDE = ("{block} runs only inside a shardpipe.SkipSequential or a shardpipe.Pipeline, "
            "which carry what is stashed to its Pop; a plain nn.Sequential passes one value on. "
            "Build the model as SkipSequential(...)")


class _Carried(NamedTuple):
    """What crosses a stage boundary while values are stashed: the main value and the stash
    (name -> value, in stash order). A class of its own, so that a stage tells it from a
    tuple the model itself passes on; the pipeline carries it like any nested value."""

    value: Any
    stash: dict


class Stash(nn.Module):
    """Keep the value flowing past this block under ``name`` and hand it on unchanged.

    The value comes back at the ``Pop(name)`` further on (it may be any value, typically a
    tensor). Only inside a :class:`SkipSequential` or a :class:`~shardpipe.Pipeline`.

    Example::

        >>> model = SkipSequential(nn.Linear(4, 4), Stash("x"), nn.Tanh(),
        ...                        Pop("x", merge=lambda y, x: y + x))
        >>> model(torch.zeros(2, 4)).shape
        torch.Size([2, 4])
    """

    def __init__(self, name):
        super().__init__()
        self.name = _check_name(name)

    def forward(self, value, stash=None):
        if stash is None:
            raise RuntimeError(_OUTSIDE.format(block=self._label()))
        stash[self.name] = value
        return value

    def _label(self):
        return f"Stash({self.name!r})"

    def extra_repr(self):
        return repr(self.name)


class Pop(nn.Module):
    """Take back the value stashed under ``name`` and merge it into the value flowing here.

    Returns ``merge(value, stashed)``, or the tuple ``(value, stashed)`` for the next block
    when ``merge`` is None. A ``merge`` that is an ``nn.Module`` (a 1x1 convolution fusing
    the two) is registered as this block's child, so its parameters are the model's and
    move with its stage. Only inside a :class:`SkipSequential` or a
    :class:`~shardpipe.Pipeline`.

    Example::

        >>> concat = lambda x, skip: torch.cat([x, skip], dim=1)
        >>> model = SkipSequential(Stash("input"), nn.Linear(4, 2), Pop("input", merge=concat))
        >>> model(torch.zeros(3, 4)).shape
        torch.Size([3, 6])
    """

    def __init__(self, name, merge=None):
        super().__init__()
        self.name = _check_name(name)
        if merge is not None and not callable(merge):
            raise TypeError(f"merge must be callable or None, got {type(merge).__name__}")
        self.merge = merge

    def forward(self, value, stash=None):
        if stash is None:
            raise RuntimeError(_OUTSIDE.format(block=self._label()))
        if self.name not in stash:
            raise RuntimeError(f"{self._label()}: nothing is stashed under {self.name!r}; "
                               f"stashed: {sorted(stash)}")
        stashed = stash.pop(self.name)
        return (value, stashed) if self.merge is None else self.merge(value, stashed)

    def _label(self):
        return f"Pop({self.name!r})"

    def extra_repr(self):
        if self.merge is None or isinstance(self.merge, nn.Module):
            return repr(self.name)
        return f"{self.name!r}, merge={getattr(self.merge, '__name__', self.merge)}"


class SkipSequential(nn.Sequential):
    """An ``nn.Sequential`` whose :class:`Stash` and :class:`Pop` blocks make skip connections.

    Runs its children in order like ``nn.Sequential``, keeping what each ``Stash`` stashes
    until its ``Pop``, so it computes what the model written with the skip computes. Given
    to :class:`~shardpipe.Pipeline`, it may be cut anywhere, inside a skip too: each stage
    returns its main value together with what is still stashed, and the next stage takes
    both. ``balance`` counts the ``Stash`` and ``Pop`` blocks as children; with
    ``nested=True`` a ``SkipSequential`` child is opened like a plain ``nn.Sequential``.

    Raises:
        ValueError: at construction, when a ``Pop`` has no ``Stash`` of its name before it, a
            name is stashed again before its ``Pop``, or a stash is never popped; the message
            names the blocks. A name may be stashed again once popped (repeated residual
            blocks).

    Example::

        >>> concat = lambda x, skip: torch.cat([x, skip], dim=1)
        >>> unet = SkipSequential(
        ...     nn.Conv2d(3, 4, 3, padding=1), Stash("full"),       # 8x8, kept for later
        ...     nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),      # 4x4
        ...     nn.Upsample(scale_factor=2), Pop("full", merge=concat),
        ...     nn.Conv2d(8, 2, 1))
        >>> x = torch.randn(4, 3, 8, 8)
        >>> pipe = shardpipe.Pipeline(unet, ["cpu", "cpu"], chunks=2, balance=[3, 4])
        >>> torch.allclose(pipe(x), unet(x))    # the skip crosses the cut after MaxPool2d
        True
        >>> SkipSequential(Stash("a"), nn.ReLU())
        Traceback (most recent call last):
        ...
        ValueError: Stash('a') (block '0') is never popped: ...
    """

    def __init__(self, *args):
        super().__init__(*args)
        _check_stashes(self._modules.items())

    def forward(self, value):
        return _run(self, value)


class _Stage(SkipSequential):
    """A pipeline stage: some of the model's blocks, whose stashes may cross its boundaries
    (the pairing is checked over the whole model instead)."""

    def __init__(self, *args):
        nn.Sequential.__init__(self, *args)


def _run(blocks, value):
    """Run ``blocks`` in order, keeping stashed values until their Pop; what is still
    stashed at the end is returned beside the value."""
    stash = {}
    if type(value) is _Carried:
        value, stash = value.value, dict(value.stash)
    for block in blocks:
        value = block(value, stash) if isinstance(block, (Stash, Pop)) else block(value)
    return _Carried(value, stash) if stash else value


def _check_name(name):
    check_instance(name, "name", str, "a str")
    if not name:
        raise ValueError("name must not be empty")
    return name


def _check_stashes(blocks):
    """Raise ValueError unless every Stash among the (name, block) pairs is popped later by
    a Pop of its name, each name stashed at most once at a time."""
    pending = {}  # stashed name -> the block that stashed it
    for name, block in blocks:
        if isinstance(block, Stash):
            if block.name in pending:
                raise ValueError(f"{block._label()} (block {name!r}) stashes {block.name!r} "
                                 f"again before the Pop of the one block {pending[block.name]!r} "
                                 "stashed; give the skips different names")
            pending[block.name] = name
        elif isinstance(block, Pop):
            if pending.pop(block.name, None) is None:
                raise ValueError(f"{block._label()} (block {name!r}) has no "
                                 f"Stash({block.name!r}) before it")
    if pending:
        never = ", ".join(f"Stash({key!r}) (block {name!r})" for key, name in pending.items())
        raise ValueError(f"{never} {'is' if len(pending) == 1 else 'are'} never popped: add a "
                         "Pop of the name after it, or remove the Stash")
