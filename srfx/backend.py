"""A ``torch.compile`` backend: minimize every captured graph with srfx, then compile it.

    >>> compiled = torch.compile(model, backend="srfx")            # doctest: +SKIP
    >>> b = srfx.Backend(); compiled = torch.compile(model, backend=b)  # doctest: +SKIP
    >>> with torch.no_grad(): compiled(x)                          # doctest: +SKIP
    >>> print(b.records[-1])                                       # doctest: +SKIP

How it sees the weights: dynamo lifts parameters and buffers to graph *inputs* (inlining of
built-in nn modules is always on in recent torch), so the captured graph alone carries no
weights. Its example inputs do: the ones whose dynamo source is a module's ``_parameters`` or
``_buffers`` are the live tensors. For each graph the backend

1. snapshots those tensors and turns their placeholders into attributes of a private module;
   functional ``linear``/``conv{1,2,3}d``/eval ``batch_norm``/``layer_norm`` calls that own their
   weights become the matching ``nn`` modules (the form srfx's rules and BatchNorm folding know);
2. runs :func:`srfx.compress` on it (verified there against the snapshot);
3. compiles the smaller graph with the inner backend (``inductor`` by default) and checks it
   against the captured graph on the example inputs;
4. returns a function that drops the weight arguments. Before each call it checks that the weights
   are the same tensors, at the same version counter and (by default) with the same values as a
   copy taken when it minimized (writes through ``.data`` bump no version counter); if they
   changed (``load_state_dict``, an optimizer step, an EMA update), it minimizes again from the
   current values, so results stay exact.

A graph it cannot minimize exactly goes to the inner backend unchanged, with a warning that says
why: gradients are needed (minimization drops parameters autograd would differentiate), the graph
runs in train mode or writes to its inputs/buffers, sizes are symbolic (``dynamic=True``, or
automatic dynamic shapes after a recompile: use ``dynamic=False``), or srfx failed. The user's
model is never modified: the backend only reads the tensors dynamo hands it.

Each graph leaves a :class:`GraphRecord` in ``Backend.records`` (``"srfx"`` by name uses
:data:`default_backend`).
"""
from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import InputError

__all__ = ["Backend", "GraphRecord", "default_backend", "srfx_backend"]

_CONVS = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}
_BATCHNORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


@dataclass(frozen=True)
class GraphRecord:
    """What the backend did with one captured graph.

    ``status``: ``"minimized"`` (a smaller graph runs), ``"unchanged"`` (nothing to remove, or no
    weights in the graph), ``"fallback"`` (the captured graph runs as is; ``reason`` says why).
    ``report`` is srfx's :class:`~srfx.Report` when compress ran; ``graph_module`` the minimized
    graph (weights as attributes, only the real inputs as placeholders)."""

    index: int
    status: str
    reason: str
    weights: int  # parameter/buffer inputs of the captured graph
    params_before: int
    params_after: int
    seconds: float
    report: Any = None
    graph_module: Optional[fx.GraphModule] = None

    def __str__(self) -> str:
        head = f"graph {self.index}: {self.status}"
        if self.status == "minimized":
            head += f", parameters {self.params_before} -> {self.params_after}"
        if self.reason:
            head += f" ({self.reason})"
        return head + f", {self.seconds:.2f} s"


def _is_weight_source(source: Any) -> bool:
    from torch._dynamo.source import ParamBufferSource, UnspecializedParamBufferSource

    while source is not None:
        if isinstance(source, (ParamBufferSource, UnspecializedParamBufferSource)):
            return True
        source = getattr(source, "base", None)
    return False


