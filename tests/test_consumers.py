"""What srfx emits runs where users deploy it: torch.export and torch.compile (inductor, CPU)."""
import torch

import srfx
from architectures import MLP, ResidualCNN
from helpers import assert_close, kill_channels


def _compressed(cls, x):
    model = kill_channels(cls(), rate=0.35, seed=5).eval()
    return model, srfx.compress(model, x)


def test_torch_export_with_dynamic_batch():
    x = torch.randn(4, 1, 28, 28)
    model, small = _compressed(MLP, x)  # includes the input gather (index_select on a buffer)
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(small, (x,), dynamic_shapes=({0: batch},))
    y = torch.randn(7, 1, 28, 28)
    with torch.no_grad():
        assert_close(model(y), program.module()(y))


def test_torch_compile_inductor_cpu():
    x = torch.randn(2, 3, 8, 8)
    model, small = _compressed(ResidualCNN, x)
    compiled = torch.compile(small, backend="inductor")
    with torch.no_grad():
        assert_close(model(x), compiled(x))
