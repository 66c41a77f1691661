"""Issue 7: bad input gets a typed error that says what to do; unknown structure stays exact;
nothing of the user's is touched; dtypes and memory formats."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize, prune

import srfx
from architectures import ResidualCNN
from helpers import assert_close, assert_untouched, kill_channels, report, snapshot


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # control flow on tensor values: not traceable
            return self.a(x)
        return x


def test_untraceable_model_raises_trace_error_naming_the_line():
    with pytest.raises(srfx.TraceError) as err:
        srfx.compress(DataDependent(), torch.randn(2, 4))
    assert "test_reliability.py" in str(err.value) and "x.sum() > 0" in str(err.value)
    assert "register_notrace_module" in str(err.value)  # says what to try
    assert "control flow" in str(err.value).splitlines()[-1]


def test_tensor_assignment_gets_its_own_advice():
    class Assigns(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)

        def forward(self, x):
            h = self.a(x)
            h[:, :2] = 0.5
            return h

    with pytest.raises(srfx.TraceError) as err:
        srfx.compress(Assigns(), torch.randn(2, 4))
    advice = str(err.value).splitlines()[-1]
    assert "x[...] = v" in advice and "control flow" not in advice


@pytest.mark.parametrize("bad", [torch.randn(2, 5), torch.randint(0, 3, (2, 4))], ids=["shape", "dtype"])
def test_example_input_of_wrong_shape_or_dtype(bad):
    with pytest.raises(srfx.InputError, match="example input"):
        srfx.compress(nn.Linear(4, 3), bad)


def test_example_input_not_a_tensor():
    with pytest.raises(srfx.InputError, match="not a torch.Tensor"):
        srfx.compress(nn.Linear(4, 3), [[1.0, 2.0, 3.0, 4.0]])


def test_wrong_number_of_inputs():
    with pytest.raises(srfx.InputError, match="argument"):
        srfx.compress(nn.Linear(4, 3), (torch.randn(2, 4), torch.randn(2, 4)))


def test_nan_weights_are_named():
    m = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        m[0].weight[0, 0] = float("nan")
    with pytest.raises(srfx.InputError, match=r"0\.weight holds NaN"):
        srfx.compress(m, torch.randn(2, 4))


def test_not_a_module():
    with pytest.raises(srfx.InputError, match="nn.Module"):
        srfx.compress(lambda x: x, torch.randn(2, 4))


class ReturnsFloat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2)

    def forward(self, x):
        return self.a(x), 3.0


def test_outputs_that_are_not_tensors():
    with pytest.raises(srfx.InputError, match="returns a float"):
        srfx.compress(ReturnsFloat(), torch.randn(2, 4))


def test_unsupported_dtype():
    m = nn.Linear(4, 2).to(torch.complex64)
    with pytest.raises(srfx.InputError, match="complex64"):
        srfx.compress(m, torch.randn(2, 4, dtype=torch.complex64))


def test_errors_share_a_base_class():
    for cls in (srfx.TraceError, srfx.InputError, srfx.VerificationError, srfx.RewriteError):
        assert issubclass(cls, srfx.SrfxError)


def test_verification_error_carries_the_measurement(monkeypatch):
    from srfx import verify as verify_module

    m = kill_channels(ResidualCNN(), seed=0).eval()
    wrong = lambda *a: m(*a) + 1.0  # noqa: E731  a candidate that is off by one everywhere
    with pytest.raises(srfx.VerificationError) as err:
        verify_module.verify(m, wrong, (torch.randn(1, 3, 8, 8),))
    assert err.value.max_abs_error == pytest.approx(1.0, rel=1e-5)


class Counter(nn.Module):
    """forward changes Python state fx bakes in as a constant: the trace itself is wrong."""

    def __init__(self):
        super().__init__()
        self.a, self.calls = nn.Linear(4, 2), 0

    def forward(self, x):
        self.calls += 1
        return self.a(x) * self.calls


def test_a_trace_that_differs_from_the_model_is_a_trace_error_not_an_srfx_bug():
    """When the graph fx recorded already computes something else, before any rewrite, the
    error says so (a TraceError naming the likely causes), instead of a VerificationError
    calling it a bug in srfx."""
    with pytest.raises(srfx.TraceError, match="before srfx changed anything") as err:
        srfx.compress(Counter().eval(), torch.randn(3, 4))
    assert isinstance(err.value.__cause__, srfx.VerificationError)


def test_a_reference_that_answers_differently_each_call_gets_no_second_opinion():
    """The float64 second opinion measured the reference's own rounding as its distance from
    a float64 run; a forward whose result changes from call to call (a counter here) looked
    like a model with huge rounding, and a candidate 75% off passed verification."""
    from srfx import verify as verify_module

    frozen = copy.deepcopy(Counter())
    frozen.forward = lambda x: frozen.a(x) * 1
    with pytest.raises(srfx.VerificationError):
        verify_module.verify(Counter(), frozen, (torch.randn(3, 4),))


def test_the_candidates_own_float32_rounding_is_judged_in_float64():
    """A rewrite may round worse than the original in float32 (another order of sums, a bias
    that absorbed a large constant) while computing the same function; when its error is more
    than 10x the original's own, the candidate run in float64 decides. A different function
    still fails."""
    from srfx import verify as verify_module

    class Identity(nn.Module):
        def forward(self, x):
            return x * 1.0

    class RoundsBadly(nn.Module):  # the same function; float32 loses ~5e-4 of x to the 1e4
        def forward(self, x):
            return (x + 1e4) - 1e4

    class Different(nn.Module):
        def forward(self, x):
            return (x + 1e4) - 1e4 + 1e-3

    x = (torch.randn(4, 16),)
    assert verify_module.verify(Identity(), RoundsBadly(), x) > 1e-5  # accepted, the float32 error reported
    with pytest.raises(srfx.VerificationError):
        verify_module.verify(Identity(), Different(), x)


# --- conservative structure -------------------------------------------------------------------
class BufferWrittenInForward(nn.Module):
    """A running statistic updated in place on every call, then read."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)
        self.register_buffer("ema", torch.zeros(6))

    def forward(self, x):
        h = self.a(x)
        self.ema.add_(h.mean(0))
        return self.b(h + self.ema)


