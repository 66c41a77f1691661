"""torch.compile(model, backend="srfx"): captured graphs are minimized, exact, and the model is left alone."""
import copy
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import srfx
from architectures import MLP, ResidualCNN
from helpers import assert_close, assert_untouched, kill_channels, snapshot
from srfx.report import count_parameters


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _pruned(cls):
    return kill_channels(cls(), rate=0.35, seed=5).eval()


def test_backend_by_name_with_inductor_is_exact_and_smaller():
    from srfx.backend import default_backend

    model = _pruned(ResidualCNN)
    compiled = torch.compile(model, backend="srfx", dynamic=False)
    x = torch.randn(2, 3, 8, 8)
    before = len(default_backend.records)
    with torch.no_grad():
        assert_close(model(x), compiled(x))
        assert_close(model(x + 1), compiled(x + 1))
    (record,) = default_backend.records[before:]
    assert record.status == "minimized", record
    assert record.params_after < record.params_before == count_parameters(model)
    assert count_parameters(record.graph_module) == record.params_after
    assert [n.op for n in record.graph_module.graph.nodes].count("placeholder") == 1  # weights are attributes now


def test_mlp_layers_shrink_and_a_new_batch_size_is_minimized_again():
    model = _pruned(MLP)
    backend = srfx.Backend("eager")
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        for batch in (4, 7):
            x = torch.randn(batch, 1, 28, 28)
            assert_close(model(x), compiled(x))
    assert [r.status for r in backend.records] == ["minimized", "minimized"]
    small = backend.records[0].graph_module
    linears = [m for m in small.modules() if isinstance(m, nn.Linear)]
    originals = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == len(originals)  # functional linears became modules again
    assert sum(m.out_features for m in linears) < sum(m.out_features for m in originals)
    assert "parameters" in str(backend.records[0])


def test_model_is_untouched_and_changed_weights_are_minimized_again():
    model = _pruned(ResidualCNN)
    before = snapshot(model)
    backend = srfx.Backend("eager")
    compiled = torch.compile(model, backend=backend, dynamic=False)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        compiled(x)
    assert_untouched(model, before)
    with torch.no_grad():
        model.fc.weight.mul_(2)
        model.stem[0].weight[:3] = 0  # more dead channels: the old small graph would be wrong
        with pytest.warns(UserWarning, match="minimizing it again"):
            y = compiled(x)
        assert_close(model(x), y)
        assert_close(model(x), compiled(x))
    assert [r.status for r in backend.records] == ["minimized", "minimized"]
    assert backend.records[1].params_after < backend.records[0].params_after


def _fallback_reason(backend):
    reasons = [r.reason for r in backend.records if r.status == "fallback"]
    assert reasons, backend.records
    return reasons[-1]


def test_gradients_fall_back_with_a_warning_and_stay_exact():
    model = _pruned(MLP)
    backend = srfx.Backend("eager")
    compiled = torch.compile(model, backend=backend, dynamic=False)
    x = torch.randn(4, 1, 28, 28)
    with pytest.warns(UserWarning, match="gradients are enabled"):
        y = compiled(x)
    assert y.requires_grad
    assert_close(model(x).detach(), y.detach())
    assert "no_grad" in _fallback_reason(backend)


def test_train_mode_falls_back_and_updates_the_users_statistics():
    model = _pruned(ResidualCNN).train()
    twin = copy.deepcopy(model)
    backend = srfx.Backend("eager")
    compiled = torch.compile(model, backend=backend, dynamic=False)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), pytest.warns(UserWarning, match="train mode"):
        y = compiled(x)
    with torch.no_grad():
        assert_close(twin(x), y)
    assert torch.equal(model.stem[1].running_mean, twin.stem[1].running_mean)  # as eager: updated once


def test_dynamic_shapes_fall_back_with_a_hint():
    model = _pruned(MLP)
    backend = srfx.Backend("eager")
    compiled = torch.compile(model, backend=backend, dynamic=True)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad(), pytest.warns(UserWarning, match="dynamic=False"):
        assert_close(model(x), compiled(x))


def test_graph_breaks_each_graph_handled():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = MLP(), nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))

        def forward(self, x):
            h = self.a(x)
            torch._dynamo.graph_break()
            return self.b(h)

    model = kill_channels(Broken(), rate=0.35, seed=1).eval()
    backend = srfx.Backend("eager")
    compiled = torch.compile(model, backend=backend, dynamic=False)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here should need a fallback
        assert_close(model(x), compiled(x))
    assert len(backend.records) == 2
    assert {r.status for r in backend.records} <= {"minimized", "unchanged"}
    assert backend.records[0].status == "minimized"


def test_weights_held_as_attributes_are_minimized_too():
    """Graphs whose weights are module attributes (dynamo before nn-module inlining, or any fx graph)."""
    model = _pruned(ResidualCNN)
    backend = srfx.Backend("eager")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        run = backend(fx.symbolic_trace(model), [x])
        assert_close(model(x), run(x))
    assert backend.records[0].status == "minimized"


def test_writes_through_data_and_inference_tensors_are_seen():
    """A write through ``.data`` (old-style optimizers, EMA updates, weight clipping) bumps no
    version counter, and inference tensors have none: the minimized graph ran on its stale copy
    of the weights. The default check compares values."""
    model = _pruned(MLP)
    compiled = torch.compile(model, backend=srfx.Backend("eager", warn=False), dynamic=False)
    x = torch.randn(4, 784)
    with torch.no_grad():
        compiled(x)
        model.layers[2].weight.data.mul_(2)
        model.layers[2].bias.data = model.layers[2].bias.data + 1
        assert_close(model(x), compiled(x))
    torch._dynamo.reset()
    with torch.inference_mode():
        served = _pruned(MLP)  # parameters created here are inference tensors
    compiled = torch.compile(served, backend=srfx.Backend("eager", warn=False, check_weights="versions"), dynamic=False)
    with torch.inference_mode():
        compiled(x)
        served.load_state_dict({k: v * 2 for k, v in served.state_dict().items()})
        assert_close(served(x), compiled(x))
