"""Structured masks from srfx's own coupling groups: prune whole channels (atoms) at once.

Unstructured masks leave compacted matrices a few percent dense; minimize then finds little.
A channel leaves a network only when *every* tensor slice tied to it is dead: the writers'
rows, the readers' columns, the per-channel convs in between (ConvNeXt's depthwise kernels),
and the norm scales of a stream a norm writes. The coupling analysis knows those slices:
every parameter axis is a dim, and its indices map to atoms (the units that live or die
together). So this pruner scores each atom by the root-mean-square of the Linear/Conv weight
entries it owns, relative to the other atoms of its group, and masks the weakest atoms whole,
every parameter slice of theirs (biases, norm scales and shifts, layer scales too), until the
requested fraction of Linear/Conv weights is masked; every group keeps at least one atom. An
attention head is one unit (its q, k and v rows and its columns of the output projection),
and each attention call keeps at least one head. After it, :func:`srfx.compress` removes each
pruned atom exactly: it is zero everywhere, so it is unread, and free to leave even a
LayerNorm stream.

Relative weight size cannot tell a narrow early stage (few weights per channel, every channel
needed) from a wide late one; :func:`taylor_costs` can: each atom's first-order estimate of the
loss its removal costs, per Linear/Conv weight it frees, measured on a few fixed batches.

    >>> masks = group_masks(model, x, 0.5)                           # doctest: +SKIP
    >>> SqueezeRelease(model, x, train, evaluate, pruner=group_pruner(x))  # doctest: +SKIP
    >>> pruner = group_pruner(x, loss=F.cross_entropy, batches=fixed_batches)  # doctest: +SKIP
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn as nn

from .api import analyze
from .decompose import original_slice
from .facts import ParamKey
from .modes import evaluating

__all__ = ["group_masks", "group_pruner", "taylor_costs", "atom_slices", "atom_table", "Atoms"]


@dataclass(frozen=True)
class Atoms:
    """The atoms a group pruner may mask: the parameter slices each owns, and the coupling
    group it belongs to (the pruner keeps at least one atom of every group alive)."""

    slices: dict[int, list[tuple[str, int, int]]]
    group: dict[int, int]


def atom_table(model: nn.Module, example_input: Any) -> Atoms:
    """The units a group pruner may mask, with the parameter slices (qualname, axis, index)
    each owns and its group: the atoms of shrinkable groups whose channels are single-axis,
    and whole attention heads (a head's q, k and v atoms together; their group is the
    attention call, so one head per call stays). Single dims of a head are not units: every
    head must keep the same dims."""
    coupling = analyze(model, example_input)
    weights = dict(model.named_parameters())
    needed = set()
    for did, _ in coupling.needs:
        needed.update(coupling.atoms(coupling.dims[did]).tolist())
    blocked = set(needed)
    for d in coupling.dims:
        group = coupling.groups[coupling.group_of_dim[d.id]]
        if group.fixed is not None or len(d.ref.axes) > 1:
            blocked.update(coupling.atoms(d).tolist())
    owned: dict[int, list] = defaultdict(list)  # every atom's parameter slices
    group_of: dict[int, int] = {}
    for d in coupling.dims:
        if not isinstance(d.ref.value, ParamKey):
            continue
        name, axis = d.ref.value.qualname, d.ref.axes[0]
        for index, atom in enumerate(coupling.atoms(d).tolist()):
            # a decomposed nn.MultiheadAttention's projections are slices of its in_proj_weight
            where = (name, axis, index) if name in weights else original_slice(model, name, axis, index)
            if where is not None:
                owned[atom].append(where)
                group_of[atom] = int(coupling.group_of_dim[d.id])
    slices = {atom: owned[atom] for atom in owned if atom not in blocked}
    group_of = {atom: group_of[atom] for atom in slices}
    unit = int(coupling.atom_of_slot.max()) + 1 if len(coupling.atom_of_slot) else 0
    for call, heads in enumerate(_head_atoms(coupling)):
        for atoms in heads:
            head = [s for atom in atoms.tolist() for s in owned.get(atom, ())]
            if not head or needed.intersection(atoms.tolist()):
                continue
            slices[unit], group_of[unit] = head, -1 - call
            unit += 1
    return Atoms(slices, group_of)


def _head_atoms(coupling) -> list[list[np.ndarray]]:
    """Per attention call whose channels may shrink, per head: the atoms of its q, k and v."""
    calls = []
    for eff in coupling.effects.values():
        att = eff.meta.get("attention")
        if not att:
            continue
        dims = [coupling.dim(att[n]) for n in ("q", "k", "v")]
        if any(coupling.groups[coupling.group_of_dim[d.id]].fixed is not None for d in dims):
            continue
        grids = [coupling.atoms(d).reshape(d.sizes) for d in dims]
        heads = grids[2].shape[0]
        if heads > 1:
            calls.append([np.unique(np.concatenate([g[h].ravel() for g in grids])) for h in range(heads)])
    return calls


def atom_slices(model: nn.Module, example_input: Any) -> dict[int, list[tuple[str, int, int]]]:
    """atom -> [(parameter qualname, axis, index)]: the slices of :func:`atom_table`."""
    return atom_table(model, example_input).slices


def group_masks(
    model: nn.Module,
    example_input: Any,
    sparsity: float,
    existing: Optional[dict] = None,
    atoms: Optional[Atoms] = None,
    *,
    normalize: bool = True,
    min_keep: int = 1,
    costs: Optional[dict[int, float]] = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks (name -> bool tensor) over Linear/Conv weights with at least ``sparsity`` of
    their entries masked (where ``min_keep`` allows), pruning whole atoms weakest first.

    An atom's score is the RMS of its weight entries (already-masked entries count as zero);
    with ``normalize`` divided by the mean score of its group's live atoms, so groups whose
    weights are smaller overall (another init scale, a later stage) are not emptied first.
    ``costs`` (atom -> cost, e.g. :func:`taylor_costs`) replaces that score: lowest cost goes
    first, atoms without a cost are kept. Every group keeps at least ``min_keep`` live atoms: a
    stream pruned to nothing makes the network's output constant. ``existing`` masks stay
    masked."""
    from srfx.passes.mask import prunable_parameters  # the weights the cycle's sparsity counts

    counted = prunable_parameters(model, frozen=True)  # a channel frees its frozen slices too
    params = dict(model.named_parameters())
    atoms = atoms if atoms is not None else atom_table(model, example_input)
    slices = atoms.slices
    owned_names = {name for owned in slices.values() for name, _, _ in owned} | set(counted)
    masks = {n: (existing[n].clone() if existing and n in existing else torch.ones_like(params[n], dtype=torch.bool)) for n in owned_names}
    total = sum(w.numel() for w in counted.values())
    masked = sum(int((~masks[n]).sum()) for n in counted)
    target = int(round(sparsity * total))
    scores: dict[int, float] = {}
    for atom, owned in slices.items():
        sq, alive, n = 0.0, 0, 0
        for name, axis, index in owned:
            if name not in counted:
                continue
            w = counted[name].detach().select(axis, index)
            keep = masks[name].select(axis, index)
            sq += float((w[keep] ** 2).sum())
            alive += int(keep.sum())
            n += w.numel()
        if alive:
            scores[atom] = float(np.sqrt(sq / n)) if costs is None else costs.get(atom, float("inf"))
    live: dict[int, int] = defaultdict(int)
    by_group: dict[int, list[float]] = defaultdict(list)
    for atom, score in scores.items():
        live[atoms.group[atom]] += 1
        by_group[atoms.group[atom]].append(score)
    scale = {g: (float(np.mean(v)) or 1.0) if normalize and costs is None else 1.0 for g, v in by_group.items()}
    for atom in sorted(scores, key=lambda a: (scores[a] / scale[atoms.group[a]], a)):
        if masked >= target or scores[atom] == float("inf"):
            break
        group = atoms.group[atom]
        if live[group] <= min_keep:
            continue
        live[group] -= 1
        for name, axis, index in slices[atom]:
            m = masks[name].select(axis, index)
            masked += int(m.sum()) if name in counted else 0
            m.fill_(False)
    return masks


