"""Front end: turn a user's model into a shape-annotated ``torch.fx.GraphModule``.

The user's model is never traced in place: tracing works on a deep copy in eval mode, so
hooks, flags and parameters of the original stay exactly as they were (some timm models
also break when traced twice).

Shapes come from running the traced graph on the example input, on ``device="meta"``
tensors where that records exactly what a real run would (:mod:`srfx.meta_facts`), else
for real.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import operator
import os
import threading
import traceback
import types
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch.amp import autocast_mode
from torch.fx.proxy import ParameterProxy

from .decompose import Unexpressible, decompose_modules, mixed_calls, unseen
from .errors import InputError, TraceError

__all__ = ["Traced", "NodeFacts", "trace", "normalize_inputs", "facts_of", "bake_masks", "private_copy", "working_copy", "hooked_modules", "preserved_buffers"]

META_KEY = "srfx"
UNTRACEABLE_KEY = "srfx_untraceable"  # node.meta of a module kept whole because fx could not trace it: why


@dataclass(frozen=True)
class Traced:
    """A traced copy of the model: ``graph_module`` carries ``tensor_meta`` on every node."""

    graph_module: fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    front_end: str  # "fx", "fx+known-functions", either "+untraceable-leaves", or "fx+timm-leaves"
    untraceable: dict = field(default_factory=dict)  # module kept whole -> why fx could not trace it


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


def _known_untraceable() -> tuple[Any, ...]:
    """Functions fx should record as calls rather than trace into, from libraries that are
    installed: timm's registered not-traceable functions, and einops (its functions read
    concrete shapes and reject fx proxies). Each such call is a barrier."""
    found: list[Any] = list(_timm_leaves()[1])
    try:
        import einops
    except ImportError:
        pass
    else:
        found.append(einops)
    return tuple(found)


def _timm_leaves() -> tuple[list[type], list[Any]]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is optional
        return [], []
    return list(get_notrace_modules()), list(get_notrace_functions())


def _tensor_at(root: torch.nn.Module, qualname: str) -> Any:
    """The parameter or buffer registered under ``qualname``, read from the registries (a
    plain ``getattr`` would go through the tracer's patched ``Module.__getattr__``)."""
    *path, leaf = qualname.split(".")
    mod = root
    for part in path:
        mod = mod._modules.get(part)
        if mod is None:
            return None
    return mod._parameters.get(leaf, mod._buffers.get(leaf))


def _srfx_leaf_types() -> tuple[type, ...]:
    from .compensated_ln import CompensatedLayerNorm

    return (CompensatedLayerNorm,)


class _CachedDis:
    """``dis`` as ``torch.fx.proxy`` sees it while srfx traces: fx disassembles the whole
    calling function each time a proxy is unpacked (``B, N, C = x.shape``; 25 times, 12 ms
    in a ViT). A function's instructions do not change, so each is disassembled once."""

    def __init__(self, real):
        self._real = real
        self._seen: dict = {}

    def get_instructions(self, code, *args, **kwargs):
        if args or kwargs:
            return self._real.get_instructions(code, *args, **kwargs)
        found = self._seen.get(code)
        if found is None:
            found = self._seen[code] = tuple(self._real.get_instructions(code))
        return iter(found)

    def __getattr__(self, name):
        return getattr(self._real, name)


# fx patches torch.nn.Module.__call__ (and swaps ``dis``) process-wide while it traces, so two
# traces in different threads would record each other's calls: srfx runs its traces one at a
# time (re-entrant for a trace started inside another, in the same thread).
_TRACE_LOCK = threading.RLock()


_EXAMPLES = threading.local()  # .inputs: the example inputs of the srfx trace in progress


@contextlib.contextmanager
def _example_inputs(inputs: tuple) -> Any:
    outer = getattr(_EXAMPLES, "inputs", None)
    _EXAMPLES.inputs = inputs
    try:
        yield
    finally:
        _EXAMPLES.inputs = outer


class _NotADtypeCondition(Exception):
    pass


def _dtype_condition(node: Any, root: torch.nn.Module, example_value=None) -> Any:
    """The value of ``node`` if it is a comparison of dtypes of model inputs (the example's),
    parameters or buffers, or (with ``example_value(node)``, the value a node takes on the
    example) intermediate tensors; else raise :class:`_NotADtypeCondition`."""
    if not isinstance(node, fx.Node):
        if isinstance(node, torch.dtype):
            return node
        raise _NotADtypeCondition
    if node.op == "call_function" and node.target in (operator.eq, operator.ne, operator.is_, operator.is_not):
        a, b = (_dtype_condition(arg, root, example_value) for arg in node.args)
        return node.target(a, b)
    if node.op == "call_function" and node.target is operator.not_:
        return not _dtype_condition(node.args[0], root, example_value)
    if node.op == "call_function" and node.target is getattr and node.args[1] == "dtype" and isinstance(node.args[0], fx.Node):
        source = node.args[0]
        if source.op == "placeholder":
            inputs = getattr(_EXAMPLES, "inputs", None) or ()
            index = [n for n in source.graph.nodes if n.op == "placeholder"].index(source)
            if index < len(inputs):
                return inputs[index].dtype
        elif source.op == "get_attr":
            tensor = _tensor_at(root, source.target)
            if tensor is not None:
                return tensor.dtype
        elif example_value is not None:
            value = example_value(source)
            if isinstance(value, torch.Tensor):
                return value.dtype
    raise _NotADtypeCondition


class _ExampleRun:
    """The values the graph traced so far takes on the example inputs, run eagerly node by
    node as far as asked (each node once per trace), on srfx's own copy with its buffers kept
    as they were. Autocast entries and exits are not run: srfx traces with autocast off."""

    def __init__(self, tracer: fx.Tracer):
        self.tracer, self.values, self.interpreter = tracer, {}, None

    def __call__(self, node: fx.Node) -> Any:
        """``node``'s value on the example, or None where it cannot be had (the condition then
        stays undecided, a trace failure as before)."""
        if node in self.values:
            return self.values[node]
        inputs = getattr(_EXAMPLES, "inputs", None)
        revert = getattr(torch.fx._symbolic_trace, "_maybe_revert_all_patches", None)  # else fx's patches make proxies
        if inputs is None or revert is None or not isinstance(self.tracer.root, torch.nn.Module):
            return None
        if self.interpreter is None:
            self.interpreter = fx.Interpreter(self.tracer.root, garbage_collect_values=False, graph=self.tracer.graph)
            self.interpreter.env = self.values
        self.tracer._running_example = True
        try:
            with revert(), torch.no_grad(), preserved_buffers(self.tracer.root):
                self._run_to(node, inputs)
        except Exception:  # an op that does not run eagerly here: undecided
            return None
        finally:
            self.tracer._running_example = False
        return self.values.get(node)

    def _run_to(self, node: fx.Node, inputs: tuple) -> None:
        placeholders = 0
        for n in self.tracer.graph.nodes:
            if n.op == "placeholder":
                placeholders += 1
            if n in self.values:
                continue
            if n.op == "placeholder":
                index = placeholders - 1
                self.values[n] = inputs[index].clone() if index < len(inputs) else (n.args[0] if n.args else None)
            elif n.op == "call_function" and n.target in _AUTOCAST_CALLS:
                self.values[n] = None
            else:
                self.values[n] = self.interpreter.run_node(n)
            if n is node:
                return


DTYPE_GUARD = "srfx decided by the example's dtypes that "


def dtype_guard_message(condition: fx.Node, value: bool) -> str:
    return (f"{DTYPE_GUARD}`{_condition_text(condition)}` is {value}; this call's inputs make it {not value}. "
            "Compress again with an example of the dtypes you run the model with.")


def dtype_guards(graph: fx.Graph) -> tuple[str, ...]:
    """The messages of the dtype guards in ``graph``, each once (a check repeated in every
    block of a stack is one assumption): what the model assumes of its inputs."""
    return tuple(dict.fromkeys(n.args[1] for n in graph.nodes
                               if n.op == "call_function" and n.target is torch._assert and str(n.args[1]).startswith(DTYPE_GUARD)))


_OPERATOR_TEXT = {operator.eq: "==", operator.ne: "!=", operator.is_: "is", operator.is_not: "is not"}


def _condition_text(node: Any) -> str:
    """``x.dtype != a.weight.dtype``: a dtype condition as the model's code wrote it."""
    if not isinstance(node, fx.Node):
        return str(node)
    if node.target in _OPERATOR_TEXT:
        a, b = node.args
        return f"{_condition_text(a)} {_OPERATOR_TEXT[node.target]} {_condition_text(b)}"
    if node.target is operator.not_:
        return f"not ({_condition_text(node.args[0])})"
    if node.target is getattr:
        return f"{_condition_text(node.args[0])}.{node.args[1]}"
    return str(node.target) if node.op == "get_attr" else node.name


class _InPlaceProxy(fx.Proxy):
    """An fx proxy on which ``h += t`` records ``operator.iadd``, as Python runs it on tensors
    (in place: every other name bound to h sees the sum). fx's own proxies have no in-place
    operators, so Python fell back to ``h = h + t`` and the graph lost the write."""


def _augmented(name: str):
    target = getattr(operator, name)

    def impl(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", target, (self, other), {})

    impl.__name__ = f"__{name}__"
    return impl


for _name in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand", "ior", "ixor", "ilshift", "irshift"):
    setattr(_InPlaceProxy, f"__{_name}__", _augmented(_name))


# the calls an autocast block becomes in a graph (the real ones: tracing patches the names)
_AUTOCAST_CALLS = frozenset({autocast_mode._enter_autocast, autocast_mode._exit_autocast})


@contextlib.contextmanager
def _recording_autocast(tracer: fx.Tracer):
    """``with torch.autocast(...)`` in forward runs while fx traces and leaves nothing in the
    graph. While ``tracer`` traces, entering and leaving such a block also records
    ``torch.amp._enter_autocast`` / ``_exit_autocast`` nodes (the calls torch.export records
    for it), and those calls in a graph traced again are recorded rather than run."""
    cls = autocast_mode.autocast
    real_enter, real_exit = cls.__enter__, cls.__exit__
    enter_fn, exit_fn = autocast_mode._enter_autocast, autocast_mode._exit_autocast
    entered: list[tuple[Any, fx.Node]] = []
    tracing = threading.get_ident()  # other threads' autocast blocks are theirs: not recorded

    def recording() -> bool:  # nor blocks run by srfx's own eager run of the example
        return threading.get_ident() == tracing and not getattr(tracer, "_running_example", False)

    def enter_block(self):
        out = real_enter(self)
        if recording():
            node = tracer.create_node("call_function", enter_fn, (self.device, self.fast_dtype, self._enabled, self._cache_enabled), {})
            entered.append((self, node))
        return out

    def exit_block(self, *exc):
        if entered and entered[-1][0] is self:
            tracer.create_node("call_function", exit_fn, (entered.pop()[1],), {})
        return real_exit(self, *exc)

    def enter_call(*vals):
        if not recording():
            return enter_fn(*vals)
        return tracer.create_proxy("call_function", enter_fn, vals, {})

    def exit_call(mode):
        if not recording():
            return exit_fn(mode)
        return tracer.create_proxy("call_function", exit_fn, (mode,), {})

    cls.__enter__, cls.__exit__ = enter_block, exit_block
    autocast_mode._enter_autocast = torch.amp._enter_autocast = enter_call
    autocast_mode._exit_autocast = torch.amp._exit_autocast = exit_call
    try:
        yield
    finally:
        cls.__enter__, cls.__exit__ = real_enter, real_exit
        autocast_mode._enter_autocast = torch.amp._enter_autocast = enter_fn
        autocast_mode._exit_autocast = torch.amp._exit_autocast = exit_fn


class _Tracer(fx.Tracer):
    """``fx.Tracer`` with constant-time parameter lookups.

    fx finds the qualified name of a parameter or buffer that forward touches by scanning
    ``root.named_parameters()`` / ``named_buffers()`` on every access: quadratic in the model
    size (about 70 ms of efficientnet_b0's trace, whose BatchNormAct layers read four tensors
    each). Same answers from an id -> name table built once per trace; a tensor the table does
    not know, or one no longer registered under its name, takes fx's own scan.
    """

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        # srfx's own modules (CompensatedLayerNorm) have channel rules: keep them whole
        return isinstance(m, _srfx_leaf_types()) or super().is_leaf_module(m, qualname)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InPlaceProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        """``if x.dtype != w.dtype:`` on a model input, a parameter or an intermediate value:
        decided by the example's dtypes, and a guard in the graph checks the decision on every
        call (inputs that would take the other branch are refused, not run down the
        example's); any other condition on a proxy stays a trace failure."""
        try:
            value = bool(_dtype_condition(obj.node, self.root, self._example_run))
        except _NotADtypeCondition:
            return super().to_bool(obj)
        held = self.create_node("call_function", operator.eq, (obj.node, value), {})
        self.create_node("call_function", torch._assert, (held, dtype_guard_message(obj.node, value)), {})
        return value

    def trace(self, root, concrete_args=None):
        if isinstance(root, torch.nn.Module):
            # named_* list a shared tensor once, under the name fx's scan would find first
            self._params = {id(t): n for n, t in root.named_parameters()}
            self._buffers = {id(t): n for n, t in root.named_buffers()}
        else:
            self._params, self._buffers = {}, {}
        proxy_module = torch.fx.proxy
        with _TRACE_LOCK:
            real_dis = proxy_module.dis
            proxy_module.dis = _CachedDis(real_dis)
            self._example_run = _ExampleRun(self)
            try:
                with _recording_autocast(self):
                    return super().trace(root, concrete_args)
            finally:
                proxy_module.dis = real_dis
                self._params, self._buffers, self._example_run = {}, {}, None

    def _name_of(self, value: Any) -> str | None:
        if isinstance(value, torch.nn.Parameter):
            name = self._params.get(id(value))
            if name is None and self.proxy_buffer_attributes:
                name = self._buffers.get(id(value))
        elif isinstance(value, torch.Tensor) and self.proxy_buffer_attributes:
            name = self._buffers.get(id(value))
        else:
            return None
        return name if name is not None and _tensor_at(self.root, name) is value else None

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        name = self._name_of(attr_val)
        if name is None:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:  # as fx.Tracer.getattr does on a match
            factory = None
            if self.param_shapes_constant:
                factory = lambda node: ParameterProxy(self, node, name, attr_val)  # noqa: E731
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {}, proxy_factory_fn=factory)
        return parameter_proxy_cache[name]

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            # fx searches parameters for a Parameter and buffers for any other tensor
            table = self._params if isinstance(a, torch.nn.Parameter) else self._buffers
            name = table.get(id(a))
            if name is not None and _tensor_at(self.root, name) is a:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)


