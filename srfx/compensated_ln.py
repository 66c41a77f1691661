"""CompensatedLayerNorm: LayerNorm over the kept channels of a stream whose removed channels
carry known constants, reproducing the original statistics exactly (docs/compensated_layernorm.md).

The removed channels' outputs are affine in two per-position scalars, u = 1/s and v = mu/s, so a
linear reader can still see them: the module appends u and/or v as extra channels and
:func:`compensate_reader` gives the reader the matching columns and bias.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

__all__ = ["CompensatedLayerNorm", "ReaderCompensation", "compensate_reader"]


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
    ):
        super().__init__()
        if not 0 <= kept <= total:
            raise ValueError(f"kept={kept} must be between 0 and total={total}")
        self.kept, self.total, self.eps, self.channel_dim = kept, total, eps, channel_dim
        self.removed_sum, self.removed_sq_sum = float(removed_sum), float(removed_sq_sum)
        self.emit_u, self.emit_v = emit_u, emit_v
        self.weight = nn.Parameter(weight.detach().clone()) if weight is not None else None
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @property
    def extra_channels(self) -> int:
        return int(self.emit_u) + int(self.emit_v)

    def _per_channel(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return t.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, n_removed = self.total, self.total - self.kept
        c1, c2 = self.removed_sum, self.removed_sq_sum
        mu = (x.sum(self.channel_dim, keepdim=True) + c1) / d
        dev = x - mu
        var = ((dev * dev).sum(self.channel_dim, keepdim=True) + c2 - 2 * mu * c1 + n_removed * mu * mu) / d
        inv = torch.rsqrt(var + self.eps)
        y = dev * inv
        if self.weight is not None:
            y = y * self._per_channel(self.weight, x)
        if self.bias is not None:
            y = y + self._per_channel(self.bias, x)
        extras = ([inv] if self.emit_u else []) + ([mu * inv] if self.emit_v else [])
        return torch.cat([y, *extras], dim=self.channel_dim) if extras else y

    def extra_repr(self) -> str:
        return f"kept={self.kept}, total={self.total}, eps={self.eps}, emit_u={self.emit_u}, emit_v={self.emit_v}"

    @classmethod
    def replacing(cls, norm: nn.LayerNorm, keep: torch.Tensor, constants: torch.Tensor, emit_u: bool, emit_v: bool, channel_dim: int = -1):
        """The compensated form of ``norm`` keeping channels ``keep``; ``constants`` holds the
        value of every channel (only the removed ones are read)."""
        if len(norm.normalized_shape) != 1:
            raise ValueError("CompensatedLayerNorm normalizes over one (channel) axis")
        total = norm.normalized_shape[0]
        removed = torch.ones(total, dtype=torch.bool)
        removed[keep] = False
        c = constants.double()[removed]
        w = norm.weight[keep] if norm.weight is not None else None
        b = norm.bias[keep] if norm.bias is not None else None
        return cls(len(keep), total, c.sum().item(), (c * c).sum().item(), norm.eps, w, b, emit_u, emit_v, channel_dim)


@dataclass(frozen=True)
class ReaderCompensation:
    """New weight (kept columns, then u and v columns as emitted) and bias of a linear reader."""

    weight: torch.Tensor
    bias: torch.Tensor
    emit_u: bool
    emit_v: bool


def compensate_reader(weight, bias, gamma, beta, keep, constants, tol: float = 0.0) -> ReaderCompensation:
    """A linear reader ``y = W n + b`` of a LayerNorm's output, rewritten for the kept channels.

    Removed channel j outputs ``gamma_j c_j u - gamma_j v + beta_j``; so the reader gets
    column ``a = W_R (gamma_R c_R)`` for u, ``-W_R gamma_R`` for v, and ``b += W_R beta_R``.
    A column that is zero is not emitted (``tol`` treats tiny ones as zero: 0 keeps it exact).
    """
    d = weight.shape[1]
    removed = torch.ones(d, dtype=torch.bool)
    removed[keep] = False
    w64 = weight.double()
    g = gamma.double() if gamma is not None else torch.ones(d, dtype=torch.float64)
    be = beta.double() if beta is not None else torch.zeros(d, dtype=torch.float64)
    c = constants.double()
    w_r = w64[:, removed]
    a = w_r @ (g[removed] * c[removed])
    v_col = -(w_r @ g[removed])
    new_bias = (bias.double() if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)) + w_r @ be[removed]
    emit_u, emit_v = bool((a.abs() > tol).any()), bool((v_col.abs() > tol).any())
    cols = [w64[:, keep]] + ([a[:, None]] if emit_u else []) + ([v_col[:, None]] if emit_v else [])
    return ReaderCompensation(torch.cat(cols, dim=1).to(weight.dtype), new_bias.to(weight.dtype), emit_u, emit_v)
