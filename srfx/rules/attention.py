"""Matrix products and attention.

``a @ b``: batch axes pass channels through, ``a``'s rows and ``b``'s columns reach the output,
and the contracted axis is read as a whole (every channel is needed). Channel dims that span a
batch axis *and* the contracted axis (attention heads after a heads reshape) are kept here;
head removal is the attention pass's job (DESIGN §5).
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..facts import Effects, Link
from ..registry import ChannelRule, register_instance

__all__ = ["MatMul", "KeepAll"]


class MatMul(ChannelRule):
    name = "matmul"

    def effects(self, node, env):
        a, b = node.args[0], node.args[1]
        sa, sb, so = env.shape(a), env.shape(b), env.out_shape
        if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
            x = [t for t in (a, b) if env.shape(t) is not None]
            why = f"{node.name}: vector product"
            return Effects(fixed=tuple((r, why) for t in x for r in env.dims(t)))
        n = len(so)
        outs, links, needs, fixed = {}, [], [], []

        def place(ref, axes):
            out = outs.setdefault(axes, env.out(axes))
            links.append(Link(ref, out))

        for t, shp, row_axis, contract_axis, out_axis in ((a, sa, len(sa) - 2, len(sa) - 1, n - 2), (b, sb, len(sb) - 1, len(sb) - 2, n - 1)):
            off = n - len(shp)
            for r in env.dims(t):
                axes = set(r.axes)
                if axes == {row_axis}:
                    place(r, (out_axis,))
                elif axes == {contract_axis}:
                    needs.append((r, f"{node.name}: contracted by a matrix product"))
                elif axes.isdisjoint({row_axis, contract_axis}):
                    place(r, tuple(x + off for x in r.axes))
                else:
                    fixed.append((r, f"{node.name}: channels span a product's batch and contracted axes (attention heads)"))
        return Effects(outputs=tuple(outs.values()), links=tuple(links), needs=tuple(needs), fixed=tuple(fixed))


class KeepAll(ChannelRule):
    """An op with a rule that still cannot let channels go: every channel it touches stays."""

    name = "keep_all"

    def __init__(self, why: str):
        self.why = why

    def effects(self, node, env):
        refs = [r for t in env.tensor_args() for r in env.dims(t)]
        return Effects(fixed=tuple((r, f"{node.name}: {self.why}") for r in refs))


register_instance(MatMul(), operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm")
register_instance(KeepAll("scaled_dot_product_attention keeps its heads (head removal: attention pass)"), F.scaled_dot_product_attention)
register_instance(KeepAll("nn.MultiheadAttention keeps its heads (head removal: attention pass)"), nn.MultiheadAttention)