class _LeafTracer(_Tracer):
    def __init__(self, leaf_modules: Sequence[type] = (), autowrap_functions: Sequence[Any] = ()):
        super().__init__(autowrap_functions=tuple(f for f in autowrap_functions if callable(f)))
        self._leaf_types = tuple(leaf_modules)

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaf_types) or super().is_leaf_module(m, qualname)


class _UntraceableLeafTracer(_Tracer):
    """fx with the named module instances kept whole: those whose forward fx could not trace."""

    def __init__(self, leaves: Sequence[str] = (), autowrap: Sequence[Any] = ()):  # bare: unpickling builds it so
        modules = tuple(m for m in autowrap if isinstance(m, types.ModuleType))  # every public function of these
        super().__init__(autowrap_modules=(math, *modules), autowrap_functions=tuple(f for f in autowrap if callable(f) and f not in modules))
        self._untraceable = frozenset(leaves)

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return qualname in self._untraceable or super().is_leaf_module(m, qualname)


# at most this many retraces around modules fx could not trace before srfx gives up
MAX_UNTRACEABLE = 32


def _innermost_module(tracer: fx.Tracer) -> tuple[str, Any]:
    """The module (name, class) whose forward was being traced when tracing raised: fx pushes
    each module it enters on ``module_stack`` and pops it on return, so a failure leaves the
    path in place."""
    stack = list(getattr(tracer, "module_stack", {}).values())
    return stack[-1] if stack else ("", None)


