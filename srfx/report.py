"""Size and cost of a model: what a deployment stores (parameters and floating buffers,
counted once per tensor) and multiply-accumulates of its linear layers on the example input."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

from .tracing import facts_of

__all__ = ["count_parameters", "count_stored", "count_nonzero", "count_macs", "Report"]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() already dedups tied tensors


def count_stored(model: nn.Module) -> int:
    """Parameters plus floating-point buffers (BatchNorm statistics): the deployable size.
    Counted per storage, so tensors that are views of one table (fx lifts a constant used
    in several places as several views) count once."""
    storages: dict[int, int] = {}
    for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
        if t.device.type == "meta":
            storages[id(t)] = t.numel()
            continue
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes() // t.element_size())
    return sum(storages.values())


def count_nonzero(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


def count_macs(gm: fx.GraphModule) -> int:
    """MACs of Linear/Conv/matmul nodes, from shapes recorded by tracing (needs facts)."""
    modules = dict(gm.named_modules())
    total = 0
    for node in gm.graph.nodes:
        f = facts_of(node)
        if f is None or not f.is_tensor:
            continue
        out = int(np.prod(f.shape))
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, nn.Linear):
                total += out * m.in_features
            elif isinstance(m, nn.modules.conv._ConvNd):
                total += out * m.weight[0].numel() if not isinstance(m, nn.modules.conv._ConvTransposeNd) else int(np.prod(facts_of(node.args[0]).shape)) * m.weight[0].numel()
        elif node.op == "call_function" and node.target in (F.linear, F.conv1d, F.conv2d, F.conv3d):
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            w = facts_of(weight) if isinstance(weight, fx.Node) else None
            if w is not None and w.is_tensor:
                total += out * int(np.prod(w.shape[1:]))
        elif (node.op == "call_function" and node.target in (torch.matmul, torch.bmm)) or node.target in ("matmul", "bmm") or getattr(node.target, "__name__", "") == "matmul":
            a = facts_of(node.args[0])
            if a is not None and a.is_tensor:
                total += out * a.shape[-1]
    return total


@dataclass(frozen=True)
class Report:
    """Before/after sizes and per-group channel counts of one compress."""

    params_before: int
    params_after: int
    stored_before: int
    stored_after: int
    macs_before: int
    macs_after: int
    groups: tuple  # of srfx.planning.GroupPlan
    max_rel_error: float | None
    warnings: tuple[str, ...] = ()
    heads: tuple[tuple[str, int, int], ...] = ()  # (attention node, heads before, after)
    compensated_norms: int = 0
    # parameter name -> axis -> indices (LongTensor) of the model's entries it keeps, for every
    # parameter of the result that is a slice of the model's own: optimizer state can follow
    kept: dict = field(default_factory=dict, repr=False, compare=False)
    # parameters of the result whose values are not just slices of the model's own of that
    # name (readers a compensated norm rebuilt, convs BatchNorm was folded into): their
    # optimizer state describes other numbers, so it starts fresh
    rebuilt: tuple[str, ...] = field(default=(), repr=False, compare=False)
    # what the result assumes of its inputs beyond the example's shapes (a branch on dtypes the
    # example decided); the result checks each on every call and refuses inputs that break it
    assumptions: tuple[str, ...] = ()

    @property
    def heads_removed(self) -> int:
        return sum(before - after for _, before, after in self.heads)

    @property
    def ratio(self) -> float:
        return self.stored_before / max(1, self.stored_after)

    def __str__(self) -> str:
        rows = [
            ("parameters", self.params_before, self.params_after, f"{self.params_before / max(1, self.params_after):.2f}x"),
            ("stored (params + float buffers)", self.stored_before, self.stored_after, f"{self.ratio:.2f}x"),
            ("MACs", self.macs_before, self.macs_after, f"{self.macs_before / max(1, self.macs_after):.2f}x"),
        ]
        text = tabulate(rows, headers=["", "before", "after", "ratio"])
        shrunk = [g for g in self.groups if g.kept < g.channels]
        text += f"\n{len(shrunk)} of {len(self.groups)} channel groups shrank"
        if self.heads:
            text += f"; {self.heads_removed} of {sum(b for _, b, _ in self.heads)} attention heads removed"
        if self.compensated_norms:
            text += f"; {self.compensated_norms} norms compensated"
        if self.max_rel_error is not None:
            text += f"; verified, max relative error {self.max_rel_error:.2e}"
        for w in self.warnings:
            text += f"\nwarning: {w}"
        for a in self.assumptions:
            text += f"\nchecked on every call: {a}"
        return text
