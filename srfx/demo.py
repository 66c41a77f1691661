"""The built-in example: Squeeze-Release on an MLP for scikit-learn's bundled digits.

Trains a 64-128-64-10 MLP on the 1,797 8x8 digits (they ship with scikit-learn), then runs
:class:`srfx.cycle.SqueezeRelease`: each cycle removes whole input pixels and hidden units
(:func:`srfx.cycle.unit_pruner`, the layer chosen by the loss it raises least per weight),
fine-tunes with distillation from the dense model, compresses exactly with
:func:`srfx.compress`, and releases; then prints the per-cycle table. About 20-40 s on a laptop
CPU; ``quick=True`` (``python -m srfx demo --quick``) is a few seconds.
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
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    a, b = int(0.6 * len(y)), int(0.8 * len(y))
    return (x[perm[:a]], y[perm[:a]]), (x[perm[a:b]], y[perm[a:b]]), (x[perm[b:]], y[perm[b:]])


def run_demo(sparsity: float = 0.9, quick: bool = False, cycles: int = 4, progress: bool = False) -> None:
    """``sparsity``: the fraction of the weights the cycles aim to remove in all (each cycle
    prunes ``1 - (1 - sparsity) ** (1 / cycles)`` of what is left)."""
    import srfx
    from srfx.cycle import Schedule, SqueezeRelease, SupervisedLoop, TensorBatches, unit_pruner

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest and leaves the rest alone
    try:
        start = time.time()
        train, val, test = _digits()
        dense = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
        SupervisedLoop(TensorBatches(*train, 64, True, seed=1), None, lr=3e-3, lr_schedule="cosine").train(dense, 10 if quick else 40)
        tester = SupervisedLoop(None, TensorBatches(*test, 512, False))
        dense_acc = tester.evaluate(dense)
        print(f"dense MLP 64-128-64-10: {srfx.report.count_parameters(dense)} parameters, test accuracy {dense_acc:.3f}")

        calib_x, calib_y = train

        def loss(model):  # what the unit pruner tries not to raise
            with torch.no_grad():
                return float(F.cross_entropy(model(calib_x), calib_y))

        sr = SqueezeRelease.supervised(
            dense, test[0][:8], TensorBatches(*train, 64, True, seed=1), TensorBatches(*val, 512, False),
            lr=2e-3, teacher=dense, distill=0.5, lr_schedule="cosine",
            schedule=Schedule(
                cycles=cycles, target_sparsity=1 - (1 - sparsity) ** (1 / cycles), prune_rate=0.3, tolerance=0.02,
                recovery_epochs=1 if quick else 3, finetune_epochs=2 if quick else 10,
            ),
            pruner=unit_pruner(calib_x, loss=loss), optimizer_state="slice", progress=progress, log=None,
        )
        small = sr.run()
        print(sr.table())
        print(f"compressed: widths {'-'.join(map(str, sr.history[-1].widths))}, test accuracy {tester.evaluate(small):.3f} "
              f"(dense {dense_acc:.3f}), stored {sr.history[-1].stored} of {srfx.report.count_stored(dense)} parameters")
        print(f"({time.time() - start:.0f} s)")
    finally:
        torch.set_num_threads(threads)
