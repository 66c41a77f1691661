"""Constant channels: which channels of which values carry one number everywhere (DESIGN §3).

A forward pass over the graph in the rules' own terms: each rule's ``constants`` maps its
output dims to per-channel values (NaN = not constant). Facts are about the original model,
so they stay true whatever is later removed.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .coupling import Coupling
from .facts import Ref, ValueKey
from .env import NodeEnv
from .registry import lookup
from .tracing import facts_of

__all__ = ["Constants", "constant_channels"]


class Constants:
    """Per-dim constants, and the queries rules make while computing them."""

    def __init__(self, coupling: Coupling):
        self.coupling = coupling
        self.gm = coupling.graph_module
        self.values: dict[int, np.ndarray] = {}
        self.notes: list[str] = []  # ops whose constants could not be evaluated
        self._params = {**dict(self.gm.named_parameters(remove_duplicate=False)), **dict(self.gm.named_buffers(remove_duplicate=False))}

    # --- queries for rules --------------------------------------------------------------
    def effects(self, node):
        return self.coupling.effects[node.name]

    def dims_of(self, node) -> list[Ref]:
        return [d.ref for d in self.coupling.dims_of_value(ValueKey(node.name))]

    def param(self, qualname: str) -> torch.Tensor:
        return self._params[qualname]

    def value(self, ref: Ref) -> np.ndarray:
        did = self.coupling.index.get(ref)
        if did is None:
            raise KeyError(ref)
        d = self.coupling.dims[did]
        return self.values.get(did, np.full(d.size, math.nan))

    def value_or_nan(self, ref: Ref, size: int) -> np.ndarray:
        did = self.coupling.index.get(ref)
        if did is None:
            return np.full(size, math.nan)
        return self.value(ref)

    def of(self, dim_id: int) -> np.ndarray:
        d = self.coupling.dims[dim_id]
        return self.values.get(dim_id, np.full(d.size, math.nan))


def constant_channels(coupling: Coupling) -> Constants:
    known = Constants(coupling)
    gm = coupling.graph_module
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if facts_of(node) is None or node.name not in coupling.effects:
            continue
        rule = lookup(node, modules)
        if rule is None:
            continue
        env = NodeEnv(gm, node, lambda key: [d.ref for d in coupling.dims_of_value(key)], modules, coupling.mutated)
        try:
            found = rule.constants(node, env, known)
        except Exception as exc:  # a rule that cannot evaluate an op knows no constant: safe
            known.notes.append(f"{node.name}: constants unknown ({type(exc).__name__}: {exc})")
            continue
        for ref, vals in found.items():
            did = coupling.index.get(ref)
            if did is not None and len(vals) == coupling.dims[did].size:
                known.values[did] = np.asarray(vals, dtype=np.float64)
    return known