def _trace_around_failures(model: torch.nn.Module, n_inputs: int, autowrap: Sequence[Any] = ()) -> tuple[fx.GraphModule, int, dict]:
    """Trace with plain fx; where a submodule's forward cannot be traced (control flow on
    values or shapes, tensor assignment), keep that module instance whole and trace again: a
    barrier there instead of a model srfx cannot read at all. Once a second module of one class
    fails, every module of that class is kept whole at once (a deep model's blocks would
    otherwise cost a trace each). A failure in the model's own forward, or more than
    MAX_UNTRACEABLE retries, raises. ``autowrap``: functions fx records as calls instead of
    tracing into. Returns the graph, how many modules stay decomposed, and module -> why it
    was kept whole."""
    leaves: dict[str, str] = {}
    failed_classes: set = set()
    for _ in range(MAX_UNTRACEABLE + 1):
        made: list[fx.Tracer] = []

        def make_tracer():
            made.append(_UntraceableLeafTracer(leaves, autowrap))
            return made[-1]

        try:
            gm, decomposed = _trace_decomposed(model, make_tracer, n_inputs)
            return gm, decomposed, leaves
        except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
            name, cls = _innermost_module(made[-1]) if made else ("", None)
            if not name or name in leaves:
                raise
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            why = f"torch.fx could not trace its forward ({type(exc).__name__}: {first_line}{_where_it_failed(exc)})"
            leaves[name] = why
            if cls in failed_classes:
                for other, module in made[-1].root.named_modules():
                    if type(module) is cls and other not in leaves:
                        leaves[other] = f"a {cls.__name__} like {name}: {why}"
            failed_classes.add(cls)
    raise TraceError(f"fx still failed after keeping whole, {MAX_UNTRACEABLE} times, the module it failed in")


