"""Issue 4, attention (DESIGN §5): dead heads leave with their q/k/v slices, q·k dims and value
dims shrink separately, and the original 1/sqrt(d) scale is kept."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import srfx
from helpers import assert_close, report


class Attention(nn.Module):
    """Separate q/k/v projections, heads split with view, F.scaled_dot_product_attention."""

    def __init__(self, d=12, heads=3, dk=4, dv=5):
        super().__init__()
        self.heads, self.dk, self.dv = heads, dk, dv
        self.q, self.k = nn.Linear(d, heads * dk), nn.Linear(d, heads * dk)
        self.v, self.o = nn.Linear(d, heads * dv), nn.Linear(heads * dv, d)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.dk).transpose(1, 2)
        k = self.k(x).view(b, n, self.heads, self.dk).transpose(1, 2)
        v = self.v(x).view(b, n, self.heads, self.dv).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.o(a.transpose(1, 2).reshape(b, n, self.heads * self.dv))


class Block(nn.Module):
    def __init__(self, d, heads, dk, dv):
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(d), Attention(d, heads, dk, dv)

    def forward(self, x):
        return x + self.attn(self.norm(x))


def _random(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _heads(head, width):
    return list(range(head * width, (head + 1) * width))


def test_dead_heads_and_dims_leave_and_the_scale_stays():
    model = _random(Attention().double().eval(), 0)
    with torch.no_grad():
        model.q.weight[[0, 4, 8]] = 0  # q dim 0 is zero in every head ...
        model.q.bias[[0, 4, 8]] = 0
        model.k.weight[[1, 5, 9]] = 0  # ... k dim 1 is constant (its bias) in every head
        model.v.weight[_heads(1, 5)] = 0  # head 1 outputs its value bias at every token
        model.o.weight[:, [3, 8, 13]] = 0  # value dim 3 is never read
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    small = srfx.compress(model, x)
    r = report(small)
    assert (small.q.out_features, small.k.out_features) == (2 * 2, 2 * 2)  # 2 heads x 2 q·k dims
    assert (small.v.out_features, small.o.in_features) == (2 * 4, 2 * 4)  # 2 heads x 4 value dims
    assert r.heads == (("scaled_dot_product_attention", 3, 2),)
    sdpa = next(n for n in small.graph.nodes if n.target is F.scaled_dot_product_attention)
    assert sdpa.kwargs["scale"] == pytest.approx(4 ** -0.5)
    y = torch.randn(3, 9, 12, dtype=torch.float64)
    assert_close(model(y), small(y))


def test_a_head_with_only_a_dead_query_is_kept():
    """Zero queries make the head's softmax uniform: it still outputs the mean of its values,
    so it cannot go. Removing it (zeroing its output columns) would change the output."""
    model = _random(Attention().double().eval(), 1)
    with torch.no_grad():
        model.q.weight[_heads(2, 4)] = 0
        model.q.bias[_heads(2, 4)] = 0
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    small = srfx.compress(model, x)
    assert report(small).heads == (("scaled_dot_product_attention", 3, 3),)
    assert_close(model(x), small(x))
    without = _random(Attention().double().eval(), 1)
    with torch.no_grad():
        without.q.weight[_heads(2, 4)] = 0
        without.q.bias[_heads(2, 4)] = 0
        without.o.weight[:, _heads(2, 5)] = 0
    assert (model(x) - without(x)).abs().max() > 1e-3


@settings(deadline=None, max_examples=25)
@given(data=st.data())
def test_random_attention_blocks_stay_exact(data):
    heads, dk, dv = (data.draw(st.integers(1, 4), label=name) for name in ("heads", "dk", "dv"))
    depth, d = data.draw(st.integers(1, 2), label="depth"), 6
    model = _random(nn.Sequential(*[Block(d, heads, dk, dv) for _ in range(depth)]).double().eval(), data.draw(st.integers(0, 999)))
    with torch.no_grad():
        for block in model:
            a = block.attn
            for h in data.draw(st.sets(st.integers(0, heads - 1))):  # value-dead heads
                a.v.weight[_heads(h, dv)] = 0
            for h in data.draw(st.sets(st.integers(0, heads - 1))):  # unread heads
                a.o.weight[:, _heads(h, dv)] = 0
            for i in data.draw(st.sets(st.integers(0, dk - 1))):  # zero query dims, every head
                rows = [h * dk + i for h in range(heads)]
                a.q.weight[rows] = 0
                a.q.bias[rows] = 0
    x = torch.randn(2, 5, d, dtype=torch.float64)
    small = srfx.compress(model, x)
    y = torch.randn(3, 7, d, dtype=torch.float64)
    assert_close(model(y), small(y))
    again = srfx.compress(small, x)
    assert report(again).params_after == report(again).params_before  # idempotent


def test_rewritten_attention_runs_under_export_and_compile():
    model = _random(Attention().eval(), 2)
    with torch.no_grad():
        model.o.weight[:, _heads(0, 5)] = 0
    x = torch.randn(2, 6, 12)
    small = srfx.compress(model, x)
    assert report(small).heads_removed == 1
    assert_close(model(x), torch.export.export(small, (x,)).module()(x))
    assert_close(model(x), torch.compile(small)(x))


class MhaBlock(nn.Module):
    def __init__(self, batch_first, need_weights):
        super().__init__()
        self.norm, self.attn, self.fc = nn.LayerNorm(16), nn.MultiheadAttention(16, 4, batch_first=batch_first), nn.Linear(16, 3)
        self.need_weights = need_weights

    def forward(self, x):
        y = self.norm(x)
        a, _ = self.attn(y, y, y, need_weights=self.need_weights)
        return self.fc(x + a)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_heads_leave(batch_first):
    """nn.MultiheadAttention is decomposed on srfx's copy (q/k/v Linear + sdpa), so its heads
    are visible: an unread head and a value-dead head leave; the user's module is untouched."""
    model = _random(MhaBlock(batch_first, need_weights=False).eval(), 3)
    with torch.no_grad():
        model.attn.out_proj.weight[:, 4:8] = 0  # head 1 unread
        model.attn.in_proj_weight[32 + 8 : 32 + 12] = 0  # head 2's values: its bias at every token
    before = model.attn.in_proj_weight.clone()
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    small = srfx.compress(model, x)
    assert report(small).heads_removed == 2
    assert small.get_submodule("attn.v_proj").out_features == 8 and small.get_submodule("attn.out_proj").in_features == 8
    assert torch.equal(model.attn.in_proj_weight, before) and isinstance(model.attn, nn.MultiheadAttention)
    y = torch.randn(*x.shape)
    assert_close(model(y), small(y))


