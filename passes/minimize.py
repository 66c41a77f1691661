"""minimize: apply a removal plan, emitting a smaller dense GraphModule (DESIGN §3).

Guarantee: the returned module computes the same function as the traced input up to
floating-point rounding, in eval semantics; the input GraphModule is not modified. When the
plan narrows a LayerNorm stream (``plan.compensations``), the guarantee holds once
:func:`srfx.passes.compensate_ln` has run on the result (``meta["srfx_pending_compensation"]``
names the norms until then).

    >>> # fc1: 4 -> 3 hidden units, unit 2 has a zero row (constant relu(b2)), fc2 reads it
    >>> # after minimize: fc1 4 -> 2, fc2 2 -> out, fc2.bias += fc2.weight[:, 2] * relu(b2)
"""
from __future__ import annotations

import copy
from collections import defaultdict
from typing import Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

from srfx.compensation import PENDING_KEY
from srfx.errors import RewriteError
from srfx.facts import ParamKey, Ref, ValueKey
from srfx.passes import _attrs
from srfx.planning import Plan
from srfx.registry import lookup
from srfx.rules.movement import SHAPE_ARGS, SPLIT, Movement

__all__ = ["minimize"]


def _fold_constants(gm: fx.GraphModule, plan: Plan) -> None:
    """Readers absorb removed constant channels into their bias: b += sum_j W[:, j] c_j."""
    for fold in plan.folds:
        role = fold.role
        if not np.any(fold.values):  # zero constants add nothing (and grouped readers fold only those)
            continue
        w = _attrs.get(gm, role.weight).detach().double()
        out_axis = 1 - role.in_axis
        w = w.movedim((out_axis, role.in_axis), (0, 1))
        kernel = int(np.prod(w.shape[2:])) if w.dim() > 2 else 1
        w_sum = w.reshape(w.shape[0], w.shape[1], kernel).sum(-1)[:, torch.as_tensor(fold.index)]
        delta = (w_sum * torch.as_tensor(fold.values, dtype=torch.float64)[None, :]).sum(1)
        if not torch.isfinite(delta).all():
            raise RewriteError(f"folding constants into {role.owner} gave non-finite values")
        if not delta.any():
            continue
        if role.bias is not None:
            bias = _attrs.get(gm, role.bias)
            _attrs.put(gm, role.bias, (bias.detach().double() + delta).to(bias.dtype))
        else:
            module = _attrs.get(gm, role.owner)
            if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                raise RewriteError(f"{role.owner} reads a constant channel but has no bias to fold it into")
            # a new bias has no channel dim of its own: give it the rows the weight keeps
            rows = plan.keep(plan.coupling.dim(Ref(ParamKey(role.weight), (out_axis,))).id)
            delta = delta[torch.as_tensor(rows, dtype=torch.long)]
            module.bias = nn.Parameter(delta.to(module.weight.dtype), requires_grad=module.weight.requires_grad)


def _slice_parameters(gm: fx.GraphModule, plan: Plan) -> set[str]:
    coupling = plan.coupling
    cuts = plan.parameter_cuts()
    aliases = defaultdict(list)
    for name, canon in coupling.aliases.items():
        aliases[canon].append(name)
    touched = set()
    for qualname, axes in cuts.items():
        t = _attrs.get(gm, qualname).detach()
        for axis, keep in axes.items():
            t = t.index_select(axis, torch.as_tensor(keep, dtype=torch.long, device=t.device))
        for name in aliases.get(qualname, [qualname]):
            _attrs.put(gm, name, t.clone() if name != qualname else t)
            touched.add(name.rpartition(".")[0])
        if len(aliases.get(qualname, [])) > 1:  # keep tied tensors tied
            first = _attrs.get(gm, qualname)
            for name in aliases[qualname]:
                owner, _, attr = name.rpartition(".")
                setattr(_attrs.get(gm, owner), attr, first)
    return touched


