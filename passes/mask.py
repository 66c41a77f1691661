"""mask: unstructured magnitude pruning. Returns a masked copy; the input is not modified.

Global (one threshold over all prunable tensors) or per-layer (the same fraction of each).
By default Linear and Conv weights are prunable; ``include`` adds biases, norm affine
parameters or any parameter whose qualified name matches. Masks are returned so training
can keep pruned weights at zero (see :func:`apply_masks`).
"""
from __future__ import annotations

import copy
import fnmatch
from typing import Iterable, Optional

import torch
import torch.nn as nn

__all__ = ["prunable_parameters", "magnitude_masks", "mask", "apply_masks"]


def prunable_parameters(model: nn.Module, include: Iterable[str] = ()) -> dict[str, nn.Parameter]:
    """Weights of Linear/ConvNd modules, plus parameters whose names match ``include``
    (fnmatch patterns, e.g. ``"*.bias"``, ``"*norm*.weight"``, ``"*gamma"``)."""
    chosen = {}
    for mname, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and isinstance(getattr(m, "weight", None), nn.Parameter):
            chosen[f"{mname}.weight" if mname else "weight"] = m.weight
    patterns = list(include)
    if patterns:
        for name, p in model.named_parameters():
            if any(fnmatch.fnmatch(name, pat) for pat in patterns):
                chosen[name] = p
    return chosen


def magnitude_masks(
    model: nn.Module,
    sparsity: float,
    *,
    scope: str = "global",
    include: Iterable[str] = (),
    existing: Optional[dict[str, torch.Tensor]] = None,
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks that zero the ``sparsity`` fraction of smallest-magnitude weights.

    Weights already zero (or masked in ``existing``) count as pruned, so iterating with a
    rising ``sparsity`` is a schedule.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    params = prunable_parameters(model, include)
    existing = existing or {}
    scores = {n: p.detach().abs() * existing.get(n, torch.ones_like(p, dtype=torch.bool)) for n, p in params.items()}
    if scope == "global":
        flat = torch.cat([s.flatten() for s in scores.values()]) if scores else torch.zeros(0)
        k = int(sparsity * flat.numel())
        if k == 0:
            return {n: s != 0 for n, s in scores.items()} if existing else {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
        threshold = flat.kthvalue(k).values
        masks = {n: s > threshold for n, s in scores.items()}
        return masks
    if scope == "layer":
        masks = {}
        for n, s in scores.items():
            k = int(sparsity * s.numel())
            masks[n] = s > s.flatten().kthvalue(k).values if k else s != 0 if existing else torch.ones_like(s, dtype=torch.bool)
        return masks
    raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero masked weights in place (call after each optimizer step to keep masks fixed)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, m in masks.items():
            params[name].mul_(m.to(params[name].dtype))


def mask(model: nn.Module, sparsity: float, *, scope: str = "global", include: Iterable[str] = ()) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of ``model`` with the smallest weights zeroed, and the masks used."""
    out = copy.deepcopy(model)
    masks = magnitude_masks(out, sparsity, scope=scope, include=include)
    apply_masks(out, masks)
    return out, masks
