"""Shape facts without arithmetic: run the traced graph on ``device="meta"`` tensors.

The analysis needs every node's shapes, dtypes and small python values (``x.size(1)``), not
its numbers. A real forward spends almost all its time in convolutions and matmuls; on meta
tensors the same graph runs in a fraction of that. Meta tensors have no data, so anything
that reads values (``.item()``, ``bool(t)``, boolean masks, ``nonzero``, ``.numpy()``) raises,
as does mixing them with real tensors made in forward: every such case, and every other
doubt, returns False and the caller runs the real forward instead. A run that succeeds
records the facts a real run would.

Two things keep it cheap:

- Many meta kernels are Python decompositions (100 us to 1 ms a call). A node's result on
  meta tensors depends only on the op and its arguments' metadata, so a graph of repeated
  blocks computes each (op, metadata) once: a per-run cache returns a fresh empty tensor of
  the recorded layout for the next node that asks the same. Only pure ops are cached: torch
  functions and tensor methods that do not write in place, and ``torch.nn`` layers of known
  types without hooks.
- Eval-mode batch norm and layer norm, whose meta decompositions cost about 1 ms a call,
  and elementwise activation layers return a tensor shaped and typed as their input
  whenever the real kernel would accept the call (same dtype everywhere, statistics or
  affine parameters of the normalized size); anything else takes the decomposition.
"""
from __future__ import annotations

import builtins
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .env import is_inplace
from .tracing import META_KEY, _facts

__all__ = ["propagate_on_meta"]

_META = torch.device("meta")

# torch.nn layers whose forward is a pure function of their config attributes, parameter
# metadata and the input's metadata
_PURE_MODULES = frozenset({
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.Embedding,
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
    nn.ELU, nn.Mish, nn.Softmax, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Flatten,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
})
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# elementwise activations: a floating input's shape and dtype, or the input itself in place
_ACTIVATIONS = frozenset({nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.GELU, nn.Mish})
# results of these depend on strides or devices, which meta tensors need not reproduce
_LAYOUT_QUERIES = frozenset({"stride", "is_contiguous", "data_ptr", "storage_offset", "get_device", "device", "is_cuda", "is_cpu", "is_meta"})
_VALUE_TYPES = (int, float, bool, str, type(None), torch.dtype, torch.Size)


class _Uncachable(Exception):
    pass


_SELF = object()  # cache entry of an in-place op: it returns its first argument


def _key(a: Any) -> Any:
    """Hashable description of an argument: metadata for tensors, (type, value) otherwise
    (so 1, 1.0 and True, equal in python, stay apart)."""
    if isinstance(a, torch.Tensor):
        if a.device != _META or type(a) not in (torch.Tensor, nn.Parameter):
            raise _Uncachable
        return (torch.Tensor, tuple(a.shape), a.stride(), a.storage_offset(), a.dtype, a.requires_grad)
    if isinstance(a, torch.Size):
        return (torch.Size, tuple(a))
    if isinstance(a, (tuple, list)):  # fx hands arguments over as immutable_list/dict
        return (list if isinstance(a, list) else type(a), tuple(_key(x) for x in a))
    if isinstance(a, dict):
        return (dict, tuple((k, _key(v)) for k, v in a.items()))
    if type(a) is slice:
        return (slice, _key(a.start), _key(a.stop), _key(a.step))
    if isinstance(a, _VALUE_TYPES) or a is Ellipsis or isinstance(a, torch.memory_format):
        return (type(a), a)
    raise _Uncachable


def _module_key(m: nn.Module) -> Any:
    if type(m) not in _PURE_MODULES or m._forward_hooks or m._forward_pre_hooks:
        raise _Uncachable
    config = tuple((k, _key(v)) for k, v in vars(m).items() if not k.startswith("_"))
    tensors = tuple((k, None if t is None else _key(t)) for d in (m._parameters, m._buffers) for k, t in d.items())
    return (type(m), config, tensors)


def _cachable_result(r: Any) -> bool:
    if isinstance(r, torch.Tensor):
        return r.device == _META and type(r) is torch.Tensor
    if type(r) in (tuple, list):
        return all(_cachable_result(x) for x in r)
    return isinstance(r, _VALUE_TYPES)