def _resize_module(module: nn.Module) -> None:
    """Bring a module's size attributes in line with its sliced tensors."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.conv._ConvTransposeNd):
        module.in_channels = module.weight.shape[0]
        module.out_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.modules.conv._ConvNd):
        old_out, old_groups, old_in = module.out_channels, module.groups, module.in_channels
        new_out = module.weight.shape[0]
        if old_groups > 1 and old_groups == old_in:  # depthwise: `mult` outputs per input channel
            module.groups = new_out // (old_out // old_groups)
            module.in_channels = module.groups
        else:
            module.in_channels = module.weight.shape[1] * old_groups
        module.out_channels = new_out
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        t = module.running_mean if module.running_mean is not None else module.weight
        module.num_features = t.shape[0]
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = (module.weight.shape[0],) if module.weight is not None else module.normalized_shape
    elif isinstance(module, nn.GroupNorm):
        per_group = module.num_channels // module.num_groups
        module.num_channels = module.weight.shape[0]
        module.num_groups = module.num_channels // per_group
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.numel()


def _new_size(plan: Plan, key: ValueKey, shape, axes_filter=None) -> list:
    """The output shape of a value after removal (ints where channels shrink, else None)."""
    coupling = plan.coupling
    sizes = [None] * len(shape)
    for d in coupling.dims_of_value(key):
        if not plan.shrinks(d.id):
            continue
        keep = plan.keep(d.id)
        coords = np.unravel_index(keep, d.sizes)
        for pos, axis in enumerate(d.ref.axes):
            sizes[axis] = len(np.unique(coords[pos]))
    return sizes


def _reads_a_shrinking_size(arg: fx.Node, plan: Plan) -> bool:
    """Is ``arg`` (a number computed in the graph) made from the size of an axis whose channels
    shrink?"""
    from srfx.rules.common import scalar_sources
    from srfx.tracing import facts_of

    for _, query in scalar_sources(arg):
        if query is None:
            continue
        tensor, axis = query
        f = facts_of(tensor) if isinstance(tensor, fx.Node) else None
        if f is not None and f.is_tensor and isinstance(axis, int):
            if _new_size(plan, ValueKey(tensor.name), f.shape)[axis % len(f.shape)] is not None:
                return True
    return False


def _pin_shrinking_sizes(node: fx.Node, plan: Plan) -> None:
    """A shape argument computed from a channel count that shrinks (``C // nh`` from
    ``h.size()``) takes the example's value: it may size another tensor that keeps its
    channels. (Where this view's own output shrinks, the new size replaces it afterwards.)"""
    from srfx.tracing import facts_of

    def pinned(a):
        if isinstance(a, fx.Node) and a.op != "get_attr" and _reads_a_shrinking_size(a, plan):
            f = facts_of(a)
            if f is not None and isinstance(f.value, int) and not isinstance(f.value, bool):
                return f.value
        return a

    node.args = (node.args[0], *fx.node.map_aggregate(node.args[1:], pinned))
    node.kwargs = fx.node.map_aggregate(node.kwargs, pinned)


def _rewrite_shape_args(gm: fx.GraphModule, plan: Plan) -> None:
    from srfx.tracing import facts_of

    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is F.group_norm:
            _rewrite_group_count(node, plan)
            continue
        rule = lookup(node, modules)
        if not isinstance(rule, Movement) or facts_of(node) is None or not facts_of(node).shapes:
            continue
        if rule.kind == SHAPE_ARGS:
            _pin_shrinking_sizes(node, plan)
            new = _new_size(plan, ValueKey(node.name), facts_of(node).shape)
            if not any(s is not None for s in new):
                continue
            if node.op == "call_module":
                _as_unflatten_call(gm, node, modules[node.target])
            if node.target in ("unflatten", torch.unflatten):
                x, dim, sizes = node.args[0], node.args[1], list(node.args[2])
                dim = dim % len(facts_of(x).shape)
                sizes = [new[dim + i] if new[dim + i] is not None else s for i, s in enumerate(sizes)]
                node.args = (x, node.args[1], tuple(sizes))
                continue
            x, rest = node.args[0], node.args[1:]
            packed = len(rest) == 1 and isinstance(rest[0], (tuple, list))
            shape = list(rest[0]) if packed else list(rest)
            if len(shape) != len(new):
                raise RewriteError(f"{node.format_node()}: cannot line up its shape arguments with its output")
            shape = [n if n is not None else s for s, n in zip(shape, new)]
            node.args = (x, tuple(shape)) if packed else (x, *shape)
        elif rule.kind == SPLIT:
            _rewrite_split(node, plan)


def _as_unflatten_call(gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> None:
    """An nn.Unflatten call becomes ``torch.unflatten(x, dim, sizes)`` (sizes this call site
    can change without touching a module other calls may share); the module goes once no
    call is left, so printing the result does not show its old sizes."""
    sizes = getattr(module, "unflattened_size", None)
    if not isinstance(module, nn.Unflatten) or not all(isinstance(s, int) for s in sizes):
        raise RewriteError(f"{node.target}: cannot resize a {type(module).__name__} module yet")
    target = node.target
    node.op, node.target = "call_function", torch.unflatten
    node.args, node.kwargs = (node.args[0], module.dim, tuple(sizes)), {}
    if not any(n.op == "call_module" and n.target == target for n in gm.graph.nodes):
        gm.delete_submodule(target)


def _pin_attention_scale(gm: fx.GraphModule, plan: Plan) -> None:
    """scaled_dot_product_attention defaults to 1/sqrt(q.size(-1)): once q/k dims go, pass the
    original scale explicitly."""
    for node in gm.graph.nodes:
        att = plan.coupling.effects.get(node.name, None)
        att = att.meta.get("attention") if att is not None else None
        if att and plan.shrinks(plan.coupling.dim(att["q"]).id):
            node.kwargs = {**node.kwargs, "scale": float(att["scale"])}
            if len(node.args) > 6:
                node.args = node.args[:6]


def _rewrite_group_count(node: fx.Node, plan: Plan) -> None:
    """F.group_norm(x, num_groups, ...): whole groups went, so fewer groups."""
    from srfx.tracing import facts_of

    channels = facts_of(node).shape[1]
    new = _new_size(plan, ValueKey(node.name), facts_of(node).shape)[1]
    if new is None:
        return
    groups = node.args[1] if len(node.args) > 1 else node.kwargs["num_groups"]
    new_groups = groups * new // channels
    if len(node.args) > 1:
        node.args = (node.args[0], new_groups, *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "num_groups": new_groups}


def _rewrite_split(node: fx.Node, plan: Plan) -> None:
    from srfx.tracing import facts_of

    f = facts_of(node)
    x = node.args[0]
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    axis = dim % len(facts_of(x).shape)
    sizes = []
    changed = False
    for i, shape in enumerate(f.shapes):
        new = _new_size(plan, ValueKey(node.name, i), shape)
        changed |= new[axis] is not None
        sizes.append(new[axis] if new[axis] is not None else shape[axis])
    if not changed:
        return
    with node.graph.inserting_after(node):
        node.target = "split" if node.op == "call_method" else torch.split
        node.args = (x, sizes)
        node.kwargs = {"dim": axis}


def _compose_gather(gm: fx.GraphModule, x: fx.Node, axis: int, keep: torch.Tensor) -> bool:
    """The reader already reads through an earlier gather of its own (a compressed model
    compressed again): narrow that gather's index instead of stacking a second one."""
    if not (x.op == "call_function" and x.target is torch.index_select and len(x.users) == 1):
        return False
    index = x.args[2]
    if not (isinstance(index, fx.Node) and index.op == "get_attr" and len(index.users) == 1):
        return False
    from srfx.tracing import facts_of

    ndim = len(facts_of(x).shape)
    if x.args[1] % ndim != axis % ndim:
        return False
    old = _attrs.get(gm, index.target)
    _attrs.put(gm, index.target, old.index_select(0, keep.to(old.device)))
    return True


def _dim_on_axis(coupling, value: str, axis: int):
    """The coupling dim of ``value`` that lives on ``axis`` alone (None if there is none)."""
    return next((d for d in coupling.dims_of_value(ValueKey(value)) if d.ref.axes == (axis,)), None)


def _renumbered(plan: Plan, inp, out, table: np.ndarray, where: str) -> Optional[np.ndarray]:
    """For an index whose output channel i is input channel ``table[i]``: the kept outputs'
    entries renumbered to the kept inputs, or None when neither side shrinks (a missing dim
    keeps every channel)."""
    if not any(d is not None and plan.shrinks(d.id) for d in (inp, out)):
        return None
    wanted = table[plan.keep(out.id)] if out is not None else table
    if inp is None:
        return wanted
    kept_in = plan.keep(inp.id)
    new = np.searchsorted(kept_in, wanted)
    if np.any(new >= len(kept_in)) or np.any(kept_in[np.minimum(new, len(kept_in) - 1)] != wanted):
        raise RewriteError(f"{where}: an indexed channel was removed while its output channel stays")
    return new


def _rewrite_index_selects(gm: fx.GraphModule, plan: Plan) -> None:
    """index_select on a constant index: where its input or output channels shrank, the index
    keeps the kept outputs, renumbered to the kept inputs."""
    coupling = plan.coupling
    for node in gm.graph.nodes:
        eff = coupling.effects.get(node.name)
        if eff is None or "index" not in eff.meta:
            continue
        axis = eff.meta["axis"]
        out, inp = _dim_on_axis(coupling, node.name, axis), _dim_on_axis(coupling, node.args[0].name, axis)
        new = _renumbered(plan, inp, out, eff.meta["index"], node.name) if out is not None and inp is not None else None
        if new is None:
            continue
        index = node.args[2]
        old = _attrs.get(gm, index.target)
        _attrs.put(gm, index.target, torch.as_tensor(new, dtype=old.dtype, device=old.device))


def _device_of(gm: fx.GraphModule) -> torch.device:
    """Where the module's tensors live: index buffers srfx adds must be there too."""
    for t in (*gm.parameters(), *gm.buffers()):
        return t.device
    return torch.device("cpu")


def _rewrite_reindexes(gm: fx.GraphModule, plan: Plan) -> None:
    """Slices, lists and reorders along a channel axis (:class:`srfx.rules.movement.Reindex`)
    whose input or output channels shrank: the indexing keeps the channel axis whole, and an
    ``index_select`` after it picks the kept output channels, renumbered to the kept inputs."""
    coupling = plan.coupling
    for node in list(gm.graph.nodes):
        eff = coupling.effects.get(node.name)
        r = eff.meta.get("reindex") if eff is not None else None
        if r is None:
            continue
        x = node.args[0]
        new = _renumbered(plan, _dim_on_axis(coupling, x.name, r.in_axis), _dim_on_axis(coupling, node.name, r.out_axis), r.table, node.name)
        if new is None:
            continue
        name = f"_srfx_index_{node.name}"
        while hasattr(gm, name):
            name += "_"
        gm.register_buffer(name, torch.as_tensor(new, dtype=torch.long, device=_device_of(gm)))
        if r.component is not None:
            index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            index = index[: r.component] + (slice(None),) + index[r.component + 1 :]
        if r.component is None or all(c == slice(None) or c is Ellipsis for c in index):
            # narrow along the channel axis, or nothing else indexed: the index_select is all of it
            with gm.graph.inserting_before(node):
                idx = gm.graph.get_attr(name)
                picked = gm.graph.call_function(torch.index_select, (x, r.in_axis, idx))
            node.replace_all_uses_with(picked)
            gm.graph.erase_node(node)
            continue
        node.args = (x, index)
        with gm.graph.inserting_after(node):
            idx = gm.graph.get_attr(name)
        with gm.graph.inserting_after(idx):
            picked = gm.graph.call_function(torch.index_select, (node, r.out_axis, idx))
        node.replace_all_uses_with(picked, delete_user_cb=lambda user: user is not picked)


def _gather_inputs(gm: fx.GraphModule, plan: Plan) -> set[str]:
    """Readers of groups that cannot shrink drop their all-zero input columns and read the
    kept channels through an index_select (the model's interface stays as it was)."""
    touched = set()
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    for i, gather in enumerate(plan.gathers):
        role = gather.role
        w = _attrs.get(gm, role.weight)
        keep = torch.as_tensor(gather.keep, dtype=torch.long, device=w.device)
        _attrs.put(gm, role.weight, w.detach().index_select(role.in_axis, keep))
        node = nodes[role.owner]
        x = node.args[0]
        axis = -1 if isinstance(_attrs.get(gm, role.owner), nn.Linear) else 1
        touched.add(role.owner)
        if _compose_gather(gm, x, axis, keep):
            continue
        name = f"_srfx_gather_{i}"
        while hasattr(gm, name):
            name += "_"
        gm.register_buffer(name, keep)
        with gm.graph.inserting_before(node):
            idx = gm.graph.get_attr(name)
            picked = gm.graph.call_function(torch.index_select, (x, axis, idx))
        node.replace_input_with(x, picked)
    return touched


def minimize(gm: fx.GraphModule, plan: Plan) -> PassResult:
    """Apply ``plan`` (made for ``gm``) to a copy of ``gm``; return the smaller module."""
    if plan.coupling.graph_module is not gm:
        raise RewriteError("the plan was made for a different graph module")
    if not plan.removes_anything and not plan.folds:
        return PassResult(gm, False)
    out = copy.deepcopy(gm)
    # node objects differ in the copy; names are stable
    _fold_constants(out, plan)
    touched = _slice_parameters(out, plan) | _gather_inputs(out, plan)
    for name in touched:
        module = _attrs.get(out, name)
        if isinstance(module, nn.Module):
            _resize_module(module)
    _rewrite_shape_args(out, plan)
    _rewrite_index_selects(out, plan)
    _rewrite_reindexes(out, plan)
    _pin_attention_scale(out, plan)
    if plan.compensations:  # the narrowed norms are only right once compensate_ln has run
        out.meta[PENDING_KEY] = tuple(site.node for site in plan.compensations)
    out.graph.lint()
    out.recompile()
    return PassResult(out, True)
