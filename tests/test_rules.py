"""One test (or a few) per channel rule: what it couples, reads, writes, mixes or keeps."""
import pytest
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import srfx
from hypothesis import given, settings, strategies as st
from srfx.facts import ValueKey
from srfx.registry import lookup
from helpers import assert_close


class Wrap(nn.Module):
    """A model from a forward function and named submodules/parameters."""

    def __init__(self, fn, **parts):
        super().__init__()
        for name, part in parts.items():
            setattr(self, name, part)
        self._fn = fn

    def forward(self, x):
        return self._fn(self, x)


def group_of(coupling, owner, kind):
    for g in coupling.groups:
        if owner in getattr(g, kind):
            return g
    raise AssertionError(f"no group with {kind} {owner}")


def value_dims(coupling, node_name):
    return [d for d in coupling.dims if d.ref.value == ValueKey(node_name)]


# --- layers -------------------------------------------------------------------------------------
def test_linear_is_a_boundary_reader_of_input_writer_of_output():
    m = Wrap(lambda s, x: s.b(F.relu(s.a(x))), a=nn.Linear(4, 6), b=nn.Linear(6, 3))
    c = srfx.analyze(m, torch.randn(2, 4))
    hidden = group_of(c, "a", "writers")
    assert hidden.readers == ("b",) and hidden.channels == 6
    assert group_of(c, "b", "writers").id != hidden.id


def test_depthwise_conv_is_a_per_channel_op_and_grouped_conv_reads_columns_across_groups():
    m = Wrap(lambda s, x: s.g(s.dw(s.pw(x))), pw=nn.Conv2d(3, 8, 1), dw=nn.Conv2d(8, 8, 3, padding=1, groups=8), g=nn.Conv2d(8, 4, 1, groups=2))
    c = srfx.analyze(m, torch.randn(1, 3, 5, 5))
    g = group_of(c, "pw", "writers")
    assert "dw" in g.ops and "g" in g.readers
    assert g.channels == 4  # input j of each of the 2 groups is one weight column: 8 channels, 4 atoms
    assert any("grouped conv" in r for r in group_of(c, "g", "writers").mixed)


def test_grouped_conv_loses_the_same_channels_in_every_group():
    m = Wrap(lambda s, x: s.out(F.relu(s.g(s.a(x)))), a=nn.Conv2d(3, 8, 1), g=nn.Conv2d(8, 6, 3, padding=1, groups=2), out=nn.Conv2d(6, 2, 1)).eval()
    with torch.no_grad():
        m.g.weight[:, 1] = 0  # input 1 of each group: channels 1 and 5 of a
        m.g.weight[:, 2, 0, 0] = 0  # only part of input 2: stays
        m.out.weight[:, [0, 3]] = 0  # output 0 of both groups (3 per group)
        m.out.weight[:, 4] = 0  # output 1 of group 1 only: stays
    small = srfx.compress(m, torch.randn(1, 3, 5, 5))
    assert (small.a.out_channels, small.g.in_channels, small.g.out_channels, small.g.groups) == (6, 6, 4, 2)


def test_depthwise_multiplier_couples_each_input_with_its_outputs():
    m = Wrap(lambda s, x: s.out(s.dw(s.pw(x))), pw=nn.Conv2d(3, 4, 1), dw=nn.Conv2d(4, 8, 3, padding=1, groups=4), out=nn.Conv2d(8, 2, 1))
    c = srfx.analyze(m, torch.randn(1, 3, 5, 5))
    assert group_of(c, "pw", "writers").channels == 4  # 8 outputs, 2 per input channel: 4 atoms


def test_conv_transpose_reads_axis_0_of_its_weight():
    m = Wrap(lambda s, x: s.out(s.up(s.a(x))), a=nn.Conv2d(3, 5, 1), up=nn.ConvTranspose2d(5, 4, 2, stride=2), out=nn.Conv2d(4, 2, 1))
    c = srfx.analyze(m, torch.randn(1, 3, 4, 4))
    assert "up" in group_of(c, "a", "writers").readers
    assert group_of(c, "up", "writers").channels == 4


def test_embedding_writes_its_columns():
    m = Wrap(lambda s, x: s.fc(s.emb(x)), emb=nn.Embedding(10, 6), fc=nn.Linear(6, 2))
    c = srfx.analyze(m, torch.randint(0, 10, (2, 3)))
    assert group_of(c, "emb", "writers").readers == ("fc",)


