"""Normalization layers.

BatchNorm (eval) is affine per channel: a per-channel op. LayerNorm/RMSNorm over the channel
axis and GroupNorm read several channels for their statistics: channels of one LayerNorm, or
of one GroupNorm group, are removed all together or not at all (compensate_ln lifts this).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..compensated_ln import CompensatedLayerNorm
from ..facts import Effects, Link, Mix, Role
from ..registry import ChannelRule, register_instance
from .common import call_with, channel_effects, per_channel_constant, probe

__all__ = ["BatchNormRule", "LayerNormRule", "CompensatedLayerNormRule", "GroupNormRule"]


def _affine_params(node, env, names):
    """Refs of a norm module's per-channel tensors (axis 0 of each)."""
    m = env.module()
    return [env.param_ref(f"{node.target}.{n}", 0) for n in names if getattr(m, n, None) is not None]


def _arg_refs(env, args):
    """Refs of per-channel tensors passed as get_attr arguments of a functional norm."""
    return [r for a in args if a is not None for r in env.dims(a)]


def _shift_where_unscaled(weight, bias, otherwise: np.ndarray) -> np.ndarray:
    """A zero scale makes a norm output its shift whatever comes in (gamma = 0 frees a
    channel): per channel, the shift there and ``otherwise`` elsewhere."""
    w = weight.detach().double().numpy()
    shift = bias.detach().double().numpy() if bias is not None else np.zeros_like(w)
    return np.where(w == 0, shift, otherwise)