def test_buffer_written_in_forward_is_exact_and_its_state_does_not_drift():
    m = BufferWrittenInForward().eval()
    with torch.no_grad():
        m.a.weight[1] = 0
        m.b.weight[:, 2] = 0
    before = snapshot(m)
    small = srfx.compress(m, torch.randn(3, 4))
    assert_untouched(m, before)
    assert small.a.out_features == 6  # the stream mixes with a buffer written in place: kept
    x = torch.randn(3, 4)
    with torch.no_grad():  # srfx's own runs left the state where the user's model has it
        assert torch.allclose(m(x), small(x), rtol=1e-5, atol=1e-6)
        assert torch.allclose(m(x), small(x), rtol=1e-5, atol=1e-6)


# --- nothing of the user's is touched -----------------------------------------------------------
def test_train_mode_hooks_and_flags_survive_with_a_warning():
    m = kill_channels(ResidualCNN(), seed=2).train()
    calls = []
    m.fc.register_forward_hook(lambda *a: calls.append(1))
    before = snapshot(m)
    with pytest.warns(UserWarning, match="train mode"):
        srfx.compress(m, torch.randn(2, 3, 8, 8))
    assert_untouched(m, before)
    assert m.training
    m(torch.randn(2, 3, 8, 8))
    assert calls == [1]  # the user's hook stays registered, and srfx never called it


