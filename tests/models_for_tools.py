"""Small models for tests of tools/show_groups.py (``tests.models_for_tools:NAME`` from the
repo root, or ``models_for_tools:NAME`` with tests/ on sys.path)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyCNN(nn.Module):
    """stem -> residual block -> concat of two branches -> head; plus a parameter that only
    goes to the output (a group with neither writer nor reader)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.a = nn.Conv2d(8, 6, 1)
        self.b = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
        self.mix = nn.Conv2d(10, 5, 1)
        self.head = nn.Linear(5, 2)
        self.offset = nn.Parameter(torch.zeros(7))

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.block(x))
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        y = F.relu(self.mix(y))
        return self.head(y.mean((2, 3))), self.offset * 2


def tiny_cnn() -> nn.Module:
    return TinyCNN()


class ResidualChain(nn.Module):
    """``n`` residual 1x1 convs on one stream: one group with n+1 writers and n+1 readers."""

    def __init__(self, n: int = 8, c: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 1) for _ in range(n))
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        for conv in self.convs:
            x = x + conv(x)
        return self.out(x)


def residual_chain() -> nn.Module:
    return ResidualChain()


class DefaultedForward(nn.Module):
    """``forward`` has an optional argument (like timm's VisionTransformer)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x, mask: Optional[torch.Tensor] = None, scale: float = 1.0):
        h = F.relu(self.conv(x))
        if mask is not None:
            h = h * mask
        return self.out(h) * scale


def defaulted_forward() -> nn.Module:
    return DefaultedForward()


def not_a_module():
    return 42


def needs_an_argument(width: int) -> nn.Module:
    """A factory the command line cannot call (it takes no arguments)."""
    return nn.Linear(width, 2)


# a model instance, not a factory: the command line takes it as it is
an_instance = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