def test_multihead_attention_asked_for_its_weights_stays_whole():
    model = _random(MhaBlock(True, need_weights=True).eval(), 4)
    with torch.no_grad():
        model.attn.out_proj.weight[:, 4:8] = 0
    x = torch.randn(2, 5, 16)
    small = srfx.compress(model, x)
    assert report(small).heads == ()  # the original module ran: no attention the analysis could see
    assert_close(model(x), small(x))


def test_torchvision_vit_heads_leave():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.3)
        model.heads.head.weight.normal_(0, 0.2)  # torchvision zero-inits the head: outputs would not depend on x
        model.encoder.layers[0].self_attention.out_proj.weight[:, 16:32] = 0
        model.encoder.layers[1].self_attention.in_proj_weight[128:144] = 0
    x = torch.randn(2, 3, 32, 32)
    small = srfx.compress(model, x)
    assert report(small).heads_removed == 2
    y = torch.randn(2, 3, 32, 32)
    assert_close(model(y), small(y))


timm = pytest.importorskip("timm")


def test_timm_vit_heads_leave():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=5).eval()
    hd, d = 64, 192
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.5)  # nonzero biases: a value-dead head outputs a real constant
        model.blocks[0].attn.qkv.weight[2 * d + hd : 2 * d + 2 * hd] = 0  # block 0, head 1: value-dead
        model.blocks[1].attn.proj.weight[:, 2 * hd : 3 * hd] = 0  # block 1, head 2: unread
    x = torch.randn(2, 3, 32, 32)
    small = srfx.compress(model, x)
    r = report(small)
    assert r.heads_removed == 2
    assert small.get_submodule("blocks.0.attn.qkv").out_features == 3 * 2 * hd
    assert small.get_submodule("blocks.1.attn.proj").in_features == 2 * hd
    y = torch.randn(2, 3, 32, 32)
    assert_close(model(y), small(y))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_multihead_attention_decomposes_in_the_models_dtype(dtype):
    """The decomposed q/k/v Linears were built in the default dtype: a float64 or bfloat16
    model with an nn.MultiheadAttention could not be compressed at all."""
    model = _random(MhaBlock(True, need_weights=False).eval(), 3).to(dtype)
    with torch.no_grad():
        model.attn.out_proj.weight[:, 4:8] = 0
    x = torch.randn(2, 5, 16, dtype=dtype)
    small = srfx.compress(model, x)
    assert report(small).heads_removed == 1
    assert small.get_submodule("attn.q_proj").weight.dtype == dtype


