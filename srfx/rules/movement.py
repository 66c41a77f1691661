"""Data-movement ops (reshape, permute, cat, split, getitem, expand, pixel shuffle, ...).

One rule serves them all, exact by construction: the op is run on *position labels* (every
input element holds its own index) and the output shows, for every output element, where
it came from. A channel dim of an input reaches the output along the axes where its channel
index varies; channels that end up spread over axes the analysis cannot follow, or mixed
with untracked data, are kept.
"""
from __future__ import annotations

import dataclasses
import math
import operator

import numpy as np
import torch
import torch.fx as fx
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


def _varying_axes(ch: np.ndarray, dense: bool = False) -> list[int]:
    """Axes along which ``ch`` changes between neighbours that both hold a channel (>= 0;
    ``dense``: all of them do)."""
    axes = []
    for a in range(ch.ndim):
        if ch.shape[a] < 2:
            continue
        x0 = ch[(slice(None),) * a + (slice(0, -1),)]  # views, not copies
        x1 = ch[(slice(None),) * a + (slice(1, None),)]
        if np.any(x0 != x1) if dense else np.any((x0 >= 0) & (x1 >= 0) & (x0 != x1)):
            axes.append(a)
    return axes


def _channel_index(local: np.ndarray, shape: tuple[int, ...], axes: tuple[int, ...]) -> np.ndarray:
    """Flat index over ``axes`` (in their order) of each flat position ``local`` of ``shape``:
    ``ravel_multi_index(unravel_index(local, shape)[axes], sizes)``, on the axes needed only."""
    out = None
    for a in axes:
        coord = local // math.prod(shape[a + 1 :]) % shape[a]
        out = coord if out is None else out * shape[a] + coord
    return out


def _table(ch: np.ndarray, axes: list[int]) -> np.ndarray | None:
    """Channel index per position of ``axes`` (flat, -1 where none); None if ``ch`` depends
    on other axes too."""
    rest = [i for i in range(ch.ndim) if i not in axes]
    moved = np.transpose(ch, axes + rest).reshape(int(np.prod([ch.shape[a] for a in axes])), -1)
    table = moved.max(axis=1)
    ok = (moved < 0) | (moved == table[:, None])
    return table.astype(np.int64, copy=False) if ok.all() else None


_NODE = "\0"  # stand-in name of the node in a memoized label analysis


def _typed(a, node_key):
    """Hashable, type-exact description of an argument (1, 1.0 and True stay apart);
    ``node_key`` describes fx nodes. TypeError when there is none."""
    if isinstance(a, fx.Node):
        return node_key(a)
    if isinstance(a, torch.Size):
        return (torch.Size, tuple(a))
    if isinstance(a, (tuple, list)):
        return (list if isinstance(a, list) else type(a), tuple(_typed(x, node_key) for x in a))
    if isinstance(a, dict):
        return (dict, tuple((k, _typed(v, node_key)) for k, v in a.items()))
    if isinstance(a, slice):
        return (slice, _typed(a.start, node_key), _typed(a.stop, node_key), _typed(a.step, node_key))
    if a is None or a is Ellipsis or isinstance(a, (int, float, str, torch.dtype, torch.device, torch.memory_format)):
        return (type(a), a)
    raise TypeError(type(a).__name__)


def _memo_key(rule, node, env, inputs, all_in):
    """What the label analysis of ``node`` depends on, without names; None if unknown
    (module calls, tensors as arguments)."""
    if node.op == "call_module":
        return None
    index = {a: i for i, a in enumerate(inputs)}
    by_name = {a.name: i for i, a in enumerate(inputs)}

    def node_key(a):
        if a in index:
            return ("input", index[a])
        if a.op == "get_attr":
            raise TypeError("get_attr")
        return ("value", _typed(env.concrete(a), node_key))

    try:
        key = (
            type(rule), rule.kind, node.op, node.target,
            _typed(node.args, node_key), _typed(node.kwargs, node_key),
            tuple((facts_of(a).shapes, facts_of(a).elements) for a in inputs),
            tuple((by_name[r.value.node], r.value.element, r.axes) for r in all_in),
            (env.out_facts.shapes, env.out_facts.elements),
        )
        hash(key)
    except (TypeError, KeyError):
        return None
    return key


