"""Layers with weights: Linear, ConvNd (plain, depthwise, grouped), ConvTransposeNd, Embedding.

Linear and plain convs are boundaries (DESIGN §2): input channels belong to the upstream
group (they *read* them), output channels start a new group (they *write* them). Depthwise
convs are per-channel ops inside a group. Other grouped convs are kept whole: removing a
channel would unbalance their groups.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..facts import Effects, Link, Mix, Role
from ..registry import ChannelRule, register_instance

__all__ = ["WeightSpec", "weight_spec"]


@dataclass(frozen=True)
class WeightSpec:
    weight: Optional[str]  # qualname, None when the weight is computed in forward
    bias: Optional[str]
    kind: str  # "linear", "conv", "conv_transpose"
    groups: int = 1
    zero_padded: bool = False  # a constant channel c != 0 is not constant at the borders

    @property
    def fold(self) -> str:
        return "zero_only" if self.kind == "conv_transpose" or self.zero_padded else ("linear" if self.kind == "linear" else "conv")


def _zero_padded(padding, padding_mode: str, kernel) -> bool:
    if padding_mode != "zeros":
        return False
    if isinstance(padding, str):
        return padding == "same" and any(k > 1 for k in kernel)
    pads = padding if isinstance(padding, (tuple, list)) else (padding,)
    return any(p > 0 for p in pads)


def weight_spec(node, env) -> WeightSpec:
    if node.op == "call_module":
        m = env.module()
        bias = f"{node.target}.bias" if getattr(m, "bias", None) is not None else None
        if isinstance(m, nn.Linear):
            return WeightSpec(f"{node.target}.weight", bias, "linear")
        if isinstance(m, nn.Embedding):
            return WeightSpec(f"{node.target}.weight", None, "embedding")
        transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
        return WeightSpec(
            f"{node.target}.weight", bias, "conv_transpose" if transposed else "conv", m.groups,
            _zero_padded(m.padding, m.padding_mode, m.kernel_size),
        )
    weight = env.param_name(env.arg(1, "weight"))
    bias_arg = env.arg(2, "bias")
    bias = env.param_name(bias_arg) if bias_arg is not None else None
    if bias_arg is not None and bias is None:
        weight = None  # a computed bias: treat like a computed weight (kept)
    if node.target is F.linear:
        return WeightSpec(weight, bias, "linear")
    transposed = node.target in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
    padding = env.concrete(env.arg(4 if transposed else 4, "padding", 0))
    groups = env.concrete(env.arg(6 if transposed else 6, "groups", 1))
    kernel = env.shape(env.arg(1, "weight"))[2:]
    return WeightSpec(weight, bias, "conv_transpose" if transposed else "conv", groups, _zero_padded(padding, "zeros", kernel))


class WeightedLayer(ChannelRule):
    name = "weighted"

    def effects(self, node, env):
        eff, spatial = self._effects(node, env)
        return dataclasses.replace(eff, fixed=eff.fixed + spatial) if spatial else eff

    def _effects(self, node, env):
        spec = weight_spec(node, env)
        x = env.arg(0, "input")
        n = len(env.shape(x))
        ch_in = n - 1 if spec.kind == "linear" else 1
        weight_dims = len(env.module().weight.shape) if node.op == "call_module" else len(env.shape(env.arg(1, "weight")) or ())
        if spec.kind != "linear" and n < weight_dims:  # an unbatched (C, H, W) conv: channels on axis 0
            why = f"{node.name}: convolution of an unbatched input"
            return Effects(fixed=tuple((r, why) for r in env.dims(x))), ()
        passthrough = [r for r in env.dims(x) if ch_in not in r.axes]
        touching = [r for r in env.dims(x) if ch_in in r.axes and r.axes != (ch_in,)]
        spatial = ()
        if spec.kind != "linear" and passthrough:
            # a conv slides along its spatial axes: channels laid out there (ECA's Conv1d over
            # the channel axis) are mixed with their neighbours, not passed through
            why = f"{node.name}: a convolution mixes along the axis these channels lie on"
            spatial, passthrough = tuple((r, why) for r in passthrough), []
        links = [Link(r, env.out(r.axes)) for r in passthrough]
        outs = [env.out(r.axes) for r in passthrough]
        if spec.weight is None or touching:
            why = f"{node.name}: weight computed in forward" if spec.weight is None else f"{node.name}: channels span its input axis"
            return Effects(outputs=tuple(outs), links=tuple(links), fixed=tuple((r, why) for r in env.dims(x) if r not in passthrough) + ((env.dim_at(x, (ch_in,)), why),)), spatial
        x_in, out = env.dim_at(x, (ch_in,)), env.out((ch_in,))
        # a functional layer's get_attr weight/bias dims are tied to the parameter dims linked below
        weight_args = [a for a in env.tensor_args() if a is not x and env.param_name(a) is not None]
        w_in, w_out = (0, 1) if spec.kind == "conv_transpose" else (1, 0)
        # ... but a kernel axis is no channel: nothing may slice it
        kernel = f"{node.name}: kernel axis of its weight"
        spatial += tuple((r, kernel) for a in weight_args for r in env.dims(a) if not set(r.axes) <= {w_in, w_out})
        meta = {"untouched": tuple(r for a in weight_args for r in env.dims(a) if set(r.axes) <= {w_in, w_out})}
        param = env.param_ref
        outs.append(out)
        out_links = [Link(out, param(spec.weight, w_out))]
        if spec.bias:
            out_links.append(Link(out, param(spec.bias, 0)))
        depthwise = spec.kind == "conv" and spec.groups > 1 and spec.groups == env.shape(x)[1]
        if spec.groups == 1:
            roles = [
                Role("reader", x_in, _owner(node, spec), node.name, spec.fold, spec.weight, spec.bias, w_in),
                Role("writer", out, _owner(node, spec), node.name, None, spec.weight, spec.bias, w_in),
            ]
            links += [Link(x_in, param(spec.weight, w_in))] + out_links
            return Effects(outputs=tuple(outs), links=tuple(links), roles=tuple(roles), meta=meta), spatial
        if spec.groups > 1 and node.op != "call_module":
            # minimize rewrites a module's groups, not a functional call's literal argument
            why = f"{node.name}: functional grouped conv (groups={spec.groups}); kept"
            return Effects(outputs=tuple(outs), links=tuple(links + out_links), fixed=((x_in, why), (out, why), (param(spec.weight, w_in), why)), meta=meta), spatial
        if depthwise:
            c_out = env.out_shape[1]
            mult = c_out // spec.groups
            idx = np.arange(c_out)
            links += [Link(out, x_in, (idx, idx // mult))] + out_links
            roles = [Role("op", out, _owner(node, spec), node.name, None, spec.weight, spec.bias, w_in)]
            return Effects(outputs=tuple(outs), links=tuple(links), roles=tuple(roles), meta={"depthwise": mult, **meta}), spatial
        if spec.kind != "conv":
            why = f"{node.name}: grouped transposed conv (groups={spec.groups}); kept"
            # the weight's input axis too: nothing else ties it to x_in, and left free it looks unread
            return Effects(outputs=tuple(outs), links=tuple(links + out_links), fixed=((x_in, why), (out, why), (param(spec.weight, w_in), why)), meta=meta), spatial
        # grouped conv: every group must keep as many channels as the others. Input j of each
        # group is one weight column, so inputs go as a column across all groups; outputs go
        # as the same index in every group (a mix).
        c_in, c_out = env.shape(x)[1], env.out_shape[1]
        in_per_group, out_per_group = c_in // spec.groups, c_out // spec.groups
        idx = np.arange(c_in)
        links += [Link(x_in, param(spec.weight, w_in), (idx, idx % in_per_group))] + out_links
        mix = Mix(out, np.arange(c_out) % out_per_group, f"{node.name}: grouped conv (groups={spec.groups}) removes the same channels in every group")
        roles = [
            Role("reader", x_in, _owner(node, spec), node.name, "zero_only", spec.weight, spec.bias, w_in),
            Role("writer", out, _owner(node, spec), node.name, None, spec.weight, spec.bias, w_in),
        ]
        return Effects(outputs=tuple(outs), links=tuple(links), roles=tuple(roles), mixes=(mix,), meta={"groups": spec.groups, **meta}), spatial

    def constants(self, node, env, known):
        spec = weight_spec(node, env)
        if spec.weight is None or (spec.groups > 1 and spec.kind != "conv"):
            return {}
        x = env.arg(0, "input")
        ch_in = len(env.shape(x)) - 1 if spec.kind == "linear" else 1
        out = env.out((ch_in,))
        if out not in known.dims_of(node):
            return {}
        w = known.param(spec.weight).detach().double()
        b = known.param(spec.bias).detach().double() if spec.bias else torch.zeros(env.out_shape[ch_in], dtype=torch.float64)
        c = torch.as_tensor(known.value_or_nan(env.dim_at(x, (ch_in,)), env.shape(x)[ch_in]))
        if spec.kind == "conv_transpose":
            w = w.transpose(0, 1)
            c = torch.where(c == 0, c, torch.full_like(c, float("nan")))  # only zeros survive
        elif spec.zero_padded:
            c = torch.where(c == 0, c, torch.full_like(c, float("nan")))
        kernel = int(np.prod(w.shape[2:])) if w.dim() > 2 else 1
        w3 = w.reshape(w.shape[0], w.shape[1], kernel)
        w_sum, nz = w3.sum(-1), (w3 != 0).any(-1)  # (out, in per group)
        groups = spec.groups if spec.kind == "conv" else 1
        per_out = max(1, w.shape[0] // groups)
        # output o of group g = o // per_out reads inputs g * in_per_group + j
        idx = (torch.arange(w.shape[0])[:, None] // per_out) * w.shape[1] + torch.arange(w.shape[1])[None, :]
        c_in = c[idx] if len(c) else torch.zeros(idx.shape, dtype=torch.float64)
        blocked = (nz & torch.isnan(c_in)).any(1)
        vals = b + (w_sum * torch.nan_to_num(c_in)).sum(1)
        vals[blocked] = float("nan")
        return {out: vals.numpy()}


def _owner(node, spec: WeightSpec) -> str:
    return node.target if node.op == "call_module" else spec.weight.rsplit(".", 1)[0] if spec.weight else node.name


class EmbeddingRule(ChannelRule):
    """An embedding writes its output channels from its weight's columns."""

    name = "embedding"

    def effects(self, node, env):
        n = len(env.out_shape)
        out = env.out((n - 1,))
        weight = f"{node.target}.weight"
        return Effects(
            outputs=(out,),
            links=(Link(out, env.param_ref(weight, 1)),),
            roles=(Role("writer", out, node.target, node.name, None, weight, None, 0),),
        )

    def constants(self, node, env, known):
        w = known.param(f"{node.target}.weight").detach().double()
        same = (w == w[:1]).all(0)
        vals = w[0].clone()
        vals[~same] = float("nan")
        return {env.out((len(env.out_shape) - 1,)): vals.numpy()}


register_instance(
    WeightedLayer(), nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d, F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
    F.conv_transpose3d,
    nn.modules.linear.NonDynamicallyQuantizableLinear,  # nn.MultiheadAttention's out_proj: a plain Linear
)
register_instance(EmbeddingRule(), nn.Embedding)