def test_module_hooks_are_left_out_of_the_result_with_a_warning():
    """fx does not record a Linear's forward hook, and the hook would see the compacted
    tensors: srfx compresses the model without its hooks, says so, and never calls them."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        m[0].weight[[1, 2]] = 0  # two dead units emitting sigmoid(bias)
    seen = []

    def doubling(module, inputs, output):
        seen.append(tuple(output.shape))
        return output * 2

    handle = m[0].register_forward_hook(doubling)
    with pytest.warns(UserWarning, match=r"module hooks \(0\)"):
        small = srfx.compress(m, torch.randn(2, 8))
    assert seen == [] and getattr(small, "0").out_features == 14
    x = torch.randn(5, 8)
    handle.remove()
    assert torch.allclose(small(x), m(x), rtol=1e-5, atol=1e-6)  # the model without its hook, exactly
    assert len(m[0]._forward_hooks) == 0 and seen == []


def test_prune_masks_are_honoured_and_left_in_place():
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    prune.ln_structured(m[2], "weight", amount=0.5, n=1, dim=1)  # half the hidden units unread
    before = {k: v.clone() for k, v in m.state_dict().items()}
    small = srfx.compress(m, torch.randn(4, 6))
    assert getattr(small, "0").out_features == 4
    assert hasattr(m[2], "weight_orig") and hasattr(m[2], "weight_mask")
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_parametrized_masks_from_torch_ao_sparsifier():
    from torch.ao.pruning import WeightNormSparsifier

    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(8, 1), zeros_per_block=8)
    sparsifier.prepare(m, [{"tensor_fqn": "2.weight"}])
    sparsifier.step()
    assert parametrize.is_parametrized(m[2])
    x = torch.randn(4, 8)
    expected = m(x).detach()
    small = srfx.compress(m, x)
    assert getattr(small, "0").out_features < 8
    assert parametrize.is_parametrized(m[2])  # the user's model keeps its parametrization
    srfx.plan(m, x)
    # ... and its masked weight: parametrize's class is shared with srfx's deep copy, whose
    # un-parametrizing once deleted the `weight` property of the user's module too
    assert torch.equal(m(x), expected)
    assert torch.allclose(small(x), expected, rtol=1e-5, atol=1e-6)


# --- dtypes and memory formats -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(dtype):
    m = kill_channels(ResidualCNN(), seed=3).eval().to(dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    small = srfx.compress(m, x)  # verified with srfx.verify.TOLERANCES[dtype]
    assert report(small).stored_after < report(small).stored_before
    assert small(x).dtype == dtype


def test_channels_last_input():
    m = kill_channels(ResidualCNN(), seed=4).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    small = srfx.compress(m, x)
    assert report(small).stored_after < report(small).stored_before


def test_example_input_on_another_device():
    with pytest.raises(srfx.InputError, match="device"):
        srfx.compress(nn.Linear(4, 3), torch.randn(2, 4, device="meta"))


def test_float32_rounding_of_the_original_is_not_a_false_alarm():
    """A dead channel carrying 3e4 that the next bias cancels: the float32 original is itself
    off by ~1e-3 (relative) from its exact value; the candidate is judged against float64."""

    class Cancel(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    m = Cancel().eval()
    with torch.no_grad():
        m.fc1.weight[3] = 0
        m.fc1.bias[3] = 3e4
        m.fc2.weight[:, 3] = 1.0
        m.fc2.bias[:] = -3e4
    small = srfx.compress(m, torch.randn(8, 4))
    assert small.fc1.out_features == 3
    x = torch.randn(8, 4)
    with torch.no_grad():
        exact = m.double()(x.double())
        assert (small(x).double() - exact).abs().max() < 1e-4 * exact.abs().max() + 1e-2


def test_expanded_buffer_constant_does_not_break_compress():
    """fx lifts ``buffer.expand(...)`` as a stride-0 constant; restoring buffers after srfx's own
    runs must not try to write into it (found with HF's token_type_ids buffer)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(3, 10), nn.Linear(10, 4)
            self.register_buffer("token_type", torch.zeros(1, 10, dtype=torch.long))

        def forward(self, x):
            return self.fc(x + self.emb(self.token_type.expand(2, 10)))

    model = Net().eval()
    x = torch.randn(2, 10, 10)
    small = srfx.compress(model, x)
    assert torch.equal(model(x), small(x))


def test_convs_kept_only_because_torch_needs_a_channel_stay_idempotent():
    """The head reads nothing, so every conv would lose all its channels; torch needs one
    each. Kept one at a time from the output back, the upstream conv keeps the channel the
    downstream one reads, not an arbitrary dead one that a second pass would remove
    (found by hypothesis, seed 13)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList([nn.Conv2d(1, 2, 1, bias=False), nn.Conv2d(2, 2, 1, bias=False)])
            self.bn, self.gap, self.head = nn.BatchNorm2d(2), nn.AdaptiveAvgPool2d(1), nn.Linear(2, 1)

        def forward(self, x):
            x = torch.relu(self.convs[1](torch.relu(self.bn(self.convs[0](x)))))
            return self.head(self.gap(x).flatten(1))

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.bn.weight[0] = 0
        model.bn.running_mean.normal_()
        model.bn.bias.normal_()
        model.head.weight[0] = 0
    x = torch.randn(2, 1, 4, 4)
    once = srfx.compress(model, x)
    twice = srfx.compress(once, x)
    assert once.meta["srfx_report"].params_after == twice.meta["srfx_report"].params_after
    assert torch.allclose(model(x), once(x))


def test_traces_in_two_threads_do_not_record_each_other():
    """fx patches ``nn.Module.__call__`` process-wide while it traces: a second thread's trace
    started while the first is inside forward must wait for it, not record into it (it
    failed with "module is not installed as a submodule"). torch.fx's ``dis`` is fx's own
    afterwards and both graphs are right."""
    import threading
    import time

    import torch.fx.proxy as fx_proxy

    from srfx.tracing import trace

    original_dis = fx_proxy.dis
    inside, go = threading.Event(), threading.Event()

    class Waits(nn.Module):
        def __init__(self, wait):
            super().__init__()
            self.wait, self.lin = wait, nn.Linear(4, 4)

        def forward(self, x):
            if self.wait and isinstance(x, torch.fx.Proxy):
                inside.set()
                assert go.wait(30)
            return self.lin(x).relu()

    results, errors = {}, {}

    def run(k):
        try:
            results[k] = trace(Waits(k == 0), torch.randn(2, 4))
        except Exception as e:  # reported below
            errors[k] = e

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    threads[0].start()
    assert inside.wait(30)
    threads[1].start()
    time.sleep(0.5)  # the second trace reaches fx while the first is still inside forward
    go.set()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert fx_proxy.dis is original_dis
    for traced in results.values():
        assert [n.op for n in traced.graph_module.graph.nodes] == ["placeholder", "call_module", "call_method", "output"]


def test_a_nan_output_is_never_a_small_error():
    """max(0.0, nan) is 0.0: a candidate that outputs NaN once passed with error 0. NaN or
    infinity where the reference is finite is an infinite error, whatever the float64
    second opinion says."""
    from srfx import verify as verify_module

    class Overflows(nn.Module):  # float64 says it is the identity; float16 overflows to inf - inf
        def forward(self, x):
            return (x * 1e3 * 1e3) / 1e3 / 1e3

    class Identity(nn.Module):
        def forward(self, x):
            return x * 1.0

    x = (torch.randn(4, 16).half(),)
    abs_err, rel_err, ok = verify_module.compare_outputs(x[0], torch.full_like(x[0], float("nan")))
    assert not ok and abs_err == float("inf")
    with pytest.raises(srfx.VerificationError):
        verify_module.verify(Identity(), Overflows(), x)
    both_nan = torch.tensor([float("nan"), 1.0])
    assert verify_module.compare_outputs(both_nan, both_nan.clone())[2], "NaN where the original has NaN agrees"


def test_keyword_only_optional_arguments_are_fixed_at_their_defaults():
    class KwOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x, *, mask=None, scale=2.0):
            y = self.fc2(torch.relu(self.fc1(x))) * scale
            return y if mask is None else y * mask

    m = KwOnly().eval()
    with torch.no_grad():
        m.fc1.weight[:6] = 0
        m.fc1.bias[:6] = -1
    x = torch.randn(2, 8)
    small = srfx.compress(m, x)
    assert small.fc1.out_features == 10
    torch.testing.assert_close(small(x), m(x))


def test_wrappers_name_the_model_inside():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    for wrapped, inner in ((nn.DataParallel(m), "model.module"), (torch.compile(m), "model._orig_mod")):
        for call in (srfx.compress, srfx.analyze, srfx.plan):
            with pytest.raises(srfx.InputError, match=inner.replace(".", r"\.")):
                call(wrapped, torch.randn(2, 8))


def test_forward_with_star_args_is_told_to_name_its_inputs():
    class VarArgs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, *xs):
            return sum(self.fc(x) for x in xs)

    with pytest.raises(srfx.TraceError, match="names each input"):
        srfx.compress(VarArgs(), torch.randn(2, 8))


@pytest.mark.parametrize("width, compensated", [(64, False), (4, True)])
def test_compensation_is_used_only_where_it_makes_the_model_smaller(width, compensated):
    """One dead stream channel under a LayerNorm whose reader is wide: the reader's u and v
    columns cost more than the channel frees (148 -> 158 stored before), so the channel stays
    and the model keeps its size. A narrow reader still gets the compensation."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.ln, self.head = nn.Linear(3, 16 if compensated else 6), nn.LayerNorm(16 if compensated else 6), nn.Linear(16 if compensated else 6, width)

        def forward(self, x):
            return self.head(self.ln(self.inp(x)))

    torch.manual_seed(0)
    m = Block().eval()
    with torch.no_grad():
        m.inp.weight[0] = 0
        m.inp.bias[0] = 0.7
    x = torch.randn(2, 3)
    small = srfx.compress(m, x)
    r = report(small)
    assert r.stored_after <= r.stored_before
    assert r.compensated_norms == int(compensated)
    assert (r.stored_after < r.stored_before) == compensated
    torch.testing.assert_close(small(x), m(x))
    assert len(srfx.plan(m, x).compensations) == int(compensated), "srfx.plan shows what compress does"


def test_a_compensation_that_would_grow_the_model_is_dropped_by_the_backstop(monkeypatch):
    """With the per-norm trial switched off, the wide-reader case above still comes back no
    larger than the input: the last check plans without compensation."""
    from srfx import api

    monkeypatch.setattr(api, "_COMPENSATION_PAYS_FROM", 0)
    m = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Linear(6, 64)).eval()
    with torch.no_grad():
        m[0].weight[0] = 0
        m[0].bias[0] = 0.7
    x = torch.randn(2, 3)
    r = report(srfx.compress(m, x))
    assert r.stored_after <= r.stored_before and r.compensated_norms == 0



