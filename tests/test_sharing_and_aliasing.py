"""State shared between call sites and memory shared between tensors: a module or bias used
twice, an in-place write through a view, a tensor attribute, a functional grouped transposed
conv. Each case gave a wrong answer (or a crash) once; each is compressed with verify=False so
that srfx's own check cannot hide a wrong rewrite, and compared with the model."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import srfx
from tests.helpers import assert_close


def _exact_without_verify(model: nn.Module, example: torch.Tensor, *inputs: torch.Tensor) -> torch.fx.GraphModule:
    small = srfx.compress(model, example, verify=False)
    with torch.no_grad():
        for x in (example, *inputs):
            expected, got = model(x), small(x)
            for e, g in zip(expected if isinstance(expected, tuple) else (expected,), got if isinstance(got, tuple) else (got,)):
                assert_close(e, g)
    return small


class _SharedReader(nn.Module):
    """One Linear reading two streams whose dead units emit different constants."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.o(torch.sigmoid(self.a(x))), self.o(torch.tanh(self.b(x)))


def test_a_reader_called_twice_folds_no_constant_into_its_one_bias():
    torch.manual_seed(0)
    m = _SharedReader().eval()
    with torch.no_grad():
        m.a.weight[[1, 2]] = 0
        m.b.weight[[1, 2]] = 0
    _exact_without_verify(m, torch.randn(2, 8), torch.randn(5, 8))


def test_a_functional_bias_also_read_elsewhere_takes_no_fold():
    class BiasReadTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 16)
            self.w, self.b = nn.Parameter(torch.randn(3, 16)), nn.Parameter(torch.randn(3))

        def forward(self, x):
            return F.linear(torch.sigmoid(self.a(x)), self.w, self.b) + self.b

    torch.manual_seed(0)
    m = BiasReadTwice().eval()
    with torch.no_grad():
        m.a.weight[[1, 2]] = 0
    _exact_without_verify(m, torch.randn(2, 8), torch.randn(5, 8))


def test_a_layernorm_module_called_on_two_streams_is_not_compensated():
    class SharedNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.ln = nn.Linear(8, 16), nn.Linear(8, 16), nn.LayerNorm(16)
            self.o1, self.o2 = nn.Linear(16, 3), nn.Linear(16, 3)

        def forward(self, x):
            return self.o1(self.ln(self.a(x))) + self.o2(self.ln(self.b(x)))

    torch.manual_seed(0)
    m = SharedNorm().eval()
    with torch.no_grad():  # the same channels dead in both streams, with different constants
        m.a.weight[[1, 2]], m.a.bias[[1, 2]] = 0, 0.5
        m.b.weight[[1, 2]], m.b.bias[[1, 2]] = 0, -0.3
    small = _exact_without_verify(m, torch.randn(2, 5, 8), torch.randn(3, 5, 8))
    assert small.meta["srfx_report"].compensated_norms == 0


