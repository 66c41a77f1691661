"""Front end: turn a user's model into a shape-annotated ``torch.fx.GraphModule``.

The user's model is never traced in place: tracing works on a deep copy in eval mode, so
hooks, flags and parameters of the original stay exactly as they were (some timm models
also break when traced twice).
"""
from __future__ import annotations

import contextlib
import copy
import traceback
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from .errors import InputError, TraceError

__all__ = ["Traced", "NodeFacts", "trace", "normalize_inputs", "facts_of", "bake_masks", "private_copy", "preserved_buffers"]

META_KEY = "srfx"


@dataclass(frozen=True)
class Traced:
    """A traced copy of the model: ``graph_module`` carries ``tensor_meta`` on every node."""

    graph_module: fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    front_end: str  # "fx" or "fx+timm-leaves"


def normalize_inputs(example_input: Any) -> tuple[torch.Tensor, ...]:
    """Accept a tensor or a tuple/list of tensors as the example input."""
    inputs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    if not inputs:
        raise InputError("example_input is empty: pass the tensor(s) the model's forward takes.")
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise InputError(
                f"example_input[{i}] is a {type(t).__name__}, not a torch.Tensor: srfx traces with "
                "real tensors, pass one of the shape and dtype the model expects."
            )
    return inputs


def _timm_leaves() -> tuple[list[type], list[Any]]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is optional
        return [], []
    return list(get_notrace_modules()), list(get_notrace_functions())


def _srfx_leaf_types() -> tuple[type, ...]:
    from .compensated_ln import CompensatedLayerNorm

    return (CompensatedLayerNorm,)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        # srfx's own modules (CompensatedLayerNorm) have channel rules: keep them whole
        return isinstance(m, _srfx_leaf_types()) or super().is_leaf_module(m, qualname)


class _LeafTracer(_Tracer):
    def __init__(self, leaf_modules: Sequence[type], autowrap_functions: Sequence[Any]):
        super().__init__(autowrap_functions=tuple(f for f in autowrap_functions if callable(f)))
        self._leaf_types = tuple(leaf_modules)

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaf_types) or super().is_leaf_module(m, qualname)


def _defaults_not_given(model: torch.nn.Module, n_given: int) -> dict:
    """forward's optional arguments the example input does not give, fixed at their defaults
    (timm's ``mask=None``): tracing them symbolically would take the wrong branch."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    params = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {p.name: p.default for p in params[n_given:] if p.default is not p.empty}


def _symbolic_trace(model: torch.nn.Module, tracer: fx.Tracer, n_inputs: int) -> fx.GraphModule:
    graph = tracer.trace(model, concrete_args=_defaults_not_given(model, n_inputs) or None)
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


def private_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy srfx may change freely. Tensors a pruning hook computed (``weight`` =
    ``weight_orig * weight_mask``, non-leaf, which deepcopy refuses) are copied detached;
    the hook recomputes them anyway."""
    memo = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def preserved_buffers(*modules: torch.nn.Module):
    """Run code that calls forward without letting buffers written in forward (running
    statistics, counters) drift: srfx's own runs must leave no trace in any model."""
    saved = [(b, b.detach().clone()) for m in modules for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                if b.shape == value.shape:
                    b.copy_(value)


def bake_masks(model: torch.nn.Module) -> torch.nn.Module:
    """Make pruning masks part of the weights (in place, on srfx's own copy): the mask is
    what the model carries, whether exact zeros, ``torch.nn.utils.prune``'s
    ``weight_orig``/``weight_mask`` or a ``torch.nn.utils.parametrize`` parametrization (as
    torch.ao.pruning's sparsifiers leave them)."""
    from torch.nn.utils import parametrize, prune

    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


def _where_it_failed(exc: BaseException) -> str:
    """The innermost user-code frame of a tracing failure, for the error message."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno} ({f.line.strip() if f.line else f.name})"


def trace(model: torch.nn.Module, example_input: Any) -> Traced:
    """Trace a deep copy of ``model`` (eval mode) and annotate shapes with ``example_input``.

    Plain ``torch.fx.symbolic_trace`` first (it sees through every block, so the analysis
    does too); if that fails, retry with timm's registered leaf modules and functions, which
    become opaque barriers. If both fail, raise :class:`TraceError` naming where.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"srfx works on torch.nn.Module instances, got {type(model).__name__}.")
    inputs = normalize_inputs(example_input)
    failures = []
    leaf_modules, leaf_functions = _timm_leaves()
    attempts = [("fx", lambda: _Tracer())]
    if leaf_modules or leaf_functions:
        attempts.append(("fx+timm-leaves", lambda: _LeafTracer(leaf_modules, leaf_functions)))
    for front_end, make_tracer in attempts:
        work = bake_masks(private_copy(model).eval())
        try:
            gm = _symbolic_trace(work, make_tracer(), len(inputs))
        except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
            failures.append(f"{front_end}: {type(exc).__name__}: {exc}{_where_it_failed(exc)}")
            continue
        _propagate_shapes(gm, inputs)
        return Traced(gm, inputs, front_end)
    raise TraceError(
        f"could not trace {type(model).__name__} with torch.fx:\n  "
        + "\n  ".join(failures)
        + "\nData-dependent control flow (an `if` on tensor values or shapes) cannot be traced: "
        "move it out of forward, or register the module as a leaf (timm.layers.register_notrace_module)."
    )


@dataclass(frozen=True)
class NodeFacts:
    """What running the example input showed about one node (stored in ``node.meta["srfx"]``).

    ``shapes`` holds one shape per tensor the node produced: one for a tensor, several for a
    tuple/list of tensors (``elements`` is then True). ``value`` keeps non-tensor results
    (ints from ``x.size(1)``, shapes) that rules and rewrites need.
    """

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    elements: bool
    value: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.shapes[0]

    @property
    def is_tensor(self) -> bool:
        return bool(self.shapes) and not self.elements


def facts_of(node: fx.Node) -> NodeFacts | None:
    return node.meta.get(META_KEY)


def _facts(result: Any) -> NodeFacts:
    if isinstance(result, torch.Tensor):
        return NodeFacts((tuple(result.shape),), (result.dtype,), False)
    if isinstance(result, (tuple, list)) and result and all(isinstance(r, torch.Tensor) for r in result):
        return NodeFacts(tuple(tuple(r.shape) for r in result), tuple(r.dtype for r in result), True)
    return NodeFacts((), (), False, result)


class _FactRecorder(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta[META_KEY] = _facts(result)
        return result


def _propagate_shapes(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = sum(1 for n in placeholders if not n.args)  # args holds a default value
    if not required <= len(inputs) <= len(placeholders):
        raise InputError(
            f"the model's forward takes {required} to {len(placeholders)} argument(s) after tracing, "
            f"but example_input has {len(inputs)}."
        )
    try:
        with torch.no_grad(), preserved_buffers(gm):
            _FactRecorder(gm).run(*inputs)
    except Exception as exc:
        raise InputError(
            f"running the model on the example input failed: {type(exc).__name__}: {exc}. "
            "Check the example input's shape, dtype and device."
        ) from exc