_PICKLE_THEN_TRACE = """
import io, torch, torch.nn as nn, srfx
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
    def forward(self, x, mask=None, flag=False):
        y = self.fc(x)
        if mask is not None:
            y = y * mask
        return y * 2 if flag else y
small = srfx.compress(M().eval(), torch.randn(2, 4))
assert "_assert_is_none" not in small.code and "specialized" not in small.code, small.code
try:
    small(torch.randn(2, 4), torch.ones(2, 4))
except TypeError:
    pass
else:
    raise SystemExit("the result accepted an argument it fixed at its default")
buf = io.BytesIO(); torch.save(small, buf); buf.seek(0)
loaded = torch.load(buf, weights_only=False)
srfx.compress(loaded, torch.randn(2, 4))
srfx.compress(nn.Sequential(nn.Linear(4, 3)), torch.randn(2, 4))
print("ok")
"""


def test_arguments_fixed_at_their_defaults_leave_the_signature_and_pickles_stay_traceable():
    """fx left `_assert_is_none(mask)` checks in results (timm ViT's attn_mask=None). Once such
    a GraphModule had been through torch.save/torch.load (a SqueezeRelease checkpoint), every
    later fx trace in the process failed with KeyError: resuming a ViT run was impossible.
    Fixed arguments now leave the result's signature. (A subprocess: a regression poisons fx
    for the whole process.)"""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _PICKLE_THEN_TRACE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


