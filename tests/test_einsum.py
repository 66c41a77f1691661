"""torch.einsum (srfx/rules/einsum.py): channels follow their letters. Each case is compressed
with verify=False, so that srfx's own check cannot hide a wrong rewrite, and compared with the
model on fresh inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import srfx
from helpers import assert_close


def _compress_exactly(model: nn.Module, example: torch.Tensor, *fresh: torch.Tensor):
    small = srfx.compress(model, example, verify=False)
    with torch.no_grad():
        for x in (example, *fresh):
            assert_close(model(x), small(x))
    return small


class EinsumLinear(nn.Module):
    """A hidden layer written as einsum with a raw weight, its unread outputs, a scaling vector."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.w = nn.Parameter(torch.randn(8, 10))
        self.scale = nn.Parameter(torch.randn(10))
        self.out = nn.Linear(10, 3)

    def forward(self, x):
        h = torch.einsum("bi,ij->bj", torch.relu(self.inp(x)), self.w)
        return self.out(torch.einsum("bj,j->bj", torch.relu(h), self.scale))


def test_unread_einsum_outputs_leave_its_weight_and_the_contracted_axis_stays():
    torch.manual_seed(0)
    model = EinsumLinear().eval()
    with torch.no_grad():
        model.out.weight[:, :4] = 0  # output letters j = 0..3 unread
        model.inp.weight[:2], model.inp.bias[:2] = 0, -1.0  # contracted letters i = 0, 1 dead (zeros after relu)
    small = _compress_exactly(model, torch.randn(2, 6), torch.randn(5, 6))
    assert small.w.shape == (8, 6)  # j shrank; i is contracted: read whole, kept
    assert small.scale.shape == (6,) and small.out.in_features == 6
    assert small.inp.out_features == 8


class EinsumHeads(nn.Module):
    """Attention written with einsum: heads x dims channels are kept; per-token MLP units go."""

    def __init__(self, d=12, heads=3):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 20), nn.Linear(20, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.einsum("bhnd,bhmd->bhnm", q, k).softmax(-1)
        y = torch.einsum("bhnm,bhmd->bhnd", att, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(y)
        return x + self.fc2(torch.relu(self.fc1(x)))


def test_einsum_attention_stays_exact_and_the_mlp_shrinks():
    torch.manual_seed(0)
    model = EinsumHeads().eval()
    with torch.no_grad():
        model.proj.weight[:, 4:8] = 0  # head 1 unread: kept, since einsum keeps heads x dims
        model.fc2.weight[:, :5] = 0
    small = _compress_exactly(model, torch.randn(2, 5, 12), torch.randn(3, 7, 12))
    assert small.fc1.out_features == 15
    assert small.qkv.out_features == 36


@pytest.mark.parametrize("equation, shapes, widths", [
    ("ij,ij->ij", [(4, 6), (4, 6)], [5, 5]),  # elementwise: j reaches the output in both operands
    ("bij,bjk->bik", [(2, 4, 6), (2, 6, 5)], [6, 4]),  # j contracted: kept
    ("bi,bi->b", [(3, 6), (3, 6)], [6, 6]),  # all contracted
    ("...i,ij->...j", [(2, 3, 6), (6, 5)], [6, 4]),
    ("ij,jk", [(4, 6), (6, 5)], [6, 4]),  # implicit output: ik
    ("ii->i", [(6, 6)], [6]),  # a diagonal: kept
])
def test_einsum_between_linears_stays_exact(equation, shapes, widths):
    """Each operand comes from a Linear over its last axis, with two dead channels (kept: no
    constants are claimed through a product); the output goes into a Linear that does not
    read its last channel, which leaves every operand whose last letter reaches the output."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.makers = nn.ModuleList(nn.Linear(3, s[-1]) for s in shapes)
            out = torch.einsum(equation, *[torch.zeros(s) for s in shapes])
            self.vector_out = out.dim() == 1  # known here, not from a proxy in forward
            self.head = nn.Linear(1 if self.vector_out else out.shape[-1], 2)

        def forward(self, a, b):  # b is unused by one-operand equations
            ops = [torch.relu(m(x)) for m, x in zip(self.makers, (a, b))]
            y = torch.einsum(equation, *ops)
            return self.head(y.unsqueeze(-1) if self.vector_out else y)

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        for m in model.makers:
            m.weight[:2], m.bias[:2] = 0, -1.0  # two dead channels per operand
        model.head.weight[:, -1] = 0  # one unread output channel
    inputs = tuple(torch.randn(*s[:-1], 3) for s in shapes) + ((torch.randn(2, 3),) if len(shapes) == 1 else ())
    small = srfx.compress(model, inputs, verify=False)
    with torch.no_grad():
        assert_close(model(*inputs), small(*inputs))
    assert [small.get_submodule(f"makers.{i}").out_features for i in range(len(shapes))] == widths
