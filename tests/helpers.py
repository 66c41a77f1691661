"""Shared test helpers: killing channels, snapshots of a model's state, tolerances."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from srfx.verify import TOLERANCES


def snapshot(model: nn.Module) -> dict:
    """Everything of the user's that srfx must leave alone."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        "ids": [id(p) for p in model.parameters()],
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["ids"] == before["ids"]
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k


def assert_close(expected: torch.Tensor, actual: torch.Tensor) -> None:
    rtol, atol = TOLERANCES[expected.dtype]
    scale = expected.abs().max().item()
    err = (expected - actual).abs().max().item()
    assert err <= atol + rtol * scale, f"max abs error {err:.3e} vs scale {scale:.3e}"


def kill_channels(model: nn.Module, rate: float = 0.3, seed: int = 0, columns: bool = True) -> nn.Module:
    """Zero whole output rows (and some input columns) of Linear/Conv weights; give every
    BatchNorm nonzero random statistics, scales and shifts so dead channels carry constants."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
                if not m.weight.any():  # zero-initialized heads (timm) would hide every error
                    m.weight.normal_(0, m.weight.shape[1] ** -0.5, generator=g)
                rows = torch.rand(m.weight.shape[0], generator=g) < rate
                m.weight[rows] = 0
                if columns and m.weight.shape[1] > 1:
                    cols = torch.rand(m.weight.shape[1], generator=g) < rate / 2
                    m.weight[:, cols] = 0
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
                if m.weight is not None:  # timm's zero_init_last would otherwise silence whole branches
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        for name, p in model.named_parameters():
            if name.endswith("gamma"):  # layer scale starts near 1e-6 in timm: residual branches would vanish
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def report(gm):
    return gm.meta["srfx_report"]