def test_an_in_place_write_through_a_view_keeps_the_channels_it_changes():
    class WriteThroughView(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Linear(8, 16), nn.Linear(16, 3)

        def forward(self, x):
            h = self.a(x)
            h.view(-1, 16).sigmoid_()  # h itself now holds sigmoid(a(x)): dead units emit sigmoid(bias)
            return self.c(h)

    torch.manual_seed(0)
    m = WriteThroughView().eval()
    with torch.no_grad():
        m.a.weight[[1, 2, 5]] = 0
    _exact_without_verify(m, torch.randn(2, 8), torch.randn(4, 8))


def test_augmented_assignment_writes_in_place_like_the_model_does():
    """``h += ...`` changes h in place, so a name still bound to h (the skip here) sees the
    sum. fx's proxies have no ``__iadd__`` and recorded an out-of-place add: the traced graph
    itself computed something else (a VerificationError blamed on srfx). A size taken with
    ``n += ...`` stays a plain number."""

    class AliasedSkip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.a(x)
            skip = h
            h += self.b(torch.relu(h))
            n = h.shape[-1]
            n -= 0
            return self.c(skip.reshape(-1, n))

    torch.manual_seed(0)
    m = AliasedSkip().eval()
    with torch.no_grad():
        m.a.weight[:3], m.a.bias[:3] = 0, 0  # dead in a, alive again after the in-place add
    small = _exact_without_verify(m, torch.randn(3, 4), torch.randn(5, 4))
    assert small.c.in_features == 6
    code = small.code
    assert "iadd" in code or "+=" in code


def test_augmented_assignment_that_nothing_reads_before_still_shrinks():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.a(x)
            h += self.b(h)
            return self.c(torch.relu(h))

    torch.manual_seed(0)
    m = Residual().eval()
    with torch.no_grad():
        m.a.weight[:3], m.a.bias[:3], m.b.weight[:3], m.b.bias[:3] = 0, 0, 0, 0
    small = _exact_without_verify(m, torch.randn(3, 4), torch.randn(5, 4))
    assert small.c.in_features == 3


def test_an_in_place_statement_nothing_reads_survives_batchnorm_folding():
    """``h.relu_()`` and ``h += t`` as statements: graph nodes nobody reads, which fx's dead
    code elimination (run after folding BatchNorm) deleted, changing the result."""

    class Statements(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.bn, self.c2 = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 2, 1)
            self.side = nn.Conv2d(3, 6, 3)

        def forward(self, x):
            h = self.bn(self.c1(x))
            h += self.side(x)
            h.relu_()
            return self.c2(h)

    torch.manual_seed(0)
    m = Statements().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
    _exact_without_verify(m, torch.randn(2, 3, 8, 8), torch.randn(1, 3, 6, 6))


def test_tensor_attributes_are_barriers_not_shape_queries():
    class Attribute(nn.Module):
        def __init__(self, attr):
            super().__init__()
            self.attr, self.a = attr, nn.Linear(8, 16)
            self.o = nn.Linear(5 if attr == "mT" else 16, 3)

        def forward(self, x):
            return self.o(getattr(torch.relu(self.a(x)), self.attr))

    for attr in ("mT", "real", "data"):
        torch.manual_seed(0)
        m = Attribute(attr).eval()  # no zeros at all: nothing may go
        small = _exact_without_verify(m, torch.randn(2, 5, 8), torch.randn(3, 5, 8))
        assert small.a.out_features == 16, attr


def test_a_functional_grouped_transposed_conv_keeps_its_weight_whole():
    class GroupedTransposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.w, self.b = nn.Parameter(torch.randn(8, 2, 3, 3)), nn.Parameter(torch.randn(4))

        def forward(self, x):
            return F.conv_transpose2d(torch.relu(self.a(x)), self.w, self.b, stride=2, groups=2)

    torch.manual_seed(0)
    small = _exact_without_verify(GroupedTransposed().eval(), torch.randn(2, 3, 7, 7), torch.randn(3, 3, 7, 7))
    assert tuple(small.w.shape) == (8, 2, 3, 3)


class _UntraceableGate(nn.Module):
    """Reads a Linear it shares with the model, behind control flow fx cannot trace."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        if x.shape[-1] > 2:
            return self.lin(x).relu()
        return x


class _SharedWithAWholeModule(nn.Module):
    def __init__(self, gate_first: bool):
        super().__init__()
        lin = nn.Linear(8, 8)
        if gate_first:  # fx names a shared module by the first path it finds
            self.gate, self.lin = _UntraceableGate(lin), lin
        else:
            self.lin, self.gate = lin, _UntraceableGate(lin)
        self.pre, self.out = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.gate(self.lin(self.pre(x).relu()).relu()))


@pytest.mark.parametrize("gate_first", [False, True])
def test_a_module_shared_with_a_module_kept_whole_keeps_its_shape(gate_first):
    """The gate is kept whole (fx cannot trace it) and reads the shared Linear inside: slicing
    that Linear for its traced call broke the gate (RewriteError). Its channels now stay."""
    torch.manual_seed(0)
    model = _SharedWithAWholeModule(gate_first).eval()
    with torch.no_grad():
        model.pre.weight[:3], model.pre.bias[:3] = 0, -1.0  # dead inputs of the shared Linear
        model.lin.weight[:2], model.lin.bias[:2] = 0, -1.0  # dead outputs of it
    x = torch.randn(2, 4)
    small = _exact_without_verify(model, x, torch.randn(5, 4))
    assert small.get_submodule("gate").lin.weight.shape == (8, 8)
    reasons = " ".join(g.fixed for g in srfx.analyze(model, x).groups if g.fixed)
    assert "is also read whole inside gate" in reasons
