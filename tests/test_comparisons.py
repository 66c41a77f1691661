"""Comparisons and torch.where (srfx/rules/pointwise.py ``Comparison``, ``Where``): channels pass
as through any elementwise op; a dead channel's comparison is decided, and the channel folded,
only where its constant is clearly on one side of the threshold. Compressed with verify=False so
that srfx's own check cannot hide a wrong rewrite."""
from __future__ import annotations

import torch
import torch.nn as nn

import srfx
from helpers import assert_close


class HandWritten(nn.Module):
    """A leaky ReLU by torch.where, a mask by >=, and a bool added as a number."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 10), nn.Linear(10, 4)

    def forward(self, x):
        h = self.a(x)
        h = torch.where(h > 0, h, 0.1 * h)
        return self.b(h * (h >= 0.5).to(h.dtype) + h.gt(-0.2))


def _dead(model, biases):
    with torch.no_grad():
        model.a.weight[: len(biases)] = 0
        model.a.bias[: len(biases)] = torch.tensor(biases)
    return model


def test_dead_channels_clearly_off_the_thresholds_fold_and_the_others_stay():
    torch.manual_seed(0)
    # 0.3 and -0.7 are decided at every comparison; 0.5 sits on >= 0.5, 0.0 on > 0, and 1e-6 is too
    # close to 0 to trust float32 rounding: those three stay
    model = _dead(HandWritten().eval(), [0.3, -0.7, 0.5, 0.0, 1e-6])
    small = srfx.compress(model, torch.randn(3, 6), verify=False)
    assert small.a.out_features == 8
    for _ in range(3):
        y = torch.randn(5, 6)
        assert_close(model(y), small(y))


def test_unread_channels_through_a_comparison_go():
    torch.manual_seed(0)
    model = HandWritten().eval()
    with torch.no_grad():
        model.b.weight[:, :3] = 0
    small = srfx.compress(model, torch.randn(3, 6), verify=False)
    assert small.a.out_features == 7
    y = torch.randn(5, 6)
    assert_close(model(y), small(y))


def test_a_bfloat16_model_decides_only_with_a_wider_margin():
    """sqrt(eps) of bfloat16 is about 0.09: a constant 0.05 above its threshold is decided in
    float32 and left undecided (kept) in bfloat16."""
    torch.manual_seed(0)
    widths = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _dead(HandWritten().eval(), [0.3, -0.7, 0.55]).to(dtype)
        small = srfx.compress(model, torch.randn(3, 6, dtype=dtype), verify=False)
        widths[dtype] = small.a.out_features
        y = torch.randn(5, 6, dtype=dtype)
        assert_close(model(y), small(y))
    assert widths == {torch.float32: 7, torch.bfloat16: 8}


class Masks(HandWritten):
    """Masks combined with &, ~ and logical_or, applied with masked_fill (HandWritten's layers)."""

    def forward(self, x):
        h = self.a(x)
        inside = (h > 0) & ~(h > 2)
        y = h.masked_fill(~inside, 0.0) + torch.logical_or(h < -1, inside).to(h.dtype)
        return self.b(y)


def test_masks_combined_and_applied_with_masked_fill_fold_their_dead_channels():
    torch.manual_seed(0)
    model = Masks().eval()
    with torch.no_grad():
        model.a.weight[:4] = 0
        model.a.bias[:4] = torch.tensor([0.3, -0.7, 5.0, -3.0])  # inside; outside; above; below -1
        model.b.weight[:, 9] = 0  # unread
    small = srfx.compress(model, torch.randn(3, 6), verify=False)
    assert small.a.out_features == 5
    for _ in range(3):
        y = torch.randn(5, 6) * 3
        assert_close(model(y), small(y))
