"""Helpers for checking srfx on your own models: random dead channels that carry constants."""
from __future__ import annotations

import torch

__all__ = ["kill_channels"]


def kill_channels(model: torch.nn.Module, rate: float = 0.3, seed: int = 0, columns: bool = True,
                  wake_scales: bool = True) -> torch.nn.Module:
    """Random dead channels for exactness checks: zero whole output rows (and some input
    columns) of Linear/Conv weights; give every BatchNorm nonzero random statistics, scales
    and shifts so dead channels carry constants; un-zero timm's zero-initialized heads and
    layer-scale gammas (they would hide every error). In place; returns ``model``.

    ``wake_scales`` (applied last, so the tensors above get the same values either way):
    other near-zero scale parameters get ``rand + 0.5`` too, i.e. any parameter that is not a Linear/Conv weight, not named ``*bias``, and holds one value
    ``|v| < 1e-3`` everywhere. ``endswith("gamma")`` alone misses CaiT's
    ``gamma_1``/``gamma_2`` (1e-5), PoolFormer's ``layer_scale*.scale`` (1e-5), NF-Net's
    zero-init ``gain`` and ConvNeXt-V2's GRN ``weight``; left alone, they silence whole
    residual branches and the output barely depends on the input."""
    nn = torch.nn
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
                if not m.weight.any():
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
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        if wake_scales:
            layer_weights = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))}
            for name, p in model.named_parameters():
                if id(p) in layer_weights or name.endswith("bias") or name.endswith("gamma") or p.numel() < 2:
                    continue
                first = p.flatten()[0]
                if p.is_floating_point() and first.abs() < 1e-3 and bool((p == first).all()):
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model
