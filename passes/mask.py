"""mask: magnitude pruning, unstructured or unit-level. Returns masks; the input is not modified
unless a function says so.

What is prunable: the weights of Linear and ConvNd modules by default; ``include`` adds biases,
norm affine parameters, layer scales or any parameter whose qualified name matches (fnmatch).

Two families of masks:

* :func:`magnitude_masks`: zero the ``sparsity`` fraction of weights with the smallest *score*,
  globally or per layer. ``score="magnitude"`` is ``|w|``. ``score="unit"`` is structure-aware:
  ``|w_ij| * (r_i / mean r) * (c_j / mean c)`` with ``r``/``c`` the L2 norms of the weight's rows
  (output units) and columns (inputs) over the weights still alive, so a weak row or column
  loses its weights first and dies as a whole; exact minimization then removes it. A callable
  ``score(name, weight) -> tensor`` plugs in any other criterion.
* :func:`unit_masks`: structured. Removes whole *inputs* of Linear/Conv weights (columns: an input
  pixel of the first layer, a hidden unit or channel of the layers after it) until the prunable
  weights reach ``sparsity``. An input's damage is ``std(x_j) * ||W[:, j]||`` measured on a
  calibration batch (``||W[:, j]||`` without one), relative to the layer's mean, lowest first
  (so each layer loses its weakest inputs; :func:`srfx.cycle.unit_pruner` with a loss picks the
  layer by measured damage per weight instead). With ``compensate=True`` each removed input's mean is folded into the layer's bias
  (mean replacement), so a nearly constant input (an MNIST border pixel) goes for free.

``>>> m = nn.Linear(4, 3); masks = magnitude_masks(m, 0.5)``: ``masks["weight"]`` keeps 6 of 12.
"""
from __future__ import annotations

import copy
import fnmatch
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.nn as nn

from srfx.errors import InputError
from srfx.modes import evaluating

__all__ = ["prunable_parameters", "magnitude_masks", "unit_masks", "unit_score", "mask", "apply_masks", "masks_sparsity"]

Score = Union[str, Callable[[str, torch.Tensor], torch.Tensor]]


def prunable_parameters(model: nn.Module, include: Iterable[str] = (), *, frozen: bool = False) -> dict[str, nn.Parameter]:
    """Weights of Linear/ConvNd modules, plus parameters whose names match ``include``
    (fnmatch patterns, e.g. ``"*.bias"``, ``"*norm*.weight"``, ``"*gamma"``).

    Each tensor once, under its first name (a tied weight is one set of weights to rank and
    release). Frozen parameters (``requires_grad=False``) are left out unless ``frozen``: no
    training could recover from pruning them, and weights released into them would never
    train. (Whole-channel pruning frees a frozen layer's slices with the rest of the channel,
    so it counts them: ``frozen=True``.)"""
    chosen, seen = {}, set()

    def choose(name: str, p) -> None:
        if isinstance(p, nn.Parameter) and (p.requires_grad or frozen) and id(p) not in seen:
            seen.add(id(p))
            chosen[name] = p

    for mname, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            choose(f"{mname}.weight" if mname else "weight", getattr(m, "weight", None))
    patterns = list(include)
    if patterns:
        for name, p in model.named_parameters():
            if any(fnmatch.fnmatch(name, pat) for pat in patterns):
                choose(name, p)
    return chosen


def unit_score(w: torch.Tensor) -> torch.Tensor:
    """``|w_ij|`` times the relative norms of row ``i`` and column ``j`` (2-D and up; other
    tensors: ``|w|``). Rows and columns already dead score 0, weak ones score low everywhere."""
    a = w.detach().abs().float()
    if a.dim() < 2:
        return a
    sq = a.pow(2)
    other = tuple(range(2, a.dim()))
    rows = (sq.sum(dim=(1,) + other).sqrt()).view(-1, *([1] * (a.dim() - 1)))
    cols = (sq.sum(dim=(0,) + other).sqrt()).view(1, -1, *([1] * (a.dim() - 2)))
    rows = rows / rows.mean().clamp_min(1e-30)
    cols = cols / cols.mean().clamp_min(1e-30)
    return a * rows * cols


