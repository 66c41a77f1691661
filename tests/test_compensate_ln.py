"""Issue 4: stream channels leave LayerNorm/RMSNorm streams exactly (compensate_ln), in random
pre-norm transformer and ConvNeXt-like blocks and in timm models."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import srfx
from helpers import assert_close, report
from srfx.compensated_ln import CompensatedLayerNorm


def _norms(gm):
    return {n: m for n, m in gm.named_modules() if isinstance(m, CompensatedLayerNorm)}


class PreNormBlock(nn.Module):
    def __init__(self, d, hidden, norm):
        super().__init__()
        self.norm, self.fc1, self.fc2 = norm(d), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class TinyTransformer(nn.Module):
    """Token embedding -> pre-norm MLP blocks -> final norm -> head on the first token or the mean."""

    def __init__(self, d, hidden, depth, rms, pool):
        super().__init__()
        norm = (lambda n: nn.RMSNorm(n)) if rms else (lambda n: nn.LayerNorm(n))
        self.embed = nn.Linear(6, d)
        self.blocks = nn.Sequential(*[PreNormBlock(d, hidden, norm) for _ in range(depth)])
        self.norm, self.head, self.pool = norm(d), nn.Linear(d, 3), pool

    def forward(self, x):
        x = self.norm(self.blocks(self.embed(x)))
        return self.head(x[:, 0] if self.pool == "token" else x.mean(1))


class ConvNeXtLike(nn.Module):
    """Stem conv -> channels-first LayerNorm (as timm's LayerNorm2d) -> ConvNeXt blocks."""

    def __init__(self, d, depth):
        super().__init__()
        self.stem = nn.Conv2d(3, d, 2, stride=2)
        self.stem_norm = nn.LayerNorm(d)
        self.dws = nn.ModuleList([nn.Conv2d(d, d, 3, padding=1, groups=d) for _ in range(depth)])
        self.norms = nn.ModuleList([nn.LayerNorm(d) for _ in range(depth)])
        self.fc1s = nn.ModuleList([nn.Linear(d, 2 * d) for _ in range(depth)])
        self.fc2s = nn.ModuleList([nn.Linear(2 * d, d) for _ in range(depth)])
        self.gammas = nn.ParameterList([nn.Parameter(torch.rand(d) + 0.5) for _ in range(depth)])
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        x = self.stem_norm(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        for dw, norm, fc1, fc2, gamma in zip(self.dws, self.norms, self.fc1s, self.fc2s, self.gammas):
            y = norm(dw(x).permute(0, 2, 3, 1))
            y = fc2(torch.nn.functional.gelu(fc1(y))) * gamma
            x = x + y.permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


@settings(deadline=None)
@given(data=st.data())
def test_transformer_stream_channels_leave_exactly(data):
    d, depth = data.draw(st.integers(3, 10), label="d"), data.draw(st.integers(1, 3), label="depth")
    rms, pool = data.draw(st.booleans(), label="rms"), data.draw(st.sampled_from(["token", "mean"]), label="pool")
    torch.manual_seed(data.draw(st.integers(0, 10_000)))
    model = TinyTransformer(d, 2 * d, depth, rms, pool).double().eval()
    dead = data.draw(st.sets(st.integers(0, d - 1), min_size=1, max_size=d - 1))
    zero_bias = data.draw(st.booleans())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # norms get non-trivial scales and shifts
        writers = [model.embed] + [b.fc2 for b in model.blocks]
        for w in writers:
            w.weight[sorted(dead)] = 0
        if zero_bias:
            model.embed.bias[sorted(dead)] = 0
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    small = srfx.compress(model, x)
    norms = _norms(small)
    assert len(norms) == depth + 1, "every norm of the stream is compensated"
    assert all(n.kept == d - len(dead) and n.total == d for n in norms.values())
    assert all(not n.emit_v for n in norms.values()) if rms else True
    y = torch.randn(4, 5, 6, dtype=torch.float64)
    assert_close(model(y), small(y))
    again = srfx.compress(small, x)  # minimize is idempotent: nothing more to remove
    assert report(again).params_after == report(again).params_before


@settings(deadline=None, max_examples=15)
@given(data=st.data())
def test_convnext_stream_channels_leave_exactly(data):
    d, depth = data.draw(st.integers(3, 8), label="d"), data.draw(st.integers(1, 2), label="depth")
    torch.manual_seed(data.draw(st.integers(0, 10_000)))
    model = ConvNeXtLike(d, depth).double().eval()
    dead = sorted(data.draw(st.sets(st.integers(0, d - 1), min_size=1, max_size=d - 1)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        model.stem.weight[dead] = 0  # stem writes a constant; its norm's scale 0 makes the stream constant
        model.stem_norm.weight[dead] = 0
        for dw, fc2 in zip(model.dws, model.fc2s):
            dw.weight[dead] = 0  # the depthwise conv then outputs its bias: constant at the norm
            fc2.weight[dead] = 0
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    small = srfx.compress(model, x)
    norms = _norms(small)
    assert len(norms) == depth + 1
    assert all(n.kept == d - len(dead) for n in norms.values())
    assert not norms["stem_norm"].extra_channels, "gamma = 0 channels need no compensation"
    assert small.head.in_features == d - len(dead)
    y = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert_close(model(y), small(y))


def test_norm_output_through_a_nonlinearity_keeps_the_stream():
    """LayerNorm -> GELU -> Linear: a removed channel's output is no longer affine in u and v."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.norm, self.fc = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)

        def forward(self, x):
            return self.fc(torch.nn.functional.gelu(self.norm(self.embed(x))))

    model = Net().eval()
    with torch.no_grad():
        model.embed.weight[[1, 4]] = 0
    small = srfx.compress(model, torch.randn(3, 4))
    assert not _norms(small) and small.fc.in_features == 6
    plan = srfx.plan(model, torch.randn(3, 4))
    assert not plan.compensations


def test_shared_reader_keeps_the_stream():
    """One Linear reads the norm and something else: its columns cannot take u and v."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.norm, self.fc = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 6)

        def forward(self, x):
            h = self.embed(x)
            return self.fc(self.norm(h)) + self.fc(h)

    model = Net().eval()
    with torch.no_grad():
        model.embed.weight[[0, 3]] = 0
    x = torch.randn(3, 4)
    small = srfx.compress(model, x)
    assert not _norms(small)
    assert_close(model(x), small(x))


def test_zero_padded_conv_reader_keeps_the_stream():
    """A zero-padded conv would see beta_R at the borders where the original saw zeros."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.norm, self.conv = nn.Conv2d(3, 6, 1), nn.LayerNorm(6), nn.Conv2d(6, 2, 3, padding=1)

        def forward(self, x):
            return self.conv(self.norm(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))

    model = Net().eval()
    with torch.no_grad():
        model.stem.weight[[2]] = 0
    x = torch.randn(1, 3, 5, 5)
    small = srfx.compress(model, x)
    assert not _norms(small) and small.conv.in_channels == 6
    assert_close(model(x), small(x))


def test_norm_reads_its_own_width_for_other_tensors():
    """timm's Attention does ``B, N, C = x.shape`` on the norm output and reshapes the attention
    output with C: that count must stay the original width, not the compensated one."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.norm, self.v, self.proj = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = self.norm(self.embed(x))
            b, n, c = h.shape
            return self.proj(self.v(h).reshape(b * n, c))

    model = Net().eval()
    with torch.no_grad():
        model.embed.weight[[1, 2, 6]] = 0
    x = torch.randn(2, 5, 4)
    small = srfx.compress(model, x)
    assert _norms(small)["norm"].kept == 5
    y = torch.randn(3, 7, 4)
    assert_close(model(y), small(y))


def test_compressed_stream_runs_under_export_and_compile():
    model = TinyTransformer(8, 16, 2, rms=False, pool="token").eval()
    with torch.no_grad():
        for w in [model.embed] + [b.fc2 for b in model.blocks]:
            w.weight[[0, 5]] = 0
    x = torch.randn(2, 5, 6)
    small = srfx.compress(model, x)
    assert _norms(small)
    exported = torch.export.export(small, (x,))
    assert_close(model(x), exported.module()(x))
    compiled = torch.compile(small)
    assert_close(model(x), compiled(x))


timm = pytest.importorskip("timm")


def _kill_vit_stream(model, dead):
    with torch.no_grad():
        model.patch_embed.proj.weight[dead] = 0
        model.patch_embed.proj.bias[dead] = 0
        model.cls_token[..., dead] = 0
        model.pos_embed[..., dead] = 0
        for block in model.blocks:
            block.attn.proj.weight[dead] = 0
            block.mlp.fc2.weight[dead] = 0


def _kill_convnext_streams(model, dead):
    with torch.no_grad():
        model.stem[0].weight[dead[0]] = 0
        model.stem[1].weight[dead[0]] = 0
        for i, stage in enumerate(model.stages):
            if i > 0:
                stage.downsample[1].weight[dead[i]] = 0
            for block in stage.blocks:
                block.conv_dw.weight[dead[i]] = 0
                block.mlp.fc2.weight[dead[i]] = 0
                block.gamma.uniform_(0.5, 1.5)  # timm's 1e-6 layer scale would hide errors


def _held(model, modules_rows, modules_cols, n_dead):
    """Parameters a removed stream channel holds in the given writers (rows + bias) and readers
    (columns): a lower bound of what removing it frees."""
    held = 0
    for m in modules_rows:
        held += m.weight[0].numel() + (1 if m.bias is not None else 0)
    for m in modules_cols:
        held += m.weight[:, 0].numel()
    return held * n_dead


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "deit_tiny_patch16_224"])
def test_timm_vit_stream_shrinks(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=64, num_classes=10).eval()
    d = model.embed_dim
    dead = torch.randperm(d)[: d // 4]
    _kill_vit_stream(model, dead)
    x = torch.randn(1, 3, 64, 64)
    small = srfx.compress(model, x, random_inputs=1)
    r = report(small)
    norms = _norms(small)
    assert len(norms) == 2 * len(model.blocks) + 1
    assert all(n.kept == d - len(dead) for n in norms.values())
    writers = [model.patch_embed.proj] + [b.attn.proj for b in model.blocks] + [b.mlp.fc2 for b in model.blocks]
    readers = [b.attn.qkv for b in model.blocks] + [b.mlp.fc1 for b in model.blocks] + [model.head]
    extra_rows = sum(m.weight.shape[0] for m in readers) * 2  # at most u and v per reader row
    assert r.params_before - r.params_after >= _held(model, writers, readers, len(dead)) - extra_rows
    assert r.max_rel_error <= 1e-5
    y = torch.randn(2, 3, 64, 64)
    assert_close(model(y), small(y))


def test_timm_convnext_tiny_streams_shrink():
    torch.manual_seed(0)
    model = timm.create_model("convnext_tiny", pretrained=False, num_classes=10).eval()
    widths = [stage.blocks[0].conv_dw.weight.shape[0] for stage in model.stages]
    dead = [torch.randperm(w)[: w // 4] for w in widths]
    _kill_convnext_streams(model, dead)
    x = torch.randn(1, 3, 64, 64)
    small = srfx.compress(model, x, random_inputs=1)
    r = report(small)
    norms = _norms(small)
    assert len(norms) == 1 + sum(len(s.blocks) for s in model.stages) + 3 + 1  # stem, blocks, downsamples, head
    for i, stage in enumerate(model.stages):
        assert small.get_submodule(f"stages.{i}.blocks.0.norm").kept == widths[i] - len(dead[i])
    assert r.max_rel_error <= 1e-5
    assert r.params_after < 0.8 * r.params_before
    y = torch.randn(1, 3, 64, 64)
    assert_close(model(y), small(y))


def test_timm_swin_stream_shrinks_through_windows():
    """Swin rolls, zero-pads and views the norm's output into windows before qkv: the views
    carry kept + emitted channels, and beta_R rides a ones channel through the padding."""
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, depths=(2, 1, 1, 1)).eval()
    dead = torch.arange(0, 96, 4)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)  # nonzero LayerNorm shifts: the ones channel matters
        model.patch_embed.proj.weight[dead] = 0
        model.patch_embed.norm.weight[dead] = 0  # the stream is written by a norm: its scale goes too
        for block in model.layers[0].blocks:
            block.attn.proj.weight[dead] = 0
            block.mlp.fc2.weight[dead] = 0
    x = torch.randn(1, 3, 224, 224)
    small = srfx.compress(model, x, random_inputs=1)
    norms = _norms(small)
    assert norms["layers.0.blocks.0.norm1"].kept == 72 and norms["layers.0.blocks.0.norm1"].emit_one
    assert norms["layers.1.downsample.norm"].kept == 4 * 72  # patch merging: four copies of the stream
    assert report(small).max_rel_error <= 1e-5
    assert_close(model(x), small(x))


def test_zero_padding_between_norm_and_reader_is_exact():
    """Nonzero padding amounts and nonzero shifts: the ones channel is padded with zeros
    exactly where the removed channels were."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.norm, self.fc = nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, 2)

        def forward(self, x):  # x: (B, H, W, 3)
            h = self.norm(self.embed(x))
            h = F.pad(h, (0, 0, 1, 2, 2, 0))
            b, hh, ww, c = h.shape
            return self.fc(h.view(b, hh * ww, c))

    model = Net().eval()
    with torch.no_grad():
        model.norm.bias.normal_()
        model.embed.weight[[2, 5]] = 0
    x = torch.randn(2, 3, 4, 3)
    small = srfx.compress(model, x)
    assert _norms(small)["norm"].kept == 6 and _norms(small)["norm"].emit_one
    y = torch.randn(3, 5, 2, 3)
    assert_close(model(y), small(y))


def test_show_groups_tells_which_streams_compensation_can_narrow():
    from srfx.groups_view import analyze, groups_json

    groups = groups_json(analyze(timm.create_model("convnext_atto", pretrained=False), (1, 3, 64, 64)))
    stem = next(g for g in groups if "stem.0" in g["writers"])
    stage1 = next(g for g in groups if "stages.1.downsample.1" in g["writers"])
    assert stage1["compensable"] == {"norms": ["stages.1.blocks.0.norm", "stages.1.blocks.1.norm", "stages.2.downsample.0"], "blocked": {}}
    # stem.1's output is the stream itself (residual adds, depthwise convs): only gamma = 0 channels leave it
    assert list(stem["compensable"]["blocked"]) == ["stem.1"]
    assert "stages.0.blocks.0.norm" in stem["compensable"]["norms"]


@pytest.mark.parametrize("rms", [False, True])
def test_a_compensated_stream_narrows_again_in_the_next_cycle(rms):
    """Squeeze-Release compresses compressed models: a CompensatedLayerNorm is traced as a leaf
    with its own rule, keeps its emitted u/v channels, and lets more stream channels go."""
    torch.manual_seed(3)
    model = TinyTransformer(10, 16, 2, rms, "token").double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        for w in [model.embed] + [b.fc2 for b in model.blocks]:
            w.weight[[1, 7]] = 0
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    once = srfx.compress(model, x)
    with torch.no_grad():  # the next cycle's pruning kills two more stream channels (kept indices 0 and 4)
        for w in [once.embed] + [once.get_submodule(f"blocks.{i}.fc2") for i in range(2)]:
            w.weight[[0, 4]] = 0
    twice = srfx.compress(once, x)
    norms = _norms(twice)
    assert len(norms) == 3 and all(n.kept == 6 and n.total == 10 for n in norms.values())
    y = torch.randn(3, 4, 6, dtype=torch.float64)
    assert_close(once(y), twice(y))
    assert report(srfx.compress(twice, x)).params_after == report(twice).params_after
