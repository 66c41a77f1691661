"""Issue 3's bar: exact (relative error <= 1e-5, float32) on timm models with random masks that
kill whole channels, BatchNorm statistics set to nonzero random values."""
import pytest
import torch

timm = pytest.importorskip("timm")

import srfx
from helpers import kill_channels, report

MODELS = ["resnet50", "efficientnet_b0", "mobilenetv3_large_100", "densenet121", "regnety_008"]
# beyond issue 3: LayerNorm streams, attention, token mixing, grouped convs
MODELS += ["resnext50_32x4d", "convnext_atto", "vit_tiny_patch16_224", "mixer_s16_224"]


@pytest.mark.parametrize("name", MODELS)
def test_timm_model_compresses_exactly(name):
    torch.manual_seed(0)
    model = kill_channels(timm.create_model(name, pretrained=False), rate=0.3, seed=0).eval()
    x = torch.randn(1, 3, 224, 224)
    small = srfx.compress(model, x, random_inputs=1)
    r = report(small)
    assert r.max_rel_error <= 1e-5
    assert r.stored_after < r.stored_before
    with torch.no_grad():
        y = torch.randn(1, 3, 224, 224)
        e, a = model(y), small(y)
    assert (e - a).abs().max().item() <= 1e-5 * e.abs().max().item()
