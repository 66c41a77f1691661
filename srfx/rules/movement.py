"""Data-movement ops (reshape, permute, cat, split, getitem, expand, pixel shuffle, ...).

One rule serves them all, exact by construction: the op is run on *position labels* (every
input element holds its own index) and the output shows, for every output element, where
it came from. A channel dim of an input reaches the output along the axes where its channel
index varies; channels that end up spread over axes the analysis cannot follow, or mixed
with untracked data, are kept.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..env import tensor_leaves
from ..facts import Effects, Link, Ref, Role, ValueKey
from ..registry import ChannelRule, register_instance
from ..tracing import facts_of
from .common import call_with

__all__ = ["Movement", "FREE", "SHAPE_ARGS", "SPLIT", "INDEX"]

_LIKE = ("view_as", "reshape_as", "expand_as")

FREE, SHAPE_ARGS, SPLIT, INDEX = "free", "shape_args", "split", "index"


def _varying_axes(ch: np.ndarray) -> list[int]:
    axes = []
    for a in range(ch.ndim):
        if ch.shape[a] < 2:
            continue
        x0 = ch[(slice(None),) * a + (slice(0, -1),)]  # views, not copies
        x1 = ch[(slice(None),) * a + (slice(1, None),)]
        if np.any((x0 >= 0) & (x1 >= 0) & (x0 != x1)):
            axes.append(a)
    return axes


def _table(ch: np.ndarray, axes: list[int]) -> np.ndarray | None:
    """Channel index per position of ``axes`` (flat, -1 where none); None if ``ch`` depends
    on other axes too."""
    rest = [i for i in range(ch.ndim) if i not in axes]
    moved = np.transpose(ch, axes + rest).reshape(int(np.prod([ch.shape[a] for a in axes])), -1)
    table = moved.max(axis=1)
    ok = (moved < 0) | (moved == table[:, None])
    return table if ok.all() else None


class Movement(ChannelRule):
    """``kind`` says what a rewrite must update when channels shrink (see passes.minimize)."""

    name = "movement"

    def __init__(self, kind: str = FREE):
        self.kind = kind

    def effects(self, node, env):
        inputs = list(tensor_leaves((node.args, node.kwargs), elements=True))
        labels, spans = {}, []  # spans: (ValueKey, shape, offset)
        offset = 0
        for a in inputs:
            f = facts_of(a)
            elems = range(len(f.shapes)) if f.elements else [-1]
            made = []
            for e in elems:
                shape = f.shapes[max(e, 0)]
                n = int(np.prod(shape)) if shape else 1
                made.append(torch.arange(offset, offset + n, dtype=torch.int64).reshape(shape))
                spans.append((ValueKey(a.name, e), shape, offset))
                offset += n
            labels[a] = tuple(made) if f.elements else made[0]
        all_in = [r for a in inputs for r in env.all_dims(a)]
        if not facts_of(node).shapes:
            return Effects()  # a non-tensor result (a size, a shape tuple)
        try:
            result = call_with(node, env, lambda a: labels[a] if a in labels else env.concrete(a))
        except Exception as exc:  # the op does not run on integer labels
            reason = f"{node.name}: cannot follow channels through it ({type(exc).__name__})"
            return Effects(fixed=tuple((r, reason) for r in all_in))
        facts = env.out_facts
        outs = list(result) if facts.elements else [result]
        elements = list(range(len(outs))) if facts.elements else [-1]
        out_refs, links, fixed, opaque = [], [], [], set()
        coverage = {r: [] for r in all_in}  # input dim -> [(element, table)]
        for e, out in zip(elements, outs):
            src = out.numpy()
            found: dict[tuple[int, ...], list[tuple[Ref, np.ndarray]]] = {}
            contributes = []
            for key, shape, off in spans:
                n = int(np.prod(shape)) if shape else 1
                mask = (src >= off) & (src < off + n)
                if not mask.any():
                    continue
                local = np.where(mask, src - off, 0)
                coords = np.unravel_index(local, shape) if shape else ()
                dims = [r for r in all_in if r.value == key]
                mapped = False
                for ref in dims:
                    sizes = tuple(shape[a] for a in ref.axes)
                    ch = np.where(mask, np.ravel_multi_index(tuple(coords[a] for a in ref.axes), sizes), -1)
                    axes = _varying_axes(ch)
                    if not axes and len(ref.axes) == 1 and self._along(node, env) == ref.axes[0]:
                        axes = [ref.axes[0]]  # a one-channel piece of a cat/split stays on its axis
                    table = _table(ch, axes) if axes else None
                    if table is None:
                        fixed.append((ref, f"{node.name}: channels move where srfx cannot follow them"))
                        continue
                    found.setdefault(tuple(axes), []).append((ref, table))
                    coverage[ref].append((e, table))
                    mapped = True
                contributes.append((key, mask, local, mapped))
            taken = [a for axes in found for a in axes]
            if len(taken) != len(set(taken)):
                reason = f"{node.name}: channel dims overlap in the output"
                fixed.extend((ref, reason) for group in found.values() for ref, _ in group)
                continue
            for axes, members in found.items():
                out_ref = env.out(axes, e)
                out_refs.append(out_ref)
                for ref, table in members:
                    idx = np.nonzero(table >= 0)[0]
                    links.append(Link(out_ref, ref, (idx, table[idx])))
                # every output channel must come from a tracked input dim
                covered = np.zeros(len(members[0][1]), dtype=bool)
                for _, table in members:
                    covered |= table >= 0
                untracked = [k for k, mask, local, mapped in contributes if not mapped]
                if untracked:
                    opaque.add(e)
                for k, mask, local, _ in contributes:
                    if k in untracked:
                        pos = np.where(mask, local, -1)
                        if _varying_axes(pos) and any(a in axes for a in _varying_axes(pos)):
                            fixed.append((out_ref, f"{node.name}: channels mixed with untracked data from {k}"))
                if not covered.all() and not untracked:
                    fixed.append((out_ref, f"{node.name}: output channels not traced to a source"))
        if self.kind in (SPLIT, INDEX):
            sizes = {r: int(np.prod([shape[a] for a in r.axes])) for k, shape, _ in spans for r in all_in if r.value == k}
            fixed.extend(self._check_index_op(node, coverage, sizes))
        if node.op == "call_method" and node.target in _LIKE and len(node.args) > 1:
            links, fixed, meta_untouched = self._like(node, env, links, fixed, out_refs)
        else:
            meta_untouched = ()
        meta = {"kind": self.kind, "opaque": frozenset(opaque), "untouched": meta_untouched}
        roles = ()
        if node.target in (torch.cat, torch.concat, torch.stack):  # a parameter concatenated in writes channels
            from .pointwise import _parameter_behind

            roles = tuple(
                Role("writer", r, owner, node.name)
                for a in inputs
                for owner in [_parameter_behind(a, env)]
                if owner is not None
                for r in env.dims(a)
                if any(l.b == r for l in links)
            )
        return Effects(outputs=tuple(dict.fromkeys(out_refs)), links=tuple(links), fixed=tuple(fixed), roles=roles, meta=meta)

    def constants(self, node, env, known):
        """Moved data keeps its values: an output channel is constant iff every position
        comes from known-constant input channels that agree."""
        eff = known.effects(node)
        result = {}
        for out in eff.outputs:
            if out.value.element in eff.meta.get("opaque", ()):
                continue
            size = int(np.prod([env.out_facts.shapes[max(out.value.element, 0)][a] for a in out.axes]))
            lo, hi = np.full(size, np.inf), np.full(size, -np.inf)
            seen = np.zeros(size, dtype=bool)
            for link in eff.links:
                if link.a != out:
                    continue
                oi, ii = link.pairs if link.pairs is not None else (np.arange(size), np.arange(size))
                v = known.value(link.b)[ii]
                np.minimum.at(lo, oi, np.where(np.isnan(v), -np.inf, v))
                np.maximum.at(hi, oi, np.where(np.isnan(v), np.inf, v))
                seen[oi] = True
            vals = np.where(seen & (lo == hi), lo, np.nan)
            result[out] = vals
        return result

    def _like(self, node, env, links, fixed, out_refs):
        """``x.view_as(ref)``: ref only lends its shape, so its channel axes must be the output's
        (they shrink together). Its data does not flow: its dims are linked, not moved."""
        ref = node.args[1]
        links = [l for l in links if l.b.value != ValueKey(ref.name)]
        fixed = [f for f in fixed if f[0].value != ValueKey(ref.name)]
        own = {r.axes: r for r in out_refs}
        for r in env.dims(ref):
            if r.axes in own:
                links.append(Link(r, own[r.axes]))
            else:
                fixed.append((r, f"{node.name}: lends its shape but its channels are not the output's"))
        return links, fixed, ()

    def _along(self, node, env):
        """The axis a cat/split/chunk works along (their output keeps axis numbering)."""
        if node.target not in (torch.cat, torch.concat, "split", "chunk", "tensor_split", torch.split, torch.chunk, torch.tensor_split):
            return None
        first = env.tensor_args()[0] if env.tensor_args() else None
        shape = env.shape(first) if first is not None else None
        if shape is None and node.args and isinstance(node.args[0], (list, tuple)):
            shape = env.shape(node.args[0][0])
        if shape is None:
            return None
        index = 1 if node.target in (torch.cat, torch.concat) else 2
        dim = env.concrete(env.arg(index, "dim", 0))
        return dim % len(shape) if isinstance(dim, int) else None

    def _check_index_op(self, node, coverage, sizes):
        """Indexing and splitting are exact to rewrite when each input channel lands exactly
        once and in order (a partition); anything else (a partial slice, a reorder) is kept."""
        bad = []
        for ref, parts in coverage.items():
            tables = [t[t >= 0] for _, t in parts]
            hits = np.concatenate(tables) if tables else np.zeros(0, dtype=np.int64)
            in_order = all(np.all(np.diff(t) == 1) for t in tables)
            partition = len(hits) == sizes[ref] and len(np.unique(hits)) == sizes[ref]
            if not (in_order and partition):
                bad.append((ref, f"{node.name}: indexes channels (a slice, select or reorder); kept"))
            elif self.kind == INDEX and len(parts) > 1:
                bad.append((ref, f"{node.name}: splits channels by index; kept"))
        return bad


class TupleOrTensorGetitem(Movement):
    """``operator.getitem``: picking an element of a tuple (after split/chunk) passes its
    channels through; indexing a tensor is a movement op whose slices must not cut channels."""

    def effects(self, node, env):
        source = node.args[0]
        f = facts_of(source) if hasattr(source, "op") else None
        if f is not None and f.elements and isinstance(node.args[1], int):
            i = node.args[1] % len(f.shapes)
            links = tuple(Link(env.out(r.axes), r) for r in env.dims(source, i))
            others = tuple(r for j in range(len(f.shapes)) if j != i for r in env.dims(source, j))
            return Effects(outputs=tuple(l.a for l in links), links=links, meta={"kind": FREE, "untouched": others})
        return super().effects(node, env)


register_instance(
    Movement(FREE),
    "permute", "transpose", "t", "flatten", "squeeze", "unsqueeze", "movedim", "moveaxis", "swapaxes",
    "expand_as", "roll", "flip", "unbind", "view_as", "reshape_as", "repeat",
    torch.permute, torch.transpose, torch.t, torch.flatten, torch.squeeze, torch.unsqueeze, torch.movedim,
    torch.cat, torch.concat, torch.stack, torch.roll, torch.flip, torch.unbind, torch.swapaxes,
    F.pixel_shuffle, F.pixel_unshuffle, torch.channel_shuffle, F.channel_shuffle,
    nn.Flatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
)
register_instance(Movement(SHAPE_ARGS), "view", "reshape", "expand", "unflatten", torch.reshape, nn.Unflatten, torch.unflatten)
register_instance(Movement(SPLIT), "split", "chunk", "tensor_split", torch.split, torch.chunk, torch.tensor_split)
register_instance(TupleOrTensorGetitem(INDEX), operator.getitem)
register_instance(Movement(INDEX), "narrow", "select", torch.narrow, torch.select)