class _DeadUnit(nn.Module):
    """A hidden unit that is a nonzero constant (zero row, bias 0.5) feeding ``combine``."""

    def __init__(self, combine):
        super().__init__()
        self.a, self.b, self.combine = nn.Linear(6, 8), nn.Linear(8, 3), combine
        with torch.no_grad():
            self.a.weight[:2] = 0
            self.a.bias[:2] = 0.5

    def forward(self, x):
        return self.b(self.combine(torch.relu(self.a(x)), x))


@pytest.mark.parametrize("combine", [
    lambda h, x: h.sum(0, keepdim=True).expand_as(h),     # a sum over the batch counts it
    lambda h, x: h * x.size(0),                           # the batch size as a number
    lambda h, x: h * x.shape[0] / 4,
    lambda h, x: h * torch.sign(x.mean()).item(),          # a number read off the data
], ids=["sum-over-batch", "size0", "shape0", "item"])
def test_constants_that_depend_on_the_batch_or_the_data_are_not_folded(combine):
    """Found by an audit: such a constant was folded with the example's value (batch 4, a
    positive mean) and verification, on inputs of the same batch and sign, passed it."""
    torch.manual_seed(0)
    model = _DeadUnit(combine).double().eval()
    example = torch.rand(4, 6, dtype=torch.float64) + 0.5
    small = srfx.compress(model, example)
    for x in (torch.rand(7, 6, dtype=torch.float64) + 0.5, -torch.rand(4, 6, dtype=torch.float64) - 0.5):
        torch.testing.assert_close(small(x), model(x), rtol=1e-10, atol=1e-12)


class _Stage(nn.Module):
    """conv (4 of 8 channels dead) -> ``op`` -> conv: what ``op`` does along channels decides."""

    def __init__(self, op, dead=(1, 2, 5)):
        super().__init__()
        self.c1, self.c2, self.op = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), op
        with torch.no_grad():
            self.c1.weight[list(dead)] = 0
            self.c1.bias[list(dead)] = torch.tensor([0.0, 0.3, -0.2])  # dead: zero, and two nonzero constants
            self.c2.weight[:, [3, 6]] = 0  # and two channels after the op are never read

    def forward(self, x):
        return self.c2(self.op(self.c1(x)))


class _FunctionalDepthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 1, 3, 3))

    def forward(self, h):
        return nn.functional.conv2d(h, self.w, groups=8, padding=1)


@pytest.mark.parametrize("op", [
    lambda h: torch.roll(h, 3, dims=1),                          # the shift is modulo the channel count
    lambda h: h.roll(5, 1),
    lambda h: nn.functional.channel_shuffle(h, 2),               # interleaves count / groups
    lambda h: nn.functional.softmax(h),                          # implicit dim: 1 on a 4-D tensor
    lambda h: torch.relu(h).sum(dim=()).expand(2, 8, 6, 6),      # dim=() reduces every axis
    "functional-depthwise",
], ids=["roll", "roll-method", "channel_shuffle", "softmax-implicit-dim", "sum-dim-empty", "functional-depthwise"])
def test_ops_whose_meaning_depends_on_the_channel_count_stay_exact(op):
    """Found by an audit: these were rewritten as if channels could leave freely (a false
    VerificationError, or a raw RuntimeError)."""
    torch.manual_seed(0)
    if op == "functional-depthwise":  # minimize rewrites a module's groups, not a literal argument
        op = _FunctionalDepthwise()
    model = _Stage(op).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    small = srfx.compress(model, x)
    y = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(small(y), model(y), rtol=1e-10, atol=1e-12)


def test_batchnorm_is_not_folded_into_a_conv_whose_weight_is_read_elsewhere():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.c(x)) + nn.functional.conv2d(x, self.c.weight, self.c.bias, padding=1)

    torch.manual_seed(0)
    model = Shared().eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(srfx.compress(model, x)(x), model(x))


