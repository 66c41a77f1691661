"""The built-in example: prune an MLP on scikit-learn's bundled digits, then compress it.

Runs anywhere (the 1,797 8x8 digits ship with scikit-learn) in well under a minute on a CPU.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["run_demo"]


def _digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - dev extra installs it
        raise SystemExit("the demo needs scikit-learn: pip install scikit-learn") from exc
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    split = int(0.8 * len(y))
    return (x[perm[:split]], y[perm[:split]]), (x[perm[split:]], y[perm[split:]])


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def _train(model, data, epochs, masks=None, lr=3e-3):
    from srfx.passes import apply_masks

    x, y = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if masks is not None:
                apply_masks(model, masks)  # masks stay fixed while fine-tuning
    return model.eval()


def _accuracy(model, data) -> float:
    x, y = data
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def run_demo(sparsity: float = 0.9, rounds: int = 4) -> None:
    import srfx
    from srfx.passes import magnitude_masks, apply_masks

    torch.manual_seed(0)
    train, test = _digits()
    start = time.time()
    model = _train(_mlp(), train, epochs=30)
    print(f"dense MLP 64-128-64-10: test accuracy {_accuracy(model, test):.3f}")
    masks = None
    for r in range(1, rounds + 1):
        target = 1 - (1 - sparsity) ** (r / rounds)
        masks = magnitude_masks(model, target, existing=masks)
        apply_masks(model, masks)
        model = _train(model, train, epochs=8, masks=masks, lr=1e-3)
        print(f"round {r}: {target:.1%} of weights masked, test accuracy {_accuracy(model, test):.3f}")
    small = srfx.compress(model, test[0][:8])
    widths = [m.out_features for m in small.modules() if isinstance(m, nn.Linear)]
    print(f"compressed: Linear widths {widths}, test accuracy {_accuracy(small, test):.3f}")
    print(small.meta[srfx.REPORT_KEY])
    print(f"({time.time() - start:.0f} s)")