def _rename_ref(ref: Ref, names: dict) -> Ref:
    return Ref(ValueKey(names.get(ref.value.node, _NODE), ref.value.element), ref.axes)


def _renamed(eff: Effects, back: dict) -> Effects:
    """``eff`` with stand-in names replaced (``back``: stand-in -> real name)."""
    refs: dict = {}

    def ref(r):
        out = refs.get(r)
        if out is None:
            out = refs[r] = Ref(ValueKey(back[r.value.node], r.value.element), r.axes)
        return out

    def text(reason):
        if "\0" not in reason:
            return reason
        for stand_in, name in back.items():
            if stand_in != _NODE:
                reason = reason.replace(stand_in, name)
        return reason.replace(_NODE, back[_NODE])

    return Effects(
        outputs=tuple(ref(r) for r in eff.outputs),
        links=tuple(Link(ref(l.a), ref(l.b), l.pairs) for l in eff.links),
        fixed=tuple((ref(r), text(why)) for r, why in eff.fixed),
        meta=eff.meta,
    )


class Movement(ChannelRule):
    """``kind`` says what a rewrite must update when channels shrink (see passes.minimize)."""

    name = "movement"

    def __init__(self, kind: str = FREE):
        self.kind = kind

    def effects(self, node, env):
        inputs = list(tensor_leaves((node.args, node.kwargs), elements=True))
        if not facts_of(node).shapes:
            return Effects()  # a non-tensor result (a size, a shape tuple)
        # The label analysis is the expensive part and does not depend on names: run it with
        # stand-in names (input i is "\0i\0", this node "\0") and reuse it for every node
        # with the same op, arguments, shapes and input dims (a model's repeated blocks).
        names = {a.name: f"\0{i}\0" for i, a in enumerate(inputs)}
        all_in = [r for a in inputs for r in env.all_dims(a)]
        key = _memo_key(self, node, env, inputs, all_in)
        memo = getattr(env, "memo", None)
        core = memo.get(key) if memo is not None and key is not None else None
        if core is None:
            core = self._label_effects(node, env, inputs, names, [_rename_ref(r, names) for r in all_in])
            if memo is not None and key is not None:
                memo[key] = core
        back = {v: k for k, v in names.items()}
        back[_NODE] = node.name
        eff = _renamed(core, back)
        if not eff.meta:  # the op did not run on labels: every input dim is fixed
            return eff
        links, fixed, out_refs = list(eff.links), list(eff.fixed), list(eff.outputs)
        if node.op == "call_method" and node.target in _LIKE and len(node.args) > 1:
            links, fixed, _ = self._like(node, env, links, fixed, out_refs)
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
        return Effects(outputs=eff.outputs, links=tuple(links), fixed=tuple(fixed), roles=roles, meta=eff.meta)

    def _label_effects(self, node, env, inputs, names, all_in):
        """Outputs, links and fixed dims from running the op on position labels, with the
        stand-in names of ``names`` (``all_in``: the input dims under those names)."""
        spans = []  # (ValueKey, shape, offset)
        offset = 0
        for a in inputs:
            f = facts_of(a)
            for e in range(len(f.shapes)) if f.elements else [-1]:
                shape = f.shapes[max(e, 0)]
                spans.append((ValueKey(names[a.name], e), shape, offset))
                offset += math.prod(shape)

        def labelled(dtype):
            made = iter(torch.arange(off, off + math.prod(shape), dtype=dtype).reshape(shape) for _, shape, off in spans)
            labels = {}
            for a in inputs:
                f = facts_of(a)
                labels[a] = tuple(next(made) for _ in f.shapes) if f.elements else next(made)
            return call_with(node, env, lambda a: labels[a] if a in labels else env.concrete(a))

        name = _NODE
        try:
            # int32 labels halve the memory traffic; an op that refuses them gets int64
            try:
                if offset >= 2**31:
                    raise OverflowError
                result = labelled(torch.int32)
            except Exception:  # noqa: BLE001 - retried with the labels every op takes
                result = labelled(torch.int64)
        except Exception as exc:  # the op does not run on integer labels
            reason = f"{name}: cannot follow channels through it ({type(exc).__name__})"
            return Effects(fixed=tuple((r, reason) for r in all_in))
        facts = env.out_facts
        outs = list(result) if facts.elements else [result]
        elements = list(range(len(outs))) if facts.elements else [-1]
        out_refs, links, fixed, opaque = [], [], [], set()
        coverage = {r: [] for r in all_in}  # input dim -> [(element, table, output axes)]
        for e, out in zip(elements, outs):
            src = out.numpy()
            found: dict[tuple[int, ...], list[tuple[Ref, np.ndarray]]] = {}
            contributes = []
            lo, hi = (int(src.min()), int(src.max())) if src.size else (0, -1)
            for key, shape, off in spans:
                n = math.prod(shape)
                if src.size == 0 or hi < off or lo >= off + n:
                    continue  # nothing of this input reaches the output
                if off <= lo and hi < off + n:
                    mask = None  # every output position comes from this input
                    local = src - off if off else src
                else:
                    mask = (src >= off) & (src < off + n)
                    if not mask.any():
                        continue
                    local = np.where(mask, src - off, 0)
                dims = [r for r in all_in if r.value == key]
                mapped = False
                for ref in dims:
                    ch = _channel_index(local, shape, ref.axes)
                    if mask is not None:
                        ch = np.where(mask, ch, -1)
                    axes = _varying_axes(ch, dense=mask is None)
                    if not axes and len(ref.axes) == 1 and self._along(node, env) == ref.axes[0]:
                        axes = [ref.axes[0]]  # a one-channel piece of a cat/split stays on its axis
                    table = _table(ch, axes) if axes else None
                    if table is None:
                        fixed.append((ref, f"{name}: channels move where srfx cannot follow them"))
                        continue
                    found.setdefault(tuple(axes), []).append((ref, table))
                    coverage[ref].append((e, table, tuple(axes)))
                    mapped = True
                contributes.append((key, mask, local, mapped))
            taken = [a for axes in found for a in axes]
            if len(taken) != len(set(taken)):
                reason = f"{name}: channel dims overlap in the output"
                fixed.extend((ref, reason) for group in found.values() for ref, _ in group)
                continue
            for axes, members in found.items():
                out_ref = Ref(ValueKey(name, e), tuple(axes))
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
                        pos = local if mask is None else np.where(mask, local, -1)
                        if _varying_axes(pos) and any(a in axes for a in _varying_axes(pos)):
                            fixed.append((out_ref, f"{name}: channels mixed with untracked data from {k}"))
                if not covered.all() and not untracked:
                    fixed.append((out_ref, f"{name}: output channels not traced to a source"))
        meta = {"kind": self.kind, "opaque": frozenset(opaque), "untouched": ()}
        if self.kind in (SPLIT, INDEX):
            sizes = {r: int(np.prod([shape[a] for a in r.axes])) for k, shape, _ in spans for r in all_in if r.value == k}
            bad = self._check_index_op(name, coverage, sizes)
            source, reindex = _single_axis_reindex(node, env, coverage, bad) if self.kind == INDEX else (None, None)
            if reindex is not None:
                meta["reindex"] = reindex
                bad = [(r, why) for r, why in bad if r != source]
            fixed.extend(bad)
        return Effects(outputs=tuple(dict.fromkeys(out_refs)), links=tuple(links), fixed=tuple(fixed), meta=meta)

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

    def _check_index_op(self, name, coverage, sizes):
        """Indexing and splitting are exact to rewrite as they are when each input channel lands
        exactly once and in order (a partition); anything else (a partial slice, a reorder) is
        kept, unless it is a :class:`Reindex` (see :func:`_single_axis_reindex`)."""
        bad = []
        for ref, parts in coverage.items():
            tables = [t[t >= 0] for _, t, _ in parts]
            hits = np.concatenate(tables) if tables else np.zeros(0, dtype=np.int64)
            in_order = all(np.all(np.diff(t) == 1) for t in tables)
            partition = len(hits) == sizes[ref] and len(np.unique(hits)) == sizes[ref]
            if not (in_order and partition):
                bad.append((ref, f"{name}: indexes channels (a slice, select or reorder); kept"))
            elif self.kind == INDEX and len(parts) > 1:
                bad.append((ref, f"{name}: splits channels by index; kept"))
        return bad


