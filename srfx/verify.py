"""Verification: the emitted module must compute what the original computes (DESIGN §7).

``max|a - b| <= atol + rtol * max|a|`` per output tensor, with tolerances per dtype from one
table. Where a low-precision model's own rounding is larger than that (a float32 network
whose activations dwarf its outputs), the candidate is instead measured against the
reference run in float64 and must be within 10x the reference's own error of it, or, run in
float64 itself, agree with the reference in float64 while staying within 100x of its own
error (or of the tolerance). An output that is NaN or infinite where the other is not is an
infinite error. A mismatch raises :class:`VerificationError`; it is never a warning.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from .errors import InputError, VerificationError

__all__ = ["TOLERANCES", "tolerance", "compare_outputs", "random_like_inputs", "verify"]

# (rtol, atol) relative to the output's scale; float32 accumulates ~1e-7 per op over depth
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-7),
    torch.float16: (1e-2, 1e-4),
    torch.bfloat16: (5e-2, 1e-3),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    if dtype not in TOLERANCES:
        raise InputError(f"srfx verifies float64, float32, float16 and bfloat16 outputs, not {dtype}")
    return TOLERANCES[dtype]


def _tensors(out: Any) -> list[torch.Tensor]:
    leaves = pytree.tree_leaves(out)
    bad = [type(x).__name__ for x in leaves if not isinstance(x, torch.Tensor)]
    if bad:
        raise InputError(f"model outputs must be tensors or nested tuples/lists/dicts of tensors, found {bad[0]}")
    return leaves


def compare_outputs(expected: Any, actual: Any) -> tuple[float, float, float]:
    """(max abs error, max relative error, worst allowed/actual margin). Relative error is
    measured against each output's largest magnitude."""
    exp, act = _tensors(expected), _tensors(actual)
    if len(exp) != len(act):
        raise VerificationError(f"{len(act)} outputs instead of {len(exp)}", max_abs_error=float("inf"), max_rel_error=float("inf"), tolerance=0.0)
    worst_abs = worst_rel = 0.0
    ok = True
    for e, a in zip(exp, act):
        if e.shape != a.shape:
            raise VerificationError(f"output shape {tuple(a.shape)} instead of {tuple(e.shape)}", max_abs_error=float("inf"), max_rel_error=float("inf"), tolerance=0.0)
        if not e.is_floating_point():
            if not torch.equal(e, a):
                ok = False
                worst_abs = worst_rel = float("inf")
            continue
        rtol, atol = tolerance(e.dtype)
        scale = _finite_max(e.double().abs())
        err = _error(e.double(), a.double())
        if not (err <= atol + rtol * scale):
            ok = False
        worst_abs = max(worst_abs, err)
        worst_rel = max(worst_rel, err / scale if scale > 0 else err)
    return worst_abs, worst_rel, (1.0 if ok else 0.0)


def _finite_max(t: torch.Tensor) -> float:
    t = t[torch.isfinite(t)]
    return t.max().item() if t.numel() else 0.0


def _error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """Largest absolute difference; infinite where one output is NaN or infinite and the other
    is not (a NaN must never make the error look small: ``max(0.0, nan)`` is 0.0)."""
    if not expected.numel():
        return 0.0
    same_nan = torch.isnan(expected) & torch.isnan(actual)
    same_inf = torch.isinf(expected) & (expected == actual)
    finite = torch.isfinite(expected) & torch.isfinite(actual)
    if not (same_nan | same_inf | finite).all():
        return float("inf")
    return _finite_max((expected - actual)[finite].abs())