def _mark_untraceable(gm: fx.GraphModule, untraceable: dict) -> None:
    """Say on each call of a module kept whole for failing to trace why (the analysis's barrier
    reason then names the failure, not a missing channel rule)."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in untraceable:
            node.meta[UNTRACEABLE_KEY] = untraceable[node.target]


def _forward_parameters(model: torch.nn.Module) -> list:
    """The parameters of ``model.forward``'s signature (none where Python cannot tell)."""
    import inspect

    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return []


def _defaults_not_given(model: torch.nn.Module, n_given: int) -> dict:
    """forward's optional arguments the example input does not give, fixed at their defaults
    (timm's ``mask=None``): tracing them symbolically would take the wrong branch."""
    params = _forward_parameters(model)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword_only = [p for p in params if p.kind == p.KEYWORD_ONLY]
    return {p.name: p.default for p in positional[n_given:] + keyword_only if p.default is not p.empty}


# wrappers whose forward is not the model's: tracing them fails with fx messages about the
# wrapper's machinery, so name the model inside instead
_WRAPPERS = {
    "OptimizedModule": "_orig_mod",  # torch.compile
    "DataParallel": "module",
    "DistributedDataParallel": "module",
    "FullyShardedDataParallel": "module",
}


def refuse_wrappers(model: torch.nn.Module) -> None:
    if isinstance(model, torch.jit.ScriptModule):  # fx cannot read TorchScript's compiled code
        raise InputError(
            f"{type(model).__name__} is TorchScript (torch.jit.script/trace): torch.fx cannot trace it. Pass the "
            "nn.Module it was made from to srfx, and script the compressed result if you need to."
        )
    inner = _WRAPPERS.get(type(model).__name__)
    if inner is not None and isinstance(getattr(model, inner, None), torch.nn.Module):
        raise InputError(
            f"{type(model).__name__} wraps the model: pass the model itself (model.{inner}) to srfx, "
            "and wrap the compressed result again if you need to."
        )


