"""Channel-coupling analysis: from a traced graph to coupling groups (DESIGN §2).

Every channel dimension (a value's axes, or a parameter's axis) becomes a node of a networkx
graph; a rule's links join them. Connected components are **coupling groups**. Inside a
group, every channel index is a *slot*; linked slots are the same channel, so the connected
components of slots (scipy, on index arrays) are the group's **atoms**: the units that live
or die together.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Optional

import networkx as nx
import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
import torch.fx as fx

from . import rules as _rules  # noqa: F401  (registers the rule table)
from .env import NodeEnv, mutated_attributes, tensor_leaves
from .facts import Effects, Mix, ParamKey, Ref, Role, ValueKey
from .registry import describe_op, lookup
from .tracing import UNTRACEABLE_KEY, facts_of

__all__ = ["Dim", "Group", "Coupling", "coupling_groups"]


@dataclass(frozen=True)
class Dim:
    id: int
    ref: Ref
    sizes: tuple[int, ...]
    base: int  # first slot index

    @property
    def size(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True)
class Group:
    id: int
    dims: tuple[int, ...]
    channels: int  # number of atoms
    writers: tuple[str, ...]
    readers: tuple[str, ...]
    ops: tuple[str, ...]
    fixed: Optional[str]  # why the group cannot shrink, or None
    mixed: tuple[str, ...]  # why some channels can only go together

    @property
    def prunable(self) -> bool:
        return self.fixed is None


@dataclass(frozen=True, eq=False)
class Coupling:
    """Result of the analysis. Read-only by convention; passes never change it."""

    graph_module: fx.GraphModule
    dims: tuple[Dim, ...]
    index: dict  # Ref -> dim id
    atom_of_slot: np.ndarray  # slot -> atom id
    group_of_dim: np.ndarray  # dim id -> group id
    groups: tuple[Group, ...]
    roles: tuple[Role, ...]
    fixed: dict  # dim id -> reason
    needs: tuple[tuple[int, str], ...]
    mixes: tuple[Mix, ...]
    effects: dict  # node name -> Effects
    barriers: dict  # node name -> reason (ops no rule knows, rules that gave up)
    by_value: dict  # ValueKey -> [dim id]
    aliases: dict  # parameter qualname -> canonical qualname (tied tensors)
    mutated: frozenset  # get_attr targets forward writes in place

    def dim(self, ref: Ref) -> Dim:
        if isinstance(ref.value, ParamKey) and ref not in self.index:
            ref = Ref(ParamKey(self.aliases.get(ref.value.qualname, ref.value.qualname)), ref.axes)
        return self.dims[self.index[ref]]

    def tied_names(self) -> frozenset[str]:
        """Every parameter name that shares its tensor with another name (both sides of a tie):
        slicing one of them alone would change the others' users."""
        return frozenset(n for pair in self.aliases.items() if pair[0] != pair[1] for n in pair)

    def module_calls(self) -> dict[str, int]:
        """Module qualname -> its call sites in the graph (a module called twice is shared)."""
        calls: dict[str, int] = {}
        for node in self.graph_module.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        return calls

    def dims_of_value(self, key: ValueKey) -> list[Dim]:
        return [self.dims[i] for i in self.by_value.get(key, ())]

    def atoms(self, dim: Dim) -> np.ndarray:
        return self.atom_of_slot[dim.base : dim.base + dim.size]

    def group_of(self, ref: Ref) -> Group:
        return self.groups[self.group_of_dim[self.index[ref]]]


