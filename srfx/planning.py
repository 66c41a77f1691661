"""Plan: which channels go, and what their readers absorb (DESIGN §3). Data, not actions.

A greatest fixpoint over atoms. An atom is *needed* when a fixed group holds it, a model
output or a reduction reads it, or some reader reads it through a nonzero weight (among the
rows still kept) and cannot fold it as a constant. Mixed channels (LayerNorm, GroupNorm
groups) and multi-axis dims (heads x head_dim, which must stay rectangular) close the set.
Everything else goes: *unread* atoms simply vanish, *constant* ones are folded into readers'
biases. Removing rows can make columns unread, so iterate until nothing changes.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from tabulate import tabulate

from .compensation import NormSite, compensable_norms
from .constants import Constants, constant_channels
from .coupling import Coupling
from .facts import ParamKey, Ref, Role

__all__ = ["Plan", "GroupPlan", "Fold", "Gather", "NormSite", "plan_removal"]


@dataclass(frozen=True)
class GroupPlan:
    group: int
    channels: int
    kept: int
    unread: int
    constant: int
    fixed: Optional[str]
    compensated: int = 0  # left a norm's stream through compensation (see srfx.compensation)


@dataclass(frozen=True, eq=False)
class Fold:
    """Reader ``role`` absorbs input channels ``index`` (of its input dim) carrying ``values``."""

    role: Role
    index: np.ndarray
    values: np.ndarray


@dataclass(frozen=True, eq=False)
class Gather:
    """Reader ``role`` keeps only input channels ``keep`` of a group that cannot shrink (a model
    input, a barrier's output): its all-zero columns go, and an index_select feeds it."""

    role: Role
    keep: np.ndarray


@dataclass(frozen=True, eq=False)
class Plan:
    coupling: Coupling
    constants: Constants
    kept_atoms: np.ndarray
    folds: tuple[Fold, ...]
    groups: tuple[GroupPlan, ...]
    gathers: tuple[Gather, ...] = ()
    compensations: tuple[NormSite, ...] = ()  # norms that lose channels: compensate_ln rewrites them

    def keep(self, dim_id: int) -> np.ndarray:
        """Indices of the channels of dim ``dim_id`` that stay."""
        d = self.coupling.dims[dim_id]
        return np.nonzero(self.kept_atoms[self.coupling.atoms(d)])[0]

    def shrinks(self, dim_id: int) -> bool:
        return len(self.keep(dim_id)) < self.coupling.dims[dim_id].size

    def parameter_cuts(self) -> dict[str, dict[int, np.ndarray]]:
        """Canonical parameter name (one per tied tensor) -> axis -> indices kept along it,
        for the axes whose channels shrink: what minimize slices."""
        cuts: dict[str, dict[int, np.ndarray]] = {}
        for d in self.coupling.dims:
            if isinstance(d.ref.value, ParamKey) and self.shrinks(d.id):
                cuts.setdefault(d.ref.value.qualname, {})[d.ref.axes[0]] = self.keep(d.id)
        return cuts

    def kept_indices(self) -> dict[str, dict[int, np.ndarray]]:
        """Every parameter name (tied names too) -> axis -> indices of the entries the
        minimized model keeps: the channel cuts plus the input columns a gather drops. What
        optimizer state (momentum, Adam's moments) needs to follow a minimize."""
        aliases: dict[str, list[str]] = {}
        for name, canon in self.coupling.aliases.items():
            aliases.setdefault(canon, []).append(name)
        out: dict[str, dict[int, np.ndarray]] = {}
        for canon, axes in self.parameter_cuts().items():
            for name in aliases.get(canon, [canon]):
                out[name] = dict(axes)
        for g in self.gathers:
            out.setdefault(g.role.weight, {})[g.role.in_axis] = g.keep
        return out

    def attention_heads(self) -> tuple[tuple[str, int, int], ...]:
        """(attention node, heads before, heads after) for every scaled_dot_product_attention."""
        out = []
        for name, eff in self.coupling.effects.items():
            att = eff.meta.get("attention")
            if att:
                v = self.coupling.dim(att["v"])
                kept = self.kept_atoms[self.coupling.atoms(v)].reshape(v.sizes)
                out.append((name, v.sizes[0], int(kept.any(1).sum())))
        return tuple(out)

    @property
    def removes_anything(self) -> bool:
        return any(g.kept < g.channels for g in self.groups) or bool(self.gathers)

    def table(self) -> str:
        rows = [
            (g.group, g.channels, g.kept, g.unread, g.constant, g.compensated, g.fixed or "")
            for g in self.groups
            if g.kept < g.channels or g.fixed is None
        ]
        table = tabulate(rows, headers=["group", "channels", "kept", "unread", "constant", "compensated", "kept whole because"])
        if self.compensations:
            names = ", ".join(site.node for site in self.compensations)
            table += f"\ncompensated norms ({len(self.compensations)}): {names}"
        whole = [g for g in self.groups if g.fixed is not None and g.kept == g.channels]
        if whole:  # not rows: a model has many; say how many and the commonest reasons
            reasons = Counter(g.fixed for g in whole)
            common = reasons.most_common(3)
            table += f"\nkept whole ({len(whole)} group{'s' if len(whole) > 1 else ''}): " + "; ".join(f"{n} x {reason}" for reason, n in common)
            table += "; ..." if len(reasons) > 3 else ""
            table += " (srfx.analyze or `srfx groups` shows every group and why)"
        return table

    def __str__(self) -> str:
        return self.table()


@dataclass(frozen=True, eq=False)
class _Reader:
    role: Role
    in_atoms: np.ndarray
    out_atoms: np.ndarray
    weight: np.ndarray  # (out, in) with other axes reduced: "is any weight nonzero"
    consts: np.ndarray
    foldable: np.ndarray
    compensated: bool = False  # absorbs a compensated norm's removed channels (no Fold)


def _readers(coupling: Coupling, constants: Constants, sites: tuple[NormSite, ...] = ()) -> list[_Reader]:
    modules = dict(coupling.graph_module.named_modules())
    absorbs = {}
    for site in sites:
        for role in site.readers:
            absorbs[role.node] = site.removable_out
    bias_uses = _bias_uses(coupling)
    out = []
    for role in coupling.roles:
        if role.kind != "reader" or role.fold is None:
            continue
        in_dim = coupling.dim(role.ref)
        w = constants.param(role.weight).detach()
        out_axis = 1 - role.in_axis
        kernel = int(np.prod(w.shape)) // max(1, w.shape[out_axis] * w.shape[role.in_axis]) if w.numel() else 1
        nz = (w != 0).movedim((out_axis, role.in_axis), (0, 1)).reshape(w.shape[out_axis], w.shape[role.in_axis], kernel).any(-1)
        if nz.shape[1] != in_dim.size:  # grouped conv: output rows of group g read inputs of group g
            groups = in_dim.size // nz.shape[1]
            per_out = nz.shape[0] // groups
            full = torch.zeros(nz.shape[0], in_dim.size, dtype=torch.bool)
            for g in range(groups):
                full[g * per_out : (g + 1) * per_out, g * nz.shape[1] : (g + 1) * nz.shape[1]] = nz[g * per_out : (g + 1) * per_out]
            nz = full
        c = constants.of(in_dim.id)
        foldable = ~np.isnan(c) & ((c == 0) | (role.fold != "zero_only"))
        if role.bias is None and not isinstance(modules.get(role.owner), (nn.Linear, nn.modules.conv._ConvNd)):
            foldable &= c == 0  # a functional layer without a bias has nowhere to fold a constant
        elif bias_uses.get(role.bias or f"{role.owner}.bias", 0) > 1:
            foldable &= c == 0  # a bias other calls use too: one reader's constants would shift theirs
        compensated = role.node in absorbs
        if compensated:
            foldable = foldable | absorbs[role.node]
        out_dim = coupling.dim(Ref(ParamKey(role.weight), (out_axis,)))
        out.append(_Reader(role, coupling.atoms(in_dim), coupling.atoms(out_dim), nz.numpy(), c, foldable, compensated))
    return out


def _bias_uses(coupling: Coupling) -> dict[str, int]:
    """Bias qualname -> how many graph uses it has: the calls of the module it belongs to (a
    module called twice folds into one bias) plus every read of it as an attribute."""
    uses = {f"{module}.bias": calls for module, calls in coupling.module_calls().items()}
    for node in coupling.graph_module.graph.nodes:
        if node.op == "get_attr":
            uses[node.target] = uses.get(node.target, 0) + len(node.users)
    return uses


@dataclass(frozen=True, eq=False)
class _Attention:
    """One attention call: atoms of its q/k and v channels as (heads, dims) grids, and which
    q/k dims may go (q is 0 there, or k is constant: softmax ignores a per-query shift)."""

    qk: np.ndarray
    v: np.ndarray
    qk_free: np.ndarray


def _attentions(coupling: Coupling, constants: Constants) -> list[_Attention]:
    out = []
    for eff in coupling.effects.values():
        att = eff.meta.get("attention")
        if not att:
            continue
        q, k, v = (coupling.dim(att[n]) for n in ("q", "k", "v"))
        cq, ck = constants.of(q.id), constants.of(k.id)
        free = ((cq == 0) | np.isfinite(ck)).reshape(q.sizes)
        out.append(_Attention(coupling.atoms(q).reshape(q.sizes), coupling.atoms(v).reshape(v.sizes), free))
    return out


def _attend(attentions: list[_Attention], kept: np.ndarray, need: np.ndarray) -> None:
    """A head's queries and keys are needed while its values are kept (a head whose values
    all went, unread or constant, needs neither); q/k dims that are free may still go."""
    for att in attentions:
        heads = kept[att.v].any(1)
        need[att.qk[heads][~att.qk_free[heads]]] = True


def _head_mismatch(attentions: list[_Attention], kept: np.ndarray) -> list[int]:
    """Atoms to keep so that q, k and v keep the same heads (their shapes must agree)."""
    extra = []
    for att in attentions:
        if not kept[att.v].any():  # every head gone: keep one rather than emit zero-size attention
            extra.append(att.v[0, 0])
            continue
        qk_heads, v_heads = kept[att.qk].any(1), kept[att.v].any(1)
        qk_dims, v_dims = kept[att.qk].any(0), kept[att.v].any(0)
        for h in np.nonzero(qk_heads & ~v_heads)[0]:
            extra.append(att.v[h, int(np.argmax(v_dims)) if v_dims.any() else 0])
        for h in np.nonzero(v_heads & ~qk_heads)[0]:
            extra.append(att.qk[h, int(np.argmax(qk_dims)) if qk_dims.any() else 0])
    return extra


def _close(coupling: Coupling, need: np.ndarray, free: dict[int, np.ndarray]) -> np.ndarray:
    """Mixed channels go together (except those a compensated norm frees: ``free`` maps a
    norm's input dim to them); multi-axis dims keep a rectangular (product) shape."""
    multi = [d for d in coupling.dims if len(d.ref.axes) > 1]
    while True:
        before = need.copy()
        for mix in coupling.mixes:
            dim = coupling.dim(mix.ref)
            atoms = coupling.atoms(dim)
            hit = np.zeros(int(mix.labels.max()) + 1, dtype=bool)
            np.logical_or.at(hit, mix.labels, need[atoms])
            bound = ~free.get(dim.id, np.zeros(len(atoms), dtype=bool))
            need[atoms[hit[mix.labels] & bound]] = True
        for d in multi:
            atoms = coupling.atoms(d)
            k = need[atoms].reshape(d.sizes)
            full = np.ones(d.sizes, dtype=bool)
            for ax in range(len(d.sizes)):
                others = tuple(i for i in range(len(d.sizes)) if i != ax)
                proj = k.any(axis=others, keepdims=True)
                full &= proj
            if k.any():
                need[atoms[full.reshape(-1)]] = True
        if np.array_equal(before, need):
            return need


def _fixpoint(coupling: Coupling, readers: list[_Reader], base: np.ndarray, n_atoms: int, free: dict[int, np.ndarray], attentions: list[_Attention]) -> np.ndarray:
    kept = np.ones(n_atoms, dtype=bool)
    while True:
        need = base.copy()
        for r in readers:
            rows = kept[r.out_atoms]
            read = r.weight[rows].any(0)
            need[r.in_atoms[read & ~r.foldable]] = True
        need = _close(coupling, need, free)
        if attentions:  # after the closure: values needed for themselves, not for their head's q/k
            _attend(attentions, need.copy(), need)
            need = _close(coupling, need, free)
        if np.array_equal(need, kept):
            return kept
        kept = need


def plan_removal(coupling: Coupling, constants: Optional[Constants] = None, unabsorbed: frozenset = frozenset()) -> Plan:
    """What goes. ``unabsorbed``: norm nodes whose readers must not take u and v columns
    (see :func:`srfx.compensation.compensable_norms`)."""
    constants = constants or constant_channels(coupling)
    n_atoms = int(coupling.atom_of_slot.max()) + 1 if len(coupling.atom_of_slot) else 0
    base = np.zeros(n_atoms, dtype=bool)
    for g in coupling.groups:
        if g.fixed is not None:
            for did in g.dims:
                base[coupling.atoms(coupling.dims[did])] = True
    for did, _ in coupling.needs:
        base[coupling.atoms(coupling.dims[did])] = True
    sites = compensable_norms(coupling, constants, unabsorbed)
    free: dict[int, np.ndarray] = {}
    for site in sites:  # two norms of one value: a channel is free only if both free it
        free[site.in_dim] = free.get(site.in_dim, site.removable) & site.removable
    readers = _readers(coupling, constants, sites)
    attentions = _attentions(coupling, constants)
    params = constants._params
    conv_dims = [
        coupling.atoms(d) for d in coupling.dims
        if isinstance(d.ref.value, ParamKey) and params[d.ref.value.qualname].dim() >= 3 and d.size
    ]
    # torch refuses a conv with zero channels: one that would vanish keeps one (exact, larger);
    # a norm keeps one too (its statistics need something to normalize)
    must_keep_one = conv_dims + [coupling.atoms(coupling.dims[site.in_dim]) for site in sites]
    while True:
        kept = _fixpoint(coupling, readers, base, n_atoms, free, attentions)
        empty = [atoms[0] for atoms in must_keep_one if len(atoms) and not kept[atoms].any()]
        empty += [a for a in _head_mismatch(attentions, kept) if not base[a]]
        if not empty:
            break
        # one at a time, the last found first (convs come in graph order, so the most
        # downstream one): what it reads may revive upstream channels, which then keep real
        # channels instead of an arbitrary one (idempotence)
        base[empty[-1]] = True
    folds, folded_atoms, compensated_atoms = [], np.zeros(n_atoms, dtype=bool), np.zeros(n_atoms, dtype=bool)
    for r in readers:
        rows = kept[r.out_atoms]
        read = r.weight[rows].any(0)
        idx = np.nonzero(read & ~kept[r.in_atoms])[0]
        if len(idx) and r.compensated:
            compensated_atoms[r.in_atoms[idx]] = True
        elif len(idx):
            folds.append(Fold(r.role, idx, r.consts[idx]))
            folded_atoms[r.in_atoms[idx]] = True
    gathers = tuple(_gathers(coupling, readers, kept))
    groups = []
    for g in coupling.groups:
        atoms = np.unique(np.concatenate([coupling.atoms(coupling.dims[d]) for d in g.dims]))
        gone = atoms[~kept[atoms]]
        n_comp = int((compensated_atoms[gone] & ~folded_atoms[gone]).sum())
        n_const = int(folded_atoms[gone].sum())
        groups.append(GroupPlan(g.id, len(atoms), int(kept[atoms].sum()), len(gone) - n_const - n_comp, n_const, g.fixed, n_comp))
    compensations = tuple(s for s in sites if not kept[coupling.atoms(coupling.dims[s.in_dim])].all())
    return Plan(coupling, constants, kept, tuple(folds), tuple(groups), gathers, compensations)


def _gathers(coupling: Coupling, readers: list[_Reader], kept: np.ndarray):
    calls, tied = coupling.module_calls(), coupling.tied_names()
    inputs = {n.name for n in coupling.graph_module.graph.nodes if n.op == "placeholder"}
    for r in readers:
        group = coupling.group_of(r.role.ref)
        # only model inputs: their width is the user's contract, so a gather is the only way in
        from_input = any(getattr(coupling.dims[d].ref.value, "node", None) in inputs for d in group.dims)
        if group.fixed is None or not from_input or r.role.fold == "zero_only" or calls.get(r.role.owner) != 1 or r.role.weight in tied:
            continue
        read = r.weight[kept[r.out_atoms]].any(0)
        if not read.all() and read.any():
            yield Gather(r.role, np.nonzero(read)[0])
