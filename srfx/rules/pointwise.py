"""Elementwise ops with broadcasting: activations, arithmetic, casts, dropout, identity.

Channel i of every operand that spans an output axis is channel i of the output (DESIGN §2).
A parameter operand that spans it is sliced with the group; an untracked operand that does
(a model input, a barrier's output) makes the group fixed.
"""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..facts import Effects, Link, Ref, Role
from ..registry import ChannelRule, lookup, register_instance
from ..tracing import facts_of
from .common import call_with, channel_effects, computed_scalars, mutates_input, per_channel_constant, probe, used_after
from .movement import Movement

__all__ = ["Pointwise", "Comparison", "Where", "MaskedFill", "Logical", "PReLU", "pointwise_effects"]

def _parameter_behind(value, env):
    """The parameter a value is a view of (``gamma.reshape(1, -1, 1, 1)``, ``cls.expand(...)``)."""
    while value is not None and hasattr(value, "op"):
        if env.param_name(value) is not None:
            return env.param_name(value)
        if not isinstance(lookup(value, env.modules), Movement) or not value.args:
            return None
        value = value.args[0] if hasattr(value.args[0], "op") else None
    return None


def pointwise_effects(node, env, additive: bool) -> Effects:
    out_shape = env.out_shape
    n = len(out_shape)
    operands = env.tensor_args()
    if mutates_input(node, env) and operands and used_after(operands[0], node, env.modules):
        reason = f"{node.name} writes in place into {operands[0].name}, which is read again later"
        return Effects(fixed=tuple((r, reason) for a in operands for r in env.dims(a)))
    outs: dict[tuple[int, ...], Ref] = {}
    links, fixed, roles = [], [], []
    for a in operands:
        off = n - len(env.shape(a))
        for ref in env.dims(a):
            axes = tuple(x + off for x in ref.axes)
            out = outs.setdefault(axes, env.out(axes))
            links.append(Link(ref, out))
            owner = _parameter_behind(a, env)
            if owner is not None:
                roles.append(Role("writer" if additive else "op", ref, owner, node.name))
    taken = [a for axes in outs for a in axes]
    if len(taken) != len(set(taken)):
        reason = f"{node.name}: operands split channels over different axes"
        return Effects(fixed=tuple((r, reason) for a in operands for r in env.dims(a)))
    # operands spanning an output dim's axes without a dim there (model inputs, barriers)
    for axes, out in outs.items():
        for a in operands:
            shp, off = env.shape(a), n - len(env.shape(a))
            own = [tuple(x + off for x in r.axes) for r in env.dims(a)]
            if axes in own or all(ax - off < 0 or shp[ax - off] == 1 for ax in axes):
                continue
            if any(ax - off < 0 for ax in axes):
                fixed.append((out, f"{node.name}: operand {a.name} partly broadcasts a channel dim"))
                continue
            links.append(Link(env.dim_at(a, tuple(ax - off for ax in axes)), out))
    return Effects(outputs=tuple(outs.values()), links=tuple(links), roles=tuple(roles), fixed=tuple(fixed))


def pointwise_constants(node, env, known, op=None) -> dict:
    """Run the op (or ``op`` on the node's positional arguments) on per-channel constant
    stand-ins; a channel is known iff every operand that varies along it is known there and
    the result is constant over the other axes."""
    effects = known.effects(node)
    out_refs = list(effects.outputs)
    if not out_refs or computed_scalars(node):
        return {}
    operands = env.tensor_args()
    n = len(env.out_shape)
    masks = {ref: np.ones(int(np.prod([env.out_shape[a] for a in ref.axes])), dtype=bool) for ref in out_refs}
    stand_ins = {}
    for a in operands:
        if env.param_name(a) is not None:
            stand_ins[a] = env.param_value(a).detach().double()
            continue
        shp, off = env.shape(a), n - len(env.shape(a))
        fills = []
        covered = set()
        for ref in env.dims(a):
            vals = known.value(ref)
            fills.append((ref.axes, vals))
            out_axes = tuple(x + off for x in ref.axes)
            for out in out_refs:
                if out.axes == out_axes:
                    masks[out] &= ~np.isnan(vals)
                    covered.add(out)
        for out in out_refs:  # an unknown operand without this dim: nothing is known
            if out not in covered and not all(ax - off < 0 or shp[ax - off] == 1 for ax in out.axes):
                masks[out][:] = False
        stand_ins[a] = probe(shp, fills)
        if not fills:  # untracked data (a model input, a barrier's output): varies unknowably
            for out in out_refs:
                masks[out][:] = False
    try:
        value = lambda a: stand_ins.get(a, env.concrete(a))  # noqa: E731
        result = call_with(node, env, value) if op is None else op(*(value(a) if hasattr(a, "op") else a for a in node.args))
    except Exception:  # an op that refuses float64 stand-ins: nothing is known
        return {}
    if not isinstance(result, torch.Tensor):
        return {}
    consts = {}
    for out in out_refs:
        if any(result.shape[a] != env.out_shape[a] for a in out.axes):
            continue
        vals = per_channel_constant(result, out.axes)
        vals[~masks[out]] = math.nan
        consts[out] = vals
    return consts