class BatchNormRule(ChannelRule):
    name = "batch_norm"

    def _params(self, node, env):
        if node.op == "call_module":
            return _affine_params(node, env, ["weight", "bias", "running_mean", "running_var"])
        # F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        args = [env.arg(i, n) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
        return _arg_refs(env, args)

    def effects(self, node, env):
        params = self._params(node, env)
        names = [env.param_name(env.arg(i, "")) for i in (1, 2, 3, 4)] if node.op == "call_function" else []
        names = [n for n in names if n]
        owner = node.target if node.op == "call_module" else (names[0].rsplit(".", 1)[0] if names else node.name)
        if node.op == "call_function":
            args = [env.arg(i, n) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
            if any(a is not None and env.param_name(a) is None for a in args) or env.concrete(env.arg(5, "training", False)):
                x = env.tensor_args()[0]
                why = f"{node.name}: batch_norm with computed statistics or in training mode"
                return Effects(fixed=tuple((r, why) for r in env.dims(x)) + ((env.dim_at(x, (1,)), why),))
        return channel_effects(node, env, 1, params, owner)[2]

    def constants(self, node, env, known):
        if node.op == "call_function" and (env.concrete(env.arg(5, "training", False)) or env.arg(1, "running_mean") is None):
            return {}  # batch statistics (timm's weight standardization): no per-channel constant
        x = env.tensor_args()[0]
        out = env.out((1,))
        c = known.value_or_nan(env.dim_at(x, (1,)), env.shape(x)[1])
        shape = (1, len(c)) + (1,) * (len(env.shape(x)) - 2)
        stand_in = probe(shape, [((1,), c)])
        args = {x: stand_in}
        if node.op == "call_module":
            m = env.module()
            with torch.no_grad():
                y = F.batch_norm(
                    stand_in, m.running_mean.double() if m.running_mean is not None else None,
                    m.running_var.double() if m.running_var is not None else None,
                    m.weight.double() if m.weight is not None else None,
                    m.bias.double() if m.bias is not None else None, False, 0.0, m.eps,
                )
        else:
            y = call_with(node, env, lambda a: args[a] if a in args else (env.param_value(a).double() if a.op == "get_attr" else env.concrete(a)))
        vals = per_channel_constant(y, (1,))
        vals[np.isnan(c)] = np.nan
        weight, bias = self._affine(node, env)
        if weight is not None:
            vals = _shift_where_unscaled(weight, bias, vals)
        return {out: vals}

    def _affine(self, node, env):
        if node.op == "call_module":
            m = env.module()
            return m.weight, m.bias
        w, b = env.arg(3, "weight"), env.arg(4, "bias")
        return (env.param_value(w) if w is not None else None, env.param_value(b) if b is not None else None)


class LayerNormRule(ChannelRule):
    """LayerNorm over the last axis (nn.LayerNorm, F.layer_norm, RMSNorm). Its statistics mix
    all channels; ``meta`` tells compensate_ln what it needs to rebuild them (srfx.compensation)."""

    name = "layer_norm"

    def _norm(self, node, env):
        """(normalized shape, weight qualname, bias qualname, eps, centered), or a reason."""
        rms_module = getattr(nn, "RMSNorm", ())
        rms = node.target is getattr(F, "rms_norm", None) or (node.op == "call_module" and isinstance(env.module(), rms_module))
        if node.op == "call_module":
            m = env.module()
            weight = f"{node.target}.weight" if getattr(m, "weight", None) is not None else None
            bias = f"{node.target}.bias" if getattr(m, "bias", None) is not None else None
            return tuple(m.normalized_shape), weight, bias, m.eps, not rms
        shape = tuple(env.concrete(env.arg(1, "normalized_shape")))
        if rms:  # F.rms_norm(input, normalized_shape, weight=None, eps=None)
            weight, bias, eps = env.arg(2, "weight"), None, env.concrete(env.arg(3, "eps", None))
        else:  # F.layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5)
            weight, bias, eps = env.arg(2, "weight"), env.arg(3, "bias"), env.concrete(env.arg(4, "eps", 1e-5))
        names = [env.param_name(a) if a is not None else None for a in (weight, bias)]
        if any(a is not None and n is None for a, n in zip((weight, bias), names)):
            return f"{node.name}: layer_norm with computed affine parameters"
        return shape, names[0], names[1], eps, not rms

    def effects(self, node, env):
        x = env.tensor_args()[0]
        n = len(env.shape(x))
        found = self._norm(node, env)
        if isinstance(found, str):
            return Effects(fixed=tuple((r, found) for r in env.dims(x)) + ((env.dim_at(x, (n - 1,)), found),))
        shape, weight, bias, eps, centered = found
        if len(shape) != 1:
            why = f"{node.name}: normalizes over {len(shape)} axes"
            return Effects(fixed=tuple((r, why) for r in env.dims(x)) + ((env.dim_at(x, (n - 1,)), why),))
        if node.op == "call_module":
            params, owner = _affine_params(node, env, ["weight", "bias"]), node.target
        else:
            params = _arg_refs(env, [env.arg(2, "weight")] + ([env.arg(3, "bias")] if centered else []))
            owner = (weight or bias).rsplit(".", 1)[0] if (weight or bias) else node.name
        x_ch, out, eff = channel_effects(node, env, n - 1, params, owner)
        kind = "LayerNorm" if centered else "RMSNorm"
        mix = Mix(x_ch, np.zeros(shape[0], dtype=np.int64), f"{owner}: {kind} statistics read all {shape[0]} channels")
        meta = {"norm": "layer" if centered else "rms", "weight": weight, "bias": bias, "eps": eps, "owner": owner}
        return Effects(outputs=eff.outputs, links=eff.links, roles=eff.roles, mixes=(mix,), meta=meta)

    def constants(self, node, env, known):
        """Where the scale is zero the output is the shift whatever comes in (gamma = 0 frees a
        channel of the stream a LayerNorm writes, as with BatchNorm)."""
        found = self._norm(node, env)
        if isinstance(found, str) or len(found[0]) != 1 or found[1] is None:
            return {}
        _, weight, bias, _, _ = found
        n = len(env.shape(env.tensor_args()[0]))
        return {env.out((n - 1,)): _shift_where_unscaled(known.param(weight), known.param(bias) if bias else None, np.nan)}


class CompensatedLayerNormRule(ChannelRule):
    """srfx's own CompensatedLayerNorm (a leaf when tracing): its first ``kept`` output channels
    are its input channels; the emitted u/v channels after them are tied to its ``emitted``
    buffer and fixed. Its statistics mix the kept channels, and a later compensate_ln can
    narrow it further (``meta["norm"] = "compensated"``)."""

    name = "compensated_layer_norm"

    def effects(self, node, env):
        m = env.module()
        x = env.tensor_args()[0]
        n = len(env.shape(x))
        axis = m.channel_dim % n
        x_ch, out = env.dim_at(x, (axis,)), env.out((axis,))
        kept = np.arange(m.kept)
        links = [Link(x_ch, out, (kept, kept))]
        outs = [out]
        for r in env.dims(x):
            if r.axes != (axis,):
                outs.append(env.out(r.axes))
                links.append(Link(r, outs[-1]))
        for name in ("weight", "bias"):
            if getattr(m, name) is not None:
                links.append(Link(out, env.param_ref(f"{node.target}.{name}", 0), (kept, kept)))
        needs = ()
        if m.extra_channels:  # needed (kept), but only they: the stream's other channels may go
            emitted = env.param_ref(f"{node.target}.emitted", 0)
            extra = np.arange(m.extra_channels)
            links.append(Link(out, emitted, (m.kept + extra, extra)))
            needs = ((emitted, f"{node.target}: u/v channels a compensated norm emits"),)
        kind = "LayerNorm" if m.centered else "RMSNorm"
        mix = Mix(x_ch, np.zeros(m.kept, dtype=np.int64), f"{node.target}: compensated {kind} statistics read all {m.kept} channels")
        meta = {
            "norm": "compensated", "weight": f"{node.target}.weight" if m.weight is not None else None,
            "bias": f"{node.target}.bias" if m.bias is not None else None, "eps": m.eps, "owner": node.target,
        }
        roles = (Role("op", out, node.target, node.name),)
        return Effects(outputs=tuple(outs), links=tuple(links), roles=roles, mixes=(mix,), needs=needs, meta=meta)

    def constants(self, node, env, known):
        m = env.module()
        if m.weight is None:
            return {}
        vals = np.concatenate([_shift_where_unscaled(m.weight, m.bias, np.nan), np.full(m.extra_channels, np.nan)])
        return {env.out((m.channel_dim % len(env.shape(env.tensor_args()[0])),)): vals}


class GroupNormRule(ChannelRule):
    """nn.GroupNorm and F.group_norm (timm's GroupNormAct): channels of one group go together;
    the rewrite lowers the group count (module attribute or the call's num_groups)."""

    name = "group_norm"

    def effects(self, node, env):
        x = env.tensor_args()[0]
        channels = env.shape(x)[1]
        if node.op == "call_module":
            groups, params, owner = env.module().num_groups, _affine_params(node, env, ["weight", "bias"]), node.target
        else:
            groups = env.concrete(env.arg(1, "num_groups"))
            affine = [a for a in (env.arg(2, "weight"), env.arg(3, "bias")) if a is not None]
            names = [env.param_name(a) for a in affine]
            if any(n is None for n in names) or not isinstance(groups, int):
                why = f"{node.name}: group_norm with computed affine parameters"
                return Effects(fixed=tuple((r, why) for r in env.dims(x)) + ((env.dim_at(x, (1,)), why),))
            params, owner = _arg_refs(env, affine), (names[0].rsplit(".", 1)[0] if names else node.name)
        x_ch, out, eff = channel_effects(node, env, 1, params, owner)
        per_group = channels // groups
        labels = np.arange(channels) // per_group
        mix = Mix(x_ch, labels, f"{owner}: GroupNorm statistics read each group of {per_group} channels")
        return Effects(outputs=eff.outputs, links=eff.links, roles=eff.roles, mixes=(mix,))


register_instance(BatchNormRule(), nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, F.batch_norm)
register_instance(LayerNormRule(), nn.LayerNorm, F.layer_norm, *( [nn.RMSNorm, F.rms_norm] if hasattr(nn, "RMSNorm") else []))
register_instance(GroupNormRule(), nn.GroupNorm, F.group_norm)
register_instance(CompensatedLayerNormRule(), CompensatedLayerNorm)
