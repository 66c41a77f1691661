"""release: turn the exact zeros left inside compacted weights into small, trainable noise.

After :func:`srfx.compress`, the weight tensors of the smaller model still hold the zeros the
mask put there. ``release`` gives those positions back to training (the "Release" half of
Squeeze-Release, DESIGN.md section 6): each exact zero inside a Linear/ConvNd weight (plus
parameters matched by ``include``) becomes a draw from ``N(0, std**2)``, with ``std`` calibrated
per tensor.

Guarantee (what the tests check):

* ``model`` is never modified: the result is a deep copy (weights, buffers, training flag,
  ``GraphModule.meta`` are the input's own until the copy is returned).
* Only positions that are exactly ``0`` in a chosen tensor change; every nonzero weight,
  every bias, every buffer and every tensor not chosen is bit-for-bit the same. Released
  positions are never exactly zero afterwards (a draw of exactly ``0`` is nudged away).
* Calibration. ``mode="relative"`` (default): ``std = scale * std(nonzero weights of the
  tensor)``; ``mode="absolute"``: ``std = scale`` for every tensor. A tensor with fewer than two
  nonzeros uses ``scale *`` the mean absolute nonzero weight, and a tensor with none uses the
  model-wide nonzero std. With ``calibration_batch`` and ``max_output_change`` given, the common
  factor on all stds is halved (same noise draw, rescaled) until, on that batch in eval mode,
  ``max|f_released(x) - f(x)| <= max_output_change * max|f(x)|``; the bound holds for the
  returned model (if even ``2**-max_halvings`` of the scale breaks it, nothing is released and the
  report says so).
* Deterministic for a given ``seed`` (a private generator; global RNG state is untouched).

Returns ``(new_model, masks, report)``: ``masks`` are all-ones keep-masks for the chosen tensors
(everything is trainable again, ready for :func:`apply_masks` or a fresh pruning schedule);
``report.released_masks`` marks the positions that were released. ``print(report)`` shows a
table: per tensor, its size, nonzeros, number released and the std used.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn
from tabulate import tabulate

from srfx.errors import InputError
from srfx.modes import evaluating

from .mask import prunable_parameters

__all__ = ["release", "ReleaseReport", "TensorRelease"]


@dataclass(frozen=True)
class TensorRelease:
    name: str
    numel: int
    nonzero: int  # before release
    released: int
    nonzero_std: float  # std of the tensor's nonzero weights (0 when fewer than two)
    std: float  # std of the noise actually written (after calibration)


@dataclass
class ReleaseReport:
    """Per-tensor counts and stds of one :func:`release`, and how the scale was calibrated."""

    mode: str
    scale_requested: float
    scale_used: float  # scale_requested * factor
    factor: float  # 1.0 unless batch calibration shrank it (0.0: nothing released)
    halvings: int
    max_output_change: Optional[float]
    output_change: Optional[float]  # measured relative change on the calibration batch
    tensors: list[TensorRelease] = field(default_factory=list)
    released_masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def released(self) -> int:
        return sum(t.released for t in self.tensors)

    def __str__(self) -> str:
        rows = [(t.name, t.numel, t.nonzero, t.released, f"{t.nonzero_std:.3g}", f"{t.std:.3g}") for t in self.tensors]
        rows.append(("total", sum(t.numel for t in self.tensors), sum(t.nonzero for t in self.tensors), self.released, "", ""))
        text = tabulate(rows, headers=["tensor", "numel", "nonzero", "released", "nonzero std", "noise std"])
        text += f"\nmode {self.mode}, scale {self.scale_requested:g}"
        if self.max_output_change is not None:
            text += (
                f" -> {self.scale_used:g} after {self.halvings} halving(s); output change "
                f"{self.output_change:.3g} (bound {self.max_output_change:g}, relative to max|output|)"
            )
        elif self.output_change is not None:
            text += f"; output change on the batch {self.output_change:.3g} (relative to max|output|)"
        return text


def _outputs(model: nn.Module, batch: Any) -> list[torch.Tensor]:
    from torch.utils import _pytree as pytree

    with evaluating(model), torch.no_grad():
        out = model(*batch) if isinstance(batch, tuple) else model(batch)
    return [t.detach() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _relative_change(ref: list[torch.Tensor], new: list[torch.Tensor]) -> float:
    num = max((float((a.double() - b.double()).abs().max()) for a, b in zip(ref, new) if a.numel()), default=0.0)
    den = max((float(a.double().abs().max()) for a in ref if a.numel()), default=0.0)
    if num == 0.0:
        return 0.0
    return num / den if den > 0 else float("inf")


def release(
    model: nn.Module,
    *,
    scale: float = 0.1,
    mode: str = "relative",
    calibration_batch: Any = None,
    max_output_change: Optional[float] = None,
    seed: int = 0,
    include: Iterable[str] = (),
    max_halvings: int = 30,
) -> tuple[nn.Module, dict[str, torch.Tensor], ReleaseReport]:
    """A copy of ``model`` whose exact-zero weights are small noise; see the module docstring."""
    if mode not in ("relative", "absolute"):
        raise InputError(f"mode must be 'relative' or 'absolute', got {mode!r}")
    if not 0.0 <= scale < float("inf"):
        raise InputError(f"scale must be finite and >= 0, got {scale}")
    if max_output_change is not None and max_output_change < 0:
        raise InputError(f"max_output_change must be >= 0, got {max_output_change}")
    if max_output_change is not None and calibration_batch is None:
        raise InputError("max_output_change needs a calibration_batch to measure the output change on")

    out = copy.deepcopy(model)
    params = prunable_parameters(out, include)
    gen = torch.Generator().manual_seed(seed)

    nz_all = [p.detach()[p.detach() != 0].double() for p in params.values()]
    nz_all = torch.cat([t.flatten() for t in nz_all]) if nz_all else torch.zeros(0, dtype=torch.float64)
    global_std = float(nz_all.std()) if nz_all.numel() > 1 else (float(nz_all.abs().mean()) if nz_all.numel() else 1.0)

    plan = []  # (name, param, zero mask, unit noise (std 1 already multiplied by base std), base std, nonzero std)
    for name, p in params.items():
        w = p.detach()
        zero = w == 0
        nz = w[~zero].double()
        nz_std = float(nz.std()) if nz.numel() > 1 else 0.0
        if mode == "absolute":
            base = 1.0
        elif nz.numel() > 1 and nz_std > 0:
            base = nz_std
        elif nz.numel() >= 1:
            base = float(nz.abs().mean())
        else:
            base = global_std
        # drawn on the CPU generator (the same noise on any device), then moved to the weight's device
        noise = (torch.randn(w.shape, generator=gen, dtype=torch.float64) * base).to(w.device)
        plan.append((name, p, zero, noise, base, nz_std))

    def write(factor: float) -> None:
        with torch.no_grad():
            for _, p, zero, noise, base, _ in plan:
                vals = noise * (scale * factor)
                if factor > 0 and scale > 0:
                    tiny = torch.finfo(p.dtype).tiny
                    # a draw that rounds to exactly 0 in p's dtype would not be released
                    rounded = vals.to(p.dtype)
                    vals = torch.where(rounded == 0, torch.full_like(vals, max(tiny, base * scale * factor * 1e-3)), vals)
                new = torch.where(zero, vals.to(p.dtype), p.detach())
                p.copy_(new)

    factor, halvings, change = 1.0, 0, None
    ref = _outputs(model, calibration_batch) if calibration_batch is not None else None
    write(factor)
    if ref is not None:
        change = _relative_change(ref, _outputs(out, calibration_batch))
        if max_output_change is not None:
            while change > max_output_change and halvings < max_halvings:
                halvings += 1
                factor *= 0.5
                write(factor)
                change = _relative_change(ref, _outputs(out, calibration_batch))
            if change > max_output_change:  # give up: release nothing, the function is unchanged
                factor = 0.0
                write(0.0)
                change = _relative_change(ref, _outputs(out, calibration_batch))

    report = ReleaseReport(
        mode=mode,
        scale_requested=scale,
        scale_used=scale * factor,
        factor=factor,
        halvings=halvings,
        max_output_change=max_output_change,
        output_change=change,
    )
    masks = {}
    for name, p, zero, noise, base, nz_std in plan:
        released = zero & (p.detach() != 0)
        report.tensors.append(
            TensorRelease(
                name=name,
                numel=p.numel(),
                nonzero=int((~zero).sum()),
                released=int(released.sum()),
                nonzero_std=nz_std,
                std=base * scale * factor if int(released.sum()) else 0.0,
            )
        )
        report.released_masks[name] = released
        masks[name] = torch.ones_like(zero)
    return out, masks, report