@dataclasses.dataclass(frozen=True)
class Reindex:
    """A slice, step slice, list or reorder along one channel axis (``h[:, 2:6]``,
    ``h.narrow(1, 2, 4)``, ``h[..., [0, 2, 5]]``): output channel i is input channel
    ``table[i]``. minimize turns it into the same indexing with the channel component made
    whole, followed by an ``index_select`` of the kept channels renumbered."""

    in_axis: int  # of the indexed input (``node.args[0]``)
    out_axis: int
    table: np.ndarray
    component: int | None  # the getitem index's position that indexes ``in_axis``; None: narrow

    def __eq__(self, other):  # np arrays do not compare as a dataclass field
        return self is other

    __hash__ = object.__hash__


def _index_component(index: tuple, ndim: int, axis: int) -> int | None:
    """The position in a getitem index tuple that indexes input ``axis``, if every component
    is a constant slice, int, Ellipsis, None or list of ints (else None: not rewritable)."""
    consumes = []
    for c in index:
        if c is None:
            consumes.append(0)
        elif c is Ellipsis:
            consumes.append(None)
        elif isinstance(c, bool):
            return None
        elif isinstance(c, int):
            consumes.append(1)
        elif isinstance(c, slice) and all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (c.start, c.stop, c.step)):
            consumes.append(1)
        elif isinstance(c, (list, tuple)) and c and all(isinstance(v, int) and not isinstance(v, bool) for v in c):
            if sum(isinstance(o, (list, tuple)) for o in index) > 1:
                return None  # several advanced indices broadcast together
            consumes.append(1)
        else:
            return None
    if consumes.count(None) > 1:
        return None
    if None in consumes:
        i = consumes.index(None)
        consumes[i] = ndim - sum(c for c in consumes if c is not None)
    at = 0
    for pos, c in enumerate(consumes):
        if c and at <= axis < at + c:
            return pos if index[pos] is not Ellipsis else None
        at += c
    return None