class _Builder:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.dims: list[Dim] = []
        self.index: dict[Ref, int] = {}
        self.by_value: dict[ValueKey, list[Ref]] = {}
        self.n_slots = 0
        self.links: list[tuple[int, int, Optional[tuple[np.ndarray, np.ndarray]]]] = []
        self.roles: list[Role] = []
        self.fixed: dict[int, str] = {}
        self.needs: list[tuple[int, str]] = []
        self.mixes: list[Mix] = []
        self.effects: dict[str, Effects] = {}
        self.barriers: dict[str, str] = {}
        self.memo: dict = {}  # rule results shared by nodes that differ only in names
        self.whole: dict[str, str] = {}  # canonical tensor name -> the module without a rule that owns it
        self.params = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}
        # tied tensors: every alias of one tensor is the same parameter key
        first: dict[int, str] = {}
        self.canonical = {name: first.setdefault(id(t), name) for name, t in self.params.items()}

    def _canon(self, ref: Ref) -> Ref:
        if isinstance(ref.value, ParamKey):
            name = self.canonical.get(ref.value.qualname, ref.value.qualname)
            if name != ref.value.qualname:
                return Ref(ParamKey(name), ref.axes)
        return ref

    # --- dims ---------------------------------------------------------------------------
    def _sizes(self, ref: Ref) -> tuple[int, ...]:
        if isinstance(ref.value, ParamKey):
            shape = tuple(self.params[ref.value.qualname].shape)
        else:
            f = facts_of(self._node(ref.value.node))
            shape = f.shapes[max(ref.value.element, 0)]
        return tuple(shape[a] for a in ref.axes)

    def _node(self, name: str) -> fx.Node:
        return self._nodes[name]

    def make(self, ref: Ref, fixed_reason: Optional[str] = None) -> int:
        ref = self._canon(ref)
        if ref in self.index:
            return self.index[ref]
        sizes = self._sizes(ref)
        d = Dim(len(self.dims), ref, sizes, self.n_slots)
        self.dims.append(d)
        self.index[ref] = d.id
        self.n_slots += d.size
        if isinstance(ref.value, ValueKey):
            self.by_value.setdefault(ref.value, []).append(ref)
        if fixed_reason is not None:
            self.fixed.setdefault(d.id, fixed_reason)
        return d.id

    def resolve(self, ref: Ref, current: fx.Node) -> int:
        """Dim id of ``ref``, creating it if the rule named an untracked axis."""
        ref = self._canon(ref)
        if ref in self.index:
            return self.index[ref]
        if isinstance(ref.value, ParamKey):
            return self.make(ref)
        if ref.value.node == current.name:
            return self.make(ref)
        # an input axis no rule upstream tracked (model input, barrier output): keep it
        why = f"axis {ref.axes} of {ref.value} is not traced to a channel source"
        source = self._untraceable_source(ref.value.node)
        if source is not None:
            why += f": it comes out of {source.target}, kept whole ({source.meta[UNTRACEABLE_KEY]})"
        return self.make(ref, why)

    def _untraceable_source(self, name: str) -> Optional[fx.Node]:
        """The module call kept whole for failing to trace that ``name`` is an output of (through
        tuple indexing), if any."""
        node = self._nodes.get(name)
        while node is not None and node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        return node if node is not None and UNTRACEABLE_KEY in node.meta else None

    # --- build --------------------------------------------------------------------------
    def run(self) -> Coupling:
        self._nodes = {n.name: n for n in self.gm.graph.nodes}
        self.mutated = mutated_attributes(self.gm)
        for node in self.gm.graph.nodes:
            self._visit(node)
        return self._finish()

    def _visit(self, node: fx.Node) -> None:
        if facts_of(node) is None:  # never executed (dead code) or non-tensor literal
            return
        env = NodeEnv(self.gm, node, lambda key: self.by_value.get(key, []), self.modules, self.mutated, self.memo)
        rule = lookup(node, self.modules)
        inputs = [r for a in tensor_leaves((node.args, node.kwargs), elements=True) for r in env.all_dims(a)]
        if rule is not None and not facts_of(node).shapes and rule.name not in ("shape_query", "movement", "output"):
            # a python value computed from tensors (int arithmetic on sizes, .item()): no channels
            eff = _barrier(inputs, f"{node.name}: turns tensor values into a python value")
            if eff.fixed:
                self.barriers[node.name] = eff.fixed[0][1]
        elif rule is None:
            untraceable = node.meta.get(UNTRACEABLE_KEY)
            why = f"{node.target} kept whole: {untraceable}" if untraceable else f"no channel rule for {describe_op(node, self.modules)}"
            eff = _barrier(inputs, why)
            if eff.fixed:
                self.barriers[node.name] = eff.fixed[0][1]
            if node.op == "call_module":  # what it owns it reads whole, wherever else the graph reads it
                module = self.modules[node.target]
                for name, _ in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
                    qualified = f"{node.target}.{name}"
                    self.whole.setdefault(self.canonical.get(qualified, qualified), node.target)
        else:
            eff = rule.effects(node, env)
        self.effects[node.name] = eff
        for ref in eff.outputs:
            self.make(ref)
        for link in eff.links:
            a, b = self.resolve(link.a, node), self.resolve(link.b, node)
            self.links.append((a, b, link.pairs))
        for role in eff.roles:
            self.resolve(role.ref, node)
            if role.weight is not None:
                role = dataclasses.replace(role, weight=self.canonical.get(role.weight, role.weight), bias=self.canonical.get(role.bias, role.bias) if role.bias else None)
            self.roles.append(role)
        for ref, reason in eff.needs:
            ref = self._canon(ref)
            self.needs.append((self.resolve(ref, node), reason))
        for ref, reason in eff.fixed:
            did = self.resolve(ref, node)
            self.fixed.setdefault(did, reason)
            if isinstance(ref.value, ValueKey) and ref.value.node == node.name:
                self.barriers.setdefault(node.name, reason)
        for mix in eff.mixes:
            self.resolve(mix.ref, node)
            self.mixes.append(Mix(self._canon(mix.ref), mix.labels, mix.reason))
        # safety net: an input channel dim the rule did not account for must not shrink
        mentioned = {l.a for l in eff.links} | {l.b for l in eff.links} | {r.ref for r in eff.roles}
        mentioned |= {r for r, _ in eff.needs} | {r for r, _ in eff.fixed} | {m.ref for m in eff.mixes}
        mentioned |= set(eff.meta.get("untouched", ()))
        for ref in inputs:
            if ref not in mentioned:
                self.fixed.setdefault(self.index[ref], f"{node.name}: its rule did not say where channel axis {ref.axes} goes")

    def _finish(self) -> Coupling:
        for d in self.dims:  # a tensor also read inside a module kept whole (a shared submodule) keeps its shape
            if isinstance(d.ref.value, ParamKey) and d.ref.value.qualname in self.whole:
                self.fixed.setdefault(d.id, f"{d.ref.value.qualname} is also read whole inside {self.whole[d.ref.value.qualname]}")
        atom_of_slot = self._atoms()
        graph = nx.Graph()
        graph.add_nodes_from(range(len(self.dims)))
        graph.add_edges_from((a, b) for a, b, _ in self.links)
        components = sorted((sorted(c) for c in nx.connected_components(graph)), key=lambda c: c[0])
        group_of_dim = np.zeros(len(self.dims), dtype=np.int64)
        for gid, comp in enumerate(components):
            group_of_dim[comp] = gid
        groups = self._groups(components, atom_of_slot, group_of_dim)
        return Coupling(
            graph_module=self.gm,
            dims=tuple(self.dims),
            index=dict(self.index),
            atom_of_slot=atom_of_slot,
            group_of_dim=group_of_dim,
            groups=groups,
            roles=tuple(self.roles),
            fixed=dict(self.fixed),
            needs=tuple(self.needs),
            mixes=tuple(self.mixes),
            effects=dict(self.effects),
            barriers=dict(self.barriers),
            by_value={k: [self.index[r] for r in refs] for k, refs in self.by_value.items()},
            aliases=dict(self.canonical),
            mutated=self.mutated,
        )

    def _atoms(self) -> np.ndarray:
        """Connected components of the slot graph, numbered by their first slot (as scipy
        numbers them on the full graph).

        An identity link joins slot j of one dim with slot j of the other, so dims joined by
        identity links share their slots' fate: the components are found on one copy of each
        such class (a ViT's 465,000 slots become a few thousand) and spread back.
        """
        n_dims = len(self.dims)
        sizes = np.fromiter((d.size for d in self.dims), dtype=np.int64, count=n_dims)
        bases = np.fromiter((d.base for d in self.dims), dtype=np.int64, count=n_dims)
        same_a, same_b, paired = [], [], []
        for a, b, pairs in self.links:
            if pairs is not None:
                paired.append((a, b, pairs))
            elif sizes[a] != sizes[b]:
                da, db = self.dims[a], self.dims[b]
                self.fixed.setdefault(a, f"size mismatch linking {da.ref} and {db.ref}")
                self.fixed.setdefault(b, f"size mismatch linking {da.ref} and {db.ref}")
            else:
                same_a.append(a)
                same_b.append(b)
        same = sp.coo_matrix((np.ones(len(same_a), dtype=np.int8), (same_a, same_b)), shape=(n_dims, n_dims))
        n_cls, cls = connected_components(same, directed=False)
        cls_size = np.zeros(n_cls, dtype=np.int64)
        cls_size[cls] = sizes
        cls_base = np.cumsum(cls_size) - cls_size  # slots of the reduced graph
        rows = [cls_base[cls[a]] + np.asarray(ia, dtype=np.int64) for a, _, (ia, _) in paired]
        cols = [cls_base[cls[b]] + np.asarray(ib, dtype=np.int64) for _, b, (_, ib) in paired]
        r = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        c = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
        n_reduced = int(cls_size.sum())
        adj = sp.coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(n_reduced, n_reduced))
        n_atoms, reduced = connected_components(adj, directed=False)
        # number atoms by their first slot in the full graph
        first_base = np.full(n_cls, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first_base, cls, bases)
        offset = np.arange(n_reduced, dtype=np.int64) - np.repeat(cls_base, cls_size)
        first_slot = np.repeat(first_base, cls_size) + offset
        first = np.full(n_atoms, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first, reduced, first_slot)
        number = np.empty(n_atoms, dtype=reduced.dtype)
        number[np.argsort(first, kind="stable")] = np.arange(n_atoms, dtype=reduced.dtype)
        within = np.arange(self.n_slots, dtype=np.int64) - np.repeat(bases, sizes)
        return number[reduced][np.repeat(cls_base[cls], sizes) + within]

    def _groups(self, components, atom_of_slot, group_of_dim) -> tuple[Group, ...]:
        """Every group's atoms, writers, readers, ops, first fixed reason and mix reasons, in
        one pass over slots, roles, fixed dims and mixes (in their order, as the report reads)."""
        n = len(components)
        # an atom's slots are linked, so they lie in one group: count atoms per group
        sizes = np.fromiter((d.size for d in self.dims), dtype=np.int64, count=len(self.dims))
        group_of_slot = np.repeat(group_of_dim, sizes)
        group_of_atom = np.zeros(int(atom_of_slot.max()) + 1 if len(atom_of_slot) else 0, dtype=np.int64)
        group_of_atom[atom_of_slot] = group_of_slot
        channels = np.bincount(group_of_atom, minlength=n) if len(group_of_atom) else np.zeros(n, dtype=np.int64)
        owners = {kind: [dict() for _ in range(n)] for kind in ("writer", "reader", "op")}
        for role in self.roles:
            if role.kind in owners:
                owners[role.kind][group_of_dim[self.index[role.ref]]].setdefault(role.owner)
        fixed: list[Optional[str]] = [None] * n
        for did in sorted(self.fixed):
            gid = group_of_dim[did]
            if fixed[gid] is None:
                fixed[gid] = self.fixed[did]
        mixed = [dict() for _ in range(n)]
        for m in self.mixes:
            mixed[group_of_dim[self.index[m.ref]]].setdefault(m.reason)
        return tuple(
            Group(gid, tuple(comp), int(channels[gid]), tuple(owners["writer"][gid]), tuple(owners["reader"][gid]),
                  tuple(owners["op"][gid]), fixed[gid], tuple(mixed[gid]))
            for gid, comp in enumerate(components)
        )


def _barrier(inputs: list[Ref], reason: str) -> Effects:
    return Effects(fixed=tuple((ref, reason) for ref in inputs))


def coupling_groups(gm: fx.GraphModule) -> Coupling:
    """Analyze a traced, shape-annotated GraphModule (see :func:`srfx.tracing.trace`)."""
    return _Builder(gm).run()
