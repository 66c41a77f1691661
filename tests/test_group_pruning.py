"""Group pruning: whole atoms masked from the coupling analysis are removed by compress."""
from __future__ import annotations

import copy

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


def test_whole_attention_heads_are_units_and_leave():
    """A head is pruned whole (its q, k and v rows, its columns of the output projection),
    at least one per attention stays, and compress removes the pruned heads exactly."""
    from test_attention_heads import Attention, _random

    model = _random(nn.Sequential(Attention(d=12, heads=4, dk=3, dv=3), nn.Linear(12, 2)).eval(), 0)
    with torch.no_grad():
        model[0].v.weight[3:6] *= 0.01  # head 1 is by far the weakest
    x = torch.randn(2, 5, 12)
    masks = group_masks(model, x, 0.05)
    dead = [h for h in range(4) if not masks["0.v.weight"][3 * h : 3 * h + 3].any()]
    assert dead == [1]
    for name in ("0.q.weight", "0.k.weight", "0.v.weight"):
        assert not masks[name][3:6].any() and masks[name][[0, 6, 9]].all()
    assert not masks["0.o.weight"][:, 3:6].any()
    apply_masks(model, masks)
    small = srfx.compress(model, x)
    assert report(small).heads == (("scaled_dot_product_attention", 4, 3),)
    assert_close(model(x), small(x))
    assert_close(model(x + 1), small(x + 1))
    masks = group_masks(model, x, 0.99)  # as far as it goes: one head stays
    assert sum(bool(masks["0.v.weight"][3 * h : 3 * h + 3].any()) for h in range(4)) == 1


