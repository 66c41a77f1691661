"""Before tracing: ``nn.MultiheadAttention`` as ops srfx has channel rules for.

An ``nn.MultiheadAttention`` is one opaque module (torch.nn modules are fx leaves): its heads
and the stream it reads stay whole. :class:`DecomposedMultiheadAttention` computes the same
thing (eval semantics) from separate q/k/v ``nn.Linear``, ``F.scaled_dot_product_attention``
and the output ``nn.Linear``, so the analysis sees heads, q·k dims and value dims, and a
LayerNorm before it can be compensated. Calls it cannot express (attention weights requested,
masks, bias_k/bias_v, zero attention, different key/value widths) go to the original module,
which it keeps: those stay whole, exactly as before. The swap happens on srfx's private copy;
verification compares the result with the user's unchanged model.

``nn.TransformerEncoder`` and ``nn.TransformerEncoderLayer`` are fx leaves too (torch.nn
modules): :class:`DecomposedTransformerEncoder` and :class:`DecomposedTransformerEncoderLayer`
are their eval-mode functions for calls without masks or with a causal hint (``is_causal=True``
and its mask; the layer's reference path), so the
attention inside, the feed-forward units and the LayerNorm streams become visible. A call they
do not express raises :class:`Unexpressible` while tracing, and the tracer keeps that module
whole. No wrapper is left where tracing never reached it (inside a module kept whole): the
result is never larger than the model.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DecomposedMultiheadAttention", "DecomposedTransformerEncoderLayer", "DecomposedTransformerEncoder", "Unexpressible",
           "decompose_modules", "mixed_calls", "unseen"]


_PROJECTIONS = ("q_proj", "k_proj", "v_proj")  # their rows, in order, are in_proj_weight's


class DecomposedMultiheadAttention(nn.Module):
    """The eval-mode function of ``mha`` for ``need_weights=False`` calls without masks, or
    with ``is_causal=True`` and its ``attn_mask`` (torch then drops the mask for the causal
    hint too)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        e, h = mha.embed_dim, mha.num_heads
        self.num_heads, self.head_dim, self.batch_first = h, e // h, mha.batch_first
        w, b = mha.in_proj_weight.detach(), mha.in_proj_bias
        with torch.no_grad():
            for i, name in enumerate(_PROJECTIONS):  # row blocks of in_proj_weight, in order (original_slice maps back)
                proj = nn.Linear(e, e, bias=b is not None, dtype=w.dtype, device=w.device)
                proj.weight.copy_(w[i * e : (i + 1) * e])
                if b is not None:
                    proj.bias.copy_(b.detach()[i * e : (i + 1) * e])
                setattr(self, name, proj)
        self.out_proj = mha.out_proj
        self.original = mha  # for the calls this form cannot express

    def __getattr__(self, name):
        # code around an nn.MultiheadAttention reads its attributes (nn.TransformerEncoderLayer
        # checks in_proj_weight, _qkv_same_embed_dim, ... for its fast path)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["original"], name)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
        # no mask and no hint, or a mask with the causal hint (is_causal without a mask: torch raises, so the original runs)
        expressed = not need_weights and key_padding_mask is None and (attn_mask is None) == (not is_causal)
        if not expressed:
            return self.original(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                 attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, n = query.shape[0], query.shape[1]
        s = key.shape[1]
        q = self.q_proj(query).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=bool(is_causal), scale=self.head_dim ** -0.5)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


def original_slice(model: nn.Module, qualname: str, axis: int, index: int) -> Optional[tuple[str, int, int]]:
    """The slice of ``model``'s own parameter that a slice of a decomposed attention's
    projection copies (``attn.k_proj.weight`` row i is ``attn.in_proj_weight`` row e + i), or
    None when ``qualname`` is not such a projection."""
    owner, _, leaf = qualname.rpartition(".")
    parent, _, proj = owner.rpartition(".")
    if proj not in _PROJECTIONS or leaf not in ("weight", "bias"):
        return None
    try:
        mha = model.get_submodule(parent)
    except AttributeError:
        return None
    if not isinstance(mha, nn.MultiheadAttention) or not _expressible(mha):
        return None
    offset = _PROJECTIONS.index(proj) * mha.embed_dim if axis == 0 else 0
    return f"{parent + '.' if parent else ''}in_proj_{leaf}", axis, index + offset


def _expressible(mha: nn.MultiheadAttention) -> bool:
    return (
        mha._qkv_same_embed_dim and mha.in_proj_weight is not None and mha.bias_k is None
        and mha.bias_v is None and not mha.add_zero_attn and mha.embed_dim % mha.num_heads == 0
    )


class Unexpressible(Exception):
    """Raised while tracing by a decomposed module called in a way its form does not express
    (masks, causal hints): the tracer keeps that module whole and traces again."""

    def __init__(self, module: nn.Module, why: str):
        super().__init__(f"{type(module).__name__}: {why}")
        self.module = module


