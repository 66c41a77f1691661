"""HuggingFace transformers (optional extra ``hf``): random-init BERT and ViT, FFN units killed.

transformers 5 dropped ``transformers.utils.fx`` and parts of its models do not trace with plain
``torch.fx`` (position-id slicing by proxies, shape checks in forward). ``srfx.compress`` keeps
those module instances whole (the embeddings and the self-attention of BERT and ViT) and
minimizes the rest; ViTModel's own dtype check and BART's float16 clamp are decided by the example's dtypes. The ``torch.compile`` backend sees everything: dynamo
captures the graph, :class:`srfx.Backend` minimizes it. The FFN intermediate dimension must shrink (the LayerNorm
streams and attention heads are not asserted on: they may or may not shrink yet).
"""
import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")

import srfx  # noqa: E402
from helpers import assert_close  # noqa: E402

HIDDEN, FFN = 32, 64


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _kill_ffn_units(model: nn.Module, rate: float = 0.4, seed: int = 0) -> nn.Module:
    """Zero random output rows of every FFN up-projection (out_features == FFN), with nonzero
    biases: the dead units carry gelu(bias), a constant the down-projection must absorb."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.out_features == FFN:
                m.weight[torch.rand(FFN, generator=g) < rate] = 0
                m.bias.copy_(torch.randn(FFN, generator=g) * 0.5)
    return model


class _Bert(nn.Module):
    """Tensors out (the backend compares outputs); token types given, see the known issue below."""

    def __init__(self, model, token_types=True):
        super().__init__()
        self.model, self.token_types = model, token_types

    def forward(self, ids):
        token_type_ids = torch.zeros_like(ids) if self.token_types else None
        return self.model(ids, token_type_ids=token_type_ids, return_dict=False)[0]


class _Vit(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        return self.model(pixels, return_dict=False)[0]


def _bert():
    config = transformers.BertConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=FFN, max_position_embeddings=64)
    torch.manual_seed(0)
    return _kill_ffn_units(transformers.BertModel(config).eval()), torch.randint(0, 100, (2, 10))


def _vit():
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=FFN)
    torch.manual_seed(0)
    return _kill_ffn_units(transformers.ViTModel(config, add_pooling_layer=False).eval()), torch.randn(2, 3, 32, 32)


def _check_ffn_shrinks(wrapper, x):
    backend = srfx.Backend("eager")
    compiled = torch.compile(wrapper, backend=backend, dynamic=False)
    with torch.no_grad():
        assert_close(wrapper(x), compiled(x))
        x2 = x.flip(0)
        assert_close(wrapper(x2), compiled(x2))
    (record,) = backend.records
    assert record.status == "minimized", record
    # modules keep the names of the weights they came from (dynamo source -> "m_encoder_layer_0_intermediate_dense")
    modules = dict(record.graph_module.named_modules())
    up = {n: m for n, m in modules.items() if n.endswith(("intermediate_dense", "mlp_fc1"))}
    down = {n: m for n, m in modules.items() if n.endswith(("layer_0_output_dense", "layer_1_output_dense", "mlp_fc2"))}
    assert len(up) == len(down) == 2, sorted(modules)
    assert all(0 < m.out_features < FFN for m in up.values()), up  # both layers' FFNs shrank
    assert sorted(m.in_features for m in down.values()) == sorted(m.out_features for m in up.values())
    assert record.params_after < record.params_before


def test_bert_ffn_shrinks_through_the_compile_backend():
    model, ids = _bert()
    _check_ffn_shrinks(_Bert(model), ids)


def test_vit_ffn_shrinks_through_the_compile_backend():
    model, pixels = _vit()
    _check_ffn_shrinks(_Vit(model), pixels)


def test_bert_with_buffered_token_types_stays_exact():
    """Known issue: without explicit token_type_ids BERT reads an expanded buffer, and
    srfx.compress fails restoring it (``preserved_buffers`` copies into a tensor with internal
    overlap); the backend falls back to the plain graph with a warning and stays exact."""
    model, ids = _bert()
    wrapper = _Bert(model, token_types=False)
    backend = srfx.Backend("eager", warn=False)
    with torch.no_grad():
        assert_close(wrapper(ids), torch.compile(wrapper, backend=backend, dynamic=False)(ids))
    assert backend.records[0].status in ("minimized", "fallback")


def test_compress_takes_bert_directly_keeping_what_fx_cannot_trace_whole():
    """BERT's embeddings and self-attention do not trace with plain fx (proxy slicing and
    iteration): those module instances are kept whole, with the failure as the reason, and
    the FFN units of both layers still go. The kept modules run their own code, so another
    batch size and sequence length work."""
    model, ids = _bert()
    wrapper = _Bert(model)
    small = srfx.compress(wrapper, ids)
    ups = [m.out_features for n, m in small.named_modules() if n.endswith("intermediate.dense")]
    assert len(ups) == 2 and all(0 < u < FFN for u in ups), ups
    reasons = " ".join(g.fixed for g in srfx.analyze(wrapper, ids).groups if g.fixed)
    assert "comes out of model.embeddings, kept whole (torch.fx could not trace its forward" in reasons
    other = torch.randint(0, 100, (3, 7))
    with torch.no_grad():
        assert_close(wrapper(other), small(other))


def test_compress_takes_vit_directly_deciding_its_dtype_check_by_the_example():
    """ViTModel.forward compares the pixels' dtype with its weights' (``if pixel_values.dtype !=
    expected_dtype``): that condition is decided by the example's dtypes, so the model traces
    (it used to be kept whole: nothing shrank), and the FFN units of both layers go."""
    model, pixels = _vit()
    wrapper = _Vit(model).eval()
    small = srfx.compress(wrapper, pixels)
    ups = [m.out_features for n, m in small.named_modules() if n.endswith("mlp.fc1") or n.endswith("intermediate.dense")]
    assert len(ups) == 2 and all(0 < u < FFN for u in ups), ups
    other = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert_close(wrapper(other), small(other))


def test_compress_takes_bert_without_token_types():
    """The expanded token-type buffer the backend cannot restore is read inside the embeddings,
    which compress keeps whole: the FFN units still go."""
    model, ids = _bert()
    wrapper = _Bert(model, token_types=False).eval()
    small = srfx.compress(wrapper, ids)
    assert small.meta[srfx.REPORT_KEY].params_after < small.meta[srfx.REPORT_KEY].params_before
    other = torch.randint(0, 100, (3, 7))
    with torch.no_grad():
        assert_close(wrapper(other), small(other))


class _Encoder(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, ids):
        return self.encoder(input_ids=ids).last_hidden_state


def test_bart_encoder_layers_trace_past_their_float16_clamp():
    """BartEncoderLayer clamps only ``if hidden_states.dtype == torch.float16 and not
    torch.isfinite(...)``: a condition on an intermediate value's dtype. Decided by the
    example, the layers trace (only their self-attention stays whole) and their FFN units go;
    they used to be kept whole."""
    torch.manual_seed(0)
    cfg = transformers.BartConfig(encoder_layers=2, decoder_layers=1, d_model=HIDDEN, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
                                  encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=100, max_position_embeddings=64)
    wrapper = _Encoder(transformers.BartModel(cfg).get_encoder()).eval()
    _kill_ffn_units(wrapper)
    ids = torch.randint(0, 100, (2, 9))
    assert set(srfx.trace(wrapper, ids).untraceable) == {"encoder.layers.0.self_attn", "encoder.layers.1.self_attn"}
    small = srfx.compress(wrapper, ids)
    ups = [m.out_features for n, m in small.named_modules() if n.endswith("fc1")]
    assert len(ups) == 2 and all(0 < u < FFN for u in ups), ups
    other = torch.randint(0, 100, (3, 7))
    with torch.no_grad():
        assert_close(wrapper(other), small(other))
