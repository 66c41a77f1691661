"""Pruners for :class:`srfx.cycle.SqueezeRelease`, and the index bookkeeping a cycle needs:
undoing a compressed model's input gather (:func:`ungather`) and the indices minimize keeps
per parameter (:func:`kept_indices`, used to slice optimizer state).

A pruner is ``pruner(model, sparsity, masks) -> masks``: keep-masks over the prunable weights
reaching ``sparsity`` (``masks``: the current ones, never revived). It may adjust kept weights
in place (the driver snapshots the model before each step and restores it on rollback).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["Pruner", "magnitude_pruner", "unit_pruner", "ungather", "kept_indices"]

Pruner = Callable[[nn.Module, float, dict], dict]


def magnitude_pruner(score="magnitude", include: Iterable[str] = (), scope: str = "global") -> Pruner:
    """``pruner`` for :class:`SqueezeRelease`: :func:`srfx.passes.mask.magnitude_masks`."""
    from srfx.passes.mask import magnitude_masks

    include = tuple(include)

    def prune(model, sparsity, masks):
        return magnitude_masks(model, sparsity, scope=scope, include=include, existing=masks, score=score)

    return prune


def unit_pruner(calibration_batch: Any = None, *, compensate: bool = True, loss: Optional[Callable[[nn.Module], float]] = None, chunks: int = 3, layers=None) -> Pruner:
    """``pruner`` that removes whole inputs/units (:func:`srfx.passes.mask.unit_masks`).

    With ``loss`` (``loss(model) -> float``, lower is better, e.g. cross-entropy or a
    distillation loss on a fixed batch) the weights to remove are taken in ``chunks`` pieces,
    and each piece comes from the one layer whose removal raises ``loss`` least per weight
    removed (counting the producer's row a removed hidden unit also frees); without it, a
    global ranking of ``std(x_j) * ||W[:, j]||`` normalized per layer decides.
    """
    from srfx.passes.mask import unit_masks

    def prune(model, sparsity, masks):
        if loss is None:
            new = unit_masks(model, sparsity, calibration_batch=calibration_batch, existing=masks, compensate=compensate and calibration_batch is not None, layers=layers)
        else:
            new = _greedy_unit_masks(model, sparsity, masks, calibration_batch, compensate, loss, chunks, layers)
        return {**masks, **new}  # masks of tensors units do not cover (``include``d biases) stay

    return prune


def _greedy_unit_masks(model, sparsity, masks, batch, compensate, loss, chunks, layers):
    from srfx.passes.mask import apply_masks, prunable_parameters, unit_masks

    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and getattr(m, "groups", 1) == 1]
    if layers is not None:
        names = [n for n in names if n in set(layers)]
    params = prunable_parameters(model)
    total = sum(p.numel() for p in params.values())
    start = sum(int((p == 0).sum()) for p in params.values())
    masks = dict(masks or {})
    for c in range(1, chunks + 1):
        goal = (start + (sparsity * total - start) * c / chunks) / total
        base, best = loss(model), None
        for n in names:
            trial = copy.deepcopy(model)
            new = unit_masks(trial, goal, calibration_batch=batch, existing=masks, layers=[n], compensate=compensate and batch is not None, min_inputs=2)
            apply_masks(trial, new)
            freed = _freed(trial, model)
            if freed <= 0:
                continue
            d = (loss(trial) - base) / freed
            if best is None or d < best[0]:
                best = (d, trial, new)
        if best is None:
            break
        with torch.no_grad():  # adopt the winner's weights (compensated biases, zeroed columns)
            for p, q in zip(model.parameters(), best[1].parameters()):
                p.copy_(q)
        masks = best[2]
    return {n: (p.detach() != 0) & masks.get(n, torch.ones((), dtype=torch.bool)) for n, p in params.items()}


def _freed(new: nn.Module, old: nn.Module) -> int:
    """Weights a minimize would free in ``new`` beyond ``old``: the newly zeroed columns plus,
    for each newly dead input of a Linear/Conv, the matching row of the module producing it (the
    previous Linear/Conv whose output count equals this input count)."""
    mods_new = [m for m in new.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    mods_old = [m for m in old.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    freed = 0
    for i, (a, b) in enumerate(zip(mods_new, mods_old)):
        wa, wb = a.weight.detach(), b.weight.detach()
        freed += int((wb != 0).sum()) - int((wa != 0).sum())
        if i > 0 and wa.dim() > 1:
            prev = mods_old[i - 1].weight
            if prev.shape[0] == wa.shape[1]:
                dead = (wa != 0).movedim(1, 0).reshape(wa.shape[1], -1).any(1)
                was = (wb != 0).movedim(1, 0).reshape(wb.shape[1], -1).any(1)
                freed += int((was & ~dead).sum()) * (prev[0].numel() + 1)
    return freed


# -- the compressed model's input gathers and the kept indices --------------------------------


def _input_gathers(gm: fx.GraphModule):
    """(index_select node, index get_attr node, reader module) for every input gather a compress
    inserted: a model input selected by a ``_srfx_gather*`` buffer and read by exactly one
    ungrouped Linear/Conv. The one definition :func:`ungather` and :func:`kept_indices` share."""
    placeholders = {n for n in gm.graph.nodes if n.op == "placeholder"}
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.index_select or len(node.args) != 3:
            continue
        x, _, idx = node.args
        if x not in placeholders or not (isinstance(idx, fx.Node) and idx.op == "get_attr" and str(idx.target).startswith("_srfx_gather")):
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        reader = modules[users[0].target]
        if isinstance(reader, (nn.Linear, nn.modules.conv._ConvNd)) and getattr(reader, "groups", 1) == 1:
            yield node, idx, users[0].target


def ungather(model: nn.Module, example_input: Any) -> nn.Module:
    """A copy of a compressed ``model`` whose input gathers (``index_select`` of a model input by
    a ``_srfx_gather_*`` buffer, feeding one Linear/Conv) are undone: the reader gets its full
    input width back, zero columns where inputs were dropped. Same function; a pruner then sees
    every input again. Models without gathers come back as a plain copy."""
    out = copy.deepcopy(model)
    if not isinstance(out, fx.GraphModule):
        return out
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    placeholders = [n for n in out.graph.nodes if n.op == "placeholder"]
    changed = False
    for node, idx, owner in _input_gathers(out):
        x, axis, _ = node.args
        reader = out.get_submodule(owner)
        size = inputs[placeholders.index(x)].shape[axis]
        keep = getattr(out, idx.target)
        w = reader.weight.detach()
        full = torch.zeros((w.shape[0], size) + tuple(w.shape[2:]), dtype=w.dtype, device=w.device)
        full.index_copy_(1, keep.to(w.device), w)
        reader.weight = nn.Parameter(full, requires_grad=reader.weight.requires_grad)
        if isinstance(reader, nn.Linear):
            reader.in_features = size
        else:
            reader.in_channels = size
        node.replace_all_uses_with(x)
        out.graph.erase_node(node)
        if not idx.users:
            out.graph.erase_node(idx)
            delattr(out, idx.target)
        changed = True
    if changed:
        out.graph.lint()
        out.recompile()
    return out


def _gathers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Reader weight name -> gather indices, for the gathers :func:`ungather` undoes."""
    if not isinstance(model, fx.GraphModule):
        return {}
    return {f"{owner}.weight": getattr(model, idx.target) for _, idx, owner in _input_gathers(model)}


def kept_indices(model: nn.Module, example_input: Any, kept: Optional[dict] = None) -> dict[str, dict[int, torch.Tensor]]:
    """Per parameter of ``model``, the indices along each axis that :func:`srfx.compress` of
    ``ungather(model)`` keeps (axes that do not shrink are left out); used to slice optimizer
    state. ``kept``: that compress's ``report.kept``, when it already ran (else the plan is
    computed here, without BatchNorm folding). Indices into a gathered model's first layer
    are mapped back to its own columns."""
    if kept is None:
        import srfx

        flat = ungather(model, example_input)
        kept = srfx.plan(flat, example_input).kept_indices()
    cuts = {name: {axis: torch.as_tensor(keep, dtype=torch.long) for axis, keep in axes.items()} for name, axes in kept.items()}
    for name, old in _gathers(model).items():  # back to the gathered model's own columns
        axis = 1
        if name in cuts and axis in cuts[name]:
            cuts[name][axis] = torch.searchsorted(old, cuts[name][axis])
        else:
            cuts.setdefault(name, {})[axis] = torch.arange(len(old))
    return cuts
