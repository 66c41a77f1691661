"""The analysis's fast paths give what the plain ones give: the O(1) tracer the graph
fx.Tracer builds, meta-tensor facts the facts of a real forward (or a fallback to it), the
memoized movement rule the effects it computes afresh, and the private copy what deepcopy
makes."""
import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import srfx
from architectures import CASES
from srfx.coupling import coupling_groups
from srfx.meta_facts import propagate_on_meta
from srfx.tracing import META_KEY, _FactRecorder, _symbolic_trace, _Tracer, preserved_buffers, private_copy, trace


def _comparable(value):
    """Tensors inside a recorded python value (an output dict) compared by content."""
    from torch.utils import _pytree as pytree

    leaves, spec = pytree.tree_flatten(value)
    return str(spec), [(tuple(x.shape), x.dtype, x.tolist()) if isinstance(x, torch.Tensor) else x for x in leaves]


def _facts(gm):
    out = {}
    for n in gm.graph.nodes:
        f = n.meta.get(META_KEY)
        out[n.name] = None if f is None else (f.shapes, f.dtypes, f.elements, _comparable(f.value))
    return out


def _real_facts(gm, inputs):
    with torch.no_grad(), preserved_buffers(gm):
        _FactRecorder(gm).run(*inputs)
    return _facts(gm)


@pytest.mark.parametrize("name", sorted(CASES))
def test_tracer_builds_fx_graph_and_meta_facts_match_a_real_forward(name):
    torch.manual_seed(0)
    cls, make_inputs = CASES[name]
    model, inputs = cls().eval(), make_inputs()
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    plain = _symbolic_trace(copy.deepcopy(model), fx.Tracer(), len(inputs))
    fast = _symbolic_trace(copy.deepcopy(model), _Tracer(), len(inputs))
    assert fast.code == plain.code
    gm = trace(model, inputs).graph_module
    on_meta = _facts(gm)
    assert on_meta == _real_facts(gm, inputs)
    for p in gm.parameters():
        assert p.device.type == "cpu"  # the meta run put the real tensors back


class _ReadsValues(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) * x.abs().max().item()  # .item() has no meta value


class _Caches(nn.Module):
    """A leaf (opaque to fx) that keeps what forward computed: a meta tensor must not stay."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.last = None

    def forward(self, x):
        self.last = self.fc(x)
        return self.last


@pytest.mark.parametrize("cls", [_ReadsValues, _Caches])
def test_meta_run_declines_what_it_cannot_reproduce(cls):
    from srfx.tracing import _LeafTracer

    x = torch.randn(2, 4)
    gm = _symbolic_trace(private_copy(nn.Sequential(cls()).eval()), _LeafTracer([_Caches], []), 1)
    assert not propagate_on_meta(gm, (x,))
    assert all(p.device.type == "cpu" for p in gm.parameters())
    traced = trace(nn.Sequential(cls()).eval(), x).graph_module  # falls back to a real forward
    assert _facts(traced) == _real_facts(traced, (x,))


def test_meta_run_declines_dtype_mismatch_so_the_real_forward_reports_it():
    gm = _symbolic_trace(private_copy(nn.Linear(4, 3)), _Tracer(), 1)
    assert not propagate_on_meta(gm, (torch.randn(2, 4, dtype=torch.float64),))
    with pytest.raises(srfx.InputError, match="example input"):
        trace(nn.Linear(4, 3), torch.randint(0, 3, (2, 4)))


def test_inplace_activations_and_repeated_blocks_on_meta():
    blocks = [nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(inplace=True)) for _ in range(3)]
    model = nn.Sequential(nn.Conv2d(3, 8, 1), *blocks, nn.Hardswish(inplace=True)).eval()
    x = torch.randn(1, 3, 9, 9)
    gm = _symbolic_trace(private_copy(model), _Tracer(), 1)
    assert propagate_on_meta(gm, (x,))
    assert _facts(gm) == _real_facts(gm, (x,))


class _Heads(nn.Module):
    """Identical attention-style reshapes in several blocks: the movement rule's memo."""

    def __init__(self, depth=3, c=12, heads=3):
        super().__init__()
        self.heads = heads
        self.qkv = nn.ModuleList(nn.Linear(c, 3 * c) for _ in range(depth))
        self.proj = nn.ModuleList(nn.Linear(c, c) for _ in range(depth))

    def forward(self, x):
        b, n, c = x.shape
        for qkv, proj in zip(self.qkv, self.proj):
            q, k, v = qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            a = (q @ k.transpose(-2, -1)).softmax(-1) @ v
            x = x + proj(a.transpose(1, 2).reshape(b, n, c))
        return x


def test_memoized_movement_effects_equal_fresh_ones():
    from srfx.env import NodeEnv
    from srfx.registry import lookup
    from srfx.rules.movement import Movement

    gm = trace(_Heads(), torch.randn(2, 5, 12)).graph_module
    coupling = coupling_groups(gm)  # built with the memo
    modules = dict(gm.named_modules())
    by_value = {k: [coupling.dims[i].ref for i in ids] for k, ids in coupling.by_value.items()}
    checked = 0
    for node in gm.graph.nodes:
        rule = lookup(node, modules)
        if not isinstance(rule, Movement) or node.meta.get(META_KEY) is None:
            continue
        env = NodeEnv(gm, node, lambda key: by_value.get(key, []), modules, coupling.mutated)  # no memo
        fresh, memoized = rule.effects(node, env), coupling.effects[node.name]
        assert fresh.outputs == memoized.outputs and fresh.fixed == memoized.fixed and fresh.meta == memoized.meta
        assert [(l.a, l.b) for l in fresh.links] == [(l.a, l.b) for l in memoized.links]
        for a, b in zip(fresh.links, memoized.links):
            assert (a.pairs is None) == (b.pairs is None)
            if a.pairs is not None:
                assert all((x == y).all() for x, y in zip(a.pairs, b.pairs))
        checked += 1
    assert checked >= 9


def test_private_copy_matches_deepcopy_and_keeps_shared_storage():
    class Shares(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("table", torch.arange(6.0))
            self.register_buffer("view", self.table[2:])  # shares the table's storage

    m = Shares()
    a, b = copy.deepcopy(m), private_copy(m)
    for (ka, ta), (kb, tb) in zip(a.state_dict(keep_vars=True).items(), b.state_dict(keep_vars=True).items()):
        assert ka == kb and type(ta) is type(tb) and torch.equal(ta, tb) and ta.stride() == tb.stride()
        assert ta.requires_grad == tb.requires_grad
        assert tb.data_ptr() != m.state_dict(keep_vars=True)[kb].data_ptr()
    assert b.view.untyped_storage().data_ptr() == b.table.untyped_storage().data_ptr()