def test_an_unbatched_conv_keeps_its_channels():
    model = _Stage(nn.Identity()).eval()
    x = torch.randn(3, 6, 6)  # (C, H, W): channels on axis 0
    torch.testing.assert_close(srfx.compress(model, x)(x), model(x))


class _SizeFromTheStream(nn.Module):
    """nanoGPT-style: C is read off the residual stream and sizes the heads of q, k, v."""

    def __init__(self):
        super().__init__()
        self.inp, self.qkv, self.proj, self.head = nn.Linear(5, 8), nn.Linear(8, 24), nn.Linear(8, 8), nn.Linear(8, 3)
        with torch.no_grad():  # stream channel 3: dead in every writer, unread by every reader
            for writer in (self.inp, self.proj):
                writer.weight[3] = 0
                writer.bias[3] = 0
            self.qkv.weight[:, 3] = 0
            self.head.weight[:, 3] = 0

    def forward(self, x):
        h = self.inp(x)
        B, T, C = h.size()
        q, k, v = self.qkv(h).split(8, dim=2)
        q, k, v = (t.view(B, T, 2, C // 2).transpose(1, 2) for t in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, 8)
        return self.head(h + self.proj(y))


def test_a_channel_count_read_off_one_tensor_still_sizes_the_other():
    """Found by an audit: the stream lost channel 3, so C // 2 became 3 and the view of q (which
    kept its 8 channels) failed with a RuntimeError. Sizes read off a shrinking axis now keep
    the example's value; sizes of other axes stay live (another sequence length still works)."""
    torch.manual_seed(0)
    model = _SizeFromTheStream().eval()
    small = srfx.compress(model, torch.randn(2, 4, 5))
    assert small.inp.out_features == 7
    for shape in ((2, 4, 5), (3, 6, 5)):
        x = torch.randn(*shape)
        torch.testing.assert_close(small(x), model(x))


def test_a_model_on_the_meta_device_is_an_input_error():
    m = ResidualCNN().to("meta").eval()
    with pytest.raises(srfx.InputError, match="meta device"):
        srfx.compress(m, torch.randn(2, 3, 8, 8, device="meta"))


def test_compress_under_autocast_works_and_verifies_at_the_models_dtype():
    """An enclosing autocast is the caller's execution policy: verification under it would
    measure bfloat16 rounding (5e-3 on this model) and pass a rewrite wrong by that much."""
    m = kill_channels(ResidualCNN(), seed=5).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        small = srfx.compress(m, x)
        srfx.plan(m, x)
        under = small(x)
        assert under.dtype == m(x).dtype  # the result runs under autocast like the model
    assert report(small).max_rel_error <= srfx.verify.TOLERANCES[torch.float32][0]
    assert torch.allclose(small(x), m(x), rtol=1e-5, atol=1e-6)


class FullPrecision(nn.Module):
    """Computes in float32 whatever autocast the caller runs it under (as models do for
    numerically sensitive parts)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            return self.b(torch.relu(self.a(x.float())))


def test_an_autocast_block_inside_forward_is_part_of_the_result():
    """fx ran ``with torch.autocast(...)`` while tracing and recorded nothing of it: under the
    caller's autocast the result computed in bfloat16 where the model keeps float32. The
    block's entry and exit are now nodes of the graph, and survive a second compress."""
    torch.manual_seed(0)
    m = FullPrecision().eval()
    with torch.no_grad():
        m.a.weight[:6], m.a.bias[:6] = 0, -1.0  # six dead units
    x = torch.randn(3, 8)
    small = srfx.compress(m, x)
    assert small.a.out_features == 10
    again = srfx.compress(small, x)
    exported = torch.export.export(small, (x,)).module()
    for result in (small, again, exported):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected, got = m(x), result(x)
        assert got.dtype == expected.dtype == torch.float32
        assert_close(expected, got)


def test_torchscript_models_are_refused_and_scripted_submodules_kept_whole():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        m[0].weight[:5] = 0
    x = torch.randn(2, 8)
    for call in (srfx.compress, srfx.analyze, srfx.plan):
        with pytest.raises(srfx.InputError, match="TorchScript"):
            call(torch.jit.script(m), x)
    m[1] = torch.jit.script(nn.ReLU())  # a compiled block inside: fx cannot see through it
    small = srfx.compress(m, x)
    assert torch.allclose(small(x), m(x), rtol=1e-5, atol=1e-6)
    assert report(small).params_after == report(small).params_before


def test_an_exported_module_is_kept_whole_and_the_plan_says_to_pass_the_model_before_export():
    """torch.export(...).module() is an ATen-level graph: srfx has no rules for ATen ops, so it
    keeps every channel (exact, no smaller) and says what to pass instead."""
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        m[0].weight[:5] = 0
    x = torch.randn(2, 8)
    exported = torch.export.export(m, (x,)).module()
    small = srfx.compress(exported, x)
    assert report(small).params_after == report(small).params_before
    assert torch.allclose(small(x), m(x), rtol=1e-5, atol=1e-6)
    assert "pass the nn.Module before export" in str(srfx.plan(exported, x))
    assert report(srfx.compress(m, x)).params_after < report(small).params_after  # the model itself shrinks


class ShapeGate(nn.Module):
    """Python control flow on a shape: fx cannot trace this forward."""

    def forward(self, x):
        if x.shape[-1] > 4:
            return x * 2.0
        return x


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.gate, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), ShapeGate(), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.gate(torch.relu(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(h)).mean((2, 3)))


def test_a_submodule_fx_cannot_trace_is_kept_whole_and_the_rest_shrinks(tmp_path):
    """It used to make the whole model untraceable (TraceError). Now that module instance is
    kept whole, with the failure as the reason, and channels elsewhere still go; the leaf runs
    its own code, so its branch is still taken per call."""
    torch.manual_seed(0)
    model = GatedNet().eval()
    with torch.no_grad():
        model.conv1.weight[:2] = 0  # in front of the gate: kept (the gate reads them whole)
        model.conv2.weight[:3] = 0  # behind it: they go
        model.conv2.bias[:3] = -1.0
    x = torch.randn(2, 3, 8, 8)
    small = srfx.compress(model, x)
    assert small.conv1.out_channels == 8 and small.conv2.out_channels == 5
    reasons = [g.fixed for g in srfx.analyze(model, x).groups if g.fixed]
    assert any("gate kept whole: torch.fx could not trace its forward" in r for r in reasons), reasons
    for shape in ((2, 3, 8, 8), (1, 3, 4, 4)):  # both of the gate's branches
        y = torch.randn(*shape)
        assert_close(model(y), small(y))
    path = tmp_path / "small.pt"
    torch.save(small, path)  # a GraphModule pickles by retracing with its tracer class
    again = torch.load(path, weights_only=False)
    assert_close(model(x), again(x))


def halve_if_wide(x):
    """Control flow on a shape, registered with timm as a function fx should not trace (fx
    wraps only public names)."""
    if x.shape[-1] > 4:
        return x * 0.5
    return x


class HelperBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a, self.conv_b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.conv_b(halve_if_wide(torch.relu(self.conv_a(x))))


class HelperNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.fc = nn.Conv2d(3, 8, 3, padding=1), HelperBlock(), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.block(torch.relu(self.stem(x)))).mean((2, 3)))