def random_like_inputs(inputs: tuple[torch.Tensor, ...], count: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Fresh inputs of the example's shapes, dtypes and value ranges."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        batch = []
        for x in inputs:
            if x.is_floating_point():
                std = x.double().std().item() if x.numel() > 1 else 1.0
                mean = x.double().mean().item()
                r = torch.randn(x.shape, generator=g, dtype=torch.float64) * (std or 1.0) + mean
                batch.append(r.to(dtype=x.dtype, device=x.device).contiguous(memory_format=_memory_format(x)))
            elif x.dtype == torch.bool:
                batch.append(torch.randint(0, 2, x.shape, generator=g).bool().to(x.device))
            else:
                lo, hi = int(x.min()), int(x.max())
                batch.append(torch.randint(lo, hi + 1, x.shape, generator=g, dtype=torch.int64).to(dtype=x.dtype, device=x.device))
        batches.append(tuple(batch))
    return batches


def _memory_format(x: torch.Tensor):
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else torch.contiguous_format


# how far beyond the reference's own rounding (or the tolerance, where that is larger) a
# candidate may be and still be judged by running it in float64 (mobilenetv4 in float32: 12x)
_SECOND_OPINION_FACTOR = 100.0


def _within_own_rounding(reference, batch, expected, actual, factor: float = 10.0, candidate=None) -> bool:
    """A second opinion for low-precision models whose own rounding exceeds the table's
    tolerance (activations far larger than the outputs), measured against the reference run
    in float64: is the candidate within ``factor`` times the reference's own error, or does
    the candidate itself, run in float64, agree with it to float64's tolerance (the same
    function, rounded differently in the low precision)?"""
    exp_leaves = [t for t in _tensors(expected) if t.is_floating_point()]
    if not exp_leaves or exp_leaves[0].dtype == torch.float64 or not isinstance(reference, torch.nn.Module):
        return False
    if not compare_outputs(expected, reference(*batch))[2]:
        return False  # not a function of its inputs (state, randomness): its "own rounding" means nothing
    batch64 = [t.double() if t.is_floating_point() else t for t in batch]
    exact = copy.deepcopy(reference).double()(*batch64)
    if _close_to_own_rounding(expected, actual, exact, factor):
        return True
    # the candidate's float64 run only vouches for rounding differences of the reference's
    # order: a candidate far off in its own precision (or overflowing) fails however it runs in float64
    if not isinstance(candidate, torch.nn.Module) or not _near_own_rounding(expected, actual, exact):
        return False
    try:
        candidate64 = copy.deepcopy(candidate).double()(*batch64)
    except Exception:  # a graph with dtype-specific constants may not run in float64: no second opinion
        return False
    return bool(compare_outputs(exact, candidate64)[2])


def _close_to_own_rounding(expected, actual, exact, factor: float) -> bool:
    for e, a, t in zip(_tensors(expected), _tensors(actual), _tensors(exact)):
        if not e.is_floating_point():
            continue
        own = _error(t, e.double())
        cand = _error(t, a.double())
        rtol, atol = tolerance(e.dtype)
        if not cand <= atol + rtol * _finite_max(t.abs()) + factor * own:
            return False
    return True


def _near_own_rounding(expected, actual, exact) -> bool:
    """Is the candidate within ``_SECOND_OPINION_FACTOR`` times the larger of the reference's
    own error and the table's tolerance? Finite where the reference is, at least."""
    for e, a, t in zip(_tensors(expected), _tensors(actual), _tensors(exact)):
        if not e.is_floating_point():
            continue
        rtol, atol = tolerance(e.dtype)
        own = max(_error(t, e.double()), atol + rtol * _finite_max(t.abs()))
        if not _error(t, a.double()) <= _SECOND_OPINION_FACTOR * own:
            return False
    return True


def verify(reference: Callable, candidate: Callable, inputs: tuple[torch.Tensor, ...], *, random_inputs: int = 2, seed: int = 0) -> float:
    """Run both on the example and on ``random_inputs`` fresh inputs; return the max relative
    error, or raise :class:`VerificationError`."""
    worst = 0.0
    with torch.no_grad():
        for batch in [inputs] + random_like_inputs(inputs, random_inputs, seed):
            exp, act = reference(*batch), candidate(*batch)
            err_abs, err_rel, ok = compare_outputs(exp, act)
            worst = max(worst, err_rel)
            if not ok and _within_own_rounding(reference, batch, exp, act, candidate=candidate):
                continue
            if not ok:
                leaves = [t for t in _tensors(exp) if t.is_floating_point()]
                rtol, atol = tolerance(leaves[0].dtype) if leaves else (0.0, 0.0)
                raise VerificationError(
                    f"the compressed module differs from the original: max abs error {err_abs:.3e}, "
                    f"max relative error {err_rel:.3e} (allowed rtol {rtol:g} + atol {atol:g}). "
                    "This is a bug in srfx: please report it with the model.",
                    max_abs_error=err_abs, max_rel_error=err_rel, tolerance=rtol,
                )
    return worst
