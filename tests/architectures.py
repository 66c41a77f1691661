"""Small architectures covering the coupling patterns srfx must handle exactly."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ResidualCNN(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
        self.b2 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(), nn.Conv2d(2 * c, 2 * c, 1))
        self.proj = nn.Conv2d(c, 2 * c, 1, stride=2)
        self.fc = nn.Linear(2 * c, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.b1(x))
        x = F.relu(self.b2(x) + self.proj(x))
        return self.fc(x.mean((2, 3)))


class ConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.c = nn.Conv2d(10, 7, 1)
        self.head = nn.Linear(7 * 4 * 4, 3)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        y = F.relu(self.c(y))
        return self.head(torch.flatten(y, 1))


class SplitShuffle(nn.Module):
    """ShuffleNet-style: split channels, transform one half, concatenate, shuffle."""

    def __init__(self, c=8):
        super().__init__()
        self.inp = nn.Conv2d(3, c, 1)
        self.branch = nn.Sequential(nn.Conv2d(c // 2, c // 2, 1), nn.BatchNorm2d(c // 2), nn.ReLU())
        self.out = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = self.inp(x)
        a, b = x.chunk(2, dim=1)
        y = torch.cat([a, self.branch(b)], dim=1)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.out(y)


class SENet(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.reduce = nn.Conv2d(c, 4, 1)
        self.expand = nn.Conv2d(4, c, 1)
        self.out = nn.Conv2d(c, 5, 1)

    def forward(self, x):
        x = self.conv(x)
        s = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return self.out(x * s)


class DepthwiseGroupNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gn = nn.GroupNorm(4, 8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.gn(self.dw(self.pw(x))))
        return self.out(F.relu(self.grouped(x)))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(4, 12, 5, padding=2), nn.BatchNorm1d(12), nn.GELU(), nn.Conv1d(12, 10, 3), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(10, 3),
        )

    def forward(self, x):
        return self.net(x)


class UpsampleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.mix = nn.Conv2d(6, 6, 1)
        self.out = nn.Conv2d(6, 2, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.up(F.relu(self.down(x))))
        y = F.interpolate(self.mix(y), scale_factor=2, mode="nearest")
        return self.out(y)


class Attention(nn.Module):
    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class TransformerBlock(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 32)
        self.fc2 = nn.Linear(32, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(x.mean(1))


class TiedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 10)
        self.fc2 = nn.Linear(10, 10)
        self.fc3 = nn.Linear(10, 4)
        self.fc2.weight = self.fc1.weight

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class SharedModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.shared = nn.Linear(12, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        x = F.relu(self.inp(x))
        x = F.relu(self.shared(x))
        x = F.relu(self.shared(x))
        return self.out(x)


class ChannelMixing(nn.Module):
    """cumsum over channels: no rule knows it, so its channels must be kept."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=1))


class InplaceAlias(nn.Module):
    """relu_ mutates a tensor that is read again afterwards."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 8)
        self.b = nn.Linear(8, 3)
        self.c = nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        r = h.relu_()
        return self.b(r) + self.c(h)


class MultiIO(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(6, 8)
        self.c = nn.Linear(8, 3)
        self.d = nn.Linear(8, 2)

    def forward(self, x, y):
        h = F.relu(self.a(x) + self.b(y))
        return {"logits": self.c(h), "aux": (self.d(h), x.sum(1))}


class MLP(nn.Module):
    def __init__(self, sizes=(784, 300, 100, 10)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


CASES = {
    "residual": (ResidualCNN, lambda: (torch.randn(2, 3, 8, 8),)),
    "concat": (ConcatNet, lambda: (torch.randn(2, 3, 4, 4),)),
    "split_shuffle": (SplitShuffle, lambda: (torch.randn(2, 3, 6, 6),)),
    "se_gating": (SENet, lambda: (torch.randn(2, 3, 6, 6),)),
    "depthwise_groupnorm": (DepthwiseGroupNorm, lambda: (torch.randn(2, 3, 6, 6),)),
    "conv1d": (Conv1dNet, lambda: (torch.randn(2, 4, 16),)),
    "upsample": (UpsampleNet, lambda: (torch.randn(2, 3, 8, 8),)),
    "transformer": (TransformerBlock, lambda: (torch.randn(2, 5, 6),)),
    "tied": (TiedMLP, lambda: (torch.randn(3, 10),)),
    "shared_module": (SharedModule, lambda: (torch.randn(3, 6),)),
    "channel_mixing": (ChannelMixing, lambda: (torch.randn(2, 3, 4, 4),)),
    "inplace_alias": (InplaceAlias, lambda: (torch.randn(3, 5),)),
    "multi_io": (MultiIO, lambda: (torch.randn(3, 4), torch.randn(3, 6))),
    "mlp": (MLP, lambda: (torch.randn(4, 1, 28, 28),)),
}
