"""Helpers shared by rule modules: calling a node's op on stand-in tensors, in-place checks."""
from __future__ import annotations

import builtins
import operator
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx

from ..env import NodeEnv, is_inplace
from ..facts import Effects, Link, Role
from ..tracing import facts_of

__all__ = ["call_with", "mutates_input", "used_after", "probe", "per_channel_constant", "channel_effects"]


def call_with(node: fx.Node, env: NodeEnv, substitute: Callable[[fx.Node], Any]) -> Any:
    """Run the node's op with every Node argument replaced by ``substitute(node)``."""
    args = fx.node.map_aggregate(node.args, lambda a: substitute(a) if isinstance(a, fx.Node) else a)
    kwargs = fx.node.map_aggregate(node.kwargs, lambda a: substitute(a) if isinstance(a, fx.Node) else a)
    with torch.no_grad():
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return env.module()(*args, **kwargs)
    raise ValueError(f"cannot call {node.op} node {node.name}")


def axis_of_size_query(node: fx.Node):
    """For ``x.size(k)`` and ``x.shape[k]`` / ``x.size()[k]``: (x, k). None for other nodes."""
    if node.op == "call_method" and node.target == "size" and (len(node.args) > 1 or "dim" in node.kwargs):
        return node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        src = node.args[0]
        whole = (src.op == "call_function" and src.target is builtins.getattr and src.args[1] == "shape") or (
            src.op == "call_method" and src.target == "size" and len(src.args) == 1 and not src.kwargs)
        if whole:
            return src.args[0], node.args[1]
    return None


def scalar_sources(scalar: fx.Node):
    """Where a number computed in the graph comes from, walking back through its scalar
    arithmetic: yields ``(node, (tensor, axis))`` for each size query, and ``(node, None)`` for
    anything else it reaches (a tensor's values through ``.item()``, a parameter, a scalar
    input, a whole shape)."""
    stack, seen = [scalar], set()
    while stack:
        node = stack.pop()
        if node in seen or not isinstance(node, fx.Node):
            continue
        seen.add(node)
        query = axis_of_size_query(node)
        if query is not None:
            yield node, query
            continue
        f = facts_of(node)
        if node.op in ("get_attr", "placeholder") or f is None or f.is_tensor or f.elements:
            yield node, None
            continue
        stack += node.all_input_nodes


_DESCRIPTIVE_ATTRIBUTES = frozenset({"dtype", "device", "layout", "ndim", "is_cuda", "is_cpu", "is_meta", "is_floating_point"})


def _batch_or_data_dependent(scalar: fx.Node) -> bool:
    """Does a non-tensor value computed in the graph depend on the batch size (axis 0 of some
    tensor) or on tensor data (``.item()``, ``.tolist()``)? A tensor's dtype, device, layout or
    rank (``h.to(x.dtype)``) depends on neither."""
    if scalar.op == "call_function" and scalar.target is getattr and scalar.args[1] in _DESCRIPTIVE_ATTRIBUTES:
        return False
    if scalar.op == "call_method" and scalar.target in ("dim", "ndimension") and len(scalar.args) == 1:
        return False
    for _, query in scalar_sources(scalar):
        if query is None:
            return True  # tensor values, a scalar input, a whole shape: not the example's for sure
        tensor, axis = query
        f = facts_of(tensor) if isinstance(tensor, fx.Node) else None
        if not isinstance(axis, int) or f is None or not f.is_tensor or axis % len(f.shape) == 0:
            return True  # the batch axis (or one that cannot be told)
    return False


def computed_scalars(node: fx.Node) -> bool:
    """Does the node take a non-tensor argument whose value would differ for another input of
    the example's shape (a batch size, ``x.mean().item()``)? Its recorded value is the
    example's, so constants computed with it would hold for the example only. (Sizes of the
    other axes are the example's by contract: srfx results keep the example's non-batch shape.)"""
    found = []

    def visit(a):
        if isinstance(a, fx.Node) and a.op != "get_attr":
            f = facts_of(a)
            if (f is None or not f.is_tensor and not f.elements) and _batch_or_data_dependent(a):
                found.append(a)
        return a

    fx.node.map_aggregate((node.args, node.kwargs), visit)
    return bool(found)


def mutates_input(node: fx.Node, env: NodeEnv) -> bool:
    return is_inplace(node, env.modules)


