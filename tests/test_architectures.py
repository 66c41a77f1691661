"""Every coupling pattern: exact, never larger, smaller where channels are dead, idempotent,
and the user's model untouched."""
import pytest
import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

import srfx
from architectures import CASES
from helpers import assert_close, assert_untouched, kill_channels, report, snapshot


def _outputs(m, inputs):
    with torch.no_grad():
        return pytree.tree_leaves(m(*inputs))


@pytest.mark.parametrize("name", sorted(CASES))
def test_compress_is_exact_never_larger_idempotent_and_leaves_model_alone(name):
    torch.manual_seed(0)
    cls, make_inputs = CASES[name]
    model = kill_channels(cls(), rate=0.35, seed=1).eval()
    inputs = make_inputs()
    before = snapshot(model)
    small = srfx.compress(model, inputs)
    assert_untouched(model, before)
    r = report(small)
    assert r.stored_after <= r.stored_before
    fresh = tuple(torch.randn_like(t) for t in inputs)
    for e, a in zip(_outputs(model, fresh), _outputs(small, fresh)):
        assert_close(e, a)
    again = report(srfx.compress(small, inputs))
    assert again.stored_after == again.stored_before, "a second compress removed more"


@pytest.mark.parametrize("name", ["residual", "concat", "split_shuffle", "se_gating", "conv1d", "upsample", "mlp", "shared_module", "multi_io"])
def test_dead_channels_make_it_smaller(name):
    torch.manual_seed(0)
    cls, make_inputs = CASES[name]
    model = kill_channels(cls(), rate=0.35, seed=1).eval()
    r = report(srfx.compress(model, make_inputs()))
    assert r.stored_after < r.stored_before


def test_float64_is_tight():
    torch.manual_seed(0)
    model = kill_channels(CASES["residual"][0](), rate=0.4, seed=3).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    small = srfx.compress(model, x)
    with torch.no_grad():
        e, a = model(x), small(x)
    assert (e - a).abs().max().item() <= 1e-10 * e.abs().max().item()


def test_unknown_op_is_a_barrier_that_keeps_its_channels():
    from architectures import ChannelMixing

    model = kill_channels(ChannelMixing(), rate=0.5, seed=0).eval()
    coupling = srfx.analyze(model, torch.randn(1, 3, 4, 4))
    assert any("cumsum" in reason for reason in coupling.barriers.values())
    small = srfx.compress(model, torch.randn(1, 3, 4, 4))
    assert small.a.out_channels == 8  # a's channels flow into cumsum: kept


def test_inplace_write_read_again_is_kept_whole():
    from architectures import InplaceAlias

    model = InplaceAlias().eval()
    with torch.no_grad():
        model.a.weight[2] = 0  # a constant channel that relu_ changes in place
    small = srfx.compress(model, torch.randn(3, 5))
    assert small.a.out_features == 8


def test_tied_weights_stay_tied():
    from architectures import TiedMLP

    model = TiedMLP().eval()
    with torch.no_grad():
        model.fc3.weight[:, 4] = 0  # unit 4 of fc2 unread; fc1 shares the weight
    small = srfx.compress(model, torch.randn(3, 10))
    assert small.fc1.weight is small.fc2.weight


def test_tied_readers_of_model_inputs_get_no_gather():
    """Two Linears share one weight and read two model inputs; a column zero in the shared
    weight is unread by both, but gathering it for one reader would slice the other's tensor
    (tied names count on both sides of the tie): both keep the full width, and stay tied."""

    class TiedInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 4)
            self.b.weight = self.a.weight

        def forward(self, x, z):
            return self.a(x) + self.b(z)

    model = TiedInputs().eval()
    with torch.no_grad():
        model.a.weight[:, 2] = 0
    x, z = torch.randn(3, 6), torch.randn(3, 6)
    small = srfx.compress(model, (x, z))
    assert small.a.weight is small.b.weight and small.a.weight.shape == (4, 6)
    assert not any("gather" in n for n, _ in small.named_buffers())
    torch.testing.assert_close(small(x, z), model(x, z))
