"""Which LayerNorm/RMSNorm channels can leave their stream through compensation (DESIGN §4).

A norm's statistics read every channel, so the plan normally keeps its channels all together.
A channel that carries a known constant c_j at the norm's *input* can still go: the
compensated norm (:class:`srfx.compensated_ln.CompensatedLayerNorm`) rebuilds the statistics
from the kept channels and the sums of the removed constants. What the removed channel
*outputs* is ``gamma_j c_j u - gamma_j v + beta_j`` (u = 1/s, v = mu/s), which someone must
still absorb:

- when ``gamma_j = 0`` the output is the constant ``beta_j``, and readers anywhere downstream
  fold it like any constant channel;
- otherwise every use of the norm's output must end, through data movement that keeps the
  channel axis whole (permute, token selection, flatten of unit axes, dropout, mean over
  tokens), at a Linear or unpadded conv reader that is called once and not tied: those
  readers get one column for u and one for v, and ``W_R beta_R`` in their bias.

This module only finds the sites; :mod:`srfx.planning` decides what goes, and the
``compensate_ln`` pass rewrites.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .coupling import Coupling
from .facts import Role, ValueKey
from .tracing import facts_of

__all__ = ["NormSite", "Absorption", "norm_absorption", "compensable_norms", "PENDING_KEY"]

# minimize marks its output with the norms it narrowed; compensate_ln finishes them and clears it
PENDING_KEY = "srfx_pending_compensation"


@dataclass(frozen=True, eq=False)
class NormSite:
    """One norm node that compensate_ln may rewrite.

    ``removable[j]``: channel j may leave (its input constant is known, and its output is
    either constant or absorbed by ``readers``). ``readers`` is empty when some use of the
    output cannot absorb u and v (then only gamma = 0 channels are removable).
    """

    node: str
    centered: bool  # LayerNorm (True) or RMSNorm (False)
    in_dim: int
    out_dim: int
    constants: np.ndarray  # per channel at the norm's input (NaN: not constant)
    removable: np.ndarray
    weight: Optional[str]
    bias: Optional[str]
    eps: Optional[float]
    readers: tuple[Role, ...]
    why_not_readers: Optional[str] = None
    size_reads: tuple[tuple[str, int], ...] = ()  # (node, original size): channel counts read off the output
    compensated: bool = False  # already a CompensatedLayerNorm (its emitted channels follow the kept ones)
    out_size: int = 0
    reshapes: tuple[tuple[str, int], ...] = ()  # (view/reshape node, channel axis): sized kept + emitted
    zero_padded: bool = False  # zero padding on the way to the readers: beta_R travels as a ones channel

    @property
    def removable_out(self) -> np.ndarray:
        """``removable`` along the output dim (a compensated norm's emitted channels stay)."""
        return np.concatenate([self.removable, np.zeros(self.out_size - len(self.removable), dtype=bool)])


# Ops that move data without mixing channels, and act the same on every channel (so a removed
# channel's affine form in u and v survives them, and the emitted u, v channels travel along).
_TRANSPARENT_METHODS = frozenset({"permute", "transpose", "contiguous", "flatten", "clone", "mean", "roll", "view", "reshape"})
_TRANSPARENT_FUNCTIONS = frozenset({operator.getitem, torch.flatten, torch.permute, torch.transpose, torch.mean, torch.roll, torch.reshape, F.dropout, F.pad})
_RESHAPES = frozenset({"view", "reshape", torch.reshape})
_TRANSPARENT_MODULES = (nn.Dropout, nn.Identity, nn.Flatten)
_READER_FOLDS = ("linear", "conv")  # not "zero_only": zero padding would see beta at the borders


def _transparent(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_method":
        return node.target in _TRANSPARENT_METHODS
    if node.op == "call_function":
        return node.target in _TRANSPARENT_FUNCTIONS
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _TRANSPARENT_MODULES)
    return False


def _pads_with_zeros(node: fx.Node) -> bool:
    """F.pad in constant mode with zeros. It pads no channel here: the pad rule gives its
    output the channel dim only where that axis's pad pair is literal zeros. The removed
    channels were padded with zeros, and so are u, v and a ones channel standing for beta
    (see NormSite.zero_padded)."""
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    return mode == "constant" and value in (None, 0, 0.0)


def _channel_axis(coupling: Coupling, node: fx.Node, atoms: np.ndarray) -> Optional[int]:
    """The axis on which the node's value carries the norm's channels, in order (None: not so)."""
    for d in coupling.dims_of_value(ValueKey(node.name)):
        if len(d.ref.axes) == 1 and np.array_equal(coupling.atoms(d), atoms):
            return d.ref.axes[0]
    return None


def _size_reads(query: fx.Node, axis: int, ndim: int) -> Optional[list[fx.Node]]:
    """The nodes of a shape query (``x.shape``, ``x.size()``, ``x.size(i)``, ``x.dim()``) that
    hold the channel count, or None when the whole shape escapes (then it cannot be patched).
    The shape-query rule already keeps channels whose count reaches anything but shape
    arguments, so the count read here only sizes other tensors: the original number is right."""
    if query.op == "call_method" and query.target == "dim":
        return []
    whole = (query.op == "call_function" and query.target is getattr and query.args[1:] == ("shape",)) or (
        query.op == "call_method" and query.target == "size" and len(query.args) == 1 and not query.kwargs
    )
    if query.op == "call_method" and query.target == "size" and not whole:
        dim = query.args[1] if len(query.args) > 1 else query.kwargs.get("dim")
        return [query] if isinstance(dim, int) and dim % ndim == axis else ([] if isinstance(dim, int) else None)
    if not whole:
        return None
    found = []
    for user in query.users:
        if not (user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int)):
            return None
        if user.args[1] % ndim == axis:
            found.append(user)
    return found