def test_a_registered_untraceable_function_is_a_finer_barrier_than_its_whole_module():
    """Plain fx fails inside the block; keeping the block whole would hide conv_b. With timm's
    not-traceable functions recorded as calls nothing is kept whole, and that trace is chosen."""
    timm_layers = pytest.importorskip("timm.layers")
    timm_layers.register_notrace_function(halve_if_wide)
    torch.manual_seed(0)
    model = HelperNet().eval()
    with torch.no_grad():
        model.block.conv_b.weight[:3] = 0
        model.block.conv_b.bias[:3] = -1.0
    x = torch.randn(2, 3, 8, 8)
    traced = srfx.trace(model, x)
    assert traced.front_end == "fx+known-functions" and traced.untraceable == {}
    small = srfx.compress(model, x)
    assert small.block.conv_b.out_channels == 5
    for shape in ((2, 3, 8, 8), (1, 3, 4, 4)):
        y = torch.randn(*shape)
        assert_close(model(y), small(y))


class GatedStack(nn.Module):
    """Forty blocks whose forward fx cannot trace, between convs that can shrink."""

    def __init__(self, depth=40):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 1) for _ in range(depth))
        self.gates = nn.ModuleList(ShapeGate() for _ in range(depth))
        self.widen, self.head = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 6, 1)

    def forward(self, x):
        for conv, gate in zip(self.convs, self.gates):
            x = gate(conv(x))
        return self.head(self.widen(x).relu()).mean((2, 3))


def test_many_untraceable_modules_of_one_class_are_kept_whole_in_a_few_traces(monkeypatch):
    """After the second failure of a class every module of it is kept whole at once: forty
    failing blocks cost three traces, not forty-one (srfx gave up after 32)."""
    import srfx.tracing as tracing

    traces = []
    real = tracing._symbolic_trace
    monkeypatch.setattr(tracing, "_symbolic_trace", lambda *a: traces.append(1) or real(*a))
    torch.manual_seed(0)
    model = GatedStack().eval()
    with torch.no_grad():
        model.widen.weight[:3] = 0
        model.widen.bias[:3] = -1.0
    x = torch.randn(1, 4, 6, 6)
    srfx.trace(model, x)
    # per front end: fails in gates.0, then in gates.1, then the class is kept whole at once; with timm
    # installed the same again with its not-traceable functions as calls
    assert len(traces) in (3, 6)
    small = srfx.compress(model, x)
    assert small.widen.out_channels == 5
    assert_close(model(x), small(x))