class DecomposedTransformerEncoderLayer(nn.Module):
    """The eval-mode function of an ``nn.TransformerEncoderLayer`` for calls without masks or
    with a causal mask and ``is_causal=True``: its reference path (the fast path computes the
    same up to rounding), over the layer's own submodules."""

    def __init__(self, layer: nn.TransformerEncoderLayer):
        super().__init__()
        for name in ("self_attn", "linear1", "dropout", "linear2", "norm1", "norm2", "dropout1", "dropout2"):
            setattr(self, name, getattr(layer, name))
        self.activation = layer.activation  # a module (registered as before) or a function
        self.norm_first = layer.norm_first

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        if src_key_padding_mask is not None or (src_mask is not None) != bool(is_causal):
            raise Unexpressible(self, "a call with a padding mask, or an attention mask that is not a causal hint")
        x = src
        if self.norm_first:
            x = x + self._attention(self.norm1(x), src_mask, is_causal)
            return x + self._feed_forward(self.norm2(x))
        x = self.norm1(x + self._attention(x, src_mask, is_causal))
        return self.norm2(x + self._feed_forward(x))

    def _attention(self, x, mask, is_causal):
        return self.dropout1(self.self_attn(x, x, x, attn_mask=mask, need_weights=False, is_causal=bool(is_causal))[0])

    def _feed_forward(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class DecomposedTransformerEncoder(nn.Module):
    """The eval-mode function of an ``nn.TransformerEncoder`` for calls without masks or with
    a causal mask and ``is_causal=True``: its layers in turn (called as it calls them), then
    its norm. With a key padding mask the
    original may run on nested tensors and zero the padded positions: such calls are not
    expressed."""

    def __init__(self, encoder: nn.TransformerEncoder):
        super().__init__()
        self.layers = encoder.layers
        self.norm = encoder.norm

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        causal = is_causal is True  # with a mask and no hint the original compares it with a causal mask's values
        if src_key_padding_mask is not None or (mask is not None) != causal:
            raise Unexpressible(self, "a call with a padding mask, or an attention mask that is not a causal hint")
        out = src
        for layer in self.layers:
            out = layer(out, src_mask=mask, is_causal=causal, src_key_padding_mask=None)
        return out if self.norm is None else self.norm(out)


# exact type -> (can this instance be expressed, its decomposed form); outer kinds first, so
# that each later pass finds the modules inside the wrappers of the earlier ones
_DECOMPOSITIONS = (
    (nn.TransformerEncoder, lambda m: True, DecomposedTransformerEncoder),
    (nn.TransformerEncoderLayer, lambda m: True, DecomposedTransformerEncoderLayer),
    (nn.MultiheadAttention, _expressible, DecomposedMultiheadAttention),
)


def decompose_modules(model: nn.Module, keep: frozenset = frozenset()) -> dict[str, nn.Module]:
    """Swap every expressible ``nn.TransformerEncoder``, ``nn.TransformerEncoderLayer`` and
    ``nn.MultiheadAttention`` of ``model`` (srfx's own copy: in place) for its decomposed
    form, except those named in ``keep`` and those inside them (a kept module runs whole).
    Returns qualified name -> decomposed module."""
    swapped: dict[str, nn.Module] = {}

    def kept(name: str) -> bool:
        return any(name == k or name.startswith(k + ".") for k in keep)

    for kind, expressible, decomposed in _DECOMPOSITIONS:
        swaps = []
        for name, module in model.named_modules():
            for child_name, child in module.named_children():
                qualified = f"{name}.{child_name}" if name else child_name
                if type(child) is kind and expressible(child) and not kept(qualified):
                    swaps.append((module, child_name, child, qualified))
        for parent, child_name, child, qualified in swaps:
            swapped[qualified] = decomposed(child)
            setattr(parent, child_name, swapped[qualified])
    return swapped


def mixed_calls(gm) -> frozenset:
    """Decomposed modules the traced graph calls both ways: the original module for some calls
    (weights requested, masks) and the decomposed form for others. Both read one out_proj, so
    the decomposed form would shrink what the original reads whole: leave these modules whole
    (``decompose_attention(model, keep=...)``) and trace again."""
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    originals = {t[: -len(".original")] for t in targets if t.endswith(".original")}
    return frozenset(m for m in originals if any(t.startswith(m + ".") and not t.startswith(m + ".original") for t in targets))



def unseen(gm, swapped: dict[str, nn.Module]) -> frozenset:
    """Decomposed modules the trace never entered (they sit inside a module fx keeps whole, or
    were kept whole themselves): keeping them whole restores the original module, without the
    wrapper's extra weights."""
    targets = [n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")]
    return frozenset(name for name in swapped if not any(t.startswith(name + ".") for t in targets))