def _is_shape_query(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",)) or (
        node.op == "call_method" and node.target in ("size", "dim")
    )


@dataclass(frozen=True)
class _Graph:
    """What every norm's walk asks of the graph, built once per analysis."""

    coupling: Coupling
    params: dict
    modules: dict
    readers: dict  # node name -> reader Role
    calls: dict  # module qualname -> call sites
    tied: frozenset  # parameter names shared with another name

    @classmethod
    def of(cls, coupling: Coupling) -> "_Graph":
        gm = coupling.graph_module
        params = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}
        readers = {r.node: r for r in coupling.roles if r.kind == "reader"}
        return cls(coupling, params, dict(gm.named_modules()), readers, coupling.module_calls(), coupling.tied_names())


def _absorbing_readers(graph: _Graph, norm: fx.Node, out_atoms: np.ndarray):
    """The readers that absorb every use of ``norm``'s output and the channel-count reads to
    patch, or () and the reason why not."""
    coupling, params, modules, calls, tied = graph.coupling, graph.params, graph.modules, graph.calls, graph.tied
    readers_by_node = graph.readers
    found, sizes, reshapes, todo, seen = [], [], [], [norm], {norm}
    zero_padded = False
    while todo:
        value = todo.pop()
        for user in value.users:
            if user in seen:
                continue
            seen.add(user)
            if _is_shape_query(user) and user.args[0] is value:
                axis = _channel_axis(coupling, value, out_atoms)
                facts = facts_of(value)
                shape = facts.shape if facts is not None and facts.shapes else None
                reads = _size_reads(user, axis, len(shape)) if axis is not None and shape is not None else None
                if reads is None:
                    return (), f"{user.name} reads its whole shape", (), (), False
                sizes += [(r.name, len(out_atoms)) for r in reads]
                continue
            role = readers_by_node.get(user.name)
            if role is not None:
                if role.fold not in _READER_FOLDS:
                    return (), f"{user.name} reads it through a zero-padded or transposed conv", (), (), False
                if user.args[0] is not value or role.in_axis != 1:
                    return (), f"{user.name} reads it other than as its input", (), (), False
                if calls.get(role.owner, 1) != 1 or role.weight in tied:
                    return (), f"{role.owner} is shared (called more than once or tied)", (), (), False
                w = params.get(role.weight) if role.weight else None
                if w is None or w.dim() < 2 or w.shape[1] != len(out_atoms):
                    return (), f"{user.name} is a grouped reader", (), (), False
                found.append(role)
                continue
            tensor_inputs = [a for a in user.all_input_nodes if a.op != "get_attr" and facts_of(a) is not None and facts_of(a).is_tensor]
            axis = _channel_axis(coupling, user, out_atoms) if _transparent(user, modules) and tensor_inputs == [value] else None
            if axis is None:
                return (), f"{user.name} uses its output", (), (), False
            if user.target is F.pad:
                if not _pads_with_zeros(user):
                    return (), f"{user.name} pads it other than with zeros", (), (), False
                zero_padded = True
            if user.target in _RESHAPES:
                reshapes.append((user.name, axis))
            todo.append(user)
    return tuple(found), None, tuple(sizes), tuple(reshapes), zero_padded