def _scores(params: dict[str, torch.Tensor], score: Score, existing: dict) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in params.items():
        keep = existing.get(n)
        w = p.detach() if keep is None else p.detach() * keep.to(p.dtype)
        if score == "magnitude":
            s = w.abs()
        elif score == "unit":
            s = unit_score(w)
        elif callable(score):
            s = score(n, w).detach().abs()
            if s.shape != w.shape:
                raise InputError(f"score({n!r}) returned shape {tuple(s.shape)}, expected {tuple(w.shape)}")
        else:
            raise InputError(f"score must be 'magnitude', 'unit' or a callable, got {score!r}")
        # exact zeros (pruned or dead) always count as pruned and rank below every live
        # weight, whose score may be 0 too (a callable's choice, or underflow)
        out[n] = s.masked_fill(w == 0, -1.0)
    return out


def magnitude_masks(
    model: nn.Module,
    sparsity: float,
    *,
    scope: str = "global",
    include: Iterable[str] = (),
    existing: Optional[dict[str, torch.Tensor]] = None,
    score: Score = "magnitude",
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks that zero the ``sparsity`` fraction of lowest-scoring weights.

    Weights already zero (or masked in ``existing``) count as pruned, so iterating with a
    rising ``sparsity`` is a schedule. ``scope="layer"`` prunes the same fraction of each tensor.
    """
    if not 0.0 <= sparsity < 1.0:
        raise InputError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in ("global", "layer"):
        raise InputError(f"scope must be 'global' or 'layer', got {scope!r}")
    params = prunable_parameters(model, include)
    scores = _scores(params, score, existing or {})
    if scope == "global":
        flat = torch.cat([s.flatten() for s in scores.values()]) if scores else torch.zeros(0)
        k = int(sparsity * flat.numel())
        if k == 0:
            return {n: s >= 0 for n, s in scores.items()}
        # rank, not threshold: ties (many equal scores) must not prune more than asked
        order = flat.argsort(stable=True)
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        keep[order[:k]] = False
        keep &= flat >= 0
        masks, at = {}, 0
        for n, s in scores.items():
            masks[n] = keep[at : at + s.numel()].view_as(s)
            at += s.numel()
        return masks
    masks = {}
    for n, s in scores.items():
        k = int(sparsity * s.numel())
        keep = torch.ones(s.numel(), dtype=torch.bool)
        keep[s.flatten().argsort(stable=True)[:k]] = False
        masks[n] = keep.view_as(s) & (s >= 0)
    return masks


def _input_stats(model: nn.Module, batch: Any, names: dict[str, nn.Module]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-input-channel (mean, std) of every chosen module's input on ``batch`` (eval mode)."""
    stats, hooks = {}, []

    def hook(name):
        def record(mod, args):
            x = args[0].detach()
            if isinstance(mod, nn.Linear):
                x = x.reshape(-1, x.shape[-1])
            else:
                x = x.movedim(1, -1).reshape(-1, x.shape[1])
            stats[name] = (x.double().mean(0), x.double().std(0) if x.shape[0] > 1 else torch.zeros(x.shape[1], dtype=torch.float64))

        return record

    for name, mod in names.items():
        hooks.append(mod.register_forward_pre_hook(hook(name)))
    try:
        with evaluating(model), torch.no_grad():
            model(*batch) if isinstance(batch, tuple) else model(batch)
    finally:
        for h in hooks:
            h.remove()
    return stats


def unit_masks(
    model: nn.Module,
    sparsity: float,
    *,
    calibration_batch: Any = None,
    existing: Optional[dict[str, torch.Tensor]] = None,
    layers: Optional[Iterable[str]] = None,
    compensate: bool = False,
    min_inputs: int = 1,
) -> dict[str, torch.Tensor]:
    """Keep-masks over the Linear/Conv weights that remove whole inputs (columns) until the
    fraction of zero weights reaches ``sparsity``; see the module docstring.

    ``layers``: qualified module names whose inputs may go (default: every Linear/ConvNd with
    ``groups == 1``). Each layer keeps at least ``min_inputs`` live inputs. With ``compensate``
    (needs ``calibration_batch``) the model is changed in place: the bias of a layer absorbs
    ``W[:, j] * mean(x_j)`` for every removed input ``j`` (a layer without a bias is not
    compensated). Masks are for the ``.weight`` of every Linear/Conv; other tensors are left out.
    """
    if not 0.0 <= sparsity < 1.0:
        raise InputError(f"sparsity must be in [0, 1), got {sparsity}")
    if compensate and calibration_batch is None:
        raise InputError("compensate=True needs a calibration_batch to measure input means")
    mods = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and isinstance(getattr(m, "weight", None), nn.Parameter)}
    chosen = set(mods) if layers is None else set(layers)
    unknown = chosen - set(mods)
    if unknown:
        raise InputError(f"not Linear/Conv modules of the model: {sorted(unknown)}")
    existing = existing or {}
    weights = {n: m.weight.detach() * existing.get(f"{n}.weight", torch.ones((), dtype=torch.bool)).to(m.weight.dtype) for n, m in mods.items()}
    stats = _input_stats(model, calibration_batch, mods) if calibration_batch is not None else {}
    masks = {n: weights[n] != 0 for n in mods}
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((~k).sum()) for k in masks.values())
    need = int(sparsity * total) - zeros
    if need <= 0:
        return {f"{n}.weight": k for n, k in masks.items()}
    cands = []  # (relative damage, layer, column); cost-aware choice needs a loss (srfx.cycle.unit_pruner)
    for n in sorted(chosen):
        m = mods[n]
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups != 1:
            continue
        w = weights[n]
        cols = w.movedim(1, 0).reshape(w.shape[1], -1) if w.dim() > 1 else w.reshape(1, -1)
        norm = cols.double().norm(dim=1)
        live = masks[n].movedim(1, 0).reshape(w.shape[1], -1).sum(1) if w.dim() > 1 else masks[n].reshape(1, -1).sum(1)
        damage = norm * stats[n][1] if n in stats else norm
        damage = damage / damage[live > 0].mean().clamp_min(1e-30) if (live > 0).any() else damage
        for j in torch.nonzero(live > 0).flatten().tolist():
            cands.append((float(damage[j]), n, j, int(live[j])))
    cands.sort(key=lambda c: c[0])
    alive = {n: int((masks[n].movedim(1, 0).reshape(weights[n].shape[1], -1).sum(1) > 0).sum()) for n in chosen if weights[n].dim() > 1}
    removed: dict[str, list[int]] = {}
    for _, n, j, live in cands:
        if need <= 0:
            break
        if alive.get(n, 0) <= min_inputs:
            continue
        masks[n].select(1, j).fill_(False)
        alive[n] -= 1
        need -= live
        removed.setdefault(n, []).append(j)
    if compensate:
        with torch.no_grad():
            for n, cols in removed.items():
                m = mods[n]
                if getattr(m, "bias", None) is None:
                    continue
                idx = torch.tensor(cols)
                mu = stats[n][0][idx].to(m.weight.dtype)
                w = m.weight.detach().index_select(1, idx)
                m.bias += (w * mu.view(1, -1, *([1] * (w.dim() - 2)))).sum(dim=tuple(i for i in range(w.dim()) if i != 0))
    return {f"{n}.weight": k for n, k in masks.items()}


def masks_sparsity(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of masked-out positions."""
    total = sum(m.numel() for m in masks.values())
    return sum(int((~m).sum()) for m in masks.values()) / total if total else 0.0


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero masked weights in place (call after each optimizer step to keep masks fixed)."""
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied tensor under any of its names
    with torch.no_grad():
        for name, m in masks.items():
            params[name].mul_(m.to(params[name].dtype))


def mask(model: nn.Module, sparsity: float, *, scope: str = "global", include: Iterable[str] = (), score: Score = "magnitude") -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of ``model`` with the lowest-scoring weights zeroed, and the masks used."""
    out = copy.deepcopy(model)
    masks = magnitude_masks(out, sparsity, scope=scope, include=include, score=score)
    apply_masks(out, masks)
    return out, masks
