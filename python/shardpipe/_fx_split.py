"""The ``torch.fx`` fallback of ``sequentialize``: cut a traced forward into a chain.

The model's forward is traced with its top-level children (and the elements of top-level
``ModuleList``/``ModuleDict``) as leaves, and may be cut between any two operations: the
values alive across a cut (a skip connection's source beside the main value) flow from
child to child as one tuple, the value made last first and the others in the order they
were made, so every block takes and returns what crosses its boundaries. A top-level
module is never split across children, so that its keys keep their prefix; each group of
operations becomes a child: the model's own module when the group is just a call of it on
the one value alive, else a ``GraphModule`` running the group over the model's own
parameters and buffers (holding a module without state itself, inlining the forward of one
with state). Where the keys cannot stay the model's (modules that must share a child, keys
the forward never uses), a warning says so.
"""

import collections
import inspect
import itertools
import operator
import warnings

import torch
from torch import fx, nn

from ._assemble import _assemble, _hide_from_state_dict

__all__ = []


class _ChainTracer(fx.Tracer):
    """Traces only the root's forward: its children (and ModuleList/ModuleDict elements) are
    leaves, so each stays one call whose module keeps its name. Remembers which module's
    forward is being traced, to say where a trace failed."""

    def __init__(self, root):
        super().__init__()
        self._leaves = set()
        for name, child in root.named_children():
            self._add_leaves(name, child)
        self.tracing = []

    def _add_leaves(self, path, module):
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            for name, child in module.named_children():
                self._add_leaves(f"{path}.{name}", child)
        else:
            self._leaves.add(path)

    def is_leaf_module(self, m, module_qualified_name):
        return module_qualified_name in self._leaves or super().is_leaf_module(
            m, module_qualified_name
        )

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        if self.is_leaf_module(m, path):
            return super().call_module(m, forward, args, kwargs)
        self.tracing.append(path)
        result = super().call_module(m, forward, args, kwargs)
        self.tracing.pop()  # left in place on error: the innermost forward is the culprit
        return result


_HOW_TO_SPLIT_BY_HAND = (
    "Split it by hand: build nn.Sequential(OrderedDict([(name, block), ...])) from its "
    "blocks in forward order, using the model's attribute names so that state_dict keys "
    "stay the same, and write functional glue (torch.flatten, reshapes, residual adds) as "
    "small nn.Modules; pass that Sequential instead."
)


def _cannot_split(model, why):
    return TypeError(
        f"sequentialize cannot split {type(model).__name__} into a chain: {why}. "
        + _HOW_TO_SPLIT_BY_HAND
    )


