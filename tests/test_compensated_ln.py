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


@pytest.mark.parametrize("offset", [1e2, 1e3, 3e3])
def test_a_stream_far_from_zero_keeps_float32_accuracy(offset):
    """The variance of a stream whose mean is many spreads away from zero: the removed
    constants' sum of squares minus 2 mu sum c cancels catastrophically in float32 (at offset
    1000 the error was 3e-2 of the output); M2 + n (cbar - mu)^2 does not."""
    norm, reader, keep, constants, x = _setup(48, 12, False, 0)
    x64 = x + offset
    constants = constants + offset
    x64[..., ~torch.isin(torch.arange(48), keep)] = constants[~torch.isin(torch.arange(48), keep)]
    with torch.no_grad():
        expected = reader(norm(x64))
        norm32, reader32 = norm.float(), reader.float()
        got, _ = _compensated(norm32, reader32, keep, constants.float(), x64.float())
        own = reader32(norm32(x64.float()))  # the original's own float32 error is the yardstick
    own_err = (own.double() - expected).abs().max().item()
    err = (got.double() - expected).abs().max().item()
    assert err <= 4 * own_err + 1e-6 * expected.abs().max().item(), (err, own_err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_statistics_do_not_overflow(dtype):
    """Half-precision streams are normalized in float32, as nn.LayerNorm does: in float16 the
    removed constants' sum of squares (96 x 31^2) overflows and the output was all NaN."""
    d, n_removed = 384, 96
    norm, reader, keep, constants, x = _setup(d, n_removed, False, 1)
    removed = ~torch.isin(torch.arange(d), keep)
    constants[removed] = 31.0
    x = x * 10 + 30
    x[..., removed] = 31.0
    with torch.no_grad():
        expected = reader(norm(x))
        got, _ = _compensated(norm.to(dtype), reader.to(dtype), keep, constants, x.to(dtype))
        own = reader.to(dtype)(norm.to(dtype)(x.to(dtype)))
    assert got.dtype == dtype and torch.isfinite(got).all()
    own_err = (own.double() - expected).abs().max().item()
    assert (got.double() - expected).abs().max().item() <= 3 * own_err


def test_rmsnorm_default_eps_is_the_computation_dtypes():
    """nn.RMSNorm(eps=None) uses the epsilon of the dtype torch.rms_norm computes in (float32
    for half inputs, float64 for float64): the compensated norm keeps eps None and does the same."""
    for dtype in (torch.float16, torch.float64):
        norm = nn.RMSNorm(16, elementwise_affine=False).to(dtype)
        keep = torch.arange(12)
        x = (torch.randn(4, 16, dtype=torch.float64) * 1e-4)
        x[:, 12:] = 0.0
        cln = CompensatedLayerNorm.from_parts(16, keep, torch.zeros(16), None, None, None, False, False, centered=False)
        assert cln.eps is None
        with torch.no_grad():
            expected, got = norm(x.to(dtype)), cln(x[:, :12].to(dtype))
        assert torch.equal(got, expected[:, :12]) if dtype == torch.float16 else torch.allclose(got, expected[:, :12], rtol=1e-12, atol=0)


def test_narrowing_twice_merges_the_removed_statistics():
    """A compensated norm narrowed again (the next Squeeze-Release cycle) equals the norm
    narrowed once by the union of the removals."""
    d = 20
    norm, reader, keep, constants, x = _setup(d, 0, False, 2)
    constants = constants + 50.0
    first = torch.tensor([1, 4, 9, 15])
    keep1 = torch.tensor([i for i in range(d) if i not in first.tolist()])
    once = CompensatedLayerNorm.from_parts(d, keep1, constants, 1e-5, norm.weight, norm.bias, False, False)
    keep2_local = torch.tensor([i for i in range(len(keep1)) if i not in (0, 7, 11)])
    twice = once.narrowed(keep2_local, constants[keep1], False, False, False)
    direct = CompensatedLayerNorm.from_parts(d, keep1[keep2_local], constants, 1e-5, norm.weight, norm.bias, False, False)
    assert twice.kept == direct.kept and twice.total == d
    assert twice.removed_m2 == pytest.approx(direct.removed_m2, rel=1e-12)
    assert twice.removed_sum == pytest.approx(direct.removed_sum, rel=1e-12)
    xs = torch.randn(3, d, dtype=torch.float64) + 50
    with torch.no_grad():
        assert torch.allclose(twice(xs[:, keep1[keep2_local]]), direct(xs[:, keep1[keep2_local]]), rtol=1e-12, atol=1e-12)


def test_modules_pickled_before_removed_m2_still_run():
    import pickle

    norm, reader, keep, constants, x = _setup(10, 3, False, 3)
    cln = CompensatedLayerNorm.replacing(norm, keep, constants, False, False)
    expected = cln(x[..., keep])
    del cln.__dict__["removed_m2"]  # as an older srfx pickled it
    again = pickle.loads(pickle.dumps(cln))
    assert torch.allclose(again(x[..., keep]), expected, rtol=1e-10, atol=1e-12)