# ops whose result may share memory with their first argument: an in-place write into one
# changes the other (a superset is safe: it only keeps more channels)
_VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "t", "flatten", "unflatten", "squeeze",
    "unsqueeze", "expand", "expand_as", "narrow", "select", "unfold", "split", "split_with_sizes", "chunk", "unbind",
    "tensor_split", "diagonal", "as_strided", "movedim", "moveaxis", "swapaxes", "swapdims", "contiguous", "detach",
    "__getitem__", "type_as", "to", "float", "view_as_real", "view_as_complex",
})
_VIEW_FUNCTIONS = frozenset({
    operator.getitem, builtins.getattr, torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze,
    torch.transpose, torch.permute, torch.t, torch.narrow, torch.select, torch.split, torch.chunk, torch.unbind,
    torch.tensor_split, torch.diagonal, torch.as_strided, torch.movedim, torch.moveaxis, torch.swapaxes, torch.swapdims,
    torch.detach, torch.view_as_real, torch.view_as_complex,
})


def _may_alias_input(n: fx.Node, modules: dict) -> bool:
    """Can ``n``'s result share memory with its first argument (a view, or an in-place op,
    which returns its input)?"""
    if n.op not in ("call_method", "call_function", "call_module") or not n.args or not isinstance(n.args[0], fx.Node):
        return False
    if is_inplace(n, modules):
        return True
    return n.target in (_VIEW_METHODS if n.op == "call_method" else _VIEW_FUNCTIONS if n.op == "call_function" else ())


def _aliases(value: fx.Node, modules: dict, writer: fx.Node) -> set:
    """Every node whose result may share memory with ``value`` before ``writer`` writes into
    it: back to the tensor it is a view of, then every view (and in-place result) taken of
    that, except through ``writer`` (what reads the write's result is in the dataflow)."""
    base = value
    while _may_alias_input(base, modules):
        base = base.args[0]
    seen, todo = {base}, [base]
    while todo:
        for user in todo.pop().users:
            if user is not writer and user not in seen and _may_alias_input(user, modules) and user.args[0] in seen:
                seen.add(user)
                todo.append(user)
    return seen


def used_after(value: fx.Node, node: fx.Node, modules: dict | None = None) -> bool:
    """Does anything other than ``node`` read ``value``, or a tensor sharing its memory (the
    tensor it is a view of, another view of it), after ``node``? Then an in-place ``node``
    changes what that reader sees, which the dataflow graph does not show."""
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return any(order[u] > order[node] for a in _aliases(value, modules or {}, node) for u in a.users if u is not node)


def probe(shape: tuple[int, ...], fills: list[tuple[tuple[int, ...], np.ndarray]]) -> torch.Tensor:
    """A float64 tensor of ``shape``, size 1 on axes no dim spans, channel values broadcast.

    ``fills``: (axes, values) per dim; unknown values (NaN) are left 0 (callers track which
    channels are known). Where two dims both know a value, the later one wins: both are
    constants of the same tensor, so they agree wherever both are known.
    """
    dim_axes = {a for axes, _ in fills for a in axes}
    small = tuple(s if i in dim_axes else 1 for i, s in enumerate(shape))
    t = torch.zeros(small, dtype=torch.float64)
    for axes, values in fills:
        vals = torch.as_tensor(np.asarray(values, dtype=np.float64))
        block = vals.reshape([small[a] for a in axes])
        # the block's axes are in the dim's order; put them in tensor order, then broadcast
        block = block.permute(sorted(range(len(axes)), key=lambda i: axes[i]))
        view = [small[i] if i in axes else 1 for i in range(len(small))]
        block = block.reshape(view).expand(small)
        t = torch.where(torch.isnan(block), t, block)
    return t


def per_channel_constant(out: torch.Tensor, axes: tuple[int, ...]) -> np.ndarray:
    """Channel values of ``out`` along ``axes`` (flat, in the dims's order), NaN where a
    channel is not constant over the other axes."""
    out = out.detach().double()
    moved = out.permute(*axes, *[i for i in range(out.dim()) if i not in axes])
    n = int(np.prod([out.shape[a] for a in axes])) if axes else 1
    if out.numel() == 0:
        return np.full(n, np.nan)
    flat = moved.reshape(n, -1)
    first = flat[:, 0].clone()
    first[(flat != flat[:, :1]).any(dim=1)] = float("nan")
    return first.numpy()


def channel_effects(node, env, ch_axis, params, role_owner):
    """Effects of a per-channel op on axis ``ch_axis`` (a norm, a per-channel slope): every
    dim of the input passes, and the per-channel tensors ``params`` go with the channel.
    Returns (input channel ref, output channel ref, effects)."""
    x = env.tensor_args()[0]
    links, outs = [], []
    for r in env.dims(x):
        out = env.out(r.axes)
        outs.append(out)
        links.append(Link(r, out))
    x_ch = env.dim_at(x, (ch_axis,))
    out = env.out((ch_axis,))
    if out not in outs:
        outs.append(out)
        links.append(Link(x_ch, out))
    for p in params:
        links.append(Link(out, p))
    roles = (Role("op", out, role_owner, node.name),)
    return x_ch, out, Effects(outputs=tuple(outs), links=tuple(links), roles=roles)
