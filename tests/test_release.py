"""release: a copy whose exact zeros (and only those) become calibrated noise."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import srfx
from helpers import assert_untouched, snapshot
from srfx.passes import mask, release
from srfx.passes.release import ReleaseReport


def _pruned_mlp(sparsity=0.8, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5))
    m, _ = mask(m, sparsity)
    return m


def _pruned_cnn(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    m(torch.randn(1, 3, 8, 8))
    m, _ = mask(m, 0.7)
    return m.eval()


@pytest.mark.parametrize("make", [_pruned_mlp, _pruned_cnn])
def test_never_mutates_input(make):
    m = make()
    before = snapshot(m)
    out, masks, rep = release(m, scale=0.5)
    assert_untouched(m, before)
    assert out is not m
    assert all(p is not q for p, q in zip(out.parameters(), m.parameters()))


@pytest.mark.parametrize("make", [_pruned_mlp, _pruned_cnn])
def test_only_exact_zeros_change(make):
    m = make()
    out, masks, rep = release(m, scale=0.2, seed=3)
    weights = {n for n in rep.released_masks}
    old, new = m.state_dict(), out.state_dict()
    assert old.keys() == new.keys()
    for k in old:
        if k in weights:
            zero = old[k] == 0
            assert torch.equal(old[k][~zero], new[k][~zero]), k  # nonzeros bit-identical
            assert (new[k][zero] != 0).all(), k  # every zero released
            assert torch.equal(rep.released_masks[k], zero)
            assert masks[k].all() and masks[k].dtype == torch.bool and masks[k].shape == old[k].shape
        else:
            assert torch.equal(old[k], new[k]), k  # biases, BatchNorm, buffers untouched


def test_relative_std_and_report_counts():
    m = _pruned_mlp(0.75)
    out, masks, rep = release(m, scale=0.1, seed=0)
    assert isinstance(rep, ReleaseReport)
    params = dict(m.named_parameters())
    new = dict(out.named_parameters())
    assert [t.name for t in rep.tensors] == ["0.weight", "2.weight", "4.weight"]
    for t in rep.tensors:
        w = params[t.name].detach()
        zero = w == 0
        assert int((~zero).sum()) > 1
        assert t.numel == w.numel()
        assert t.nonzero == int((~zero).sum())
        assert t.released == int(zero.sum())
        nz_std = float(w[~zero].double().std())
        assert t.nonzero_std == pytest.approx(nz_std)
        assert t.std == pytest.approx(0.1 * nz_std)
        drawn = new[t.name].detach()[zero].double()
        if drawn.numel() > 200:  # the sample std of the draws is close to the calibrated std
            assert float(drawn.std()) == pytest.approx(t.std, rel=0.25)
    assert rep.released == sum(int((p == 0).sum()) for n, p in params.items() if n.endswith("weight"))
    assert srfx.report.count_nonzero(out) == srfx.report.count_nonzero(m) + rep.released
    text = str(rep)
    assert "released" in text and "0.weight" in text and "total" in text


def test_absolute_mode_and_determinism():
    m = _pruned_mlp()
    a, _, ra = release(m, scale=1e-3, mode="absolute", seed=7)
    b, _, rb = release(m, scale=1e-3, mode="absolute", seed=7)
    c, _, _ = release(m, scale=1e-3, mode="absolute", seed=8)
    assert all(t.std == pytest.approx(1e-3) for t in ra.tensors)
    for (k, v), (_, w), (_, u) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(v, w)
    assert any(not torch.equal(v, u) for v, u in zip(a.state_dict().values(), c.state_dict().values()))


@pytest.mark.parametrize("bound", [1e-1, 1e-3, 1e-6])
def test_calibration_respected(bound):
    m = _pruned_mlp(0.7)
    batch = torch.randn(64, 20)
    out, _, rep = release(m, scale=1.0, calibration_batch=batch, max_output_change=bound)
    with torch.no_grad():
        ref, new = m(batch), out(batch)
    change = float((new - ref).abs().max() / ref.abs().max())
    assert change <= bound
    assert rep.output_change == pytest.approx(change, rel=1e-6, abs=1e-12)
    assert rep.max_output_change == bound
    assert rep.scale_used == pytest.approx(2.0 ** -rep.halvings)
    assert rep.released > 0
    if rep.halvings:  # the previous (twice larger) scale would have broken the bound
        bigger, _, _ = release(m, scale=2.0 ** -(rep.halvings - 1))
        with torch.no_grad():
            assert float((bigger(batch) - ref).abs().max() / ref.abs().max()) > bound
    assert "halving" in str(rep)


def test_calibration_needs_a_batch_and_valid_arguments():
    m = _pruned_mlp()
    with pytest.raises(ValueError):
        release(m, max_output_change=0.1)
    with pytest.raises(ValueError):
        release(m, mode="nope")
    with pytest.raises(ValueError):
        release(m, scale=-1.0)


def test_release_of_a_compressed_module_keeps_it_running():
    m = _pruned_mlp(0.9).eval()
    x = torch.randn(8, 20)
    small = srfx.compress(m, x)
    out, masks, rep = release(small, scale=0.1)
    assert isinstance(out, torch.fx.GraphModule)
    assert set(masks) == {n for n, p in out.named_parameters() if n.endswith("weight")}
    assert out(x).shape == small(x).shape
    assert rep.released == sum(int((p == 0).sum()) for n, p in small.named_parameters() if n.endswith("weight"))


def test_degenerate_tensors_fall_back():
    m = _pruned_mlp(0.5)
    with torch.no_grad():
        m[2].weight.zero_()  # no nonzeros: model-wide std
        m[4].weight.zero_()
        m[4].weight[0, 0] = 0.5  # one nonzero: its magnitude
    out, _, rep = release(m, scale=0.1)
    by = {t.name: t for t in rep.tensors}
    assert by["4.weight"].std == pytest.approx(0.05)
    assert by["2.weight"].released == m[2].weight.numel() and by["2.weight"].std > 0
    assert (out[2].weight != 0).all()
