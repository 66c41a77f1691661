"""mask: magnitude masks (plain and structure-aware scores) and unit masks (whole inputs)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import srfx
from helpers import assert_untouched, snapshot
from srfx.passes import apply_masks, mask
from srfx.passes.mask import magnitude_masks, masks_sparsity, prunable_parameters, unit_masks, unit_score


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def _zeros(masks):
    return sum(int((~m).sum()) for m in masks.values())


def test_prunable_defaults_and_include():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    assert set(prunable_parameters(m)) == {"0.weight", "3.weight"}
    assert set(prunable_parameters(m, ["*.bias"])) == {"0.weight", "3.weight", "0.bias", "1.bias", "3.bias"}
    assert set(prunable_parameters(m, ["1.weight"])) == {"0.weight", "3.weight", "1.weight"}


def test_tied_weights_count_once_and_frozen_ones_not_at_all():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    m[2].weight = m[0].weight  # one tensor under two names: ranked (and released) once
    m[4].weight.requires_grad_(False)  # frozen by the user: nothing could recover or train it
    assert list(prunable_parameters(m)) == ["0.weight"]
    assert set(magnitude_masks(m, 0.5)) == {"0.weight"}


def test_a_callable_score_of_zero_ranks_low_but_is_no_reason_to_prune():
    """Live weights a score rates 0 are pruned only as far as the sparsity asks (exact zeros
    always count as pruned and go first)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        m[0].weight[0] = 0
    positive_first = lambda name, w: w.clamp_min(0)  # noqa: E731 - 0 for about half the weights
    for scope in ("global", "layer"):
        assert _zeros(magnitude_masks(m, 0.0, score=positive_first, scope=scope)) == 8  # the zero row only
        for sparsity in (0.1, 0.3):
            masks = magnitude_masks(m, sparsity, score=positive_first, scope=scope)
            assert abs(masks_sparsity(masks) - sparsity) < 0.05, (scope, sparsity)
            assert not masks["0.weight"][0].any()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.77, 0.95])
def test_global_prunes_exactly_the_smallest(sparsity):
    m = _mlp()
    masks = magnitude_masks(m, sparsity)
    total = sum(p.numel() for p in prunable_parameters(m).values())
    assert _zeros(masks) == int(sparsity * total)
    if 0 < sparsity:
        kept = torch.cat([p.detach().abs()[masks[n]] for n, p in prunable_parameters(m).items()])
        gone = torch.cat([p.detach().abs()[~masks[n]] for n, p in prunable_parameters(m).items()])
        assert gone.max() <= kept.min()


def test_ties_never_prune_more_than_asked():
    m = nn.Linear(10, 10)
    with torch.no_grad():
        m.weight.fill_(0.5)
    assert _zeros(magnitude_masks(m, 0.37)) == 37


def test_layer_scope_and_existing_masks_are_a_schedule():
    m = _mlp()
    masks = magnitude_masks(m, 0.5, scope="layer")
    for n, p in prunable_parameters(m).items():
        assert int((~masks[n]).sum()) == int(0.5 * p.numel())
    more = magnitude_masks(m, 0.8, existing=masks)
    assert all(not (more[n] & ~masks[n]).any() for n in masks)  # nothing pruned comes back
    assert masks_sparsity(more) == pytest.approx(0.8, abs=1e-2)


def test_zero_weights_count_as_pruned():
    m = _mlp()
    with torch.no_grad():
        m[0].weight[:3] = 0
    masks = magnitude_masks(m, 0.0)
    assert not masks["0.weight"][:3].any() and masks["0.weight"][3:].all()


def test_unit_score_kills_a_weak_row_first_where_magnitude_does_not():
    torch.manual_seed(0)
    m = nn.Linear(20, 10, bias=False)
    with torch.no_grad():
        m.weight.uniform_(0.2, 2.0)
        m.weight[4] = 0.3  # a weak unit: small everywhere, but not the smallest weights
    s = 1 / 10
    plain = magnitude_masks(m, s)["weight"]
    unit = magnitude_masks(m, s, score="unit")["weight"]
    assert not unit[4].any() and unit[torch.arange(10) != 4].all()
    assert plain[4].any()  # plain magnitude spreads the zeros over many rows
    assert unit_score(torch.zeros(3, 3)).eq(0).all()


def test_callable_score_and_bad_arguments():
    m = _mlp()
    first_cols = lambda name, w: torch.arange(w.shape[1]).expand_as(w).float() + 1  # noqa: E731
    masks = magnitude_masks(m, 0.1, score=first_cols)
    assert not masks["0.weight"][:, 0].any()
    with pytest.raises(ValueError):
        magnitude_masks(m, 0.1, score=lambda n, w: w[0])
    with pytest.raises(ValueError):
        magnitude_masks(m, 0.1, score="nope")
    with pytest.raises(ValueError):
        magnitude_masks(m, 1.0)
    with pytest.raises(ValueError):
        magnitude_masks(m, 0.1, scope="row")