def _signature_advice(model: torch.nn.Module) -> str:
    import inspect

    kinds = {p.kind for p in _forward_parameters(model)}
    if inspect.Parameter.VAR_POSITIONAL in kinds or inspect.Parameter.VAR_KEYWORD in kinds:
        return (f"{type(model).__name__}.forward takes *args or **kwargs: fx traces a fixed signature, so wrap the model "
                "in a module whose forward names each input it takes.\n")
    return ""


def _symbolic_trace(model: torch.nn.Module, tracer: fx.Tracer, n_inputs: int) -> fx.GraphModule:
    concrete = _defaults_not_given(model, n_inputs)
    graph = tracer.trace(model, concrete_args=concrete or None)
    _drop_fixed_arguments(graph)
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


def _is_specialization_check(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is torch.fx._symbolic_trace._assert_is_none:
        return True
    return node.target is torch._assert and "has been specialized" in str(node.args[1] if len(node.args) > 1 else "")


def _drop_fixed_arguments(graph: fx.Graph) -> None:
    """fx keeps each argument fixed at its default (concrete_args) as a placeholder with a check
    (``_assert_is_none``, or ``torch._assert`` of a comparison). The result takes the example's
    inputs only, so both go: passing one is then a TypeError rather than a check. (A
    GraphModule calling ``_assert_is_none`` also breaks every later fx trace in the process once
    it has been pickled.)"""
    doomed: set[fx.Node] = set()
    stack = [n for n in graph.nodes if _is_specialization_check(n)]
    while stack:  # the check, the comparison it asserts, the placeholder: nothing else reads them
        node = stack.pop()
        doomed.add(node)
        stack += [a for a in node.all_input_nodes if a.op in ("call_function", "placeholder") and len(a.users) == 1]
    for node in reversed([n for n in graph.nodes if n in doomed]):  # users before what they read
        graph.erase_node(node)


def private_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy srfx may change freely. Tensors a pruning hook computed (``weight`` =
    ``weight_orig * weight_mask``, non-leaf, which deepcopy refuses) are copied detached;
    the hook recomputes them anyway."""
    memo = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    memo.update(_tensor_copies(model, memo))
    memo.update(_empty_containers(model))
    return copy.deepcopy(model, memo)


def _empty_containers(model: torch.nn.Module) -> dict:
    """Fresh empties for the empty hook registries every module carries (a dozen each):
    deepcopy would rebuild each through ``__reduce_ex__``, to the same result."""
    out = {}
    for module in model.modules():
        for value in vars(module).values():
            if type(value) in (OrderedDict, set) and not value:
                out[id(value)] = type(value)()
    return out


def _tensor_copies(model: torch.nn.Module, memo: dict) -> dict:
    """What ``copy.deepcopy`` would make of the parameters and buffers, made directly (its
    generic path costs more than the copying itself: 60 of resnet50's 70 ms).

    A ``Parameter`` deep-copies to ``Parameter(p.data.clone(), p.requires_grad)``, exactly as
    here. A plain buffer is cloned here only when that is all deepcopy would do: a dense
    leaf with no grad, no python attributes, owning its whole storage and sharing it with no
    other tensor of the model (deepcopy keeps such sharing; those are left to it).
    """
    owners: dict[int, set] = {}
    tensors = {}
    for module in model.modules():
        for t in [*module._parameters.values(), *module._buffers.values(), *vars(module).values()]:
            if isinstance(t, torch.Tensor) and id(t) not in memo and t.layout == torch.strided and t.device.type != "meta":
                tensors[id(t)] = t
                owners.setdefault(t.untyped_storage().data_ptr(), set()).add(id(t))
    out = {}
    for key, t in tensors.items():
        if type(t) is torch.nn.Parameter:
            out[key] = torch.nn.Parameter(t.data.clone(memory_format=torch.preserve_format), t.requires_grad)
        elif (
            type(t) is torch.Tensor and t.is_leaf and t.grad is None and not t.__dict__ and t.is_contiguous()
            and not t.is_quantized and not t.is_conj() and not t.is_neg() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size()
            and len(owners[t.untyped_storage().data_ptr()]) == 1 and t.untyped_storage().data_ptr() != 0
        ):
            out[key] = t.clone().requires_grad_(t.requires_grad)
    return out


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
                # an expanded view (stride 0: fx lifts `buffer.expand(...)` as a constant) cannot
                # be written by forward, nor copied into
                overlapping = any(st == 0 and n > 1 for st, n in zip(b.stride(), b.shape))
                if b.shape == value.shape and not overlapping:
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
            _own_parametrized_class(module)
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


# the per-module hook registries; pruning's forward pre-hooks are gone by the time these are read
_HOOK_REGISTRIES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
                    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def hooked_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules carrying forward or backward hooks (pruning's own excepted)."""
    from torch.nn.utils import prune

    names = []
    for name, module in model.named_modules():
        pre = [h for h in module._forward_pre_hooks.values() if not isinstance(h, prune.BasePruningMethod)]
        if pre or module._forward_hooks or module._backward_hooks or module._backward_pre_hooks:
            names.append(name or "(the model)")
    return names


def working_copy(model: torch.nn.Module) -> torch.nn.Module:
    """srfx's own eval-mode copy of ``model``: masks baked into the weights, module hooks
    dropped. fx does not record the hooks of the modules it keeps as calls, and those would
    run on the compacted tensors of the result; the user's hook functions are shared by a deep
    copy, so srfx must not run them either (:func:`hooked_modules` names what is dropped)."""
    work = bake_masks(private_copy(model).eval())
    for module in work.modules():
        for registry in _HOOK_REGISTRIES:
            if getattr(module, registry, None):
                setattr(module, registry, OrderedDict())
    return work


def _own_parametrized_class(module: torch.nn.Module) -> None:
    """Give a parametrized module of srfx's copy a class of its own. parametrize makes one
    ``Parametrized<Cls>`` class per module and a deep copy shares it; removing the
    parametrization deletes the property from that class, which would take the ``weight`` of
    the user's own module with it."""
    cls = type(module)
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def _where_it_failed(exc: BaseException) -> str:
    """The innermost user-code frame of a tracing failure, for the error message."""
    here = os.path.dirname(os.path.abspath(__file__))  # srfx's own frames (its tracer, decomposed modules) are not the user's
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename and not f.filename.startswith(here)]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno} ({f.line.strip() if f.line else f.name})"