def taylor_costs(
    model: nn.Module,
    atoms: Atoms,
    loss: Callable[[torch.Tensor, Any], torch.Tensor],
    batches: Iterable[tuple[Any, Any]],
) -> dict[int, float]:
    """atom -> first-order estimate of the loss its removal costs, per live Linear/Conv
    weight it frees.

    Zeroing an atom changes the loss by about ``-sum(w * dL/dw)`` over every slice it owns
    (weights, biases, norm scales and shifts alike). That sum is taken per batch and its root
    mean square over ``batches`` is the estimate (a converged model's mean gradient is near
    zero; the per-batch spread is not: Molchanov et al. 2019). Dividing by the weights freed
    makes a cheap-looking channel of a narrow stage, which frees little, cost what it is worth.
    The model is evaluated in eval mode (no dropout, fixed norm statistics), frozen parameters
    included (``requires_grad`` is switched on for the measurement), and its gradients, flags
    and mode are left as they were. A batch's inputs are one tensor, or a tuple/list of the
    model's positional inputs (as for :func:`srfx.compress`)."""
    from srfx.passes.mask import prunable_parameters
    from srfx.tracing import normalize_inputs

    counted = prunable_parameters(model, frozen=True)  # a channel frees its frozen slices too
    params = dict(model.named_parameters())
    axes: dict[str, set[int]] = defaultdict(set)  # the axes atoms slice, per parameter
    for owned in atoms.slices.values():
        for name, axis, _ in owned:
            axes[name].add(axis)
    names = sorted(axes)
    saved_grads = {n: p.grad for n, p in params.items()}  # backward reaches every parameter
    frozen = [n for n in names if not params[n].requires_grad]  # a frozen slice still costs what it computes
    sums: dict[int, list[float]] = defaultdict(list)
    for n in frozen:
        params[n].requires_grad_(True)
    try:
        with evaluating(model):
            for x, y in batches:
                for p in params.values():
                    p.grad = None
                with torch.enable_grad():
                    loss(model(*normalize_inputs(x)), y).backward()
                per_axis: dict[tuple[str, int], np.ndarray] = {}
                for n in names:
                    g = params[n].grad
                    wg = torch.zeros_like(params[n]) if g is None else params[n].detach() * g
                    for axis in axes[n]:
                        others = tuple(a for a in range(wg.dim()) if a != axis)
                        per_axis[n, axis] = (wg.sum(others) if others else wg).double().numpy()
                for atom, owned in atoms.slices.items():
                    sums[atom].append(float(sum(per_axis[n, axis][index] for n, axis, index in owned)))
    finally:
        for n, p in params.items():
            p.grad = saved_grads[n]
        for n in frozen:
            params[n].requires_grad_(False)
    if atoms.slices and not any(sums.values()):
        raise ValueError("taylor_costs: no batches to measure the loss on")
    costs = {}
    for atom, owned in atoms.slices.items():
        freed = sum(int((counted[n].detach().select(axis, index) != 0).sum()) for n, axis, index in owned if n in counted)
        if freed and sums[atom]:
            costs[atom] = float(np.sqrt(np.mean(np.square(sums[atom])))) / freed
    return costs


