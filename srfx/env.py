"""The read-only view of the graph a channel rule gets for one node."""
from __future__ import annotations

import operator
from typing import Any, Iterator, Optional

import torch
import torch.fx as fx

from .facts import ParamKey, Ref, ValueKey
from .tracing import facts_of

__all__ = ["NodeEnv", "tensor_leaves", "is_inplace", "mutated_attributes"]

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def is_inplace(node: fx.Node, modules: dict) -> bool:
    """Does the node write into its first argument (``x.relu_()``, ``x += y``, ``inplace=True``)?"""
    if node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") and not node.target.endswith("__"):
        return True
    if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
        return True
    if node.kwargs.get("inplace", False) is True:
        return True
    return node.op == "call_module" and getattr(modules.get(node.target), "inplace", False) is True


def mutated_attributes(gm: fx.GraphModule) -> frozenset:
    """Targets of get_attr tensors that forward writes in place (running statistics,
    counters): state, not constants."""
    out = set()
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if not is_inplace(node, modules) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        while source.op != "get_attr" and source.op in ("call_method", "call_function") and source.args and isinstance(source.args[0], fx.Node):
            source = source.args[0]  # through views and chained in-place calls
        if source.op == "get_attr":
            out.add(source.target)
    return frozenset(out)


def tensor_leaves(args: Any, elements: bool = False) -> Iterator[fx.Node]:
    """Every fx.Node that produces a tensor (with ``elements``: or a tuple of tensors),
    anywhere inside (nested) args/kwargs."""
    found: list[fx.Node] = []

    def visit(a):
        if isinstance(a, fx.Node):
            f = facts_of(a)
            if f is not None and (f.is_tensor or (elements and f.elements)):
                found.append(a)
        return a

    fx.node.map_aggregate(args, visit)
    seen = set()
    for n in found:
        if n not in seen:
            seen.add(n)
            yield n


class NodeEnv:
    """Queries a rule may make: shapes, existing channel dims of inputs, modules, parameters."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node, dims_of_value, modules: dict, mutated=frozenset(), memo=None):
        self.mutated = mutated  # parameter/buffer names written in place during forward
        self.memo = memo  # one analysis's cache for rules whose work repeats across blocks (or None)
        self.gm = gm
        self.node = node
        self._dims_of_value = dims_of_value
        self.modules = modules

    # --- this node -------------------------------------------------------------------------
    @property
    def out_facts(self):
        return facts_of(self.node)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.out_facts.shape

    def out(self, axes, element: int = -1) -> Ref:
        return Ref(ValueKey(self.node.name, element), tuple(axes))

    def module(self) -> torch.nn.Module:
        return self.modules[self.node.target]

    def tensor_args(self) -> list[fx.Node]:
        return list(tensor_leaves((self.node.args, self.node.kwargs)))

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """Positional-or-keyword argument of a call node."""
        if len(self.node.args) > index:
            return self.node.args[index]
        return self.node.kwargs.get(name, default)

    # --- inputs ---------------------------------------------------------------------------
    def key(self, arg: fx.Node, element: int = -1) -> ValueKey:
        return ValueKey(arg.name, element)

    def shape(self, arg: Any) -> Optional[tuple[int, ...]]:
        if isinstance(arg, fx.Node):
            f = facts_of(arg)
            if f is not None and f.is_tensor:
                return f.shape
        return None

    def dims(self, arg: fx.Node, element: int = -1) -> list[Ref]:
        return list(self._dims_of_value(ValueKey(arg.name, element)))

    def all_dims(self, arg: fx.Node) -> list[Ref]:
        """Dims of a tensor argument, or of every element of a tuple-valued argument."""
        f = facts_of(arg)
        if f is not None and f.elements:
            return [r for i in range(len(f.shapes)) for r in self.dims(arg, i)]
        return self.dims(arg)

    def dim_at(self, arg: fx.Node, axes) -> Ref:
        """The ref of ``arg`` over ``axes``; the analysis creates it (as fixed) if untracked."""
        return Ref(ValueKey(arg.name), tuple(axes))

    def concrete(self, arg: Any) -> Any:
        """Python value of a non-tensor argument (ints from x.size(), tuples, constants)."""
        if isinstance(arg, fx.Node):
            if arg.op == "get_attr":
                return self.param_value(arg)
            f = facts_of(arg)
            return None if f is None else f.value
        if isinstance(arg, (tuple, list)):
            return type(arg)(self.concrete(a) for a in arg)
        return arg

    def param_name(self, arg: Any) -> Optional[str]:
        """Qualified name when ``arg`` is a get_attr of a parameter or buffer."""
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            return arg.target
        return None

    def param_value(self, arg: fx.Node) -> torch.Tensor:
        obj: Any = self.gm
        for part in arg.target.split("."):
            obj = getattr(obj, part)
        return obj

    def param_ref(self, qualname: str, axis: int) -> Ref:
        return Ref(ParamKey(qualname), (axis,))