# --- elementwise ------------------------------------------------------------------------------
def test_residual_add_joins_both_operands():
    m = Wrap(lambda s, x: s.out(s.a(x) + s.b(x)), a=nn.Linear(4, 6), b=nn.Linear(4, 6), out=nn.Linear(6, 2))
    c = srfx.analyze(m, torch.randn(2, 4))
    assert set(group_of(c, "a", "writers").writers) == {"a", "b"}


def test_layer_scale_parameter_is_an_op_and_added_parameter_a_writer():
    m = Wrap(lambda s, x: s.out(s.a(x) * s.gamma + s.shift), a=nn.Linear(4, 6), out=nn.Linear(6, 2))
    m.gamma = nn.Parameter(torch.ones(6))
    m.shift = nn.Parameter(torch.zeros(6))
    g = group_of(srfx.analyze(m, torch.randn(2, 4)), "a", "writers")
    assert "gamma" in g.ops and "shift" in g.writers


def test_untracked_operand_fixes_the_group():
    m = Wrap(lambda s, x: s.out(s.a(x) + x[:, :1].expand(-1, 6)), a=nn.Linear(4, 6), out=nn.Linear(6, 2))
    g = group_of(srfx.analyze(m, torch.randn(2, 4)), "a", "writers")
    assert g.fixed is not None


# --- norms ----------------------------------------------------------------------------------------
def test_batchnorm_is_a_per_channel_op_and_zero_scale_is_constant():
    m = Wrap(lambda s, x: s.out(F.relu(s.bn(s.a(x)))), a=nn.Conv2d(3, 4, 1, bias=False), bn=nn.BatchNorm2d(4), out=nn.Conv2d(4, 2, 1))
    m.eval()
    with torch.no_grad():
        m.bn.weight[1] = 0
    c = srfx.analyze(m, torch.randn(1, 3, 4, 4))
    assert "bn" in group_of(c, "a", "writers").ops
    p = srfx.plan_removal(c)
    assert any(g.constant == 1 for g in p.groups)


def test_layernorm_mixes_all_channels_and_groupnorm_each_group():
    ln = Wrap(lambda s, x: s.out(s.ln(s.a(x))), a=nn.Linear(4, 6), ln=nn.LayerNorm(6), out=nn.Linear(6, 2))
    c = srfx.analyze(ln, torch.randn(2, 4))
    (mix,) = c.mixes
    assert np.all(mix.labels == 0) and len(mix.labels) == 6
    gn = Wrap(lambda s, x: s.out(s.gn(s.a(x))), a=nn.Conv2d(3, 6, 1), gn=nn.GroupNorm(3, 6), out=nn.Conv2d(6, 2, 1))
    c = srfx.analyze(gn, torch.randn(1, 3, 4, 4))
    (mix,) = c.mixes
    assert mix.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_groupnorm_removes_whole_groups_only():
    gn = Wrap(lambda s, x: s.out(s.gn(s.a(x))), a=nn.Conv2d(3, 6, 1), gn=nn.GroupNorm(3, 6), out=nn.Conv2d(6, 2, 1)).eval()
    with torch.no_grad():
        gn.out.weight[:, 2:4] = 0  # group 1 unread
        gn.out.weight[:, 4] = 0  # half of group 2: must stay
    small = srfx.compress(gn, torch.randn(1, 3, 4, 4))
    assert small.gn.num_groups == 2 and small.a.out_channels == 4


# --- data movement --------------------------------------------------------------------------------
def test_flatten_maps_a_channel_to_its_features():
    m = Wrap(lambda s, x: s.fc(torch.flatten(s.conv(x), 1)), conv=nn.Conv2d(3, 4, 1), fc=nn.Linear(4 * 9, 2)).eval()
    with torch.no_grad():
        m.fc.weight[:, 9:18] = 0  # every feature of channel 1
        m.fc.weight[:, 18] = 0  # one feature of channel 2: channel 2 stays
    small = srfx.compress(m, torch.randn(1, 3, 3, 3))
    assert small.conv.out_channels == 3 and small.fc.in_features == 27


