"""compensate_ln: rewrite the norms a removal plan narrows into CompensatedLayerNorm (DESIGN §4).

Runs on the output of :func:`srfx.passes.minimize` for the same plan. ``minimize`` has already
sliced every stream channel the plan removes, including the norm's own scale and shift; the
norm itself would now compute its statistics over the kept channels only, which is wrong.
This pass puts that right:

- each narrowed LayerNorm / RMSNorm (module or functional) becomes a
  :class:`~srfx.compensated_ln.CompensatedLayerNorm` over the kept channels that keeps the
  original channel count and the removed channels' constants, and emits u = 1/s and/or
  v = mu/s as extra channels when a reader needs them;
- each reader that absorbs the norm (``NormSite.readers``) gets the u and v columns and
  ``W_R beta_R`` in its bias, computed from the original weights.

Guarantee: with ``minimize`` before it, the module computes the original function up to
floating-point rounding. Before/after for one pre-norm block whose stream channel 3 is 0::

    ln(384) -> qkv(384 -> 1152)   becomes   CompensatedLayerNorm(383 of 384, emits v) -> qkv(384 -> 1152)
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult

from srfx.compensated_ln import CompensatedLayerNorm, compensate_reader
from srfx.compensation import PENDING_KEY
from srfx.errors import RewriteError
from srfx.facts import ParamKey, Ref
from srfx.passes import _attrs
from srfx.planning import NormSite, Plan

__all__ = ["compensate_ln", "PENDING_KEY"]


def _rows_kept(plan: Plan, weight: str) -> torch.Tensor:
    dim = plan.coupling.dim(Ref(ParamKey(weight), (0,)))
    return torch.as_tensor(plan.keep(dim.id), dtype=torch.long)


def _reader_columns(plan: Plan, site: NormSite, keep: torch.Tensor, original: dict, gm: fx.GraphModule, prior_norm):
    """Per reader: its compensated weight and bias (rows as minimize left them), reading the
    u / v columns it needs itself (:meth:`ReaderCompensation.with_emit` aligns the readers of
    one norm). A norm that was compensated before (``prior_norm``) adds the new removals to the
    u/v columns it has."""
    gamma = original[site.weight] if site.weight else None
    beta = original[site.bias] if site.bias else None
    out = []
    for role in site.readers:
        rows = _rows_kept(plan, role.weight)
        w = original[role.weight].detach().index_select(0, rows)
        prior = (None, None, None)
        if prior_norm is not None:
            k, columns = prior_norm.kept, {}
            for name in ("emit_u", "emit_v", "emit_one"):
                if getattr(prior_norm, name, False):
                    columns[name] = w[:, k : k + 1]
                    k += 1
            w, prior = w[:, : prior_norm.kept], (columns.get("emit_u"), columns.get("emit_v"), columns.get("emit_one"))
        bias_now = _attrs.get(gm, role.bias) if role.bias else None
        comp = compensate_reader(w, bias_now, gamma, beta, keep, site.constants, centered=site.centered, prior=prior, one=_emits_one(site, prior_norm))
        out.append((role, comp))
    return out


def _emits_one(site: NormSite, prior_norm) -> bool:
    return site.zero_padded or bool(getattr(prior_norm, "emit_one", False))


def _resize_reshapes(gm: fx.GraphModule, site: NormSite, width: int) -> None:
    """Views of the norm's output between it and its readers carry kept + emitted channels."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, axis in site.reshapes:
        node = nodes[name]
        rest = node.args[1:]
        packed = len(rest) == 1 and isinstance(rest[0], (tuple, list))
        shape = list(rest[0]) if packed else list(rest)
        shape[axis] = width
        node.args = (node.args[0], tuple(shape)) if packed else (node.args[0], *shape)


def _install_reader(gm: fx.GraphModule, role, comp) -> None:
    owner = _attrs.get(gm, role.owner) if role.owner in dict(gm.named_modules()) else None
    weight = _attrs.get(gm, role.weight)
    _attrs.put(gm, role.weight, comp.weight)
    if role.bias is not None:
        _attrs.put(gm, role.bias, comp.bias)
    elif comp.bias.any():
        if not isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd)):
            raise RewriteError(f"{role.owner} absorbs a compensated norm's shift but has no bias to hold it")
        owner.bias = nn.Parameter(comp.bias, requires_grad=weight.requires_grad)
    if isinstance(owner, nn.Linear):
        owner.in_features = comp.weight.shape[1]
    elif isinstance(owner, nn.modules.conv._ConvNd):
        owner.in_channels = comp.weight.shape[1]


