"""``x.size()``, ``x.shape``, ``x.dim()``, ``x.numel()``: ints about tensors, no channels.

A channel count read this way is safe only if it ends up in a shape argument that the
rewrite updates (view/reshape/expand); if it flows into arithmetic on tensors (a 1/sqrt(d)
scale, a division by C) shrinking would change the function, so its channels are kept.
"""
from __future__ import annotations

import builtins
import operator

import torch.fx as fx

from ..facts import Effects
from ..registry import ChannelRule, lookup, register_instance
from ..tracing import facts_of

__all__ = ["ShapeQuery"]

# attributes that describe a tensor rather than hold its values (getattr on anything else is a barrier)
_NON_TENSOR_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "layout", "is_cuda", "is_cpu", "is_meta", "is_sparse",
                                    "is_quantized", "requires_grad", "is_leaf", "is_floating_point", "names"})

_INT_ARITHMETIC = {operator.getitem, operator.mul, operator.floordiv, operator.add, operator.sub, operator.truediv, operator.mod, builtins.int}


def _only_in_shape_args(node: fx.Node, axes: set[int], modules) -> bool:
    """Do the sizes of ``axes`` read at ``node`` reach nothing but view/reshape/expand
    shape arguments (through int arithmetic and indexing of the shape)?"""
    if not axes:
        return True
    from .movement import SHAPE_ARGS, Movement

    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem and user.args[0] is node:
            index = user.args[1]
            if isinstance(index, int) and isinstance(facts_of(node).value, tuple):
                n = len(facts_of(node).value)
                if not _only_in_shape_args(user, axes & {index % n}, modules):
                    return False
                continue
        if user.op == "call_function" and user.target in _INT_ARITHMETIC and not (facts_of(user) and facts_of(user).shapes):
            if not _only_in_shape_args(user, axes, modules):
                return False
            continue
        rule = lookup(user, modules)
        if isinstance(rule, Movement) and rule.kind == SHAPE_ARGS and user.args and user.args[0] is not node:
            continue
        return False
    return True


class ShapeQuery(ChannelRule):
    name = "shape_query"

    def effects(self, node, env):
        x = node.args[0]
        if not isinstance(x, fx.Node) or env.shape(x) is None:
            return Effects()
        n = len(env.shape(x))
        if node.target is getattr and node.args[1] not in _NON_TENSOR_ATTRIBUTES:
            # x.T, x.mT, x.real, x.data, ...: a tensor made of x's values, which no rule models
            why = f"{node.name}: tensor attribute .{node.args[1]} (no channel rule for it)"
            return Effects(fixed=tuple((r, why) for r in env.dims(x)))
        if node.target is getattr:
            axes = set(range(n)) if node.args[1] == "shape" else set()  # ndim, dtype, device: no sizes
        elif node.target == "size":
            which = env.concrete(env.arg(1, "dim", None))
            axes = set(range(n)) if which is None else {which % n}
        else:  # dim() reads no channel count; numel() reads all
            axes = set(range(n)) if node.target == "numel" else set()
        # per dim: Swin reads H and W into padding arithmetic and C into a reshape; only the
        # dims whose sizes reach arithmetic must stay
        touched = [r for r in env.dims(x) if set(r.axes) & axes and not _only_in_shape_args(node, set(r.axes) & axes, env.modules)]
        if not touched:
            return Effects(meta={"untouched": tuple(env.dims(x))})
        why = f"{node.name}: channel count used in arithmetic"
        return Effects(fixed=tuple((r, why) for r in touched), meta={"untouched": tuple(r for r in env.dims(x) if r not in touched)})


register_instance(ShapeQuery(), "size", "dim", "numel", getattr)