def trace(model: torch.nn.Module, example_input: Any) -> Traced:
    """Trace a deep copy of ``model`` (eval mode) and annotate shapes with ``example_input``
    (run on meta tensors when that is exact, see :mod:`srfx.meta_facts`).

    Plain ``torch.fx.symbolic_trace`` first (it sees through every block, so the analysis
    does too); if that fails, retry with timm's registered leaf modules and functions, which
    become opaque barriers. If both fail, raise :class:`TraceError` naming where.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"srfx works on torch.nn.Module instances, got {type(model).__name__}.")
    refuse_wrappers(model)
    inputs = normalize_inputs(example_input)
    with _example_inputs(inputs):
        return _trace_front_ends(model, inputs)


def _trace_front_ends(model: torch.nn.Module, inputs: tuple) -> Traced:
    failures = []
    leaf_modules, leaf_functions = _timm_leaves()
    # plain fx, the submodules it cannot trace kept whole; if some were, or it failed, also with
    # known not-traceable functions recorded as calls (finer barriers), keeping the trace that hides
    # fewer parameters in whole modules; timm's leaf modules and functions as a last resort
    known = _known_untraceable()
    attempts = [("fx", ())] + ([("fx+known-functions", known)] if known else [])
    found = []
    for front_end, autowrap in attempts:
        try:
            gm, decomposed, untraceable = _trace_around_failures(model, len(inputs), autowrap)
        except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
            failures.append(f"{front_end}: {type(exc).__name__}: {exc}{_where_it_failed(exc)}")
            continue
        called = dict(gm.named_modules())  # a class-mate kept whole may never be called, and is not in gm
        hidden = sum(p.numel() for name in untraceable if name in called for p in called[name].parameters())
        make = functools.partial(_UntraceableLeafTracer, dict(untraceable), autowrap)
        found.append((hidden, len(found), front_end + ("+untraceable-leaves" if untraceable else ""), gm, decomposed, untraceable, make))
        if not untraceable:
            break
    if not found and (leaf_modules or leaf_functions):
        make = functools.partial(_LeafTracer, leaf_modules, leaf_functions)
        try:
            gm, decomposed = _trace_decomposed(model, make, len(inputs))
            found.append((0, 0, "fx+timm-leaves", gm, decomposed, {}, make))
        except Exception as exc:
            failures.append(f"fx+timm-leaves: {type(exc).__name__}: {exc}{_where_it_failed(exc)}")
    if found:
        _, _, front_end, gm, decomposed, untraceable, make_tracer = min(found, key=lambda f: f[:2])
        try:
            _propagate_shapes(gm, inputs)
        except InputError:
            if not decomposed:
                raise
            # the decomposed form assumes batched (b, n, e) calls; an unbatched (n, e) call, or
            # anything else it does not express, runs the original modules whole
            gm = _symbolic_trace(working_copy(model), make_tracer(), len(inputs))
            _propagate_shapes(gm, inputs)
        _mark_untraceable(gm, untraceable)
        return Traced(gm, inputs, front_end, untraceable)
    raise TraceError(f"could not trace {type(model).__name__} with torch.fx:\n  " + "\n  ".join(failures) + "\n" + _signature_advice(model) + _advice(failures))


def _trace_decomposed(model: torch.nn.Module, make_tracer, n_inputs: int) -> tuple[fx.GraphModule, int]:
    """Trace a working copy whose attention and transformer modules are decomposed (heads,
    feed-forward units and norm streams become visible), except modules called in a way their
    form does not express, called both decomposed and whole, or never reached by the trace:
    those stay whole. Returns the graph and how many modules stay decomposed."""
    keep: frozenset = frozenset()
    while True:
        work = working_copy(model)
        swapped = decompose_modules(work, keep)
        names = {id(m): n for n, m in swapped.items()}
        try:
            gm = _symbolic_trace(work, make_tracer(), n_inputs)
        except Unexpressible as exc:
            keep |= {names[id(exc.module)]}
            continue
        whole = (mixed_calls(gm) | unseen(gm, swapped)) - keep
        if not whole:
            return gm, len(swapped)
        keep |= whole


_LEAF = "or register the module as a leaf (timm.layers.register_notrace_module), which srfx then keeps whole"
# what fx's failure says -> what to try; the first match wins, the last entry matches anything
_TRACE_ADVICE = (
    ("does not support item assignment", "Assignment into a tensor (x[...] = v) cannot be traced: write it as an op that "
     "returns a new tensor (torch.where, masked_fill, torch.cat), " + _LEAF + "."),
    ("control flow", "Data-dependent control flow (an `if` on tensor values or shapes) cannot be traced: move it out of "
     "forward, " + _LEAF + "."),
    ("", "torch.fx cannot trace that line: make it traceable (no Python control flow on tensor values, no tensor "
     "assignment), " + _LEAF + "."),
)


def _advice(failures: list[str]) -> str:
    text = "\n".join(failures)
    return next(advice for pattern, advice in _TRACE_ADVICE if pattern in text)


@dataclass(frozen=True)
class NodeFacts:
    """What running the example input showed about one node (stored in ``node.meta["srfx"]``;
    the same whether the run was on meta tensors or real ones).

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
    from .meta_facts import propagate_on_meta

    if propagate_on_meta(gm, inputs):  # shapes without arithmetic; else a real forward
        return
    for node in gm.graph.nodes:
        node.meta.pop(META_KEY, None)
    try:
        with torch.no_grad(), preserved_buffers(gm):
            _FactRecorder(gm).run(*inputs)
    except Exception as exc:
        raise InputError(
            f"running the model on the example input failed: {type(exc).__name__}: {exc}. "
            "Check the example input's shape, dtype and device."
        ) from exc