def _source_parts(node: fx.Node) -> list[str]:
    """``["stem", "0", "weight"]`` for dynamo's ``L['self']._modules['stem']._modules['0']._parameters['weight']``."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    text = getattr(source, "name", "")
    text = text() if callable(text) else text
    return re.findall(r"_(?:modules|parameters|buffers)\['([^']*)'\]", str(text))


def _unique(name: str, taken: set) -> str:
    base = re.sub(r"\W", "_", name)
    if not base.isidentifier():
        base = f"w_{base}"
    candidate, k = base, 1
    while candidate in taken:
        candidate, k = f"{base}_{k}", k + 1
    taken.add(candidate)
    return candidate


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _training_flag(node: fx.Node) -> bool:
    """Does this call run in train mode (dropout, batch statistics)?"""
    from torch.fx.operator_schemas import normalize_function

    if node.op != "call_function":
        return False
    try:
        normalized = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    except Exception:  # schema lookup fails for many python callables: no flag to read
        normalized = None
    kwargs = normalized.kwargs if normalized is not None else node.kwargs
    return kwargs.get("training") is True or kwargs.get("train") is True


class _Unsupported(Exception):
    """The graph cannot be minimized exactly; the message says why."""


def _as_module(node: fx.Node, weights: dict, own: Callable, ranks: dict) -> Optional[nn.Module]:
    """The ``nn`` module a functional call computes, when the call owns its weights (a tied
    weight stays an attribute: two modules would store it twice) and its other arguments are
    constants. ``None`` leaves the call as it is."""
    def optional(a):
        return a is None or own(a)

    args = node.args
    if node.op != "call_function" or node.kwargs or not args or not isinstance(args[0], fx.Node):
        return None
    if node.target in _CONVS and 2 <= len(args) <= 7 and own(args[1]) and optional(_arg(node, 2, "bias")):
        w = weights[args[1]]
        stride, padding, dilation, groups = (list(args[3:]) + [1, 0, 1, 1][len(args) - 3:])[:4]
        if not all(isinstance(a, (int, tuple, list, str)) for a in (stride, padding, dilation, groups)):
            return None
        return _CONVS[node.target](w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=stride, padding=padding, dilation=dilation,
                                   groups=groups, bias=_arg(node, 2, "bias") is not None, device=w.device, dtype=w.dtype)
    if node.target is F.linear and len(args) in (2, 3) and own(args[1]) and optional(_arg(node, 2, "bias")):
        w = weights[args[1]]
        return nn.Linear(w.shape[1], w.shape[0], bias=_arg(node, 2, "bias") is not None, device=w.device, dtype=w.dtype)
    if node.target is F.batch_norm and len(args) == 8 and args[5] is False and own(args[1]) and own(args[2]):
        rank = ranks.get(node)
        affine = args[3] is not None
        if rank in _BATCHNORMS and ((args[3] is None and args[4] is None) or (own(args[3]) and own(args[4]))):
            stats = weights[args[1]]
            return _BATCHNORMS[rank](stats.shape[0], eps=args[7], momentum=args[6], affine=affine, device=stats.device, dtype=stats.dtype)
    if node.target is F.layer_norm and 2 <= len(args) <= 5:
        shape, w, b = args[1], _arg(node, 2, "weight"), _arg(node, 3, "bias")
        eps = args[4] if len(args) > 4 else 1e-5
        if w is not None and isinstance(shape, (int, tuple, list)) and own(w) and optional(b):
            t = weights[w]
            return nn.LayerNorm(shape, eps=eps, bias=b is not None, device=t.device, dtype=t.dtype)
    return None


def _weights_of(module: nn.Module, node: fx.Node) -> dict[str, Any]:
    """Module attribute -> the graph argument that holds it."""
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return {"weight": node.args[1], "bias": _arg(node, 2, "bias")}
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return {"running_mean": node.args[1], "running_var": node.args[2], "weight": node.args[3], "bias": node.args[4]}
    return {"weight": node.args[2], "bias": _arg(node, 3, "bias")}  # LayerNorm


@dataclass(frozen=True)
class _Capture:
    """What the backend reads from a captured graph's node metadata, kept because dynamo drops
    that metadata once the graph is compiled (a rebuild after a weight change needs it again)."""

    weight_positions: tuple[int, ...]  # placeholders that are parameters/buffers
    parts: dict  # weight placeholder -> ["stem", "0", "weight"]
    ranks: dict  # call node -> rank of its first argument

    @classmethod
    def of(cls, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> "_Capture":
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        positions = tuple(
            i for i, (n, x) in enumerate(zip(placeholders, example_inputs))
            if isinstance(x, torch.Tensor) and (_is_weight_source(getattr(n.meta.get("grapharg"), "source", None)) or isinstance(x, nn.Parameter))
        )
        parts = {placeholders[i]: _source_parts(placeholders[i]) for i in positions}
        ranks = {}
        for n in gm.graph.nodes:
            value = n.args[0].meta.get("example_value") if n.args and isinstance(n.args[0], fx.Node) else None
            if isinstance(value, torch.Tensor):
                ranks[n] = value.dim()
        return cls(positions, parts, ranks)


def _lift(gm: fx.GraphModule, capture: _Capture, inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """A copy of ``gm`` whose weight placeholders are snapshots held as attributes; functional
    layers that own their weights become modules."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weights: dict[fx.Node, torch.Tensor] = {placeholders[i]: inputs[i] for i in capture.weight_positions}

    def own(arg: Any) -> bool:
        return isinstance(arg, fx.Node) and arg in weights and len(arg.users) == 1

    def snapshot(node: fx.Node) -> torch.Tensor:
        t = weights[node].detach().clone()
        return nn.Parameter(t, requires_grad=False) if isinstance(weights[node], nn.Parameter) else t

    taken: set = set()
    graph = fx.Graph()
    attrs: dict[str, Any] = {}
    env: dict[fx.Node, fx.Node] = {}
    lifted = {n: m for n in gm.graph.nodes if (m := _as_module(n, weights, own, capture.ranks)) is not None}
    absorbed = {a for n in lifted for a in n.all_input_nodes if a in weights}
    for node in gm.graph.nodes:
        if node in weights:
            if node not in absorbed:
                name = _unique("_".join(capture.parts[node]) or node.name, taken)
                attrs[name] = snapshot(node)
                env[node] = graph.get_attr(name)
            continue
        if node in lifted:
            module = lifted[node].eval().requires_grad_(False)
            held = _weights_of(module, node)
            with torch.no_grad():
                for attr, arg in held.items():
                    if arg is not None:
                        getattr(module, attr).copy_(weights[arg])
            parts = capture.parts[held["weight"] if held.get("weight") is not None else held["running_mean"]]
            name = _unique("_".join(parts[:-1]) or node.name, taken)
            attrs[name] = module
            env[node] = graph.call_module(name, (env[node.args[0]],))
            env[node].meta = dict(node.meta)
            continue
        if node.op in ("get_attr", "call_module"):  # weights dynamo left as attributes (older torch)
            attrs[node.target] = _fetch(gm, node.target)
        env[node] = graph.node_copy(node, lambda a: env[a])
    return fx.GraphModule(attrs, graph, class_name="SrfxCaptured").eval()


