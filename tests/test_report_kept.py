"""compress's report says which entries of each parameter survived (report.kept), so a training
loop can slice its optimizer state; parameters that are not slices of the model's own are left
out rather than described wrongly."""
from __future__ import annotations

import torch
import torch.nn as nn

import srfx


def _sliced(t: torch.Tensor, axes: dict) -> torch.Tensor:
    for axis, keep in axes.items():
        t = t.index_select(axis, keep)
    return t


def test_kept_names_the_surviving_rows_columns_and_gathered_inputs():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        m[0].weight[:, [1, 4]] = 0  # inputs nobody reads: a gather drops them
        m[0].weight[2] = 0  # a hidden unit whose relu(bias) is folded into layer 2's bias
        m[2].weight[:, 5] = 0  # a hidden unit nobody reads
    small = srfx.compress(m, torch.randn(4, 10))
    kept = small.meta[srfx.REPORT_KEY].kept
    assert kept["0.weight"][1].tolist() == [0, 2, 3, 5, 6, 7, 8, 9]
    assert kept["0.weight"][0].tolist() == [0, 1, 3, 4, 6, 7] and kept["0.bias"][0].tolist() == [0, 1, 3, 4, 6, 7]
    assert kept["2.weight"][1].tolist() == [0, 1, 3, 4, 6, 7]
    assert "4.weight" not in kept  # nothing of the last layer went
    before = dict(m.named_parameters())
    for name, p in small.named_parameters():
        if name in kept and name.endswith("weight"):  # weights are pure slices
            assert torch.equal(_sliced(before[name].detach(), kept[name]), p.detach()), name


class _Stream(nn.Module):
    """embed -> LayerNorm -> head: dead embed channels leave through compensate_ln, which gives
    the head extra columns (a new tensor, not a slice)."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm, self.head = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.norm(self.embed(x)))


def test_kept_leaves_out_what_compensation_rebuilt():
    torch.manual_seed(0)
    m = _Stream().eval()
    with torch.no_grad():
        m.embed.weight[[2, 5]] = 0
        m.embed.bias[[2, 5]] = 0
    small = srfx.compress(m, torch.randn(4, 6))
    report = small.meta[srfx.REPORT_KEY]
    assert report.compensated_norms == 1
    before, after = dict(m.named_parameters()), dict(small.named_parameters())
    for name, axes in report.kept.items():  # every listed entry describes the result's shape
        assert _sliced(before[name].detach(), axes).shape == after[name].shape, name
    stream = [0, 1, 3, 4, 6, 7]
    for name in ("embed.weight", "embed.bias", "norm.weight", "norm.bias"):
        assert report.kept[name][0].tolist() == stream, name
    # the head reads the 6 kept channels plus a column the compensated norm emits: rebuilt
    assert after["head.weight"].shape == (3, 7) and "head.weight" not in report.kept


def test_a_users_optimizer_follows_the_compress():
    """carry_optimizer_state with the report's kept: the momentum of every surviving entry is
    the old momentum of that entry; the compressed model then trains on with it."""
    from srfx.cycle import carry_optimizer_state

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    with torch.no_grad():
        m[0].weight[:, [1, 4]] = 0
        m[2].weight[:, 5] = 0
    small = srfx.compress(m.eval(), x[:4])
    kept = small.meta[srfx.REPORT_KEY].kept
    new = torch.optim.SGD(small.parameters(), lr=0.1, momentum=0.9)
    assert carry_optimizer_state(opt, new, m, small, kept) == len(list(small.parameters()))
    before = dict(m.named_parameters())
    for name, p in small.named_parameters():
        expect = _sliced(opt.state[before[name]]["momentum_buffer"], kept.get(name, {}))
        assert torch.equal(new.state[p]["momentum_buffer"], expect), name
    new.zero_grad()
    nn.functional.cross_entropy(small(x), y).backward()
    new.step()  # shapes agree: the carried state trains
    partial = torch.optim.SGD([small.get_parameter("4.weight")], lr=0.1, momentum=0.9)  # the user trains the head only
    assert carry_optimizer_state(opt, partial, m, small, kept) == 1
    assert list(partial.state) == [small.get_parameter("4.weight")]
    partial.state_dict()  # every state entry is a parameter the optimizer holds


def test_a_bias_that_batchnorm_folding_created_is_not_the_models():
    """conv (no bias) -> BN: folding gives the conv a bias the model never had; kept lists only
    the model's own parameters (found by the never-larger property)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()
    with torch.no_grad():
        m[0].weight[[1, 4]] = 0
        m[1].running_var.uniform_(0.5, 2.0)
    small = srfx.compress(m, torch.randn(2, 3, 8, 8))
    kept = small.meta[srfx.REPORT_KEY].kept
    assert "0.bias" in dict(small.named_parameters()) and "0.bias" not in kept
    assert kept["0.weight"][0].tolist() == [0, 2, 3, 5] and kept["3.weight"][1].tolist() == [0, 2, 3, 5]
    assert set(kept) <= set(dict(m.named_parameters()))


def test_the_plan_table_says_how_many_groups_stay_whole_and_why():
    """The table lists groups that can shrink; the ones kept whole were invisible in it."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    with torch.no_grad():
        m[0].weight[:3] = 0
    text = str(srfx.plan(m, torch.randn(1, 3, 8, 8)))
    assert "kept whole (1 group): 1 x axis (1,) of input_1 is not traced to a channel source" in text


def _trained_adam(model, x):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    return opt


def test_rebuilt_tensors_start_fresh_even_when_their_shape_did_not_change():
    """A LayerNorm reader rebuilt by compensation can keep its shape (two channels out, u and v
    in): its old state was carried whole onto shifted columns. A conv BatchNorm was folded into
    holds W * gamma / sigma: its old moments are in the units of W. Both are named in
    report.rebuilt and get no state (kept still says which rows of the conv survived)."""
    from srfx.cycle import carry_optimizer_state

    class Stream(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.norm, self.head = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.norm(self.embed(x)))

    torch.manual_seed(0)
    m = Stream()
    opt = _trained_adam(m, torch.randn(16, 6))
    with torch.no_grad():
        m.embed.weight[[2, 5]] = 0
        m.embed.bias[[2, 5]] = torch.tensor([0.7, -1.3])
        m.norm.weight.mul_(torch.linspace(0.5, 1.5, 8))
    small = srfx.compress(m.eval(), torch.randn(4, 6))
    report = small.meta[srfx.REPORT_KEY]
    assert small.head.weight.shape == m.head.weight.shape and report.compensated_norms == 1
    assert "head.weight" in report.rebuilt and "head.weight" not in report.kept
    new = torch.optim.Adam(small.parameters(), lr=1e-3)
    carry_optimizer_state(opt, new, m, small, report.kept, report.rebuilt)
    assert small.head.weight not in new.state and small.embed.weight in new.state

    torch.manual_seed(1)
    cnn = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, 2))
    x = torch.randn(4, 3, 8, 8)
    opt = _trained_adam(cnn, x)
    with torch.no_grad():
        cnn[1].running_var.uniform_(0.5, 2.0)
    small = srfx.compress(cnn.eval(), x)
    report = small.meta[srfx.REPORT_KEY]
    assert {"0.weight", "0.bias"} <= set(report.rebuilt)
    new = torch.optim.Adam(small.parameters(), lr=1e-3)
    carry_optimizer_state(opt, new, cnn, small, report.kept, report.rebuilt)
    assert small.get_parameter("0.weight") not in new.state and small.get_parameter("4.weight") in new.state