def _single_axis_reindex(node, env, coverage, bad) -> tuple[Ref | None, Reindex | None]:
    """A partial or reordered index along one single-axis channel dim that minimize can
    rewrite (see :class:`Reindex`), with that dim; None where anything else is indexed so."""
    nothing = None, None
    flagged = [r for r, _ in bad]
    if len(flagged) != 1 or len(flagged[0].axes) != 1 or len(coverage[flagged[0]]) != 1:
        return nothing
    ref = flagged[0]
    element, table, out_axes = coverage[ref][0]
    if element != -1 or len(out_axes) != 1 or table.size == 0 or not np.all(table >= 0):
        return nothing
    x = node.args[0]
    if not isinstance(x, fx.Node) or env.shape(x) is None:
        return nothing
    ndim, axis = len(env.shape(x)), ref.axes[0]
    if node.target in ("narrow", torch.narrow):
        dim = env.concrete(env.arg(1, "dim"))
        if not isinstance(dim, int) or dim % ndim != axis:
            return nothing
        component = None
    elif node.target is operator.getitem:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        component = _index_component(index, ndim, axis)
        if component is None or isinstance(index[component], int):
            return nothing
    else:
        return nothing
    return ref, Reindex(axis, out_axes[0], table.astype(np.int64), component)


class TupleOrTensorGetitem(Movement):
    """``operator.getitem``: picking an element of a tuple (after split/chunk) passes its
    channels through; indexing a tensor is a movement op (a partial or reordered index along
    one channel axis is a :class:`Reindex`)."""

    def effects(self, node, env):
        source = node.args[0]
        f = facts_of(source) if hasattr(source, "op") else None
        if f is not None and f.elements and isinstance(node.args[1], int):
            i = node.args[1] % len(f.shapes)
            links = tuple(Link(env.out(r.axes), r) for r in env.dims(source, i))
            others = tuple(r for j in range(len(f.shapes)) if j != i for r in env.dims(source, j))
            return Effects(outputs=tuple(l.a for l in links), links=links, meta={"kind": FREE, "untouched": others})
        return super().effects(node, env)