def _replace_norm(gm: fx.GraphModule, site: NormSite, norm: CompensatedLayerNorm, index: int) -> None:
    node = next((n for n in gm.graph.nodes if n.name == site.node), None)
    if node is None:
        raise RewriteError(f"compensate_ln: node {site.node} is not in the minimized graph")
    if node.op == "call_module":
        _attrs.put(gm, node.target, norm)
        return
    # functional norm: own the parameters' module path when nothing else lives under it
    owner = (site.weight or site.bias or "").rpartition(".")[0]
    params = {site.weight, site.bias} - {None}
    others = [n for n in gm.graph.nodes if n.op in ("get_attr", "call_module") and n.target.startswith(owner + ".") and n.target not in params]
    target = owner if owner and not others else f"_srfx_compensated_norm_{index}"
    x = node.args[0] if node.args else node.kwargs["input"]
    with gm.graph.inserting_before(node):
        if target == owner:
            _attrs.put(gm, owner, norm)
        else:
            gm.add_submodule(target, norm)
        new = gm.graph.call_module(target, (x,))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    attrs = [a for a in node.all_input_nodes if a.op == "get_attr"]
    gm.graph.erase_node(node)
    for a in attrs:
        if not a.users:
            gm.graph.erase_node(a)


def _patch_size_reads(gm: fx.GraphModule, site: NormSite) -> None:
    """Channel counts read off the norm's output size other tensors: give them the original."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, size in site.size_reads:
        node = nodes.get(name)
        if node is None:
            continue
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a: size if a is node else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: size if a is node else a)
        gm.graph.erase_node(node)


def _narrowed(plan: Plan, site: NormSite, keep, gamma, beta, emit_u: bool, emit_v: bool, prior) -> CompensatedLayerNorm:
    """The norm over ``keep``: from the original norm, or from an earlier compensated one
    (same total count; the removed constants' statistics grow)."""
    if prior is None:
        total = plan.coupling.dims[site.in_dim].size
        return CompensatedLayerNorm.from_parts(total, keep, site.constants, site.eps, gamma, beta, emit_u, emit_v, -1, site.centered, _emits_one(site, None))
    return prior.narrowed(keep, site.constants[: prior.kept], emit_u, emit_v, _emits_one(site, prior))


def compensate_ln(gm: fx.GraphModule, plan: Plan) -> PassResult:
    """Finish ``minimize(graph, plan)`` for the norms ``plan.compensations`` narrows (in place
    on ``gm``, the module minimize returned: it is minimize's own copy)."""
    if not plan.compensations:
        return PassResult(gm, False)
    if gm is plan.coupling.graph_module:
        raise RewriteError("compensate_ln runs on the module minimize returned, not on the planned one")
    original = {**dict(plan.coupling.graph_module.named_parameters(remove_duplicate=False)), **dict(plan.coupling.graph_module.named_buffers())}
    nodes = {n.name: n for n in plan.coupling.graph_module.graph.nodes}
    for i, site in enumerate(plan.compensations):
        keep = torch.as_tensor(plan.keep(site.in_dim), dtype=torch.long)
        prior = plan.coupling.graph_module.get_submodule(nodes[site.node].target) if site.compensated else None
        own = _reader_columns(plan, site, keep, original, gm, prior)
        if site.readers:  # the norm emits a column when any reader needs it; all then read it
            emit_u = any(c.emit_u for _, c in own)
            emit_v = any(c.emit_v for _, c in own)
        else:  # nobody absorbs: only gamma = 0 channels went, the emitted channels stay as they were
            emit_u, emit_v = (prior.emit_u, prior.emit_v) if prior is not None else (False, False)
        readers = [(role, comp.with_emit(emit_u, emit_v)) for role, comp in own]
        gamma = original[site.weight] if site.weight else None
        beta = original[site.bias] if site.bias else None
        norm = _narrowed(plan, site, keep, gamma, beta, emit_u, emit_v, prior)
        if gamma is not None:
            norm.weight.requires_grad_(gamma.requires_grad)
        if beta is not None:
            norm.bias.requires_grad_(beta.requires_grad)
        _resize_reshapes(gm, site, len(keep) + norm.extra_channels)
        _patch_size_reads(gm, site)
        _replace_norm(gm, site, norm, i)
        for role, comp in readers:
            _install_reader(gm, role, comp)
    gm.meta.pop(PENDING_KEY, None)
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, True)