def _fresh(r: Any) -> Any:
    """A new result with the recorded metadata (never the cached object: a later in-place
    op on one node's value must not change another's)."""
    if isinstance(r, torch.Tensor):
        storage = r.untyped_storage().nbytes() // r.element_size()
        return torch.empty(storage, dtype=r.dtype, device=_META).as_strided(r.shape, r.stride(), r.storage_offset())
    if type(r) in (tuple, list):
        return type(r)(_fresh(x) for x in r)
    return r


def _meta_float(x: Any) -> bool:
    """A data-free floating tensor: a stand-in result for it needs no values."""
    return isinstance(x, torch.Tensor) and x.device == _META and x.is_floating_point()


def _batch_norm_shape(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):  # noqa: A002
    """``F.batch_norm``'s result in eval mode, when the real kernel accepts the call."""
    x = input
    if training or running_mean is None or running_var is None or not _meta_float(x) or x.dim() < 2:
        return None
    for t in (running_mean, running_var, weight, bias):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != x.dtype or tuple(t.shape) != (x.shape[1],)):
            return None
    return torch.empty_like(x)


def _layer_norm_shape(input, normalized_shape, weight=None, bias=None, eps=1e-5):  # noqa: A002
    """``F.layer_norm``'s result (contiguous, as the CPU kernel makes it), when the real
    kernel accepts the call."""
    x = input
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not _meta_float(x) or not shape or x.dim() < len(shape) or tuple(x.shape[-len(shape):]) != shape:
        return None
    for t in (weight, bias):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != x.dtype or tuple(t.shape) != shape):
            return None
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _pure_function(target: Any) -> bool:
    if target in (operator.getitem, builtins.getattr) or getattr(target, "__module__", None) == "_operator":
        return True
    module = getattr(target, "__module__", None) or ""
    return module == "torch" or module.startswith(("torch.nn.functional", "torch._C", "torch.functional"))


_SHAPE_RULES = {F.batch_norm: _batch_norm_shape, F.layer_norm: _layer_norm_shape}


class _MetaRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.modules = dict(gm.named_modules())
        self.cache: dict = {}

    def run_node(self, n: fx.Node) -> Any:
        result = self._run(n)
        n.meta[META_KEY] = _facts(result)
        return result

    def _run(self, n: fx.Node) -> Any:
        if n.op not in ("call_function", "call_method", "call_module"):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if n.op == "call_function" and n.target in _SHAPE_RULES:
            out = _SHAPE_RULES[n.target](*args, **kwargs)
            if out is not None:
                return out
        if n.op == "call_module":
            m = self.modules[n.target]
            if type(m) in _ACTIVATIONS and len(args) == 1 and not kwargs and not m._forward_hooks and not m._forward_pre_hooks:
                if _meta_float(args[0]):
                    return args[0] if getattr(m, "inplace", False) else torch.empty_like(args[0])
            if type(m) is nn.LayerNorm and len(args) == 1 and not kwargs and not m._forward_hooks and not m._forward_pre_hooks:
                out = _layer_norm_shape(args[0], m.normalized_shape, m.weight, m.bias, m.eps)
                if out is not None:
                    return out
            if type(m) in _BATCH_NORMS and not m.training and m.track_running_stats and not m._forward_hooks and not m._forward_pre_hooks and len(args) == 1 and not kwargs:
                m._check_input_dim(args[0])
                out = _batch_norm_shape(args[0], m.running_mean, m.running_var, m.weight, m.bias)
                if out is not None:
                    return out
        try:
            key = self._cache_key(n, args, kwargs)
        except _Uncachable:
            key = None
        if key is not None and key in self.cache:
            cached = self.cache[key]
            return args[0] if cached is _SELF else _fresh(cached)
        result = getattr(self, n.op)(n.target, args, kwargs)
        if key is None:
            return result
        if is_inplace(n, self.modules):
            # ``relu_`` on a meta tensor changes nothing: the same call later returns its
            # input again (``unsqueeze_`` and other ops that change the layout are not cached)
            if args and result is args[0] and _key(result) == key[1][1][0]:
                self.cache[key] = _SELF
        elif _cachable_result(result):
            self.cache[key] = result
        return result

    def _cache_key(self, n: fx.Node, args, kwargs) -> Any:
        if n.op == "call_module":
            head = _module_key(self.modules[n.target])
        elif n.op == "call_method":
            if not args or not isinstance(args[0], torch.Tensor):
                raise _Uncachable
            head = ("method", n.target)
        else:
            if not _pure_function(n.target):
                raise _Uncachable
            head = ("function", n.target)
        return (head, _key(args), _key(kwargs))


