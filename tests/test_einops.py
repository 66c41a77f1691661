"""einops (optional): its functions and layers reject fx proxies. Its functions are recorded as
calls (barriers) and its layers kept whole, so an einops model compresses everywhere else
instead of failing to trace."""
import pytest
import torch
import torch.nn as nn

einops = pytest.importorskip("einops")
from einops.layers.torch import Rearrange, Reduce  # noqa: E402

import srfx  # noqa: E402
from helpers import assert_close  # noqa: E402


class EinopsMixer(nn.Module):
    """Patches by Rearrange, a token-mixing MLP between two Rearranges, a channel MLP, a
    function call in forward (``einops.rearrange``) and a Reduce head."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Sequential(Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=4, p2=4), nn.Linear(48, 32))
        self.tokens = nn.Sequential(nn.LayerNorm(32), Rearrange("b n d -> b d n"), nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16),
                                    Rearrange("b d n -> b n d"))
        self.channels = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Sequential(Reduce("b n d -> b d", "mean"), nn.Linear(32, 10))

    def forward(self, x):
        h = self.patch(x)
        h = h + self.tokens(h)
        h = h + self.channels(h)
        h = einops.rearrange(h, "b n (g d) -> b n g d", g=2).sum(2)
        return self.head(torch.cat([h, h], -1))


def test_an_einops_model_compresses_around_its_einops_calls():
    torch.manual_seed(0)
    model = EinopsMixer().eval()
    with torch.no_grad():
        model.channels[3].weight[:, :20] = 0  # 20 hidden units of the channel MLP unread
        model.tokens[4].weight[:, :6] = 0  # 6 hidden units of the token MLP unread
    x = torch.rand(2, 3, 16, 16)
    traced = srfx.trace(model, x)
    assert "known-functions" in traced.front_end and set(traced.untraceable) == {"patch.0", "tokens.1", "tokens.5", "head.0"}
    small = srfx.compress(model, x)
    assert small.get_submodule("channels.1").out_features == 44
    assert small.get_submodule("tokens.2").out_features == 18
    y = torch.rand(3, 3, 16, 16)
    assert_close(model(y), small(y))
