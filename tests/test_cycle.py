"""SqueezeRelease driver: a tiny run on scikit-learn's digits (a few seconds)."""
from __future__ import annotations


import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from helpers import assert_untouched, snapshot
from srfx.cycle import CycleRecord, SqueezeRelease, SupervisedLoop, sparsity_of
from srfx.passes import apply_masks
from srfx.report import count_nonzero, count_stored


class _Batches:
    def __init__(self, x, y, bs, shuffle):
        self.x, self.y, self.bs, self.shuffle = x, y, bs, shuffle
        self.g = torch.Generator().manual_seed(0)

    def __len__(self):
        return (len(self.y) + self.bs - 1) // self.bs

    def __iter__(self):
        idx = torch.randperm(len(self.y), generator=self.g) if self.shuffle else torch.arange(len(self.y))
        for b in idx.split(self.bs):
            yield self.x[b], self.y[b]


@pytest.fixture(scope="module")
def digits():
    sk = pytest.importorskip("sklearn.datasets")
    d = sk.load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:1400], perm[1400:]
    return (x[tr], y[tr]), (x[va], y[va])


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    (x, y), val = digits
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    loop = SupervisedLoop(_Batches(x, y, 64, True), _Batches(*val, 500, False), lr=3e-3)
    loop.train(m, 10)
    return m


def test_supervised_driver(digits, trained):
    torch.set_num_threads(1)
    (x, y), (vx, vy) = digits
    before = snapshot(trained)
    sr = SqueezeRelease.supervised(
        trained, x[:8], _Batches(x, y, 64, True), _Batches(vx, vy, 500, False),
        lr=1e-3, cycles=3, target_sparsity=0.7, recovery_epochs=0.5, finetune_epochs=1, tolerance=0.05, log=None,
    )
    final = sr.run()
    assert_untouched(trained, before)  # the driver trains its own copy
    assert isinstance(final, fx.GraphModule)
    assert len(sr.history) == 3 and [r.cycle for r in sr.history] == [1, 2, 3]
    assert all(isinstance(r, CycleRecord) for r in sr.history)
    assert final is sr.models[-1]
    last = sr.history[-1]
    assert last.accuracy == sr.loop.evaluate(final)  # a fresh evaluation agrees with the history
    assert last.stored == count_stored(final) and last.nnz == count_nonzero(final)
    assert all(r.seconds > 0 and r.macs > 0 for r in sr.history)
    assert sr.history[0].stored < count_stored(trained)  # minimize removed dead inputs/neurons
    # released after every cycle but the last; the optimizer was rebuilt each time
    assert [r.released > 0 for r in sr.history] == [True, True, False]
    assert [r.optimizer_rebuilt for r in sr.history] == [True, True, False]
    # the loop's optimizer holds exactly the parameters of the current (released) model
    opt_params = [p for g in sr.loop.optimizer.param_groups for p in g["params"]]
    assert [id(p) for p in opt_params] == [id(p) for p in sr.model.parameters()]
    assert all(p.shape == q.shape for p, q in zip(opt_params, sr.model.parameters()))
    i, best = sr.best()
    assert best is sr.models[i]


def test_user_callables_and_rollback(digits, trained):
    """The adaptive schedule rolls back and halves the rate when accuracy drops too far."""
    torch.set_num_threads(1)
    (x, y), (vx, vy) = digits
    calls = {"train": 0, "rebuild": 0}

    def train(model, epochs, masks):
        calls["train"] += 1
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        for _ in range(int(epochs * 5)):
            idx = torch.randint(0, len(y), (128,))
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            apply_masks(model, masks)
        return model.eval()

    def evaluate(model):
        with torch.no_grad():
            return (model(vx).argmax(1) == vy).float().mean().item()

    sr = SqueezeRelease(
        trained, x[:4], train, evaluate, cycles=2, target_sparsity=[0.95, 0.5], prune_rate=0.9,
        tolerance=0.0, reference_accuracy=evaluate(trained) + 0.01,  # unreachable: every step rolls back
        min_rate=0.2, recovery_epochs=1, finetune_epochs=1, rebuild_optimizer=lambda m: calls.__setitem__("rebuild", calls["rebuild"] + 1), log=None,
    )
    final = sr.run()
    assert len(sr.history) == 2
    first = sr.history[0]
    assert first.prune_steps == 0 and first.rollbacks == 3  # 0.9 -> 0.45 -> 0.225 -> below min_rate
    assert first.sparsity < 0.05
    assert calls["rebuild"] == 1
    assert sr.history[-1].accuracy == evaluate(final)


def test_bad_arguments(trained):
    f = lambda *a: None  # noqa: E731
    with pytest.raises(ValueError):
        SqueezeRelease(trained, torch.randn(1, 64), f, f, cycles=0)
    with pytest.raises(ValueError):
        SqueezeRelease(trained, torch.randn(1, 64), f, f, target_sparsity=1.0)
    with pytest.raises(ValueError):
        SqueezeRelease(trained, torch.randn(1, 64), f, f, cycles=2, target_sparsity=[0.5])


def test_sparsity_of():
    m = nn.Linear(4, 5)
    with torch.no_grad():
        m.weight.zero_()
        m.weight[0, :2] = 1.0
    assert sparsity_of(m) == pytest.approx(18 / 20)
