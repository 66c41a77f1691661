"""The channel-rule table: op -> rule, with a conservative default for anything unknown.

Keys: a module class (exact type, so a subclass with its own forward is not mistaken for its
parent), a function object, or a method name string. ``lookup`` returns ``None`` for an op no
rule knows; the analysis turns that into a barrier that keeps every channel it touches.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.fx as fx

__all__ = ["ChannelRule", "register", "register_instance", "lookup", "op_key", "describe_op"]

_RULES: dict[Any, "ChannelRule"] = {}


class ChannelRule:
    """Base of every rule. ``effects`` is required; ``constants`` defaults to "unknown"."""

    name = "rule"

    def effects(self, node: fx.Node, env) -> "Effects":  # noqa: F821
        raise NotImplementedError

    def constants(self, node: fx.Node, env, known) -> dict:
        """Map output refs to per-channel constants (NaN = not constant). Default: none known."""
        return {}


def register(*keys: Any) -> Callable:
    """Class decorator: instantiate the rule once and register it under every key."""

    def wrap(cls):
        rule = cls()
        for key in keys:
            _RULES[key] = rule
        return cls

    return wrap


def register_instance(rule: ChannelRule, *keys: Any) -> None:
    for key in keys:
        _RULES[key] = rule


def op_key(node: fx.Node, modules: dict) -> Any:
    if node.op == "call_module":
        return type(modules[node.target])
    if node.op in ("call_function", "call_method"):
        return node.target
    return node.op  # placeholder, get_attr, output


def lookup(node: fx.Node, modules: dict) -> Optional[ChannelRule]:
    return _RULES.get(op_key(node, modules))


def describe_op(node: fx.Node, modules: dict) -> str:
    key = op_key(node, modules)
    if isinstance(key, type):
        return f"module {key.__module__}.{key.__qualname__}"
    if isinstance(key, torch._ops.OpOverload):  # a graph from torch.export / aot: ATen ops, not the model's code
        return (f"ATen op {key} (an ATen-level graph, such as torch.export(...).module(): srfx reads the "
                "model's own code; pass the nn.Module before export)")
    if callable(key):
        return f"function {getattr(key, '__module__', '') or ''}.{getattr(key, '__name__', repr(key))}".replace("None.", "")
    return f"method .{key}()" if node.op == "call_method" else str(key)
