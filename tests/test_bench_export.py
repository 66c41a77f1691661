"""The MNIST bench's deployment path: a compressed model (input gather included) behind the
normalization, torch.export-ed with a dynamic batch, loads back and matches."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn as nn

import srfx

BENCH = Path(__file__).resolve().parent.parent / "bench" / "squeeze_release_mnist.py"


def _bench():
    spec = importlib.util.spec_from_file_location("squeeze_release_mnist", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_export_pt2_dynamic_batch_matches(tmp_path):
    bench = _bench()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(784, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 10)).eval()
    with torch.no_grad():
        m[0].weight[:, :300] = 0  # dropped pixels: the compressed model gathers the rest
        m[0].weight[3] = 0
    small = srfx.compress(m, torch.randn(4, 784))
    assert any("gather" in n for n, _ in small.named_buffers())
    path = tmp_path / "model.pt2"
    bench.export_pt2(small, path)
    loaded = torch.export.load(str(path)).module()
    for n in (1, 3, 17):  # any batch size
        images = torch.rand(n, 1, 28, 28)
        with torch.no_grad():
            expected = m((images.flatten(1) - bench.MEAN) / bench.STD)
            got = loaded(images)
        assert got.shape == (n, 10)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
