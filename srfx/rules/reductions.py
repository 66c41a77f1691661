"""Per-channel ops that mix positions, not channels: pooling, interpolation, spatial padding,
reductions over non-channel axes, softmax over non-channel axes.

A channel dim on an axis the op mixes (a reduction or softmax over channels) is read as a
whole: the dim is needed (reductions) or its channels mixed (softmax).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..facts import Effects, Link, Mix
from ..registry import ChannelRule, register_instance
from .common import call_with, computed_scalars, per_channel_constant, probe

__all__ = ["PerChannel"]


def _spatial_axes(node, env) -> set[int]:
    return set(range(2, len(env.shape(env.tensor_args()[0]))))


def _padded_axes(node, env) -> set[int]:
    """F.pad's (lo, hi) pairs run from the last axis backwards; a pair written as literal
    zeros pads nothing (Swin pads H and W of a channels-last tensor with (0, 0, ...))."""
    n = len(env.shape(env.tensor_args()[0]))
    raw = env.arg(1, "pad")
    pad = env.concrete(raw)
    literal = raw if isinstance(raw, (tuple, list)) else [None] * len(pad)
    return {n - 1 - i for i in range(len(pad) // 2) if not (literal[2 * i] == 0 and literal[2 * i + 1] == 0 and isinstance(literal[2 * i], int) and isinstance(literal[2 * i + 1], int))}


def _module_padded_axes(node, env) -> set[int]:
    """nn.ConstantPad2d and friends: ``padding`` holds two numbers per padded (last) axis."""
    n = len(env.shape(env.tensor_args()[0]))
    return set(range(n - len(env.module().padding) // 2, n))


def _reduced_axes(node, env) -> set[int]:
    n = len(env.shape(env.tensor_args()[0]))
    dim = env.concrete(env.arg(1, "dim", None))
    if dim is None or (isinstance(dim, (tuple, list)) and not dim):  # dim=() reduces every axis too
        return set(range(n))
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return {d % n for d in dims}


def _keepdim(node, env) -> bool:
    return bool(env.concrete(env.arg(2, "keepdim", False)))


class PerChannel(ChannelRule):
    """``mixed(node, env)`` gives the axes the op mixes; ``reduces`` drops them (no keepdim)."""

    name = "per_channel"

    def __init__(self, mixed, reduces: bool = False):
        self.mixed = mixed
        self.reduces = reduces

    def _out_axes(self, axes, node, env, mixed):
        if not self.reduces or _keepdim(node, env):
            return axes
        return tuple(a - sum(1 for m in mixed if m < a) for a in axes)

    def effects(self, node, env):
        x = env.tensor_args()[0]
        mixed = self.mixed(node, env)
        outs, links, needs, fixed = [], [], [], []
        for r in env.dims(x):
            if set(r.axes) & mixed:
                (needs if self.reduces else fixed).append((r, f"{node.name}: mixes channel axis {r.axes}"))
                continue
            out = env.out(self._out_axes(r.axes, node, env, mixed))
            outs.append(out)
            links.append(Link(r, out))
        if not env.out_facts.is_tensor:
            fixed.extend((l.a, f"{node.name}: returns several tensors") for l in links)
            return Effects(fixed=tuple(fixed), needs=tuple(needs))
        return Effects(outputs=tuple(outs), links=tuple(links), needs=tuple(needs), fixed=tuple(fixed))

    def constants(self, node, env, known):
        x = env.tensor_args()[0]
        eff = known.effects(node)
        dims = [l.a for l in eff.links]
        if not dims:
            return {}
        if computed_scalars(node):
            return {}
        fills = [(r.axes, known.value(r)) for r in dims]
        shape = env.shape(x)
        # full extent: sums count positions. The result keeps the example's shape except for the
        # batch axis, so a reduction over the batch runs again one longer and only what did not
        # move is a constant (a sum over the batch counts it)
        mixed = {0} & set(self.mixed(node, env)) if self.reduces else set()
        grown = tuple(s + 1 if a in mixed else s for a, s in enumerate(shape))
        try:
            y = call_with(node, env, lambda a: probe(shape, fills).expand(shape).contiguous() if a is x else env.concrete(a))
            y_grown = call_with(node, env, lambda a: probe(grown, fills).expand(grown).contiguous() if a is x else env.concrete(a)) if mixed else y
        except Exception:
            return {}
        result = {}
        for link in eff.links:
            vals = per_channel_constant(y, link.b.axes)
            moved = per_channel_constant(y_grown, link.b.axes)
            vals[np.isnan(known.value(link.a)) | ~np.isclose(vals, moved, rtol=1e-12, atol=0.0)] = math.nan
            result[link.b] = vals
        return result


class Softmax(ChannelRule):
    """Softmax along a channel axis mixes those channels; along another axis it is per-channel."""

    name = "softmax"

    def effects(self, node, env):
        x = env.tensor_args()[0]
        n = len(env.shape(x))
        if node.op == "call_module":
            axis = env.module().dim
        else:
            axis = env.concrete(env.arg(1, "dim"))
        axis = axis % n if axis is not None else (0 if n in (0, 1, 3) else 1)  # torch's implicit dim (_get_softmax_dim)
        links, mixes, outs = [], [], []
        for r in env.dims(x):
            out = env.out(r.axes)
            outs.append(out)
            links.append(Link(r, out))
            if axis in r.axes:
                labels = np.zeros(int(np.prod([env.shape(x)[a] for a in r.axes])), dtype=np.int64)
                mixes.append(Mix(r, labels, f"{node.name}: softmax over channels"))
        return Effects(outputs=tuple(outs), links=tuple(links), mixes=tuple(mixes))


_POOLS = [
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.upsample, torch.max_pool2d,
]
register_instance(PerChannel(_spatial_axes), *_POOLS)
register_instance(PerChannel(_padded_axes), F.pad)
_PAD_MODULES = [
    getattr(nn, f"{kind}Pad{d}d") for kind in ("Constant", "Zero", "Reflection", "Replication", "Circular") for d in (1, 2, 3)
    if hasattr(nn, f"{kind}Pad{d}d")
]
register_instance(PerChannel(_module_padded_axes), *_PAD_MODULES)
register_instance(PerChannel(_reduced_axes, reduces=True), "mean", "sum", "amax", "amin", torch.mean, torch.sum, torch.amax, torch.amin)
register_instance(Softmax(), F.softmax, "softmax", torch.softmax, nn.Softmax, F.log_softmax, "log_softmax", nn.LogSoftmax)
