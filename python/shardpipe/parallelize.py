"""parallelize: swap the nn.Linear layers of an existing model for tensor-parallel ones."""

import fnmatch

from torch import nn

from ._checks import check_number
from .sharded_linear import ColumnParallelLinear, RowParallelLinear

__all__ = ["parallelize"]

# Plan styles: the layer class and its keyword for the activation between the two layers.
_STYLES = {
    "column": (ColumnParallelLinear, "gather_output"),
    "row": (RowParallelLinear, "input_is_parallel"),
}


def _parse_style(pattern, style):
    """(class, flag value) of one plan entry."""
    if isinstance(style, str):
        if style not in _STYLES:
            raise ValueError(
                f"plan[{pattern!r}] must be 'column' or 'row' (or a dict with 'style'), "
                f"got {style!r}"
            )
        cls, flag = _STYLES[style]
        # The Megatron pairing: column keeps its output sharded, row takes it sharded.
        return cls, {flag: style == "row"}
    if isinstance(style, dict):
        options = dict(style)
        kind = options.pop("style", None)
        if kind not in _STYLES:
            raise ValueError(f"plan[{pattern!r}]['style'] must be 'column' or 'row', got {kind!r}")
        cls, flag = _STYLES[kind]
        unknown = set(options) - {flag, "chunks"}
        if unknown:
            raise ValueError(
                f"plan[{pattern!r}] has unknown keys {sorted(unknown)}; a {kind!r} entry "
                f"takes only 'style', {flag!r} and 'chunks'"
            )
        value = options.get(flag, kind == "row")
        if not isinstance(value, bool):
            raise TypeError(f"plan[{pattern!r}][{flag!r}] must be a bool, got {value!r}")
        return cls, {flag: value, "chunks": options.get("chunks", 1)}
    raise TypeError(
        f"plan[{pattern!r}] must be 'column', 'row' or a dict, got {type(style).__name__}"
    )


def parallelize(model, plan, *, devices=None, group=None, timeout=None):
    """Replace the ``nn.Linear`` submodules of ``model`` named in ``plan``, in place.

    ``plan`` maps name patterns (``fnmatch`` over qualified names such as
    ``"blocks.0.fc1"``; ``*`` also matches dots) to a style:

    - ``"column"``: ``ColumnParallelLinear(gather_output=False)``, output left sharded;
    - ``"row"``: ``RowParallelLinear(input_is_parallel=True)``, takes a sharded input;
    - a dict such as ``{"style": "column", "gather_output": True}`` to choose the flag, and
      optionally ``"chunks"`` (see ``RowParallelLinear``).

    So ``{"*.fc1": "column", "*.fc2": "row"}`` makes every MLP ``fc2(act(fc1(x)))``
    tensor-parallel with one reduction per forward (the activation between them must be
    element-wise). The values are copied from the existing layers (over a process group, the
    first rank's), and ``model.state_dict()`` keeps its keys and full-size values. Every
    pattern must match at least one submodule, and every match must be an ``nn.Linear``
    itself (a subclass such as attention's ``out_proj`` may be read through ``.weight`` by
    its owner), registered once and sharing no parameter with another module (a tied
    weight would come untied); anything else is refused before the model is changed.

    Args:
        model: the ``nn.Module`` to change.
        plan: ``{pattern: style}`` as above.
        devices / group: where the shards go, as for ``ColumnParallelLinear`` (neither: the
            default process group if initialised, else each layer's own device).
        timeout: over a process group, the seconds a collective waits for its peers before
            every rank raises naming the rank at fault (see ``ColumnParallelLinear``).

    Apply it to the model before wrapping it in a :class:`Pipeline` (with a mesh:
    ``group=mesh["tp"].get_group()``); a pipeline, or a module one runs, is refused with
    ``TypeError``.

    Returns:
        ``model`` itself.

    Example::

        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(),
        ...                           torch.nn.Linear(32, 8))
        >>> x = torch.randn(4, 8); expected = mlp(x)
        >>> _ = shardpipe.parallelize(mlp, {"0": "column", "2": "row"}, devices=["cpu", "cpu"])
        >>> torch.allclose(mlp(x), expected, atol=1e-6)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    from .pipeline import in_pipeline

    if in_pipeline(model):
        raise TypeError("model: parallelize the model before building the Pipeline from it "
                        "(sp.parallelize(model, plan, group=mesh['tp'].get_group()), then "
                        "sp.Pipeline(model, mesh=mesh)); the stages of a built pipeline keep "
                        "running the layers parallelize would replace")
    if timeout is not None:
        check_number(timeout, "timeout", minimum=1e-3)
    if not isinstance(plan, dict):
        raise TypeError(f"plan must be a dict of name pattern -> style, got {type(plan).__name__}")
    names = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    # Parameters by identity, with every name they go by (tied weights have several).
    param_names = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        param_names.setdefault(id(param), []).append(pname)
    chosen = {}
    for pattern, style in plan.items():
        if not isinstance(pattern, str):
            raise TypeError(f"plan keys must be str patterns, got {pattern!r}")
        cls, options = _parse_style(pattern, style)
        matches = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            raise ValueError(f"plan pattern {pattern!r} matches no submodule of the model")
        for name in matches:
            if name in chosen:
                raise ValueError(
                    f"submodule {name!r} matches both {chosen[name][0]!r} and {pattern!r}"
                )
            module = model.get_submodule(name)
            # A subclass may be read through .weight by its owner (MultiheadAttention's
            # out_proj), which a sharded layer does not have.
            if type(module) is not nn.Linear:
                raise TypeError(
                    f"plan pattern {pattern!r} matches {name!r}, a {type(module).__name__}; "
                    "only nn.Linear layers (not subclasses) can be parallelized"
                )
            aliases = [n for n, m in model.named_modules(remove_duplicate=False) if m is module]
            if len(aliases) > 1:
                raise ValueError(f"submodule {name!r} is also registered as {aliases}; a "
                                 "module used in several places cannot be parallelized")
            for param in module.parameters():
                tied = [n for n in param_names[id(param)] if not n.startswith(name + ".")]
                if tied:
                    raise ValueError(f"{name!r} shares a parameter with {tied}: tied weights "
                                     "cannot be parallelized (the tie would be lost)")
            chosen[name] = (pattern, cls, options)
    # In model order, so that every rank of a group builds the layers in the same order.
    for name in names:
        if name not in chosen:
            continue
        _, cls, options = chosen[name]
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        setattr(parent, child, cls.from_linear(linear, devices=devices, group=group,
                                                timeout=timeout, **options))
    return model