class CalledTwice(nn.Module):
    """One module, two kinds of call: one the decomposed form expresses, one it does not."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(12, 3, batch_first=True)

    def forward(self, x):
        y = self.attn(x, x, x, need_weights=False)[0]
        z, weights = self.attn(y, y, y)  # need_weights=True: the original module computes it
        return z, weights


def test_a_module_called_decomposed_and_whole_stays_whole():
    """Both calls read one out_proj; the decomposed call sliced it under the whole one (a
    RuntimeError). Such a module is now left whole, and the result is exact."""
    model = _random(CalledTwice().eval(), 5)
    with torch.no_grad():
        model.attn.out_proj.weight[:, 4:8] = 0
    x = torch.randn(2, 5, 12)
    small = srfx.compress(model, x)
    assert report(small).heads_removed == 0
    y = torch.randn(3, 4, 12)
    for a, b in zip(model(y), small(y)):
        assert_close(a, b)


def test_unbatched_multihead_attention_runs_whole():
    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(12, 3)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    model = _random(Unbatched().eval(), 6)
    for length in (5, 12):  # 12 = embed_dim: shapes alone would not tell batched from unbatched
        x = torch.randn(length, 12)
        assert_close(model(x), srfx.compress(model, x)(x))


def test_a_per_head_attention_mask_keeps_the_heads():
    """An additive mask with a head axis (ALiBi slopes, a learned relative bias) has one slice
    per head: removing a head from q/k/v but not from the mask was a RuntimeError."""
    class Biased(Attention):
        def __init__(self):
            super().__init__()
            self.rel = nn.Parameter(torch.randn(1, self.heads, 1, 1))

        def forward(self, x):
            b, n, _ = x.shape
            q = self.q(x).view(b, n, self.heads, self.dk).transpose(1, 2)
            k = self.k(x).view(b, n, self.heads, self.dk).transpose(1, 2)
            v = self.v(x).view(b, n, self.heads, self.dv).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.rel)
            return self.o(a.transpose(1, 2).reshape(b, n, self.heads * self.dv))

    model = _random(Biased().eval(), 7)
    with torch.no_grad():
        model.o.weight[:, 5:10] = 0  # head 1 unread
    x = torch.randn(2, 6, 12)
    small = srfx.compress(model, x)
    assert report(small).heads_removed == 0
    assert_close(model(x), small(x))


class _SlicedQKV(nn.Module):
    """A fused qkv projection cut by slicing (``t[..., :d]``, ``t[..., d:2d]``, ...) rather
    than split/chunk."""

    def __init__(self, d: int = 16, heads: int = 4):
        super().__init__()
        self.qkv, self.proj, self.fc = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 5)
        self.d, self.heads = d, heads

    def forward(self, x):
        b, n, c = x.shape
        t = self.qkv(x)
        q, k, v = t[..., : self.d], t[..., self.d : 2 * self.d], t[..., 2 * self.d :]
        q, k, v = (z.reshape(b, n, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.fc(x + self.proj(o))


def test_heads_of_a_qkv_cut_by_slicing_shrink_exactly():
    m = _SlicedQKV().eval()
    with torch.no_grad():
        m.qkv.weight[36:40] = 0  # head 1's values
        m.qkv.bias[36:40] = 0
        qk_dim0 = [0, 4, 8, 12, 16, 20, 24, 28]  # q and k dim 0 of every head (heads stay rectangular)
        m.qkv.weight[qk_dim0] = 0
        m.qkv.bias[qk_dim0] = 0
    small = srfx.compress(m, torch.randn(2, 5, 16))
    # head 1 goes whole (12 rows); the other three heads lose q.k dim 0 (6 rows); values stay 4 wide
    assert small.qkv.out_features == 48 - 12 - 6 and small.proj.in_features == 12
    for shape in ((1, 5, 16), (3, 5, 16)):
        x = torch.randn(shape)
        assert_close(m(x), small(x))
