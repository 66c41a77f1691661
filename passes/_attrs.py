"""Module attributes by qualified name, for the passes that rewrite them."""
from __future__ import annotations

import operator

import torch.nn as nn

__all__ = ["get", "put"]


def get(root: nn.Module, qualname: str):
    """``root``'s attribute ``a.b.c`` (``root`` itself for the empty name)."""
    return operator.attrgetter(qualname)(root) if qualname else root


def put(root: nn.Module, qualname: str, value) -> None:
    """Set ``a.b.c`` on ``root``; a tensor replacing a Parameter becomes a Parameter with the
    old one's ``requires_grad`` (so training code sees the same kind of thing)."""
    owner_name, _, attr = qualname.rpartition(".")
    owner = get(root, owner_name)
    old = getattr(owner, attr, None)
    if isinstance(old, nn.Parameter) and not isinstance(value, nn.Parameter):
        value = nn.Parameter(value, requires_grad=old.requires_grad)
    setattr(owner, attr, value)