class DtypeCheck(nn.Module):
    """Casts its input to the weights' dtype only when they differ (as HF models do)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        if x.dtype != self.a.weight.dtype:
            x = x.to(self.a.weight.dtype)
        return self.b(torch.relu(self.a(x)))


def _compressed_without_three_units(model: nn.Module):
    """``model`` (a: 4 -> 8, b: 8 -> 2) with b's first three columns zero, compressed and
    checked on its example: (small, example)."""
    torch.manual_seed(0)
    with torch.no_grad():
        model.b.weight[:, :3] = 0
    x = torch.randn(3, 4)
    small = srfx.compress(model, x)
    assert small.a.out_features == 5
    assert_close(model(x), small(x))
    return small, x


def test_a_condition_on_dtypes_is_decided_by_the_example():
    """It made the model untraceable (TraceError). Now the example's dtypes decide it and the
    model compresses; the other conditions on proxies still fail the trace."""
    _compressed_without_three_units(DtypeCheck().eval())
    with pytest.raises(srfx.TraceError):
        srfx.compress(GatedRoot().eval(), torch.randn(2, 4))


class HalfReturnsFloat(nn.Module):
    """Returns float32 logits even when its weights are half (a condition on a parameter's dtype)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        if self.b.weight.dtype in (torch.float16, torch.bfloat16):
            h = h.float()
        return h


def test_a_dtype_decision_is_checked_when_the_compressed_model_runs():
    """The example's dtypes decided the branch. After ``.half()`` the model would take the
    other one (float32 logits); the compressed model used to return half logits without a
    word, and now refuses with the reason and the remedy."""
    model = HalfReturnsFloat().eval()
    small, x = _compressed_without_three_units(model)
    assert model.half()(x.half()).dtype == torch.float32
    with pytest.raises(AssertionError, match="Compress again with an example of the dtypes"):
        copy.deepcopy(small).half()(x.half())
    assumptions = small.meta[srfx.REPORT_KEY].assumptions
    assert len(assumptions) == 2 and "`b.weight.dtype == torch.float16` is False" in assumptions[0]
    again = srfx.compress(small, x)  # the guards survive a second compress, once each
    assert again.meta[srfx.REPORT_KEY].assumptions == assumptions
    with pytest.raises(AssertionError):
        again.half()(x.half())
    exported = torch.export.export(small, (x,)).module()  # consumers take the guards
    assert_close(small(x), exported(x))


class ClampInHalf(nn.Module):
    """HF's encoder layers (BART, Whisper, ...): clamp only when the stream is float16, a
    condition on an intermediate value's dtype, short-circuiting a data-dependent test."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(6, 12), nn.Linear(12, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = x + self.fc2(torch.relu(self.fc1(x)))
        if h.dtype == torch.float16 and not torch.isfinite(h).all():
            h = h.clamp(-1000, 1000)
        return self.out(h)


def test_a_condition_on_an_intermediate_dtype_is_decided_by_the_example_too():
    """It kept the block whole (its FFN could not shrink); now the example decides it (the
    value it takes on the example, run eagerly up to there) and a guard checks it on every call."""
    torch.manual_seed(0)
    model = ClampInHalf().eval()
    with torch.no_grad():
        model.fc1.weight[:5], model.fc1.bias[:5] = 0, -1.0  # five dead hidden units
    x = torch.randn(3, 6)
    assert not srfx.trace(model, x).untraceable
    small = srfx.compress(model, x)
    assert small.fc1.out_features == 7
    assert_close(model(x), small(x))
    assert "`add.dtype == torch.float16` is False" in small.meta[srfx.REPORT_KEY].assumptions[0]
    with pytest.raises(AssertionError, match="Compress again"):
        copy.deepcopy(small).half()(x.half())


class GatedRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return x


class SpareGate(nn.Module):
    """Two called gates make ShapeGate a failing class; a third, never called, is kept whole too."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.spare = ShapeGate(), ShapeGate(), ShapeGate()
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        return self.lin(self.b(self.a(x)))


def test_a_module_of_a_failing_class_that_is_never_called_does_not_break_the_trace():
    model = SpareGate().eval()
    traced = srfx.trace(model, torch.randn(2, 6))
    assert {"a", "b", "spare"} <= set(traced.untraceable)
    x = torch.randn(2, 6)
    assert_close(model(x), srfx.compress(model, x)(x))