def _plain(t: torch.Tensor, device: torch.device) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter) and t.layout == torch.strided and t.device == device and not t.is_quantized


def _layout_query(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target in _LAYOUT_QUERIES
    if n.op == "call_function" and n.target is builtins.getattr:
        return len(n.args) > 1 and n.args[1] in _LAYOUT_QUERIES
    return False


def _value_ok(v: Any) -> bool:
    """Recorded python values must be what a real run records: no meta tensors, no devices."""
    if isinstance(v, (torch.Tensor, torch.device)):
        return False
    if type(v) in (tuple, list):
        return all(_value_ok(x) for x in v)
    if isinstance(v, dict):
        return all(_value_ok(x) for x in v.values())
    return True


def _state(module: nn.Module) -> dict:
    """Which object each attribute holds, and how many entries a container has: enough to
    see forward store something (the parameter registries keep their keys while swapped)."""
    return {k: (id(v), len(v) if isinstance(v, (list, dict, set)) else None) for k, v in vars(module).items()}


def propagate_on_meta(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> bool:
    """Record facts on every node of ``gm`` by running it on meta tensors; False (facts
    possibly partial, the caller reruns for real) where that cannot be trusted."""
    cpu = torch.device("cpu")
    global_hooks = getattr(nn.modules.module, "_has_any_global_hook", lambda: True)
    if any(not _plain(x, cpu) for x in inputs) or global_hooks():
        return False
    # meta kernels skip the dtype checks real ones make (a float64 input to a float32 conv
    # runs on meta): one floating dtype for inputs, parameters and floating buffers, or real
    dtype = inputs[0].dtype if inputs else None
    if dtype not in (torch.float32, torch.float64) or any(x.dtype != dtype for x in inputs):
        return False
    if any(_layout_query(n) for n in gm.graph.nodes):
        return False
    swapped: list[tuple[dict, str, torch.Tensor, torch.Tensor]] = []
    memo: dict[int, torch.Tensor] = {}
    before: list[tuple[nn.Module, dict]] = []
    try:
        for module in gm.modules():
            if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
                return False
            before.append((module, _state(module)))
            for registry in (module._parameters, module._buffers):
                for name, t in registry.items():
                    if t is None:
                        continue
                    if not _plain(t, cpu) or isinstance(t, nn.parameter.UninitializedTensorMixin) or t.is_complex():
                        return False
                    if t.is_floating_point() and t.dtype != dtype:
                        return False
                    meta = memo.get(id(t))
                    if meta is None:
                        meta = t.detach().to(_META)
                        if isinstance(t, nn.Parameter):
                            meta = nn.Parameter(meta, t.requires_grad)
                        memo[id(t)] = meta
                    swapped.append((registry, name, t, meta))
                    registry[name] = meta
        with torch.no_grad():
            _MetaRecorder(gm).run(*(x.detach().to(_META) for x in inputs))
    except Exception:  # anything meta tensors cannot do: the real forward decides
        return False
    finally:
        replaced = False
        for registry, name, t, meta in swapped:
            replaced |= registry.get(name) is not meta  # forward assigned a new tensor
            registry[name] = t
        # forward that stores state on a module (a cache, a counter) must run for real
        replaced |= any(_state(module) != seen for module, seen in before)
    if replaced:
        return False
    return all(_value_ok(n.meta[META_KEY].value) for n in gm.graph.nodes if META_KEY in n.meta)