class Pointwise(ChannelRule):
    name = "pointwise"

    def __init__(self, additive: bool = False):
        self.additive = additive

    def effects(self, node, env):
        return pointwise_effects(node, env, self.additive)

    def constants(self, node, env, known):
        return pointwise_constants(node, env, known)


class Comparison(Pointwise):
    """``a > b``, ``torch.eq`` and the like: a mask over the same channels, so channels pass as
    through any elementwise op. A channel's result is claimed constant only where its operands
    are known and further apart than rounding in the model's dtype could move them (sqrt(eps)
    relative to their size, plus as much absolute): the stand-ins are float64, and near the
    threshold the model's own arithmetic may decide otherwise."""

    name = "comparison"

    def constants(self, node, env, known):
        def as64(x):
            return torch.as_tensor(x, dtype=torch.float64)

        gap = pointwise_constants(node, env, known, op=lambda a, b: as64(a) - as64(b))
        scale = pointwise_constants(node, env, known, op=lambda a, b: as64(a).abs() + as64(b).abs())
        dtypes = [d for a in env.tensor_args() if facts_of(a) is not None for d in facts_of(a).dtypes if d.is_floating_point]
        rtol = math.sqrt(max((torch.finfo(d).eps for d in dtypes), default=torch.finfo(torch.float32).eps))
        compare = _COMPARISONS[node.target]
        consts = {}
        for ref, g in gap.items():
            if ref not in scale:
                continue
            vals = compare(torch.from_numpy(g), 0).double().numpy()  # a op b  <=>  a - b op 0
            # too close to call (NaN gaps too); the absolute part covers a constant that cancelled
            # to near zero from much larger terms, whose float32 rounding the stand-in does not see
            vals[~(np.abs(g) > rtol * (scale[ref] + 1.0))] = math.nan
            consts[ref] = vals
        return consts


class Where(Pointwise):
    """``torch.where(cond, a, b)``: elementwise. Its constants run on stand-ins whose condition
    is a bool again (a channel whose condition is unknown stays unknown)."""

    name = "where"

    def constants(self, node, env, known):
        return pointwise_constants(node, env, known, op=lambda c, a, b: torch.where(torch.as_tensor(c) != 0, a, b))


class MaskedFill(Pointwise):
    """``x.masked_fill(mask, value)``: elementwise in ``x`` and ``mask``. Its constants run on
    stand-ins whose mask is a bool again."""

    name = "masked_fill"

    def constants(self, node, env, known):
        return pointwise_constants(node, env, known, op=lambda x, m, v: torch.as_tensor(x).masked_fill(torch.as_tensor(m) != 0, v))


class Logical(Pointwise):
    """Logical and bitwise ops on masks (``~m``, ``a & b``, ``torch.logical_or``): elementwise.
    Constants are claimed for the bitwise forms on bool operands only (on integers ``~`` and
    ``&`` are bitwise)."""

    name = "logical"

    def constants(self, node, env, known):
        logical, bitwise = _LOGICAL[node.target]
        if bitwise and any(d != torch.bool for a in env.tensor_args() if facts_of(a) is not None for d in facts_of(a).dtypes):
            return {}
        return pointwise_constants(node, env, known, op=lambda *xs: logical(*(torch.as_tensor(x, dtype=torch.float64) != 0 for x in xs)).double())


# target -> (the logical function it computes on truth values, whether it is bitwise on integers)
_LOGICAL = {
    operator.invert: (torch.logical_not, True), operator.and_: (torch.logical_and, True),
    operator.or_: (torch.logical_or, True), operator.xor: (torch.logical_xor, True),
    "bitwise_not": (torch.logical_not, True), "bitwise_and": (torch.logical_and, True),
    "bitwise_or": (torch.logical_or, True), "bitwise_xor": (torch.logical_xor, True),
    **{f: (f, False) for f in (torch.logical_not, torch.logical_and, torch.logical_or, torch.logical_xor)},
    **{name: (getattr(torch, name), False) for name in ("logical_not", "logical_and", "logical_or", "logical_xor")},
}

