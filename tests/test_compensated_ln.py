"""CompensatedLayerNorm reproduces LayerNorm + linear reader exactly (DESIGN §4)."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

from srfx.compensated_ln import CompensatedLayerNorm, compensate_reader


def _setup(d, n_removed, zero_constants, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    norm = nn.LayerNorm(d).to(dtype)
    reader = nn.Linear(d, 5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=g))
        norm.bias.copy_(torch.randn(d, generator=g))
    perm = torch.randperm(d, generator=g)
    removed, keep = perm[:n_removed], perm[n_removed:].sort().values
    constants = torch.zeros(d, dtype=dtype) if zero_constants else torch.randn(d, generator=g, dtype=dtype)
    x = torch.randn(3, 7, d, generator=g, dtype=dtype) * 2 + 0.5
    x[..., removed] = constants[removed]  # the removed channels carry their constants
    return norm, reader, keep, constants, x


def _compensated(norm, reader, keep, constants, x):
    comp = compensate_reader(reader.weight, reader.bias, norm.weight, norm.bias, keep, constants)
    cln = CompensatedLayerNorm.replacing(norm, keep, constants, comp.emit_u, comp.emit_v)
    return torch.nn.functional.linear(cln(x[..., keep]), comp.weight, comp.bias), comp


@given(
    d=st.integers(2, 24),
    frac=st.floats(0.0, 1.0),
    zero_constants=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_exact_in_float64(d, frac, zero_constants, seed):
    n_removed = min(d - 1, int(frac * d))
    norm, reader, keep, constants, x = _setup(d, n_removed, zero_constants, seed)
    with torch.no_grad():
        expected = reader(norm(x))
        actual, _ = _compensated(norm, reader, keep, constants, x)
    assert (expected - actual).abs().max() <= 1e-10 * expected.abs().max()


def test_design_example_float32():
    """DESIGN §4's check: D=12, |R|=3, float32."""
    norm, reader, keep, constants, x = _setup(12, 3, zero_constants=False, seed=1, dtype=torch.float32)
    with torch.no_grad():
        expected = reader(norm(x))
        actual, comp = _compensated(norm, reader, keep, constants, x)
    assert comp.emit_u and comp.emit_v
    assert (expected - actual).abs().max() <= 2e-6 * expected.abs().max()


def test_zero_constants_need_only_v_and_dead_scales_nothing():
    norm, reader, keep, constants, x = _setup(10, 4, zero_constants=True, seed=2)
    _, comp = _compensated(norm, reader, keep, constants, x)
    assert not comp.emit_u and comp.emit_v  # c = 0: the u column vanishes
    removed = torch.ones(10, dtype=torch.bool)
    removed[keep] = False
    with torch.no_grad():
        norm.weight[removed] = 0  # gamma_R = 0: removed outputs are the constants beta_R
    with torch.no_grad():
        expected = reader(norm(x))
        actual, comp = _compensated(norm, reader, keep, constants, x)
    assert not comp.emit_u and not comp.emit_v
    assert (expected - actual).abs().max() <= 1e-10 * expected.abs().max()


def test_channels_first():
    norm, reader, keep, constants, x = _setup(8, 2, zero_constants=False, seed=3)
    cln = CompensatedLayerNorm.replacing(norm, keep, constants, True, True, channel_dim=1)
    x_cf = x[..., keep].transpose(1, 2)  # (N, C, L)
    y = cln(x_cf)
    assert y.shape[1] == len(keep) + 2
    ref = CompensatedLayerNorm.replacing(norm, keep, constants, True, True)(x[..., keep])
    assert torch.allclose(y.transpose(1, 2), ref, rtol=0, atol=1e-12)


def test_rejects_bad_sizes():
    with pytest.raises(ValueError):
        CompensatedLayerNorm(5, 4)


@pytest.mark.parametrize("one", [False, True])
@pytest.mark.parametrize("emit", [(False, False), (True, False), (False, True), (True, True)])
def test_with_emit_is_the_compensation_computed_for_that_emit(emit, one):
    """Re-assembling a reader for the columns a shared norm emits gives what computing it with
    ``emit`` gives, bit for bit (compensate_ln computes each reader once and re-assembles)."""
    norm, reader, keep, constants, _ = _setup(12, 5, False, seed=3, dtype=torch.float32)
    args = (reader.weight, reader.bias, norm.weight, norm.bias, keep, constants)
    direct = compensate_reader(*args, emit=emit, one=one)
    reassembled = compensate_reader(*args, one=one).with_emit(*emit)
    assert torch.equal(direct.weight, reassembled.weight) and torch.equal(direct.bias, reassembled.bias)
    assert (direct.emit_u, direct.emit_v) == (reassembled.emit_u, reassembled.emit_v) == emit
    assert direct.weight.shape[1] == len(keep) + sum(emit) + one