class CountDependent(Movement):
    """A movement whose permutation depends on how many channels an axis has (``roll`` shifts
    modulo the count, ``channel_shuffle`` interleaves count / groups): the labels show the
    permutation for the original count only, so channels on those axes stay."""

    def __init__(self, axes):
        super().__init__(FREE)
        self.axes = axes  # (node, env) -> the axes whose count the permutation depends on

    def effects(self, node, env):
        eff = super().effects(node, env)
        x = env.tensor_args()[0] if env.tensor_args() else None
        if x is None or env.shape(x) is None:
            return eff
        axes = self.axes(node, env, len(env.shape(x)))
        held = [(r, f"{node.name}: the permutation depends on the channel count of axis {r.axes}") for r in env.dims(x) if set(r.axes) & axes]
        return dataclasses.replace(eff, fixed=eff.fixed + tuple(held))


def _rolled_axes(node, env, n):
    dims = env.concrete(env.arg(2, "dims", None))
    if dims is None:  # rolls the flattened tensor
        return set(range(n))
    return {d % n for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}


register_instance(
    Movement(FREE),
    "permute", "transpose", "t", "flatten", "squeeze", "unsqueeze", "movedim", "moveaxis", "swapaxes",
    "expand_as", "flip", "unbind", "view_as", "reshape_as", "repeat",
    torch.permute, torch.transpose, torch.t, torch.flatten, torch.squeeze, torch.unsqueeze, torch.movedim,
    torch.cat, torch.concat, torch.stack, torch.flip, torch.unbind, torch.swapaxes,
    F.pixel_shuffle, F.pixel_unshuffle,
    nn.Flatten, nn.PixelShuffle, nn.PixelUnshuffle,
)
register_instance(CountDependent(_rolled_axes), "roll", torch.roll)
register_instance(CountDependent(lambda node, env, n: {1}), torch.channel_shuffle, F.channel_shuffle, nn.ChannelShuffle)
register_instance(Movement(SHAPE_ARGS), "view", "reshape", "expand", "unflatten", torch.reshape, nn.Unflatten, torch.unflatten)
register_instance(Movement(SPLIT), "split", "chunk", "tensor_split", torch.split, torch.chunk, torch.tensor_split)
register_instance(TupleOrTensorGetitem(INDEX), operator.getitem)
register_instance(Movement(INDEX), "narrow", "select", torch.narrow, torch.select)


class IndexSelect(ChannelRule):
    """``torch.index_select(x, dim, index)`` with a constant index (a buffer, as srfx's own input
    gathers): output position i along ``dim`` is input position ``index[i]``. minimize rewrites
    the index when either side shrinks."""

    name = "index_select"

    def effects(self, node, env):
        x, index = env.arg(0, "input"), env.arg(2, "index")
        n = len(env.shape(x))
        axis = env.concrete(env.arg(1, "dim")) % n
        idx = env.param_value(index) if isinstance(index, fx.Node) and index.op == "get_attr" else None
        if idx is None:
            why = f"{node.name}: index_select with a computed index"
            return Effects(fixed=tuple((r, why) for r in env.dims(x)))
        idx = idx.detach().cpu().numpy().astype(np.int64)
        links, outs = [], []
        fixed = [(r, f"{node.name}: its index holds positions, not channels") for r in env.dims(index)]
        dims = env.dims(x)
        if not any(r.axes == (axis,) for r in dims):  # a model input: the analysis makes it a fixed dim
            dims = dims + [env.dim_at(x, (axis,))]
        for r in dims:
            if axis not in r.axes:
                outs.append(env.out(r.axes))
                links.append(Link(r, outs[-1]))
            elif r.axes == (axis,):
                outs.append(env.out((axis,)))
                links.append(Link(outs[-1], r, (np.arange(len(idx)), idx)))
            else:
                fixed.append((r, f"{node.name}: selects along a multi-axis channel dim"))
        return Effects(outputs=tuple(outs), links=tuple(links), fixed=tuple(fixed), meta={"index": idx, "axis": axis})

    def constants(self, node, env, known):
        eff = known.effects(node)
        result = {}
        for link in eff.links:
            if link.pairs is None:  # an axis it does not select along: the same values
                result[link.b] = known.value(link.a)
            else:  # along the selected axis, output i is input index[i]
                result[link.a] = known.value(link.b)[eff.meta["index"]]
        return result


register_instance(IndexSelect(), torch.index_select, "index_select")
