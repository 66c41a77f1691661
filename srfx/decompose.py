"""Before tracing: ``nn.MultiheadAttention`` as ops srfx has channel rules for.

An ``nn.MultiheadAttention`` is one opaque module (torch.nn modules are fx leaves): its heads
and the stream it reads stay whole. :class:`DecomposedMultiheadAttention` computes the same
thing (eval semantics) from separate q/k/v ``nn.Linear``, ``F.scaled_dot_product_attention``
and the output ``nn.Linear``, so the analysis sees heads, q·k dims and value dims, and a
LayerNorm before it can be compensated. Calls it cannot express (attention weights requested,
masks, bias_k/bias_v, zero attention, different key/value widths) go to the original module,
which it keeps: those stay whole, exactly as before. The swap happens on srfx's private copy;
verification compares the result with the user's unchanged model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DecomposedMultiheadAttention", "decompose_attention", "mixed_calls"]


class DecomposedMultiheadAttention(nn.Module):
    """The eval-mode function of ``mha`` for ``need_weights=False`` calls without masks."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        e, h = mha.embed_dim, mha.num_heads
        self.num_heads, self.head_dim, self.batch_first = h, e // h, mha.batch_first
        w, b = mha.in_proj_weight.detach(), mha.in_proj_bias
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(e, e, bias=b is not None, dtype=w.dtype, device=w.device) for _ in range(3))
        with torch.no_grad():
            for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                proj.weight.copy_(w[i * e : (i + 1) * e])
                if b is not None:
                    proj.bias.copy_(b.detach()[i * e : (i + 1) * e])
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
        if need_weights or key_padding_mask is not None or attn_mask is not None:
            return self.original(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                 attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, n = query.shape[0], query.shape[1]
        s = key.shape[1]
        q = self.q_proj(query).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=self.head_dim ** -0.5)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _expressible(mha: nn.MultiheadAttention) -> bool:
    return (
        mha._qkv_same_embed_dim and mha.in_proj_weight is not None and mha.bias_k is None
        and mha.bias_v is None and not mha.add_zero_attn and mha.embed_dim % mha.num_heads == 0
    )


def decompose_attention(model: nn.Module, keep: frozenset = frozenset()) -> int:
    """Swap every expressible ``nn.MultiheadAttention`` of ``model`` (srfx's own copy: in
    place) for its decomposed form, except those named in ``keep``; returns how many."""
    swaps = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            qualified = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.MultiheadAttention and _expressible(child) and qualified not in keep:
                swaps.append((module, child_name, child))
    for parent, child_name, child in swaps:
        setattr(parent, child_name, DecomposedMultiheadAttention(child))
    return len(swaps)


def mixed_calls(gm) -> frozenset:
    """Decomposed modules the traced graph calls both ways: the original module for some calls
    (weights requested, masks) and the decomposed form for others. Both read one out_proj, so
    the decomposed form would shrink what the original reads whole: leave these modules whole
    (``decompose_attention(model, keep=...)``) and trace again."""
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    originals = {t[: -len(".original")] for t in targets if t.endswith(".original")}
    return frozenset(m for m in originals if any(t.startswith(m + ".") and not t.startswith(m + ".original") for t in targets))

