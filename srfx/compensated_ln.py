"""CompensatedLayerNorm: LayerNorm over the kept channels of a stream whose removed channels
carry known constants, reproducing the original statistics exactly (docs/compensated_layernorm.md).

The removed channels' outputs are affine in two per-position scalars, u = 1/s and v = mu/s, so a
linear reader can still see them: the module appends u and/or v as extra channels and
:func:`compensate_reader` gives the reader the matching columns and bias.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

__all__ = ["CompensatedLayerNorm", "ReaderCompensation", "compensate_reader"]


def _m2_from_sums(total: float, squares: float, n: int) -> float:
    """sum (c - cbar)^2 from sum c and sum c^2 (for callers and pickles that give only those)."""
    return squares - total * total / n if n else 0.0


class CompensatedLayerNorm(nn.Module):
    """LayerNorm whose statistics count ``total`` channels, ``total - kept`` of which were removed
    while carrying constants with sum ``removed_sum`` and sum of squares ``removed_sq_sum``.

    Output: the ``kept`` normalized channels, then ``u = 1/s`` if ``emit_u`` and ``v = mu/s`` if
    ``emit_v`` (s the original standard deviation), along ``channel_dim``.
    """

    def __init__(
        self,
        kept: int,
        total: int,
        removed_sum: float = 0.0,
        removed_sq_sum: float = 0.0,
        eps: float = 1e-5,
        weight: Optional[torch.Tensor] = None,
        bias: Optional[torch.Tensor] = None,
        emit_u: bool = False,
        emit_v: bool = False,
        channel_dim: int = -1,
        centered: bool = True,
        emit_one: bool = False,
        removed_m2: Optional[float] = None,
    ):
        super().__init__()
        if not 0 <= kept <= total:
            raise ValueError(f"kept={kept} must be between 0 and total={total}")
        self.kept, self.total, self.eps, self.channel_dim = kept, total, eps, channel_dim
        self.removed_sum, self.removed_sq_sum = float(removed_sum), float(removed_sq_sum)
        n_removed = total - kept
        # the removed constants' sum of squares about their own mean: the variance needs
        # sum_R (c - mu)^2 = M2 + n (cbar - mu)^2, which does not cancel when the stream sits
        # far from zero (sum c^2 - 2 mu sum c + n mu^2 does)
        if removed_m2 is None:
            removed_m2 = _m2_from_sums(float(removed_sum), float(removed_sq_sum), n_removed)
        self.removed_m2 = max(float(removed_m2), 0.0)
        if emit_v and not centered:
            raise ValueError("an RMSNorm (centered=False) has no mean: only u can be emitted")
        self.emit_u, self.emit_v, self.centered, self.emit_one = emit_u, emit_v, centered, emit_one
        self.weight = nn.Parameter(weight.detach().clone()) if weight is not None else None
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        # one entry per emitted channel (not a weight: integers, not counted as stored size);
        # the channel rule ties the emitted channels to it so that a later compress keeps them
        self.register_buffer("emitted", torch.arange(int(emit_u) + int(emit_v) + int(emit_one)))

    def __setstate__(self, state: dict) -> None:
        # modules pickled before removed_m2 existed: derive it from the sums they carry
        if "removed_m2" not in state:
            state["removed_m2"] = max(_m2_from_sums(state["removed_sum"], state["removed_sq_sum"], state["total"] - state["kept"]), 0.0)
        super().__setstate__(state)

    @property
    def extra_channels(self) -> int:
        return int(self.emit_u) + int(self.emit_v) + int(self.emit_one)

    def _per_channel(self, y: torch.Tensor, t: torch.Tensor, op) -> torch.Tensor:
        """``op(y, t)`` with ``t`` along the channel axis (written so that fx can trace it)."""
        if self.channel_dim == -1:
            return op(y, t)
        return op(y.transpose(self.channel_dim, -1), t).transpose(self.channel_dim, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # half-precision inputs are normalized in float32, as nn.LayerNorm does: sums of
        # squares overflow float16 long before the stream itself does
        dtype = x.dtype
        if dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        d, n_removed = self.total, self.total - self.kept
        c1, c2 = self.removed_sum, self.removed_sq_sum
        # eps None (nn.RMSNorm's default): torch.rms_norm takes the epsilon of the dtype it computes in
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        if not self.centered:  # RMSNorm: s^2 = (sum_K x^2 + C2) / D
            inv = torch.rsqrt(((x * x).sum(self.channel_dim, keepdim=True) + c2) / d + eps)
            return self._finish(x * inv, inv, None, dtype)
        mu = (x.sum(self.channel_dim, keepdim=True) + c1) / d
        dev = x - mu
        squares = (dev * dev).sum(self.channel_dim, keepdim=True)
        if n_removed:
            off = c1 / n_removed - mu
            squares = squares + self.removed_m2 + n_removed * off * off
        inv = torch.rsqrt(squares / d + eps)
        return self._finish(dev * inv, inv, mu, dtype)

    def _finish(self, y: torch.Tensor, inv: torch.Tensor, mu, dtype: torch.dtype) -> torch.Tensor:
        if self.weight is not None:
            y = self._per_channel(y, self.weight, torch.mul)
        if self.bias is not None:
            y = self._per_channel(y, self.bias, torch.add)
        extras = ([inv] if self.emit_u else []) + ([mu * inv] if self.emit_v else []) + ([torch.ones_like(inv)] if self.emit_one else [])
        out = torch.cat([y, *extras], dim=self.channel_dim) if extras else y
        return out.to(dtype)

    def narrowed(self, keep, constants, emit_u: bool, emit_v: bool, emit_one: bool) -> "CompensatedLayerNorm":
        """This norm keeping only ``keep`` (indices among its kept channels), whose other kept
        channels now carry ``constants`` (indexed like the kept channels): same total count,
        the removed constants' statistics merged (Chan et al.'s pairwise update)."""
        keep = torch.as_tensor(keep, dtype=torch.long)
        removed = torch.ones(self.kept, dtype=torch.bool)
        removed[keep] = False
        c = torch.as_tensor(constants, dtype=torch.float64)[removed]
        n_a, n_b = self.total - self.kept, len(c)
        m2 = self.removed_m2
        if n_b:
            mean_b = c.mean().item()
            m2_b = ((c - mean_b) ** 2).sum().item()
            delta = mean_b - (self.removed_sum / n_a if n_a else mean_b)
            m2 = m2 + m2_b + delta * delta * n_a * n_b / (n_a + n_b)
        return CompensatedLayerNorm(
            len(keep), self.total, self.removed_sum + c.sum().item(), self.removed_sq_sum + (c * c).sum().item(), self.eps,
            self.weight.detach()[keep] if self.weight is not None else None, self.bias.detach()[keep] if self.bias is not None else None,
            emit_u, emit_v, self.channel_dim, self.centered, emit_one, removed_m2=m2,
        )

    def extra_repr(self) -> str:
        kind = "" if self.centered else ", rms"
        one = ", emit_one=True" if self.emit_one else ""
        return f"kept={self.kept}, total={self.total}, eps={self.eps}, emit_u={self.emit_u}, emit_v={self.emit_v}{one}{kind}"

    @classmethod
    def replacing(cls, norm: nn.Module, keep: torch.Tensor, constants: torch.Tensor, emit_u: bool, emit_v: bool, channel_dim: int = -1):
        """The compensated form of ``norm`` (nn.LayerNorm or nn.RMSNorm) keeping channels
        ``keep``; ``constants`` holds the value of every channel (only the removed ones are read)."""
        if len(norm.normalized_shape) != 1:
            raise ValueError("CompensatedLayerNorm normalizes over one (channel) axis")
        return cls.from_parts(
            norm.normalized_shape[0], keep, constants, norm.eps, norm.weight, getattr(norm, "bias", None),
            emit_u, emit_v, channel_dim, centered=isinstance(norm, nn.LayerNorm),
        )

    @classmethod
    def from_parts(cls, total: int, keep, constants, eps, weight, bias, emit_u: bool, emit_v: bool, channel_dim: int = -1, centered: bool = True, emit_one: bool = False):
        """The compensated norm over ``total`` channels keeping ``keep`` (indices), with the
        full-width ``weight``/``bias`` (or None) and per-channel ``constants``."""
        keep = torch.as_tensor(keep, dtype=torch.long)
        removed = torch.ones(total, dtype=torch.bool)
        removed[keep] = False
        c = torch.as_tensor(constants, dtype=torch.float64)[removed]
        w = weight.detach()[keep] if weight is not None else None
        b = bias.detach()[keep] if bias is not None else None
        # eps None (nn.RMSNorm's default) stays None: the machine epsilon of the input's dtype
        m2 = ((c - c.mean()) ** 2).sum().item() if len(c) else 0.0
        return cls(len(keep), total, c.sum().item(), (c * c).sum().item(), eps, w, b, emit_u, emit_v, channel_dim, centered, emit_one, removed_m2=m2)


@dataclass(frozen=True)
class ReaderCompensation:
    """New weight (kept columns, then u and v columns as emitted) and bias of a linear reader.
    ``parts`` (float64: kept columns, u, v, ones or None) lets :meth:`with_emit` re-assemble
    the weight for the columns a shared norm emits without computing them again."""

    weight: torch.Tensor
    bias: torch.Tensor
    emit_u: bool
    emit_v: bool
    parts: tuple = field(default=(), repr=False, compare=False)

    def with_emit(self, emit_u: bool, emit_v: bool) -> "ReaderCompensation":
        """The same compensation reading the u / v columns exactly when the norm emits them."""
        return ReaderCompensation(_assembled(self.parts, self.bias.dtype, emit_u, emit_v), self.bias, emit_u, emit_v, self.parts)


def _assembled(parts: tuple, dtype: torch.dtype, emit_u: bool, emit_v: bool) -> torch.Tensor:
    kept, u, v, one = parts
    cols = [kept] + ([u] if emit_u else []) + ([v] if emit_v else []) + ([one] if one is not None else [])
    return torch.cat(cols, dim=1).to(dtype)


def compensate_reader(weight, bias, gamma, beta, keep, constants, tol: float = 0.0, centered: bool = True, emit: Optional[tuple[bool, bool]] = None, prior=(None, None, None), one: bool = False) -> ReaderCompensation:
    """A linear reader ``y = W n + b`` of a LayerNorm's output, rewritten for the kept channels.
    ``weight`` reads channels on axis 1 (Linear ``(out, in)``, or a conv ``(out, in, *kernel)``
    without zero padding, where u and v are maps like any channel).

    Removed channel j outputs ``gamma_j c_j u - gamma_j v + beta_j``; so the reader gets
    column ``a = W_R (gamma_R c_R)`` for u, ``-W_R gamma_R`` for v, and ``b += W_R beta_R``
    (summed over the kernel). An RMSNorm (``centered=False``) has no v. A column that is zero
    is not emitted (``tol`` treats tiny ones as zero: 0 keeps it exact), unless ``emit``
    = (u, v) says which columns the norm emits (several readers share one norm). ``prior``
    holds the reader's u and v columns from an earlier compensation of the same norm (the
    new removals add to them). ``one``: the norm also emits a channel of ones (zero padding
    between norm and reader pads it with zeros, as it padded the removed channels), and the
    reader takes ``W_R beta_R`` as that channel's column instead of in its bias.
    """
    d = weight.shape[1]
    keep = torch.as_tensor(keep, dtype=torch.long)
    removed = torch.ones(d, dtype=torch.bool)
    removed[keep] = False
    w64 = weight.detach().double()
    g = gamma.detach().double() if gamma is not None else torch.ones(d, dtype=torch.float64)
    be = beta.detach().double() if beta is not None else torch.zeros(d, dtype=torch.float64)
    c = torch.as_tensor(constants, dtype=torch.float64)
    w_r = w64[:, removed]  # (out, |R|, *kernel)
    a = torch.tensordot(w_r, g[removed] * c[removed], dims=([1], [0])).unsqueeze(1)
    v_col = -torch.tensordot(w_r, g[removed], dims=([1], [0])).unsqueeze(1)
    shift = torch.tensordot(w_r, be[removed], dims=([1], [0])).reshape(weight.shape[0], -1).sum(1)
    prior = tuple(prior) + (None,) * (3 - len(prior))
    if prior[0] is not None:
        a = a + prior[0].detach().double()
    if prior[1] is not None:
        v_col = v_col + prior[1].detach().double()
    one_col = None
    if one:
        one_col = torch.tensordot(w_r, be[removed], dims=([1], [0])).unsqueeze(1)
        if prior[2] is not None:
            one_col = one_col + prior[2].detach().double()
        shift = torch.zeros_like(shift)
    new_bias = (bias.detach().double() if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)) + shift
    emit_u = bool((a.abs() > tol).any()) if emit is None else emit[0]
    emit_v = (centered and bool((v_col.abs() > tol).any())) if emit is None else emit[1]
    parts = (w64[:, keep], a, v_col, one_col)
    return ReaderCompensation(_assembled(parts, weight.dtype, emit_u, emit_v), new_bias.to(weight.dtype), emit_u, emit_v, parts)
