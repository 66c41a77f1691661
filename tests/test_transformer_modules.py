"""torch.nn's transformer modules (fx leaves) are decomposed on srfx's copy: heads, feed-forward
units and the layers' streams shrink exactly; calls the decomposed forms do not express (masks,
causal hints) and modules the trace never enters stay whole, and the result is never larger."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import srfx
from helpers import assert_close, assert_untouched, report, snapshot


def _random_vectors(model: nn.Module, seed: int) -> nn.Module:
    """Nonzero biases and norm affines: a dead unit then emits a real constant to fold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.shape == (16,) else 0.0))
    return model


class EncoderNet(nn.Module):
    def __init__(self, norm_first: bool, activation, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, activation=activation, batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16) if norm_first else None, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.encoder(self.embed(x))
        return self.head(h.mean(1 if self.batch_first else 0))


def _kill_unit_and_head(model: nn.Module) -> None:
    with torch.no_grad():
        model.encoder.layers[0].linear2.weight[:, :8] = 0  # layer 0: 8 feed-forward units unread
        model.encoder.layers[1].self_attn.out_proj.weight[:, 4:8] = 0  # layer 1: head 1 unread


@pytest.mark.parametrize("norm_first, activation, batch_first", [(False, "relu", True), (True, "gelu", True), (True, nn.GELU(), False)])
def test_transformer_encoder_units_and_heads_leave(norm_first, activation, batch_first):
    torch.manual_seed(0)
    model = _random_vectors(EncoderNet(norm_first, activation, batch_first).eval(), 1)
    _kill_unit_and_head(model)
    before = snapshot(model)
    x = torch.randn(2, 5, 6) if batch_first else torch.randn(5, 2, 6)
    small = srfx.compress(model, x)
    r = report(small)
    assert r.heads_removed == 1
    assert small.get_submodule("encoder.layers.0.linear1").out_features == 24
    assert small.get_submodule("encoder.layers.1.self_attn.out_proj").in_features == 12
    assert r.stored_after < r.stored_before
    assert_untouched(model, before)
    assert type(model.encoder) is nn.TransformerEncoder and type(model.encoder.layers[0]) is nn.TransformerEncoderLayer
    y = torch.randn(3, 7, 6) if batch_first else torch.randn(7, 3, 6)
    with torch.no_grad():  # the original takes its fast path here: the same function up to rounding
        assert_close(model(y), small(y))


class PaddedEncoder(nn.Module):
    """A key padding mask: the original may run on nested tensors and zero padded positions."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(16, 3)

    def forward(self, x, padding):
        return self.head(self.encoder(x, src_key_padding_mask=padding).sum(1))


def test_an_encoder_called_with_a_padding_mask_stays_whole():
    torch.manual_seed(0)
    model = _random_vectors(PaddedEncoder().eval(), 2)
    with torch.no_grad():
        model.encoder.layers[1].self_attn.out_proj.weight[:, 4:8] = 0
    x, padding = torch.randn(2, 5, 16), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    small = srfx.compress(model, (x, padding))
    r = report(small)
    assert r.heads == () and r.stored_after <= r.stored_before
    with torch.no_grad():
        assert_close(model(x, padding), small(x, padding))


class CausalAndPadded(nn.Module):
    """One layer called with a causal mask and hint (decomposed), one with a padding mask (kept
    whole: the decomposed form does not express it)."""

    def __init__(self):
        super().__init__()
        self.causal = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
        self.padded = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)

    def forward(self, x, padding):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.padded(self.causal(x, src_mask=mask, is_causal=True), src_key_padding_mask=padding)


def test_a_causal_layer_shrinks_and_a_padded_one_stays_whole():
    torch.manual_seed(0)
    model = _random_vectors(CausalAndPadded().eval(), 3)
    with torch.no_grad():
        model.causal.linear2.weight[:, :8] = 0
        model.padded.linear2.weight[:, :8] = 0
    x, padding = torch.randn(2, 5, 16), torch.tensor([[False] * 5, [False] * 4 + [True]])
    small = srfx.compress(model, (x, padding))
    assert small.get_submodule("causal.linear1").out_features == 24
    assert small.get_submodule("padded").linear1.out_features == 32  # whole: its original module
    y = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert_close(model(y, padding), small(y, padding))


class CausalLM(nn.Module):
    """A decoder-only stack as nn.TransformerEncoder with a causal mask and the is_causal hint."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, norm_first=True), 2,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(16, 20)

    def forward(self, tokens):
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.encoder(self.embed(tokens), mask=mask, is_causal=True))


def test_a_causal_encoder_stack_loses_heads_and_units_and_stays_causal():
    torch.manual_seed(0)
    model = _random_vectors(CausalLM().eval(), 4)
    _kill_unit_and_head(model)
    tokens = torch.randint(0, 20, (2, 6))
    small = srfx.compress(model, tokens)
    assert report(small).heads_removed == 1
    assert small.get_submodule("encoder.layers.0.linear1").out_features == 24
    with torch.no_grad():
        assert_close(model(tokens), small(tokens))
        changed = tokens.clone()
        changed[:, -1] = (changed[:, -1] + 1) % 20  # a later token does not reach earlier positions
        assert_close(small(tokens)[:, :-1], small(changed)[:, :-1])


class FullTransformer(nn.Module):
    """nn.Transformer is an fx leaf: the encoder layers inside it are never traced."""

    def __init__(self):
        super().__init__()
        self.transformer = nn.Transformer(16, 4, 1, 1, 32, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, src, tgt):
        return self.head(self.transformer(src, tgt))


def test_modules_the_trace_never_enters_are_not_decomposed():
    """Their decomposed forms used to be swapped in anyway: the leaf then carried the q/k/v
    Linears beside the original in_proj (a 'compressed' model 1.2x larger than the model)."""
    torch.manual_seed(0)
    model = FullTransformer().eval()
    src, tgt = torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    small = srfx.compress(model, (src, tgt))
    r = report(small)
    assert r.stored_after <= r.stored_before
    assert not any("q_proj" in name or "original" in name for name, _ in small.named_parameters())
    with torch.no_grad():
        assert_close(model(src, tgt), small(src, tgt))