def _trace(model):
    """The fx graph of ``model.forward`` with exactly one input placeholder."""
    signature = inspect.signature(type(model).forward)
    params = list(signature.parameters.values())[1:]  # drop self
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not params or params[0].kind not in positional:
        raise _cannot_split(model, "its forward takes no positional input")
    extra = params[1:]
    required = [
        p.name
        for p in extra
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    if required:
        raise _cannot_split(
            model,
            f"its forward needs several inputs ({params[0].name}, {', '.join(required)})"
            ", and a Sequential passes one value from child to child",
        )
    # Optional arguments are fixed at their defaults.
    concrete = {p.name: p.default for p in extra if p.default is not inspect.Parameter.empty}
    tracer = _ChainTracer(model)
    before = set(vars(model))
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as err:
        _forget(model, set(vars(model)) - before)
        if tracer.tracing:
            path = tracer.tracing[-1]
            where = f"the forward of {path} ({type(model.get_submodule(path)).__name__})"
        else:
            where = f"{type(model).__name__}.forward"
        raise _cannot_split(
            model, f"torch.fx could not trace {where} ({type(err).__name__}: {err})"
        ) from err
    # Tensor constants met while tracing were set on the model: the caller removes them
    # once the partitions hold them.
    created = set(vars(model)) - before
    try:
        _drop_specialized_inputs(model, graph)
    except TypeError:
        _forget(model, created)
        raise
    return graph, created


def _forget(module, attrs):
    for attr in attrs:
        delattr(module, attr)


# Nodes that only check an argument fixed by concrete_args.
_CHECKS = (torch._assert, fx._symbolic_trace._assert_is_none, operator.eq)


def _drop_specialized_inputs(model, graph):
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for placeholder in placeholders[1:]:
        checks, frontier = [], list(placeholder.users)
        while frontier:
            node = frontier.pop()
            if node.op != "call_function" or node.target not in _CHECKS:
                raise _cannot_split(
                    model, f"its argument {placeholder.target!r} is used by {node.format_node()}"
                )
            checks.append(node)
            frontier.extend(node.users)
        for node in reversed(list(graph.nodes)):
            if node in checks:
                graph.erase_node(node)
        graph.erase_node(placeholder)


def _first_name(target):
    return target.split(".", 1)[0]


def _split_with_fx(model):
    graph, created = _trace(model)
    nodes = list(graph.nodes)
    source, output = nodes[0], nodes[-1]  # the input placeholder and the output
    ops = [n for n in nodes if n.op in ("call_module", "call_function", "call_method")]
    if not ops:
        return nn.Sequential()

    # A value is alive across the boundary after ops[i] when it is made at or before i and
    # used after it. A cut may fall wherever something is alive: the values alive there flow
    # on as one tuple, each block taking and returning what crosses its boundaries.
    position = {node: i for i, node in enumerate(ops)}
    position[source] = -1
    alive = [[] for _ in ops]
    for value in [source, *ops]:  # in the order they are made
        last = max(
            (len(ops) if user is output else position[user] for user in value.users), default=-1
        )
        for i in range(max(position[value], 0), last):
            alive[i].append(value)
    cuts = [i for i in range(len(ops) - 1) if alive[i]]

    # Keys keep their prefix only if everything under a top-level name lives in one child:
    # drop the cuts inside the span of each name. A module without state has no keys, so
    # each of its uses (a U-Net's one pooling layer) may go to a child of its own.
    stateless = {name for name, child in model.named_children() if _stateless(child)}
    spans, calls = {}, collections.Counter()
    for i, node in enumerate(ops):
        # Inputs made by call_module nodes are values, not references to a module.
        attrs = [used for used in node.all_input_nodes if used.op == "get_attr"]
        for used in [node, *attrs]:
            if used.op in ("call_module", "get_attr"):
                name = _first_name(used.target)
                calls[name] += used.op == "call_module"
                if name in stateless:
                    continue
                lo, hi = spans.get(name, (i, i))
                spans[name] = (min(lo, i), max(hi, i))
    cuts = [c for c in cuts if not any(lo <= c < hi for lo, hi in spans.values())]
    reused = {name for name in stateless if calls[name] > 1}

    bounds = [-1, *cuts, len(ops) - 1]
    groups = [ops[bounds[k] + 1 : bounds[k + 1] + 1] for k in range(len(bounds) - 1)]
    # The main value (the one made last) first, then the carried ones in the order they
    # were made: a fixed order that both sides of a boundary agree on.
    inputs = [[source]] + [[alive[c][-1], *alive[c][:-1]] for c in cuts]
    outputs = [_returned(values) for values in inputs[1:]] + [output.args[0]]

    root_state = dict(model.named_parameters(recurse=False))
    root_state.update(model.named_buffers(recurse=False))
    root_tensors = {}
    built = []
    try:
        for group, value_in, value_out in zip(groups, inputs, outputs):
            built.append(_build_child(model, group, value_in, value_out, root_state, created,
                                      reused))
            root_tensors.update(built[-1][3])
    finally:
        _forget(model, created)

    # Children whose name carries the model's keys keep it; the others are named around them.
    taken = set(root_tensors) | {name for name, _, kind, _ in built if kind == "model"}
    children, renamed = [], []
    for name, module, kind, _ in built:
        if kind != "model":
            name = _unique(name, taken)
            taken.add(name)
        if kind == "merged":
            renamed.append(name)
        children.append((name, module))
    seq = _assemble(model, children, root_tensors)
    _warn_about_keys(model, seq, renamed)
    return seq


def _returned(values):
    """What a block returns for the values alive after it: one bare, several as a tuple."""
    return values[0] if len(values) == 1 else tuple(values)


def _unique(name, taken):
    # Not a name nn.Sequential already has (fx names nodes after methods: "float", "to").
    candidate, k = name, 1
    while candidate in taken or hasattr(nn.Sequential, candidate):
        k += 1
        candidate = f"{name}_{k}"
    return candidate


def _build_child(model, group, values_in, value_out, root_state, created, reused):
    """``(name, module, kind, root_tensors)`` for one group of fx nodes, which takes
    ``values_in`` (one bare, several as a tuple) and returns ``value_out``. Modules in
    ``reused`` (without state, called in several places) get a child per use.

    kind: "model" (the name is a top-level name of the model and the module carries exactly
    its keys), "glue" (no state of the model; the name is free) or "merged" (top-level
    modules that could not be given their own child; their keys get its name as a prefix).
    ``root_tensors``: the model's root-level parameters and buffers the group reads.
    """
    attrs = []  # get_attr nodes the group reads, in order
    for node in group:
        for used in node.all_input_nodes:
            if used.op == "get_attr" and used not in attrs:
                attrs.append(used)
    owners = []
    for node in [*group, *attrs]:
        if node.op in ("call_module", "get_attr") and _first_name(node.target) not in owners:
            owners.append(_first_name(node.target))
    modules = [o for o in owners if isinstance(getattr(model, o, None), nn.Module)]
    root_tensors = {o: root_state[o] for o in owners if o in root_state}

    single = group[0]
    if (
        len(group) == 1
        and single.op == "call_module"
        and "." not in single.target
        and single.target not in reused
        and len(values_in) == 1
        and single.args == (values_in[0],)
        and not single.kwargs
        and single is value_out
    ):
        return single.target, getattr(model, single.target), "model", root_tensors

    foreign = set(root_tensors) | set(created)
    if len(modules) == 1:
        # A module without state has no keys to keep: the child holds it and its own forward
        # runs (Dropout keeps following train/eval). One with state is inlined, so that the
        # child holds its state directly.
        base = None if _stateless(getattr(model, modules[0])) else modules[0]
        module = _graph_module(model, group, attrs, values_in, value_out, base, foreign)
        if module is not None:
            kind = "glue" if modules[0] in reused else "model"  # "glue": named around others
            return modules[0], module, kind, root_tensors
    module = _graph_module(model, group, attrs, values_in, value_out, None, foreign)
    if modules:
        return "_".join(modules), module, "merged", root_tensors
    return _glue_name(group), module, "glue", root_tensors


def _stateless(module):
    return next(itertools.chain(module.parameters(), module.buffers()), None) is None


def _glue_name(group):
    if len(group) == 1:
        return group[0].name
    return f"{group[0].name}_to_{group[-1].name}"


def _graph_module(model, group, attrs, values_in, value_out, base, foreign):
    """A GraphModule running ``group`` of ``model``'s graph on ``values_in``.

    With ``base`` (a top-level module name) it holds ``model.<base>``'s state directly, so
    its keys are that module's keys; a call of ``<base>`` itself is inlined from a trace of
    it. Returns None when that cannot be done. Tensors in ``foreign`` (root-level state the
    Sequential owns, fx constants) are left out of its state_dict.
    """
    prefix = f"{base}." if base else ""
    graph = fx.Graph()
    if len(values_in) == 1:
        env = {values_in[0]: graph.placeholder(values_in[0].name)}
    else:
        values = graph.placeholder("values")
        env = {
            node: graph.create_node("call_function", operator.getitem, (values, k), name=node.name)
            for k, node in enumerate(values_in)
        }
    objects = {}  # target in the new graph -> the object it names

    def retarget(target):
        return target[len(prefix) :] if prefix and target.startswith(prefix) else target

    for node in attrs:
        env[node] = graph.get_attr(retarget(node.target))
        objects[env[node].target] = _resolve(model, node.target)
    base_module = getattr(model, base) if base else None
    for node in group:
        if base and node.op == "call_module" and node.target == base:
            inlined = _inline(graph, base_module, node, env, objects)
            if inlined is None:
                return None
            env[node] = inlined
            continue
        env[node] = graph.node_copy(node, env.__getitem__)
        if node.op == "call_module":
            env[node].target = retarget(node.target)
            objects[env[node].target] = (model.get_submodule(node.target), True)
    graph.output(fx.node.map_arg(value_out, env.__getitem__))

    if base:
        own = set(base_module._modules) | set(base_module._parameters) | set(base_module._buffers)
        if any(_first_name(t) in own for t in objects if _first_name(t) in foreign):
            return None  # a root-level name clashes with one of the base module's
    holder = nn.Module()
    for target, resolved in objects.items():
        _install(holder, target, resolved)
    module = fx.GraphModule(holder, graph, class_name=f"{type(model).__name__}Part")
    if base:
        # The base module's own state, so that unused parts keep their keys too.
        for name, child in base_module.named_children():
            setattr(module, name, child)
        for name, param in base_module._parameters.items():
            module.register_parameter(name, param)
        for name, buf in base_module._buffers.items():
            persistent = name not in base_module._non_persistent_buffers_set
            module.register_buffer(name, buf, persistent=persistent)
        expected = set(base_module.state_dict())
        hidden = [k for k in module.state_dict() if k not in expected]
    else:
        hidden = [k for k in module.state_dict() if _first_name(k) in foreign]
    _hide_from_state_dict(module, hidden)
    return module


def _inline(graph, base_module, call, env, objects):
    """Copy a trace of ``base_module``'s forward into ``graph`` in place of ``call``."""
    if len(call.args) != 1 or call.kwargs:
        return None
    try:
        if _follows_mode(base_module):
            return None
        sub, created = _trace(base_module)
    except TypeError:
        return None
    try:
        placeholder = next(n for n in sub.nodes if n.op == "placeholder")
        result = graph.graph_copy(sub, {placeholder: env[call.args[0]]})
        for node in sub.nodes:
            if node.op in ("call_module", "get_attr"):
                obj = _resolve(base_module, node.target)
                if objects.setdefault(node.target, obj)[0] is not obj[0]:
                    return None  # e.g. its fx constants clash with the model's
        return result
    finally:
        _forget(base_module, created)


def _follows_mode(module):
    """Whether a trace of ``module``'s forward depends on its training flag: a trace fixes
    the branch taken, so such a module is not inlined."""
    modes = {m: m.training for m in module.modules()}
    codes = []
    try:
        for mode in (True, False):
            module.train(mode)
            graph, created = _trace(module)
            _forget(module, created)
            codes.append(graph.python_code("self").src)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return codes[0] != codes[1]


def _resolve(model, target):
    """``(object, persistent)`` for an attribute path; persistent matters for buffers."""
    path, _, name = target.rpartition(".")
    owner = model.get_submodule(path)
    return getattr(owner, name), name not in owner._non_persistent_buffers_set


def _install(holder, target, resolved):
    """Put ``resolved`` at ``target`` under ``holder``, creating containers on the way.

    Paths may run through the model's own modules (installed for another target); those
    already hold the object and are left unchanged.
    """
    obj, persistent = resolved
    path, _, name = target.rpartition(".")
    for item in path.split(".") if path else []:
        if getattr(holder, item, None) is None:
            holder.add_module(item, nn.Module())
        holder = getattr(holder, item)
    if getattr(holder, name, None) is obj:
        return
    if isinstance(obj, nn.Parameter):
        holder.register_parameter(name, obj)
    elif isinstance(obj, torch.Tensor):
        holder.register_buffer(name, obj, persistent=persistent)
    else:
        holder.add_module(name, obj)


def _warn_about_keys(model, seq, renamed):
    have = set()
    for key in seq.state_dict():
        child, _, rest = key.partition(".")
        have.add(rest if child in renamed else key)
    missing = [k for k in model.state_dict() if k not in have]
    if renamed or missing:
        parts = []
        if renamed:
            parts.append(
                f"children {renamed} hold top-level modules of the model together with work "
                "their forward does not let apart (a module with state called again after "
                "another one, or one with state whose forward cannot be traced into: called "
                "with several arguments, not traceable, or branching on train/eval), so their "
                "keys get the child's name as an extra prefix"
            )
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            parts.append(f"keys that the forward never uses are not in it ({shown})")
        warnings.warn(
            f"sequentialize({type(model).__name__}): the Sequential's state_dict differs from "
            f"the model's: {'; '.join(parts)}. " + _HOW_TO_SPLIT_BY_HAND,
            stacklevel=3,
        )
