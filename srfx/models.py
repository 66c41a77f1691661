"""Models named on the command line: ``timm:NAME`` or ``package.module:callable``."""
from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any, Optional

import torch.nn as nn

__all__ = ["parse_shape", "load_model"]


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``"1x3x224x224"``) -> ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(s) for s in re.split(r"[,x]", text.strip()))
    except ValueError:
        raise ValueError(f"input shape {text!r} is not a comma-separated list of integers") from None
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"input shape {text!r} must be positive integers, e.g. 1,3,224,224")
    return shape


def load_model(spec: str) -> tuple[nn.Module, Optional[tuple[int, ...]]]:
    """The model named by ``spec`` in eval mode, and its default input shape (or None).
    ``package.module:name`` names a function returning the model, or a model instance."""
    if spec.startswith("timm:"):
        import timm

        model = timm.create_model(spec[len("timm:"):], pretrained=False)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = cfg.get("input_size") if isinstance(cfg, dict) else None
        default = (1, *size) if size else (1, 3, 224, 224)
        return model.eval(), tuple(int(s) for s in default)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"MODEL {spec!r} is neither timm:NAME nor package.module:callable")
    if os.getcwd() not in sys.path:  # a script's own folder comes first, not the cwd
        sys.path.insert(1, os.getcwd())
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    model = obj if isinstance(obj, nn.Module) else obj()  # a module instance, or a factory of one
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval(), None