def test_an_unflatten_module_between_flattens_shrinks_with_the_channels_it_carries():
    """nn.Unflatten splits the flat features back into channels: the rewrite resized the
    functional form only and raised RewriteError on the module."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Flatten(), nn.Unflatten(1, (8, 16)), nn.Flatten(), nn.Linear(128, 3)).eval()
    with torch.no_grad():
        m[0].weight[:4], m[0].bias[:4] = 0, -1.0  # relu(-1) = 0: channels 0-3 are zero, unread
    x = torch.randn(2, 3, 4, 4)
    small = srfx.compress(m, x)
    assert small.get_submodule("0").out_channels == 4 and small.get_submodule("5").in_features == 64
    assert not any(isinstance(mod, nn.Unflatten) for mod in small.modules())  # no stale (8, 16) left to print
    assert_close(m(x), small(x))


class ChannelPReLU(nn.Module):
    """A conv stream with one PReLU slope per channel, as a module and as F.prelu on a parameter."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 3)
        self.act = nn.PReLU(8)
        self.slope = nn.Parameter(torch.linspace(-0.5, 0.5, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = F.prelu(self.a(x), self.act.weight) if self.functional else self.act(self.a(x))
        h = F.prelu(self.b(h), self.slope)
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("functional", [False, True])
@given(seed=st.integers(0, 10_000))
@settings(max_examples=10, deadline=None)
def test_prelu_slopes_go_with_their_channels_and_fold_what_dead_channels_emit(functional, seed):
    """Dead channels with a negative or positive bias emit a constant PReLU bends by their own
    slope; that constant folds into the next bias and the channel leaves with its slope."""
    torch.manual_seed(seed)
    m = ChannelPReLU(functional).eval()
    with torch.no_grad():
        m.act.weight.uniform_(-1, 1)
        m.a.weight[[1, 4, 6]] = 0
        m.a.bias[[1, 4, 6]] = torch.tensor([-0.7, 0.3, -0.2])
        m.b.weight[[0, 3]] = 0
        m.b.bias[[0, 3]] = torch.tensor([-1.0, 2.0])
    x = torch.randn(2, 3, 6, 6)
    small = srfx.compress(m, x)
    assert small.a.out_channels == 5 and small.b.in_channels == 5 and small.b.out_channels == 2
    assert small.act.weight.numel() == 5 and small.slope.numel() == 2
    assert_close(m(x), small(x))
    assert_close(m(2 * x + 1), small(2 * x + 1))


def test_cat_offsets_and_split_sizes_follow_removed_channels():
    def fwd(s, x):
        y = torch.cat([s.a(x), s.b(x)], dim=1)
        p, q = torch.split(y, [3, 5], dim=1)
        return s.c(p) + s.d(q)

    m = Wrap(fwd, a=nn.Conv2d(2, 4, 1), b=nn.Conv2d(2, 4, 1), c=nn.Conv2d(3, 2, 1), d=nn.Conv2d(5, 2, 1)).eval()
    with torch.no_grad():
        m.c.weight[:, 1] = 0  # a's channel 1
        m.d.weight[:, 2] = 0  # cat channel 5 = b's channel 1
    small = srfx.compress(m, torch.randn(1, 2, 3, 3))
    assert small.a.out_channels == 3 and small.b.out_channels == 3


def test_heads_reshape_is_a_two_axis_dim():
    def fwd(s, x):
        b, n, c = x.shape
        h = s.a(x).reshape(b, n, 2, 3)
        return s.out((h * 2).reshape(b, n, 6))

    m = Wrap(fwd, a=nn.Linear(4, 6), out=nn.Linear(6, 2))
    c = srfx.analyze(m, torch.randn(2, 5, 4))
    assert any(d.ref.axes == (2, 3) and d.sizes == (2, 3) for d in c.dims)


_CHANNEL_INDEXING = {
    "slice": lambda h: h[:, 2:6],
    "ellipsis slice": lambda h: h[..., :4],
    "negative slice": lambda h: h[:, -4:],
    "step slice": lambda h: h[:, 1::2],
    "flipped then sliced": lambda h: h.flip(1)[:, :4],
    "list": lambda h: h[:, [0, 2, 5, 7]],
    "reorder": lambda h: h[:, [7, 6, 5, 4]],
    "repeated channel": lambda h: h[:, [1, 1, 3, 6]],
    "narrow": lambda h: h.narrow(1, 2, 4),
    "torch.narrow": lambda h: torch.narrow(h, -1, 3, 4),
}


@pytest.mark.parametrize("name", list(_CHANNEL_INDEXING))
def test_partial_or_reordered_channel_indexing_removes_exactly(name):
    """h[:, 2:6], h[:, [7, 6, 5, 4]], h.narrow(...): channels outside the index are unread and
    go, dead ones inside fold; the index is renumbered to the kept channels (an index_select)."""
    pick = _CHANNEL_INDEXING[name]
    m = Wrap(lambda s, x: s.out(pick(torch.relu(s.a(x)))), a=nn.Linear(6, 8), out=nn.Linear(4, 3)).eval()
    with torch.no_grad():
        m.a.weight[[0, 3, 6]] = 0
        m.a.bias[[0, 3, 6]] = torch.tensor([-1.0, 0.5, 0.7])  # dead: relu(-1) = 0, then constants
    read = sorted(set(pick(torch.arange(8)[None].expand(2, 8))[0].tolist()))
    live_read = [c for c in read if c not in (0, 3, 6)]
    small = srfx.compress(m, torch.randn(4, 6))
    assert small.a.out_features == len(live_read)
    for n in (1, 9):
        x = torch.randn(n, 6)
        assert torch.allclose(small(x), m(x), rtol=1e-5, atol=1e-6)


def test_channel_slice_with_spatial_crop_on_a_conv_stream():
    m = Wrap(lambda s, x: s.out(torch.relu(s.a(x))[:, 2:6, 1:, :3]), a=nn.Conv2d(3, 8, 1), out=nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        m.a.weight[[0, 3, 4]] = 0
        m.a.bias[[0, 3, 4]] = torch.tensor([-1.0, 0.5, -0.7])
    small = srfx.compress(m, torch.randn(2, 3, 5, 5))
    assert small.a.out_channels == 2 and small.out.in_channels == 2  # 2 and 5 of 2..5; 3 folds, 4 is zero
    x = torch.randn(3, 3, 5, 5)
    assert torch.allclose(small(x), m(x), rtol=1e-5, atol=1e-6)


def test_a_slice_read_next_to_the_whole_stream_keeps_what_either_reads():
    """The slice's input has another reader: channels outside the slice stay for it, and the
    slice is renumbered to where its channels now sit."""
    m = Wrap(lambda s, x: s.out(torch.relu(s.a(x))[:, 4:]) + s.full(torch.relu(s.a(x))), a=nn.Linear(6, 8), out=nn.Linear(4, 3), full=nn.Linear(8, 3)).eval()
    with torch.no_grad():
        m.a.weight[[1, 5]] = 0
        m.a.bias[[1, 5]] = torch.tensor([0.3, -2.0])
    small = srfx.compress(m, torch.randn(4, 6))
    assert small.a.out_features == 6
    x = torch.randn(5, 6)
    assert torch.allclose(small(x), m(x), rtol=1e-5, atol=1e-6)


def test_a_slice_feeding_a_layernorm_and_a_step_slice_of_a_residual_stream():
    """Slices next to the other stream machinery: a LayerNorm over sliced channels is
    compensated for the dead ones, and a step slice reads a residual stream exactly."""
    before_norm = Wrap(lambda s, x: s.out(s.ln(s.a(x)[..., 2:10])), a=nn.Linear(6, 12), ln=nn.LayerNorm(8), out=nn.Linear(8, 3))

    def residual(s, x):
        h = s.a(x)
        h = h + s.b(torch.relu(h))
        return s.out(h[:, ::3]) + s.full(h)

    stream = Wrap(residual, a=nn.Linear(6, 12), b=nn.Linear(12, 12), out=nn.Linear(4, 3), full=nn.Linear(12, 3))
    for m, compensated in ((before_norm, 1), (stream, 0)):
        m.eval()
        with torch.no_grad():
            for lin in (m.a, getattr(m, "b", None)):
                if lin is not None:
                    lin.weight[[3, 4, 7]] = 0
                    lin.bias[[3, 4, 7]] = torch.tensor([0.2, -0.4, 0.0])
        small = srfx.compress(m, torch.randn(4, 6))
        r = small.meta["srfx_report"]
        assert r.params_after < r.params_before and r.compensated_norms == compensated
        x = torch.randn(9, 6)
        assert_close(m(x), small(x))


def test_channel_indexing_srfx_cannot_rewrite_is_kept_with_its_reason():
    """Bounds computed in the graph, and a slice on a two-axis (heads x dims) channel dim."""
    m = Wrap(lambda s, x: s.out(s.a(x)[:, : x.shape[1] // 2]), a=nn.Linear(6, 6), out=nn.Linear(3, 2))
    g = group_of(srfx.analyze(m, torch.randn(2, 6)), "a", "writers")
    assert g.fixed is not None and "indexes channels" in g.fixed


# --- reductions, softmax, matmul -----------------------------------------------------------------
def test_spatial_mean_passes_channels_and_channel_mean_reads_them_all():
    m = Wrap(lambda s, x: s.out(s.a(x).mean((2, 3))) + s.a(x).mean(1).flatten(1).sum(1, keepdim=True), a=nn.Conv2d(3, 4, 1), out=nn.Linear(4, 1))
    c = srfx.analyze(m, torch.randn(1, 3, 2, 2))
    g = group_of(c, "a", "writers")
    assert g.readers == ("out",)
    assert any(c.group_of_dim[d] == g.id for d, _ in c.needs)


def test_softmax_over_channels_mixes_them():
    m = Wrap(lambda s, x: s.out(s.a(x).softmax(-1)), a=nn.Linear(4, 6), out=nn.Linear(6, 2))
    c = srfx.analyze(m, torch.randn(2, 4))
    assert any("softmax" in r for r in group_of(c, "a", "writers").mixed)


def test_matmul_contraction_reads_every_channel():
    m = Wrap(lambda s, x: s.a(x) @ s.b(x).transpose(0, 1), a=nn.Linear(4, 6), b=nn.Linear(4, 6))
    c = srfx.analyze(m, torch.randn(3, 4))
    g = group_of(c, "a", "writers")
    assert any(c.group_of_dim[d] == g.id and "contracted" in why for d, why in c.needs)


# --- shape queries ---------------------------------------------------------------------------------
def test_channel_count_in_arithmetic_is_kept_but_in_a_view_is_fine():
    arith = Wrap(lambda s, x: s.out(s.a(x) / s.a(x).shape[1]), a=nn.Linear(4, 6), out=nn.Linear(6, 2))
    assert group_of(srfx.analyze(arith, torch.randn(2, 4)), "a", "writers").fixed is not None
    view = Wrap(lambda s, x: s.out(s.a(x).view(x.shape[0], s.a(x).shape[1])), a=nn.Linear(4, 6), out=nn.Linear(6, 2))
    assert group_of(srfx.analyze(view, torch.randn(2, 4)), "a", "writers").fixed is None


# --- constants --------------------------------------------------------------------------------------
def test_zero_padded_conv_folds_only_zero_constants():
    def build(padding):
        m = Wrap(lambda s, x: s.c(F.relu(s.a(x))), a=nn.Conv2d(2, 3, 1), c=nn.Conv2d(3, 2, 3, padding=padding)).eval()
        with torch.no_grad():
            m.a.weight[1] = 0
            m.a.bias[1] = 0.5  # relu(0.5): a nonzero constant
        return m

    x = torch.randn(1, 2, 5, 5)
    assert srfx.compress(build(1), x).a.out_channels == 3  # borders would see the constant
    assert srfx.compress(build(0), x).a.out_channels == 2  # no padding: folds into c's bias


def test_every_registered_key_resolves_to_a_rule():
    import torch.fx as fx

    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    modules = dict(gm.named_modules())
    rules = {n.name: lookup(n, modules) for n in gm.graph.nodes}
    assert all(r is not None for r in rules.values())


def test_conv_along_a_channel_axis_keeps_those_channels():
    """ECA: a Conv1d slides over the channel axis of pooled features; its neighbours matter."""

    def fwd(s, x):
        h = s.a(x)
        y = s.eca(h.mean((2, 3)).view(x.shape[0], 1, -1)).view(x.shape[0], -1, 1, 1)
        return s.out(h * torch.sigmoid(y).expand_as(h))

    m = Wrap(fwd, a=nn.Conv2d(3, 8, 1), eca=nn.Conv1d(1, 1, 3, padding=1, bias=False), out=nn.Conv2d(8, 2, 1)).eval()
    with torch.no_grad():
        m.a.weight[3] = 0
        m.out.weight[:, 3] = 0
    small = srfx.compress(m, torch.randn(2, 3, 4, 4))  # verified: channel 3 still feeds its neighbours' gates
    assert small.a.out_channels == 8


def test_functional_linear_with_keyword_arguments_in_any_order():
    m = Wrap(lambda s, x: F.linear(weight=s.w, input=torch.relu(s.a(x)), bias=s.b), a=nn.Linear(4, 8))
    m.w = nn.Parameter(torch.randn(3, 8))
    m.b = nn.Parameter(torch.randn(3))
    with torch.no_grad():
        m.w[:, :4] = 0
    small = srfx.compress(m.eval(), torch.randn(5, 4))
    assert small.a.out_features == 4 and small.w.shape == (3, 4)


@pytest.mark.parametrize("pad", [nn.ConstantPad2d(1, 0.5), nn.ZeroPad2d((1, 0, 2, 0)), nn.ReflectionPad2d(1), nn.ReplicationPad2d(1)])
def test_padding_modules_are_per_channel(pad):
    """Padding modules pass channels through; a constant channel stays constant only where the
    padding repeats it (reflect, replicate) or pads with the same value."""
    model = nn.Sequential(nn.Conv2d(3, 6, 1), pad, nn.Conv2d(6, 4, 3)).eval()
    with torch.no_grad():
        model[0].weight[[1, 4]] = 0  # constant channels (their bias)
        model[0].bias[4] = 0.5 if type(pad) is nn.ConstantPad2d else 0.0  # matches the pad value
        model[0].bias[1] = 0.7
        model[2].weight[:, 2] = 0  # unread
    x = torch.randn(1, 3, 5, 5)
    small = srfx.compress(model, x)
    expected = {"ConstantPad2d": 4, "ZeroPad2d": 4, "ReflectionPad2d": 3, "ReplicationPad2d": 3}[type(pad).__name__]
    assert small.get_submodule("0").out_channels == expected
    assert_close(model(x), small(x))


class _FunctionalConvs(nn.Module):
    """Convs called as functions on parameters held by the module (no nn.Conv2d)."""

    def __init__(self, pad):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(8, 3, 3, 3)), nn.Parameter(torch.randn(8))
        self.w2, self.pad = nn.Parameter(torch.randn(4, 8, 3, 3)), pad
        with torch.no_grad():
            self.w1[:3] = 0  # three constant channels relu(b1)
            self.w2[:, 5] = 0  # one unread channel

    def forward(self, x):
        y = F.relu(torch.conv2d(x, self.w1, self.b1, 1, self.pad))
        return torch.conv2d(y, self.w2, None, 1, self.pad)


@pytest.mark.parametrize("pad", [0, 1])
def test_functional_conv_keeps_its_kernel_and_folds_only_where_it_can(pad):
    """Kernel axes of a get_attr weight are no channels; a bias-less functional reader has no
    bias to fold a nonzero constant into, so only zero constants and unread channels go."""
    model = _FunctionalConvs(pad).eval()
    x = torch.randn(2, 3, 8, 8)
    small = srfx.compress(model, x)
    assert small.w1.shape[2:] == (3, 3) and small.w2.shape[2:] == (3, 3)
    constant_zero = int((F.relu(model.b1[:3]) == 0).sum())
    assert small.w2.shape[1] == 8 - 1 - constant_zero
    assert_close(model(x), small(x))


def test_index_select_with_a_constant_index_links_positions_and_is_rewritten():
    """x.index_select(1, idx) with a buffer index: output i is input idx[i]; when channels go
    on either side, the index keeps the kept outputs, renumbered to the kept inputs."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(5, 3)
            self.register_buffer("idx", torch.tensor([7, 0, 3, 3, 5]))

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)).index_select(1, self.idx))

    model = Net().eval()
    with torch.no_grad():
        model.fc2.weight[:, 1] = 0  # output 1 (unit 0, selected nowhere else) is unread
        model.fc1.weight[5] = 0  # unit 5 constant: output 4 folds into fc2's bias
    x = torch.randn(4, 5)
    small = srfx.compress(model, x)
    assert small.fc1.out_features == 2 and small.idx.tolist() == [1, 0, 0]  # units 3 and 7 stay
    assert_close(model(x), small(x))


def test_a_second_compress_narrows_the_input_gather_of_the_first():
    model = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        model[0].weight[:, [1, 4]] = 0
    x = torch.randn(2, 10)
    once = srfx.compress(model, x)
    assert once._srfx_gather_0.tolist() == [0, 2, 3, 5, 6, 7, 8, 9]
    with torch.no_grad():
        once.get_submodule("0").weight[:, [0, 5]] = 0  # inputs 0 and 7 die in the next cycle
    twice = srfx.compress(once, x)
    assert twice._srfx_gather_0.tolist() == [2, 3, 5, 6, 8, 9]
    assert sum(1 for n in twice.graph.nodes if n.target is torch.index_select) == 1
    assert_close(once(x), twice(x))