# target -> the comparison it computes
_COMPARISONS = {
    operator.gt: torch.gt, operator.ge: torch.ge, operator.lt: torch.lt, operator.le: torch.le, operator.eq: torch.eq, operator.ne: torch.ne,
    torch.greater: torch.gt, torch.greater_equal: torch.ge, torch.less: torch.lt, torch.less_equal: torch.le, torch.not_equal: torch.ne,
    **{f: f for f in (torch.gt, torch.ge, torch.lt, torch.le, torch.eq, torch.ne)},
    **{name: getattr(torch, name) for name in ("gt", "ge", "lt", "le", "eq", "ne")},
}

_UNARY_FUNCTIONS = [
    torch.relu, torch.sigmoid, torch.tanh, torch.abs, torch.neg, torch.exp, torch.log, torch.sqrt,
    torch.rsqrt, torch.square, torch.sin, torch.cos, torch.erf, torch.reciprocal, torch.clamp, torch.clip,
    torch.nn.functional.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid,
    F.leaky_relu, F.elu, F.selu, F.mish, F.softplus, F.hardtanh, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, torch.detach, torch.clone, operator.neg, operator.pos, torch.relu_,
    F.relu_, torch.sigmoid_, F.logsigmoid, F.softsign, F.tanhshrink, F.celu, F.hardshrink, torch.erfc,
]
_UNARY_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "abs", "neg", "exp", "log", "sqrt", "rsqrt",
    "square", "clamp", "clamp_", "clip", "clamp_min", "clamp_max", "contiguous", "clone", "detach", "float",
    "double", "half", "bfloat16", "to", "type", "type_as", "sin", "cos", "erf", "reciprocal", "exp_", "pow",
    "sqrt_", "neg_", "abs_",
]
_BINARY_FUNCTIONS = [
    operator.mul, operator.truediv, operator.floordiv, operator.pow, operator.imul, operator.itruediv,
    torch.mul, torch.div, torch.true_divide, torch.maximum, torch.minimum, torch.pow,
    torch.lerp, torch.addcmul, torch.rsub,
]
_BINARY_METHODS = ["mul", "mul_", "div", "div_", "maximum", "minimum", "rsub", "lerp", "addcmul"]
_MODULES = [
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
    nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.Hardshrink,
]


class PReLU(ChannelRule):
    """nn.PReLU and F.prelu: ``x`` where ``x >= 0``, else slope times ``x``. One slope per
    channel of axis 1 is a per-channel op (its slope goes with the channel, as a norm's scale
    does); a single slope makes it an elementwise activation."""

    name = "prelu"

    def _slope(self, node, env):
        """(qualname, tensor) of the slope, or None where it is computed."""
        if node.op == "call_module":
            return f"{node.target}.weight", env.module().weight
        w = env.arg(1, "weight")
        name = env.param_name(w) if w is not None else None
        return (name, env.param_value(w)) if name is not None else None

    def effects(self, node, env):
        x = env.tensor_args()[0]
        found = self._slope(node, env)
        if found is None or (found[1].numel() > 1 and len(env.shape(x)) < 2):
            why = f"{node.name}: prelu with a computed slope" if found is None else f"{node.name}: per-channel prelu on a 1-d input"
            return Effects(fixed=tuple((r, why) for r in env.dims(x)))
        name, slope = found
        if slope.numel() == 1:
            outs = tuple(env.out(r.axes) for r in env.dims(x))
            return Effects(outputs=outs, links=tuple(Link(r, o) for r, o in zip(env.dims(x), outs)))
        if node.op == "call_module":
            return channel_effects(node, env, 1, [env.param_ref(name, 0)], node.target)[2]
        return channel_effects(node, env, 1, list(env.dims(env.arg(1, "weight"))), name.rsplit(".", 1)[0])[2]

    def constants(self, node, env, known):
        found = self._slope(node, env)
        if found is None:
            return {}
        slope = found[1].detach().double().flatten().numpy()
        consts = {}
        for r in env.dims(env.tensor_args()[0]):
            if slope.size > 1 and r.axes != (1,):
                continue  # the slope varies along axis 1: nothing constant along another axis
            c = known.value(r)
            consts[env.out(r.axes)] = np.where(c >= 0, c, (slope if slope.size > 1 else slope[0]) * c)  # NaN stays NaN
        return consts


register_instance(PReLU(), nn.PReLU, F.prelu)
register_instance(Pointwise(), *_UNARY_FUNCTIONS, *_UNARY_METHODS, *_BINARY_FUNCTIONS, *_BINARY_METHODS, *_MODULES)
register_instance(Comparison(), *_COMPARISONS)
register_instance(Where(), torch.where, "where")
register_instance(MaskedFill(), torch.masked_fill, "masked_fill", "masked_fill_")
register_instance(Logical(), *_LOGICAL)
register_instance(
    Pointwise(additive=True), operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub,
    "add", "add_", "sub", "sub_",
)