def test_mask_copies():
    m = _mlp()
    before = snapshot(m)
    out, masks = mask(m, 0.6, score="unit")
    assert_untouched(m, before)
    assert all(torch.equal(p.detach() == 0, ~masks[n]) | (p.detach() == 0).all() for n, p in prunable_parameters(out).items() if n in masks)


def test_unit_masks_remove_whole_columns_and_reach_the_target():
    m = _mlp()
    masks = unit_masks(m, 0.4)
    total = sum(k.numel() for k in masks.values())
    for n, k in masks.items():
        cols = k.all(0) | ~k.any(0)
        assert cols.all(), n  # each column is kept whole or removed whole
        assert k.any(0).sum() >= 1
    assert _zeros(masks) >= int(0.4 * total)
    assert _zeros(masks) < int(0.4 * total) + 16  # at most one column (of <= 16 rows) beyond it


def test_unit_masks_take_constant_inputs_first_and_compensate_exactly():
    m = _mlp().eval()
    x = torch.randn(256, 12)
    x[:, [2, 7]] = torch.tensor([0.8, -1.5])  # two inputs that never change
    ref = m(x).detach()
    before = snapshot(m)
    w = m[0].weight.numel()
    total = sum(p.numel() for p in prunable_parameters(m).values())
    masks = unit_masks(m, 2 * 16 / total, calibration_batch=x, layers=["0"])
    assert_untouched(m, before)  # without compensate the model is not touched
    assert sorted(torch.nonzero(~masks["0.weight"].any(0)).flatten().tolist()) == [2, 7]
    masks = unit_masks(m, 2 * 16 / total, calibration_batch=x, layers=["0"], compensate=True)
    apply_masks(m, masks)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)  # the constants went into the bias
    small = srfx.compress(m, x[:4])
    assert next(l for l in small.modules() if isinstance(l, nn.Linear)).in_features == 10
    assert w  # (the first layer had 12 inputs)


def test_unit_masks_hidden_units_and_min_inputs():
    m = _mlp().eval()
    masks = unit_masks(m, 0.9, layers=["2", "4"], min_inputs=3)
    assert masks["0.weight"].all()
    assert int(masks["2.weight"].any(0).sum()) == 3 and int(masks["4.weight"].any(0).sum()) == 3
    apply_masks(m, masks)
    small = srfx.compress(m, torch.randn(2, 12))
    assert [l.out_features for l in small.modules() if isinstance(l, nn.Linear)] == [3, 3, 3]
    with pytest.raises(ValueError):
        unit_masks(m, 0.5, layers=["1"])
    with pytest.raises(ValueError):
        unit_masks(m, 0.5, compensate=True)


def test_unit_pruner_hands_back_the_masks_it_does_not_own():
    """A cycle pruning biases too (include=("*.bias",)) passes their masks in; the unit
    pruner masks weights only, and must return the bias masks or the biases train back."""
    from srfx.cycle import unit_pruner

    m = _mlp()
    x = torch.randn(64, 12)
    bias_mask = torch.ones(16, dtype=torch.bool)
    bias_mask[:5] = False
    for pruner in (unit_pruner(), unit_pruner(x), unit_pruner(x, loss=lambda model: float(model(x).detach().pow(2).mean()))):
        out = pruner(m, 0.3, {"0.bias": bias_mask})
        assert torch.equal(out["0.bias"], bias_mask)
        assert masks_sparsity({k: v for k, v in out.items() if k.endswith("weight")}) > 0.2


def test_a_weight_tied_to_an_embedding_is_masked_once():
    """A language model's output Linear shares the Embedding's weight (registered first):
    prunable_parameters names it by the Linear, named_parameters() only by the Embedding, and
    apply_masks raised a bare KeyError."""
    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc, self.head = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(torch.relu(self.fc(self.emb(x))))

    model = TinyLM().eval()
    out, masks = mask(model, 0.5)
    assert out.head.weight is out.emb.weight
    assert masks_sparsity(masks) == pytest.approx(0.5, abs=0.01)
    assert torch.equal(out.emb.weight != 0, masks["head.weight"].bool()), "the one tensor carries its mask"
    srfx.compress(model, torch.randint(0, 20, (2, 5)), sparsity=0.5)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, float("nan")])
def test_argument_errors_are_srfx_input_errors(sparsity):
    """The README says every error is an SrfxError; argument checks raised plain ValueError
    (InputError is also a ValueError, so older handlers still catch it)."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with pytest.raises(srfx.InputError):
        srfx.compress(model, torch.randn(2, 4), sparsity=sparsity)
    with pytest.raises(ValueError):
        mask(model, sparsity)
    from srfx.passes import release

    with pytest.raises(srfx.InputError, match="finite"):
        release(model, scale=float("inf"))