class _MhaStream(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.attn, self.fc = nn.Linear(8, 16), nn.MultiheadAttention(16, 4, batch_first=True), nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.fc(h + self.attn(h, h, h, need_weights=False)[0])


def test_multihead_attention_units_own_their_in_proj_weight_slices():
    """srfx traces nn.MultiheadAttention decomposed (q/k/v projections of its own); the units
    own the rows and columns of the model's in_proj_weight they copy, so every masked weight
    leaves, the streams' and the heads' alike."""
    torch.manual_seed(0)
    model = _MhaStream().eval()
    with torch.no_grad():
        for block in (4, 20, 36):  # head 1's q, k and v rows
            model.attn.in_proj_weight[block : block + 4] *= 0.01
    x = torch.randn(2, 5, 8)
    masks = group_masks(model, x, 0.3)
    assert not masks["attn.in_proj_weight"][[*range(4, 8), *range(20, 24), *range(36, 40)]].any()
    assert (~masks["attn.in_proj_weight"]).all(0).any()  # a stream channel's column too
    masked = sum(int((~m).sum()) for m in masks.values())
    apply_masks(model, masks)
    small = srfx.compress(model, x)
    r = report(small)
    assert r.heads == (("scaled_dot_product_attention", 4, 3),)
    assert r.params_after <= r.params_before - masked
    assert_close(model(x), small(x))


timm = pytest.importorskip("timm")


def test_a_weak_head_of_a_timm_vit_is_pruned_whole_and_leaves():
    """timm's fused qkv projection (one Linear, heads split by reshape and permute)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1, num_classes=10).eval()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[64:128] *= 0.01  # head 1's queries
        model.blocks[0].attn.qkv.weight[256:320] *= 0.01  # ... and keys
        model.blocks[0].attn.qkv.weight[448:512] *= 0.01  # ... and values
    x = torch.randn(2, 3, 32, 32)
    masks = group_masks(model, x, 0.05)
    assert not masks["blocks.0.attn.qkv.weight"][[*range(64, 128), *range(256, 320), *range(448, 512)]].any()
    apply_masks(model, masks)
    small = srfx.compress(model, x)
    assert report(small).heads == (("scaled_dot_product_attention", 3, 2),)
    assert_close(model(x), small(x))


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


def test_taylor_cost_is_the_first_order_loss_change_per_weight():
    """cost * weights freed = |d loss / d t| for shrinking the atom's slices by (1 - t): checked
    against a central finite difference in float64 (relative tolerance 1e-4)."""
    from srfx.group_pruning import atom_table, taylor_costs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    atoms = atom_table(model, x[:1])
    costs = taylor_costs(model, atoms, nn.functional.cross_entropy, [(x, y)])
    params = dict(model.named_parameters())
    hidden = [a for a, owned in atoms.slices.items() if ("0.weight", 0, 0) in owned or any(n == "2.weight" and ax == 1 for n, ax, _ in owned)]
    assert hidden
    for atom in hidden:
        owned = atoms.slices[atom]
        freed = sum(params[n].select(ax, i).numel() for n, ax, i in owned if n.endswith("weight"))

        def loss_at(t):
            trial = copy.deepcopy(model)
            tp = dict(trial.named_parameters())
            with torch.no_grad():
                for n, ax, i in owned:
                    tp[n].select(ax, i).mul_(1 - t)
                return float(nn.functional.cross_entropy(trial(x), y))

        h = 1e-4
        slope = (loss_at(h) - loss_at(-h)) / (2 * h)
        assert costs[atom] * freed == pytest.approx(abs(slope), rel=1e-4, abs=1e-12)


def test_loss_measured_costs_keep_the_unit_the_loss_needs():
    """Unit 0 alone carries the target but has small input weights; relative weight size
    prunes it first, the loss-measured cost keeps it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.normal_(0, 1.0)
        model[0].weight[0] = torch.tensor([0.05, 0.05, 0.05, 0.05])
        model[0].bias.fill_(0.1)
        model[2].weight.normal_(0, 0.01)
        model[2].weight[0, 0] = 1.0
        model[2].bias.zero_()
    x = torch.randn(256, 4).abs()
    with torch.no_grad():
        y = model[2].weight[0, 0] * torch.relu(model[0](x))[:, :1]
    mse = lambda out, target: ((out - target) ** 2).mean()  # noqa: E731
    unit0_alive = lambda masks: bool(masks["0.weight"][0].any())  # noqa: E731
    assert not unit0_alive(group_masks(model, x[:1], 0.2))
    prune = group_pruner(x[:1], loss=mse, batches=[(x[:128], y[:128]), (x[128:], y[128:])])
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # the user's accumulated gradients, the output bias's too (in no atom)
    masks = prune(model.train(), 0.5, {})
    assert unit0_alive(masks)
    assert int(masks["0.weight"].any(1).sum()) <= 5  # and it still pruned half the units
    assert model.training  # left as found
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_group_pruner_wants_loss_and_batches_together_and_some_batches():
    with pytest.raises(ValueError, match="loss and batches together"):
        group_pruner(torch.randn(1, 4), loss=nn.functional.mse_loss)
    with pytest.raises(ValueError, match="batches is empty"):  # else every cost is unknown: nothing would be pruned
        group_pruner(torch.randn(1, 4), loss=nn.functional.mse_loss, batches=iter([]))
    from srfx.group_pruning import atom_table, taylor_costs

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(ValueError, match="no batches"):
        taylor_costs(model, atom_table(model, torch.randn(1, 4)), nn.functional.mse_loss, [])


def test_taylor_costs_see_frozen_parameters():
    """A frozen layer's units cost what they compute: the costs with requires_grad off are the
    costs with it on, under no_grad too, and the flags come back as they were."""
    from srfx.group_pruning import atom_table, taylor_costs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    atoms = atom_table(model, x[:1])
    live = taylor_costs(model, atoms, nn.functional.cross_entropy, [(x, y)])
    for p in model[0].parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        frozen = taylor_costs(model, atoms, nn.functional.cross_entropy, [(x, y)])
    assert frozen == pytest.approx(live, rel=1e-6)
    assert not any(p.requires_grad for p in model[0].parameters()) and all(p.requires_grad for p in model[2].parameters())


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x, z):
        return self.head(torch.relu(self.a(x) + self.b(z)))


def test_taylor_costs_take_a_tuple_of_positional_inputs():
    """A batch's inputs as a tuple are the model's positional inputs, as for compress: the
    costs equal those of the same model wrapped to take one concatenated tensor."""
    from srfx.group_pruning import Atoms, atom_table, taylor_costs

    torch.manual_seed(0)
    model = _TwoInputs()
    x, z, y = torch.randn(16, 4), torch.randn(16, 3), torch.randint(0, 2, (16,))
    atoms = atom_table(model, (x[:1], z[:1]))
    costs = taylor_costs(model, atoms, nn.functional.cross_entropy, [((x, z), y)])
    assert costs and all(c >= 0 for c in costs.values())

    class Joined(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, xz):
            return self.inner(xz[:, :4], xz[:, 4:])

    joined = Joined(model)
    renamed = Atoms({a: [("inner." + n, ax, i) for n, ax, i in owned] for a, owned in atoms.slices.items()}, atoms.group)
    assert taylor_costs(joined, renamed, nn.functional.cross_entropy, [(torch.cat([x, z], 1), y)]) == pytest.approx(costs, rel=1e-6)
