"""Matrix products and attention.

``a @ b``: batch axes pass channels through, ``a``'s rows and ``b``'s columns reach the output,
and the contracted axis is read as a whole (every channel is needed). Channel dims that span a
batch axis *and* the contracted axis (attention heads of a hand-written attention) are kept.

``F.scaled_dot_product_attention(q, k, v)`` (DESIGN §5): the value channels (heads x value
dims) pass to the output, each position a convex combination of v's (softmax rows sum to 1),
so a constant value channel stays constant; q dim i and k dim i are contracted together. The
planner (srfx.planning, ``meta["attention"]``) keeps a head's q/k while its values are kept,
drops q/k dims where q is 0 or k is constant (softmax ignores a per-query shift), and the
rewrite pins the original 1/sqrt(d) scale.
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..facts import Effects, Link
from ..registry import ChannelRule, register_instance

__all__ = ["MatMul", "KeepAll", "ScaledDotProductAttention"]


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


class ScaledDotProductAttention(ChannelRule):
    name = "scaled_dot_product_attention"

    def effects(self, node, env):
        q, k, v = (env.arg(i, n) for i, n in ((0, "query"), (1, "key"), (2, "value")))
        tensors = env.tensor_args()
        why_all = None
        if any(env.shape(t) is None or len(env.shape(t)) != 4 for t in (q, k, v)):
            why_all = "attention on other than (batch, heads, tokens, dims) tensors"
        elif env.concrete(env.arg(7, "enable_gqa", False)) or env.shape(q)[1] != env.shape(k)[1]:
            why_all = "grouped-query attention"
        elif env.arg(6, "scale") is not None and not isinstance(env.concrete(env.arg(6, "scale")), (int, float)):
            why_all = "a computed attention scale"
        if why_all:
            return Effects(fixed=tuple((r, f"{node.name}: {why_all}") for t in tensors for r in env.dims(t)))
        links, needs, fixed, outs = [], [], [], {}
        heads = {}
        for name, t in (("q", q), ("k", k), ("v", v)):
            for r in env.dims(t):
                if r.axes == (1, 3):
                    heads[name] = r
                elif r.axes == (2,) and name == "q":
                    out = outs.setdefault((2,), env.out((2,)))
                    links.append(Link(r, out))
                elif r.axes == (2,):
                    needs.append((r, f"{node.name}: attention reads every key and value token"))
                else:
                    fixed.append((r, f"{node.name}: channels on attention's batch or token axes"))
        mask = env.arg(3, "attn_mask")
        if mask is not None and hasattr(mask, "op"):
            fixed += [(r, f"{node.name}: attention mask") for r in env.dims(mask)]
            shape = env.shape(mask)
            if shape is None or (len(shape) >= 3 and shape[-3] > 1):  # one mask per head (ALiBi, relative bias): its heads are not sliced
                fixed += [(r, f"{node.name}: a per-head attention mask") for r in heads.values()]
        if set(heads) != {"q", "k", "v"}:
            fixed += [(r, f"{node.name}: heads not split as (heads, dims)") for r in heads.values()]
            return Effects(outputs=tuple(outs.values()), links=tuple(links), needs=tuple(needs), fixed=tuple(fixed))
        out = env.out((1, 3))
        outs[(1, 3)] = out
        links += [Link(heads["v"], out), Link(heads["q"], heads["k"])]
        scale = env.concrete(env.arg(6, "scale"))
        meta = {"attention": {"q": heads["q"], "k": heads["k"], "v": heads["v"], "out": out,
                              "scale": scale if scale is not None else env.shape(q)[3] ** -0.5}}
        return Effects(outputs=tuple(outs.values()), links=tuple(links), needs=tuple(needs), fixed=tuple(fixed), meta=meta)

    def constants(self, node, env, known):
        """Softmax rows sum to 1: a constant value channel comes out unchanged."""
        att = known.effects(node).meta.get("attention")
        if not att:
            return {}
        return {att["out"]: known.value(att["v"])}


register_instance(ScaledDotProductAttention(), F.scaled_dot_product_attention)
register_instance(MatMul(), operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm")
register_instance(KeepAll("nn.MultiheadAttention keeps its heads (head removal: attention pass)"), nn.MultiheadAttention)
