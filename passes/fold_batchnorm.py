"""fold_batchnorm: fold eval-mode BatchNorm into the convolution that feeds it.

Guarantee: same function up to floating-point rounding, in eval semantics; one tensor per
channel fewer to store (weight, bias, running mean and variance become part of the conv's
weight and bias). Applies where a Conv's output is read only by the BatchNorm and the
BatchNorm's tensors are used nowhere else; the input module is not modified.

    conv(x) -> bn  ==>  conv'(x)   with  W' = W * s,  b' = (b - mean) * s + beta,
                                         s = gamma / sqrt(var + eps)
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

from srfx.env import is_inplace
from srfx.passes import _attrs

__all__ = ["fold_batchnorm"]


def _bn_tensors(gm, node) -> Optional[dict]:
    """mean, var, weight, bias, eps of a BatchNorm node, or None if it is not foldable."""
    if node.op == "call_module":
        m = _attrs.get(gm, node.target)
        if type(m) not in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) or m.running_mean is None:
            return None
        return {"mean": m.running_mean, "var": m.running_var, "weight": m.weight, "bias": m.bias, "eps": m.eps, "attrs": []}
    if node.op == "call_function" and node.target is F.batch_norm:
        names = ["running_mean", "running_var", "weight", "bias"]
        args = list(node.args) + [None] * 8
        vals = [args[i + 1] if i + 1 < len(node.args) else node.kwargs.get(n) for i, n in enumerate(names)]
        training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training", False)
        eps = node.args[7] if len(node.args) > 7 else node.kwargs.get("eps", 1e-5)
        if training is not False or vals[0] is None or vals[1] is None:
            return None
        if any(v is not None and (not isinstance(v, fx.Node) or v.op != "get_attr" or len(v.users) != 1) for v in vals):
            return None
        tensors = [_attrs.get(gm, v.target) if v is not None else None for v in vals]
        return {"mean": tensors[0], "var": tensors[1], "weight": tensors[2], "bias": tensors[3], "eps": eps, "attrs": [v for v in vals if v is not None]}
    return None


def _reads_only_shape(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("ndim", "shape", "dtype", "device")
    return node.op == "call_method" and node.target in ("size", "dim")


def _fold(conv: nn.modules.conv._ConvNd, bn: dict) -> None:
    with torch.no_grad():
        var, mean = bn["var"].double(), bn["mean"].double()
        scale = (bn["weight"].double() if bn["weight"] is not None else torch.ones_like(var)) / torch.sqrt(var + bn["eps"])
        shift = bn["bias"].double() if bn["bias"] is not None else torch.zeros_like(var)
        w = conv.weight.double() * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
        b = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
        b = (b - mean) * scale + shift
        conv.weight = nn.Parameter(w.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)


def _drop_attr(gm: fx.GraphModule, qualname: str) -> None:
    owner, _, attr = qualname.rpartition(".")
    delattr(_attrs.get(gm, owner), attr)  # _attrs.get of "" is gm itself


def fold_batchnorm(gm: fx.GraphModule) -> PassResult:
    """Return a copy of ``gm`` with every foldable conv -> BatchNorm pair folded."""
    counts = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
        elif n.op == "get_attr":  # a conv whose weight is also read directly is not the BatchNorm's alone
            owner = n.target.rpartition(".")[0]
            counts[owner] = counts.get(owner, 0) + 1
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or counts[node.target] != 1:
            continue
        conv = _attrs.get(gm, node.target)
        if type(conv) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            continue
        readers = [u for u in node.users if not _reads_only_shape(u)]  # x.ndim asserts stay valid
        if len(readers) != 1:
            continue
        bn_node = readers[0]
        if bn_node.args and bn_node.args[0] is node and (bn_node.op != "call_module" or counts[bn_node.target] == 1):
            if _bn_tensors(gm, bn_node) is not None:
                pairs.append((node.name, bn_node.name))
    if not pairs:
        return PassResult(gm, False)
    out = copy.deepcopy(gm)
    by_name = {n.name: n for n in out.graph.nodes}
    for conv_name, bn_name in pairs:
        conv_node, bn_node = by_name[conv_name], by_name[bn_name]
        bn = _bn_tensors(out, bn_node)
        if bn["weight"] is not None and bn["weight"].shape[0] != _attrs.get(out, conv_node.target).out_channels:
            continue
        _fold(_attrs.get(out, conv_node.target), bn)
        bn_node.replace_all_uses_with(conv_node)
        out.graph.erase_node(bn_node)
        for attr in bn["attrs"]:
            target = attr.target
            out.graph.erase_node(attr)
            if not any(n.op == "get_attr" and n.target == target for n in out.graph.nodes):
                _drop_attr(out, target)
    # nodes nobody reads that write in place (``h.relu_()``, ``h += t`` as statements) still act
    modules = dict(out.named_modules())
    out.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or is_inplace(n, modules))
    out.delete_all_unused_submodules()
    out.graph.lint()
    out.recompile()
    return PassResult(out, True)