def group_pruner(
    example_input: Any,
    *,
    loss: Optional[Callable[[torch.Tensor, Any], torch.Tensor]] = None,
    batches: Optional[Iterable[tuple[Any, Any]]] = None,
) -> Callable[[nn.Module, float, dict], dict]:
    """A ``pruner`` for :class:`srfx.cycle.SqueezeRelease` that masks whole atoms (the
    analysis runs once per model shape, i.e. once per cycle). With ``loss`` (``loss(output,
    target) -> scalar``) and ``batches`` (a fixed list of ``(input, target)``), atoms are
    ranked by :func:`taylor_costs` on the masked model instead of relative weight size."""
    if (loss is None) != (batches is None):
        raise ValueError("group_pruner: pass loss and batches together (loss-measured costs) or neither (weight size)")
    batches = list(batches) if batches is not None else None
    if batches is not None and not batches:
        raise ValueError("group_pruner: batches is empty; loss-measured costs need at least one (input, target) batch")
    cache: dict = {}

    def prune(model: nn.Module, sparsity: float, masks: dict) -> dict:
        key = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
        if key not in cache:
            cache.clear()
            cache[key] = atom_table(model, example_input)
        costs = taylor_costs(model, cache[key], loss, batches) if loss is not None else None
        new = group_masks(model, example_input, sparsity, masks, cache[key], costs=costs)
        return {**masks, **new}

    return prune