class Backend:
    """A ``torch.compile`` backend that runs :func:`srfx.compress` on every captured graph.

    ``inner``: the backend that compiles the (minimized) graph: a name (``"inductor"``,
    ``"eager"``, ...) or a compiler function. ``verify``/``random_inputs`` go to
    :func:`srfx.compress`. ``warn=False`` silences the fallback warnings (the reasons stay in
    ``records``).

    ``check_weights``: how each call makes sure the weights are still those the graph was
    minimized from. ``"values"`` (default) compares them with a copy taken then: it sees every
    change, writes through ``.data`` included, at the cost of that copy and one read of the
    weights per call. ``"versions"`` only checks tensor identity and version counters: cheap,
    but a write through ``.data`` bumps no counter, so the graph would run on stale weights.
    Weights without a version counter (inference tensors) are compared by value either way."""

    def __init__(self, inner: Union[str, Callable] = "inductor", *, verify: bool = True, random_inputs: int = 2, warn: bool = True,
                 check_weights: str = "values"):
        if check_weights not in ("values", "versions"):
            raise InputError(f"check_weights must be 'values' or 'versions', got {check_weights!r}")
        self.inner = inner
        self.verify, self.random_inputs, self.warn, self.check_weights = verify, random_inputs, warn, check_weights
        self.records: list[GraphRecord] = []

    def __repr__(self) -> str:
        return f"srfx.Backend(inner={self.inner!r}, {len(self.records)} graph(s))"

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        """The compiler function: a callable taking what ``gm`` takes, returning what it returns."""
        return self._compile(gm, list(example_inputs), _Capture.of(gm, example_inputs))

    def _compile(self, gm: fx.GraphModule, example_inputs: list, capture: _Capture) -> Callable:
        """The function dynamo calls, with every input ``gm`` takes (weights included): the real
        inputs go to the small graph. Weights that are no longer the tensors, at the versions, it
        was built from mean: build again from the current ones (a change to the weights in place,
        ``load_state_dict``, an optimizer step); a graph that cannot be minimized runs as is."""
        user_positions = [i for i in range(len(example_inputs)) if i not in set(capture.weight_positions)]
        attributes = list(gm.parameters()) + list(gm.buffers())  # weights dynamo left on the graph (older torch)
        state: dict[str, Any] = {}

        def build(args: list) -> None:
            t0 = time.perf_counter()
            try:
                state["small"] = self._minimized(gm, args, capture, user_positions, t0)
                state["built_from"] = [(i, args[i], _version(args[i])) for i in capture.weight_positions]
                state["attributes"] = [(t, _version(t)) for t in attributes]
                by_value = [args[i] for i in capture.weight_positions] + attributes
                if self.check_weights == "versions":  # only what has no version counter to watch
                    by_value = [t for t in by_value if _version(t) is None]
                state["values"] = [(t, t.detach().clone()) for t in by_value]
            except _Unsupported as exc:
                status = "unchanged" if exc.args[0] in _NOTHING_TO_DO else "fallback"
                state["small"] = None
                state["plain"] = self._plain(gm, args, capture, str(exc), t0, status)

        def changed(args) -> bool:
            return (any(args[i] is not t or _version(args[i]) != v for i, t, v in state["built_from"])
                    or any(_version(t) != v for t, v in state["attributes"])
                    or any(not torch.equal(t, copy) for t, copy in state["values"]))

        def run(*args):
            if state["small"] is not None and changed(args):
                if self.warn:
                    warnings.warn("srfx backend: the weights changed since this graph was minimized; minimizing it again", stacklevel=2)
                build(list(args))
            if state["small"] is None:
                return state["plain"](*args)
            return state["small"](*[args[i] for i in user_positions])

        build(example_inputs)
        return run if state["small"] is not None else state["plain"]

    # -- stages ---------------------------------------------------------------------------

    def _inner(self) -> Callable:
        if callable(self.inner):
            return self.inner
        from torch._dynamo import lookup_backend

        return lookup_backend(self.inner)

    def _record(self, **fields) -> GraphRecord:
        record = GraphRecord(index=len(self.records), **fields)
        self.records.append(record)
        return record

    def _plain(self, gm, example_inputs, capture: _Capture, reason: str, t0: float, status: str) -> Callable:
        """The captured graph, compiled by the inner backend as if srfx were not there."""
        count = sum(int(example_inputs[i].numel()) for i in capture.weight_positions if isinstance(example_inputs[i], nn.Parameter))
        record = self._record(status=status, reason=reason, weights=len(capture.weight_positions), params_before=count,
                              params_after=count, seconds=time.perf_counter() - t0)
        if status == "fallback" and self.warn:
            warnings.warn(f"srfx backend: graph {record.index} compiled without minimization: {reason}", stacklevel=3)
        return self._inner()(gm, example_inputs)

    @staticmethod
    def _check(gm: fx.GraphModule, example_inputs: list, weight_positions: Sequence[int]) -> None:
        held = list(gm.parameters()) + list(gm.buffers())  # weights dynamo kept as attributes (older torch)
        if not weight_positions and not held:
            raise _Unsupported(_NO_WEIGHTS)
        weights = [example_inputs[i] for i in weight_positions] + held
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            raise _Unsupported("gradients are enabled and the weights require grad (a minimized graph drops parameters autograd "
                               "would need); run under torch.no_grad()/torch.inference_mode() or call model.requires_grad_(False)")
        training = [n for n in gm.graph.nodes if _training_flag(n)]
        if training:
            raise _Unsupported(f"{training[0].name} ({torch.typename(training[0].target)}) runs in train mode; call model.eval() first")
        if any(not isinstance(x, torch.Tensor) for x in example_inputs):
            raise _Unsupported("sizes are graph inputs (dynamic shapes: a recompile after a new input shape, or dynamic=True); "
                               "compile with dynamic=False to minimize")
        if any(x.device.type == "meta" or x.is_sparse for x in example_inputs):
            raise _Unsupported("meta or sparse tensors among the inputs")

    def _minimized(self, gm: fx.GraphModule, example_inputs: list, capture: _Capture, user_positions: list, t0: float) -> Callable:
        """The minimized graph compiled by the inner backend (takes the real inputs only), or
        :class:`_Unsupported` saying why not."""
        import srfx
        from srfx.errors import SrfxError
        from srfx.verify import compare_outputs

        self._check(gm, example_inputs, capture.weight_positions)
        if not user_positions:
            raise _Unsupported("the graph has no tensor inputs besides its weights")
        # the captured graph, run on copies: the answer to match, and whether it writes to its inputs
        copies = _clone(example_inputs)
        with torch.no_grad():
            expected = gm(*copies)
        written = [i for i, (a, b) in enumerate(zip(example_inputs, copies)) if not torch.equal(a, b)]
        if written:
            name = [n for n in gm.graph.nodes if n.op == "placeholder"][written[0]].name
            raise _Unsupported(f"the graph writes to its input {name} (a buffer updated in forward?)")
        user_inputs = tuple(example_inputs[i] for i in user_positions)
        try:
            lifted = _lift(gm, capture, example_inputs)
            with torch.no_grad():
                _, _, same = compare_outputs(expected, lifted(*_clone(user_inputs)))
        except (SrfxError, RuntimeError, TypeError, ValueError) as exc:
            raise _Unsupported(f"could not turn the graph's weights into attributes: {type(exc).__name__}: {exc}") from exc
        if not same:
            raise _Unsupported("the graph with its weights as attributes differs from the captured one")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # compress's notes are about user models, not captured graphs
                small = srfx.compress(lifted, user_inputs, verify=self.verify, random_inputs=self.random_inputs)
        except (SrfxError, RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:
            # srfx's own errors, and bugs a pass may still have on forms it first meets here
            raise _Unsupported(f"srfx.compress failed: {type(exc).__name__}: {exc}") from exc
        report = small.meta[srfx.REPORT_KEY]
        if report.params_after >= report.params_before and report.stored_after >= report.stored_before:
            raise _Unsupported(_NOTHING_REMOVED)
        from torch._guards import tracing

        try:
            with tracing(None):  # dynamo's tracing context describes the captured graph, not this one
                compiled = self._inner()(small, list(user_inputs))
            with torch.no_grad():
                _, err, same = compare_outputs(expected, compiled(*_clone(user_inputs)))
        except Exception as exc:  # any failure of the inner compiler on the new graph: the plain path still works
            raise _Unsupported(f"{self.inner!r} failed on the minimized graph: {type(exc).__name__}: {exc}") from exc
        if not same:
            raise _Unsupported(f"the compiled minimized graph differs from the captured one (relative error {err:.2e})")
        self._record(status="minimized", reason="", weights=len(capture.weight_positions), params_before=report.params_before,
                     params_after=report.params_after, seconds=time.perf_counter() - t0, report=report, graph_module=small)
        return compiled


_NO_WEIGHTS = "no parameters or buffers in this graph"
_NOTHING_REMOVED = "nothing to remove"
_NOTHING_TO_DO = (_NO_WEIGHTS, _NOTHING_REMOVED)


def _fetch(module: nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _clone(args: Sequence[Any]) -> list:
    return [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


default_backend = Backend()


def srfx_backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """The compiler function behind ``torch.compile(..., backend="srfx")`` (found through the
    ``torch_dynamo_backends`` entry point in ``pyproject.toml``, so importing srfx does not import
    dynamo); records go to :data:`default_backend`."""
    return default_backend(gm, example_inputs)