@dataclass(frozen=True)
class Absorption:
    """What the structure alone says about one norm: its in/out dims, and the readers that
    absorb its output (``why_not`` when some use cannot)."""

    node: str
    owner: str
    in_dim: int
    out_dim: int
    readers: tuple[Role, ...]
    why_not: Optional[str]
    size_reads: tuple[tuple[str, int], ...]
    reshapes: tuple[tuple[str, int], ...] = ()
    zero_padded: bool = False


def norm_absorption(coupling: Coupling) -> tuple[Absorption, ...]:
    """Every LayerNorm/RMSNorm over one channel axis, and whether its readers could absorb
    removed channels (for ``show_groups``; the plan adds which channels are constant)."""
    nodes = {n.name: n for n in coupling.graph_module.graph.nodes}
    graph = _Graph.of(coupling)
    found = []
    for name, eff in coupling.effects.items():
        if eff.meta.get("norm") not in ("layer", "rms", "compensated") or not eff.mixes:
            continue
        in_ref = eff.mixes[0].ref
        if in_ref not in coupling.index or len(in_ref.axes) != 1:
            continue
        out_dims = [d for d in coupling.dims_of_value(ValueKey(name)) if d.ref.axes == in_ref.axes]
        if not out_dims:
            continue
        owner = eff.meta.get("owner", name)
        if graph.calls.get(owner, 1) > 1:  # one module, one set of removed channels' constants: not per call
            readers, why, sizes, reshapes, padded = (), f"{owner} is called {graph.calls[owner]} times", (), (), False
        else:
            readers, why, sizes, reshapes, padded = _absorbing_readers(graph, nodes[name], coupling.atoms(out_dims[0]))
        found.append(Absorption(name, owner, coupling.dim(in_ref).id, out_dims[0].id, readers, why, sizes, reshapes, padded))
    return tuple(found)


def compensable_norms(coupling: Coupling, constants, unabsorbed: frozenset = frozenset()) -> tuple[NormSite, ...]:
    """Every LayerNorm/RMSNorm over one channel axis whose channels compensation could free.
    Norms named in ``unabsorbed`` are planned as if no reader could take their u and v
    columns: only channels whose output is constant (gamma = 0) may leave them."""
    sites = []
    calls = coupling.module_calls()
    for norm in norm_absorption(coupling):
        if calls.get(norm.owner, 1) > 1:
            continue  # a shared norm module gets one replacement for all its calls: never compensated
        name, in_dim, out_dim = norm.node, coupling.dims[norm.in_dim], coupling.dims[norm.out_dim]
        eff = coupling.effects[name]
        c = constants.of(in_dim.id)
        if not np.isfinite(c).any():
            continue
        out_const = constants.of(out_dim.id)
        readers, why, sizes = norm.readers, norm.why_not, norm.size_reads
        if name in unabsorbed and why is None:
            readers, why = (), "planned without absorption: its u and v columns would cost more than the channels save"
        absorbed = np.ones(len(c), dtype=bool) if why is None else ~np.isnan(out_const)
        compensated = eff.meta["norm"] == "compensated"
        if compensated:
            module = coupling.graph_module.get_submodule(eff.meta["owner"])
            centered, absorbed = module.centered, absorbed[: in_dim.size]
        else:
            centered = eff.meta["norm"] == "layer"
        sites.append(NormSite(
            name, centered, in_dim.id, out_dim.id, c, np.isfinite(c) & absorbed,
            eff.meta.get("weight"), eff.meta.get("bias"), eff.meta.get("eps"), readers, why, sizes,
            compensated, out_dim.size, norm.reshapes, norm.zero_padded,
        ))
    return tuple(sites)
