"""Group pruning: whole atoms masked from the coupling analysis are removed by compress."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import srfx
from helpers import assert_close, report
from srfx.group_pruning import group_masks, group_pruner
from srfx.passes import apply_masks


def _masked_weight_entries(model, masks):
    weights = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    return sum(int((~m).sum()) for n, m in masks.items() if n.rsplit(".", 1)[0] in weights and n.endswith("weight"))


@pytest.mark.parametrize("sparsity", [0.3, 0.6])
def test_every_masked_weight_leaves_an_mlp(sparsity):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    x = torch.randn(4, 12)
    masks = group_masks(model, x, sparsity)
    masked = _masked_weight_entries(model, masks)
    total = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
    assert masked >= sparsity * total
    apply_masks(model, masks)
    small = srfx.compress(model, x)
    r = report(small)
    assert r.params_after <= r.params_before - masked  # whole atoms: nothing masked stays
    assert_close(model(x), small(x))


timm = pytest.importorskip("timm")


def test_convnext_streams_shrink_by_what_was_masked():
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)  # nonzero biases and norm shifts: pruned atoms must take them too
    x = torch.randn(1, 3, 32, 32)
    masks = group_masks(model, x, 0.5)
    masked = _masked_weight_entries(model, masks)
    apply_masks(model, masks)
    small = srfx.compress(model, x)
    r = report(small)
    assert r.params_after <= r.params_before - masked
    assert r.compensated_norms > 0
    assert small.get_submodule("stem.0").out_channels < 40  # the stage-0 stream itself narrowed
    assert_close(model(x), small(x))


def test_group_pruner_keeps_earlier_masks():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(2, 6)
    prune = group_pruner(x)
    first = prune(model, 0.25, {})
    second = prune(model, 0.5, first)
    for name, m in first.items():
        assert (second[name] <= m).all(), "a masked weight never comes back"


def test_no_group_is_pruned_to_nothing_and_scales_do_not_decide():
    """A stream whose weights are 100x smaller than the rest (another init scale) is not
    emptied first: scores are relative to their group, and every group keeps an atom even at a
    sparsity that would take everything (a stream pruned away makes the output constant)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[2].weight.mul_(0.01)  # the 16-unit layer's rows: its group scores low overall
        model[4].weight.mul_(0.01)
    x = torch.randn(64, 8)
    alive = lambda masks, name, axis: int(masks[name].any(axis).sum())  # noqa: E731
    masks = group_masks(model, x, 0.3)
    assert alive(masks, "2.weight", 1) >= 12  # 16 units, roughly 30% of them at most
    plain = group_masks(model, x, 0.3, normalize=False)
    assert alive(plain, "2.weight", 1) < alive(masks, "2.weight", 1)  # raw RMS empties the small group
    everything = group_masks(model, x, 0.999)
    assert alive(everything, "2.weight", 1) >= 1 and alive(everything, "0.weight", 1) >= 1
    apply_masks(model, everything)
    small = srfx.compress(model, x[:4])
    assert small(x).std(0).sum() > 0  # the output still depends on the input
    assert_close(model(x), small(x))
