"""Helpers shared by rule modules: calling a node's op on stand-in tensors, in-place checks."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx

from ..env import NodeEnv, is_inplace

__all__ = ["call_with", "mutates_input", "used_after", "probe", "per_channel_constant"]


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


def mutates_input(node: fx.Node, env: NodeEnv) -> bool:
    return is_inplace(node, env.modules)


def used_after(value: fx.Node, node: fx.Node) -> bool:
    """Does any user of ``value`` other than ``node`` run after ``node``? (then an in-place
    ``node`` changes what that user reads, which the dataflow graph does not show)."""
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return any(order[u] > order[node] for u in value.users if u is not node)


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
