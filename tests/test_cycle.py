"""SqueezeRelease driver: a tiny run on scikit-learn's digits (a few seconds)."""
from __future__ import annotations


import copy
import dataclasses

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from helpers import assert_untouched, snapshot
from srfx.cycle import CycleRecord, ReleaseSettings, Schedule, SqueezeRelease, SupervisedLoop, TensorBatches, kept_indices, sparsity_of, ungather, unit_pruner
from srfx.passes import apply_masks
from srfx.report import count_nonzero, count_stored


@pytest.fixture(scope="module")
def digits():
    sk = pytest.importorskip("sklearn.datasets")
    d = sk.load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:1400], perm[1400:]
    return (x[tr], y[tr]), (x[va], y[va])


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    (x, y), val = digits
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    loop = SupervisedLoop(TensorBatches(x, y, 64, True), TensorBatches(*val, 500, False), lr=3e-3)
    loop.train(m, 10)
    return m


def test_supervised_driver(digits, trained):
    torch.set_num_threads(1)
    (x, y), (vx, vy) = digits
    before = snapshot(trained)
    sr = SqueezeRelease.supervised(
        trained, x[:8], TensorBatches(x, y, 64, True), TensorBatches(vx, vy, 500, False),
        lr=1e-3, schedule=Schedule(cycles=3, target_sparsity=0.7, recovery_epochs=0.5, finetune_epochs=1, tolerance=0.05), log=None,
    )
    final = sr.run()
    assert_untouched(trained, before)  # the driver trains its own copy
    assert isinstance(final, fx.GraphModule)
    assert len(sr.history) == 3 and [r.cycle for r in sr.history] == [1, 2, 3]
    assert all(isinstance(r, CycleRecord) for r in sr.history)
    assert final is sr.models[-1]
    last = sr.history[-1]
    assert last.accuracy == sr.loop.evaluate(final)  # a fresh evaluation agrees with the history
    assert last.stored == count_stored(final) and last.nnz == count_nonzero(final)
    assert all(r.seconds > 0 and r.macs > 0 for r in sr.history)
    assert sr.history[0].stored < count_stored(trained)  # minimize removed dead inputs/neurons
    # released after every cycle but the last; the optimizer was rebuilt each time
    assert [r.released > 0 for r in sr.history] == [True, True, False]
    assert [r.optimizer_rebuilt for r in sr.history] == [True, True, False]
    # the loop's optimizer holds exactly the parameters of the current (released) model
    opt_params = [p for g in sr.loop.optimizer.param_groups for p in g["params"]]
    assert [id(p) for p in opt_params] == [id(p) for p in sr.model.parameters()]
    assert all(p.shape == q.shape for p, q in zip(opt_params, sr.model.parameters()))
    i, best = sr.best()
    assert best is sr.models[i]


def test_user_callables_and_rollback(digits, trained):
    """The adaptive schedule rolls back and halves the rate when accuracy drops too far."""
    torch.set_num_threads(1)
    (x, y), (vx, vy) = digits
    calls = {"train": 0, "rebuild": 0}

    def train(model, epochs, masks):
        calls["train"] += 1
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        for _ in range(int(epochs * 5)):
            idx = torch.randint(0, len(y), (128,))
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            apply_masks(model, masks)
        return model.eval()

    def evaluate(model):
        with torch.no_grad():
            return (model(vx).argmax(1) == vy).float().mean().item()

    sr = SqueezeRelease(
        trained, x[:4], train, evaluate,
        schedule=Schedule(
            cycles=2, target_sparsity=[0.95, 0.5], prune_rate=0.9, tolerance=0.0,
            reference_accuracy=evaluate(trained) + 0.01,  # unreachable: every step rolls back
            min_rate=0.2, recovery_epochs=1, finetune_epochs=1,
        ),
        rebuild_optimizer=lambda m: calls.__setitem__("rebuild", calls["rebuild"] + 1), log=None,
    )
    final = sr.run()
    assert len(sr.history) == 2
    first = sr.history[0]
    assert first.prune_steps == 0 and first.rollbacks == 3  # 0.9 -> 0.45 -> 0.225 -> below min_rate
    assert first.sparsity < 0.05
    assert calls["rebuild"] == 1
    assert sr.history[-1].accuracy == evaluate(final)


def test_bad_arguments(trained):
    import srfx

    f = lambda *a: None  # noqa: E731
    with pytest.raises(ValueError):
        Schedule(cycles=0)
    with pytest.raises(ValueError):
        Schedule(target_sparsity=1.0)
    with pytest.raises(ValueError):
        Schedule(cycles=2, target_sparsity=[0.5])
    with pytest.raises(ValueError):
        Schedule(prune_rate=1.0)
    for bad in (dict(min_rate=0.0), dict(prune_rate=0.2, min_rate=0.3), dict(overshoot=1.5), dict(max_prune_steps=0),
                dict(target_params=0), dict(tolerance=-0.1), dict(tolerance=float("nan")), dict(recovery_epochs=-1),
                dict(finetune_epochs=[1, -1, 1])):
        with pytest.raises(ValueError):
            Schedule(**bad)
    with pytest.raises(TypeError, match="Schedule"):  # the old flat keyword arguments are gone
        SqueezeRelease(trained, torch.randn(1, 64), f, f, schedule={"cycles": 2})
    with pytest.raises(TypeError, match="ReleaseSettings"):
        SqueezeRelease(trained, torch.randn(1, 64), f, f, release=False)
    assert Schedule(cycles=2, target_sparsity=[0.5, 0.7], finetune_epochs=3).finetune == [3, 3]
    with pytest.warns(UserWarning, match="target_params with pruner='magnitude'"):
        SqueezeRelease(trained, torch.randn(1, 64), f, f, schedule=Schedule(target_params=100))
    with pytest.raises(RuntimeError, match="run"):
        SqueezeRelease(trained, torch.randn(1, 64), f, f).best()
    with pytest.raises(srfx.InputError, match="Module"):
        SqueezeRelease("not a model", torch.randn(1, 64), f, f)


def test_sparsity_of():
    m = nn.Linear(4, 5)
    with torch.no_grad():
        m.weight.zero_()
        m.weight[0, :2] = 1.0
    assert sparsity_of(m) == pytest.approx(18 / 20)


def test_batch_transform_draws_from_the_loaders_generator():
    """An augmentation given to TensorBatches uses the loader's generator: the batches repeat
    when the generator's state does (what checkpoint resume relies on), and differ otherwise."""
    x, y = torch.randn(20, 3), torch.arange(20)

    def jitter(xb, generator):
        return xb + torch.randn(xb.shape, generator=generator)

    loader = TensorBatches(x, y, 8, True, seed=3, transform=jitter)
    state = loader.generator.get_state()
    first = [(bx.clone(), by.clone()) for bx, by in loader]
    second = list(loader)
    loader.generator.set_state(state)
    again = list(loader)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], second[0][0])
    assert all(not torch.equal(bx, x[by]) for bx, by in first)  # the transform ran on every batch


def _without_times(history):
    return [{k: v for k, v in r.as_dict().items() if k not in ("seconds", "stage_seconds")} for r in history]


def _driver(digits, trained, schedule=None, **kw):
    (x, y), (vx, vy) = digits
    schedule = schedule or Schedule(cycles=3, target_sparsity=0.6, recovery_epochs=0.3, finetune_epochs=0.5, tolerance=0.1)
    return SqueezeRelease.supervised(
        trained, x[:8], TensorBatches(x, y, 64, True), TensorBatches(vx, vy, 500, False), lr=1e-3, schedule=schedule, log=None, **kw,
    )


@pytest.mark.parametrize("optimizer_state", ["rebuild", "slice"])
def test_checkpoint_resume_gives_the_same_history(digits, trained, tmp_path, optimizer_state):
    """Interrupt the run by an exception in train after cycle 1; a new driver on the same
    checkpoint resumes without redoing cycle 1 and ends with the uninterrupted run's history."""
    torch.set_num_threads(1)
    torch.manual_seed(5)
    full = _driver(digits, trained, optimizer_state=optimizer_state)
    final_full = full.run()

    torch.manual_seed(5)
    ckpt = tmp_path / "sr.ckpt"
    broken = _driver(digits, trained, optimizer_state=optimizer_state, checkpoint=ckpt)
    real_train = broken.train_fn

    def train(model, epochs, masks):
        if len(broken.history) >= 1 and broken.history[0].released:  # cycle 1 is done and released
            raise KeyboardInterrupt("interrupted")
        return real_train(model, epochs, masks)

    broken.train_fn = train
    with pytest.raises(KeyboardInterrupt):
        broken.run()
    assert len(broken.history) == 1 and ckpt.exists()

    torch.manual_seed(123)  # the checkpoint restores the RNG state: this must not matter
    resumed = _driver(digits, trained, optimizer_state=optimizer_state, checkpoint=ckpt)
    calls = []
    real = resumed.train_fn
    resumed.train_fn = lambda m, e, k: calls.append(e) or real(m, e, k)
    final = resumed.run()
    assert _without_times(resumed.history) == _without_times(full.history)
    assert len(calls) < sum(r.prune_steps + r.rollbacks + 1 for r in full.history)  # cycle 1 was not redone
    x = digits[1][0]
    torch.testing.assert_close(final(x), final_full(x))
    assert all(r.optimizer.startswith("sliced" if optimizer_state == "slice" else "rebuilt") for r in resumed.history[:-1])


def test_a_checkpoint_from_other_settings_or_damaged_is_refused_by_name(digits, trained, tmp_path):
    import srfx

    torch.set_num_threads(1)
    ckpt = tmp_path / "sr.ckpt"
    short = Schedule(cycles=1, target_sparsity=0.3, recovery_epochs=0.1, finetune_epochs=0.1, tolerance=1.0)
    _driver(digits, trained, short, checkpoint=ckpt).run()
    other = dataclasses.replace(short, target_sparsity=0.5)
    with pytest.raises(srfx.InputError, match=r"sr\.ckpt was written by a run with other schedule"):
        _driver(digits, trained, other, checkpoint=ckpt).run()
    with pytest.raises(srfx.InputError, match="other optimizer"):
        _driver(digits, trained, short, checkpoint=ckpt, optimizer=torch.optim.SGD).run()
    wider = nn.Sequential(nn.Linear(64, 80), nn.ReLU(), nn.Linear(80, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(srfx.InputError, match="other model"):
        _driver(digits, wider, short, checkpoint=ckpt).run()
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # a copy cut short
    with pytest.raises(srfx.InputError, match=r"sr\.ckpt cannot be read"):
        _driver(digits, trained, short, checkpoint=ckpt).run()
    for not_ours in ({"cycle": 0}, [1, 2]):
        torch.save(not_ours, ckpt)
        with pytest.raises(srfx.InputError, match="not a SqueezeRelease checkpoint"):
            _driver(digits, trained, short, checkpoint=ckpt).run()


def test_sliced_optimizer_state_follows_the_kept_indices():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    loop = SupervisedLoop([(x, y)], [(x, y)], lr=1e-2)
    loop.train(m, 3)
    with torch.no_grad():
        m[0].weight[:, 4] = 0  # an input
        m[0].weight[2] = 0  # a hidden unit (its bias becomes a folded constant)
        m[2].weight[:, 5] = 0
    import srfx

    for _ in range(2):  # the second round goes through the input gather of a compressed model
        small = srfx.compress(ungather(m.eval(), x[:4]), x[:4])
        cuts = kept_indices(m.eval(), x[:4], small.meta[srfx.REPORT_KEY].kept)
        planned = kept_indices(m.eval(), x[:4])  # without the report: a plan of its own agrees
        assert {n: {a: k.tolist() for a, k in axes.items()} for n, axes in cuts.items()} == {n: {a: k.tolist() for a, k in axes.items()} for n, axes in planned.items()}
        old = {n: {k: v.clone() for k, v in loop.optimizer.state[p].items()} for n, p in m.named_parameters()}
        olds = dict(m.named_parameters())
        done, total = loop.adopt(small, m, cuts)
        assert done == total == 6
        for name, p in small.named_parameters():
            st = loop.optimizer.state[p]
            for key in ("exp_avg", "exp_avg_sq"):
                expect = old[name][key]
                for axis, keep in cuts.get(name, {}).items():
                    expect = expect.index_select(axis, keep)
                assert torch.equal(st[key], expect), (name, key)
            if name.endswith("weight"):  # the cuts pick exactly the weights minimize kept
                w = olds[name].detach()
                for axis, keep in cuts.get(name, {}).items():
                    w = w.index_select(axis, keep)
                assert torch.equal(w, p.detach())
        loop.train(small, 1)  # the adopted state trains
        m = small
        with torch.no_grad():
            m.get_submodule("0").weight[:, 1] = 0
    assert m.get_submodule("0").in_features == 8


def test_ungather_undoes_the_input_gather():
    torch.manual_seed(0)
    import srfx

    m = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    with torch.no_grad():
        m[0].weight[:, [1, 6]] = 0
    x = torch.randn(5, 10)
    small = srfx.compress(m, x)
    assert small.get_submodule("0").in_features == 8
    flat = ungather(small, x)
    assert flat.get_submodule("0").in_features == 10 and not any("gather" in n for n, _ in flat.named_buffers())
    torch.testing.assert_close(flat(x), small(x))
    with torch.no_grad():
        small.get_submodule("0").weight[:, 0] = 0
    again = srfx.compress(ungather(small, x), x)
    assert again.get_submodule("0").in_features == 7
    assert again._srfx_gather_0.tolist() == [2, 3, 4, 5, 7, 8, 9]
    plain = nn.Linear(3, 3)
    assert torch.equal(ungather(plain, torch.randn(1, 3)).weight, plain.weight)


def test_unit_pruner_release_off_and_target_params(digits, trained, capsys):
    """Unit pruning kills whole units; release=False keeps the zeros; the run stops once the
    compressed model is small enough; progress writes a status line, log=None nothing else."""
    torch.set_num_threads(1)
    (x, y), (vx, vy) = digits
    schedule = Schedule(cycles=6, target_sparsity=0.5, recovery_epochs=0.3, finetune_epochs=0.3, tolerance=0.5, target_params=1500)
    sr = _driver(digits, trained, schedule, pruner=unit_pruner(x[:256]), release=ReleaseSettings(enabled=False), progress=True)
    final = sr.run()
    assert all(r.released == 0 for r in sr.history)
    assert sr.history[-1].stored <= 1500 or len(sr.history) == 6
    assert len(sr.history) < 6
    widths = [r.widths for r in sr.history]
    assert widths[0][0] < 64 or widths[0][1] < 64  # whole inputs/units went in cycle 1
    assert all(r.stored == r.nnz + 0 or r.stored >= r.nnz for r in sr.history)
    assert sr.history[0].nnz == sr.history[0].params  # unit pruning leaves no zeros inside
    err = capsys.readouterr().err
    assert "cycles" in err or "prune" in err
    assert isinstance(final, fx.GraphModule)


def test_bad_new_arguments(trained):
    f = lambda *a: None  # noqa: E731
    with pytest.raises(ValueError):
        SqueezeRelease(trained, torch.randn(1, 64), f, f, optimizer_state="keep")
    with pytest.raises(ValueError):
        SqueezeRelease(trained, torch.randn(1, 64), f, f, pruner="random")
    with pytest.raises(ValueError):
        Schedule(cycles=2, finetune_epochs=[1.0])
    with pytest.raises(ValueError):
        SupervisedLoop([], [], lr_schedule="step")


def test_progress_line_without_tqdm(monkeypatch, capsys):
    import sys

    from srfx.supervised import _Progress

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # "not installed"
    bar = _Progress(3, "cycles", True)
    assert bar.bar is None
    bar.update(1, "acc 0.9")
    bar.close()
    err = capsys.readouterr().err
    assert "cycles 1/3 acc 0.9" in err
    off = _Progress(3, "cycles", False)
    off.update(1)
    off.close()
    assert capsys.readouterr().err == ""


def test_a_rollback_restores_the_optimizer_state_too(digits, trained):
    """A rejected pruning step's recovery training must not leave its Adam moments behind."""
    torch.set_num_threads(1)
    (x, y), (vx, vy) = digits
    sr = SqueezeRelease.supervised(
        trained, x[:8], TensorBatches(x, y, 64, True), TensorBatches(vx, vy, 500, False), lr=1e-3,
        schedule=Schedule(cycles=1, target_sparsity=0.5, prune_rate=0.5, min_rate=0.3, recovery_epochs=0.2, reference_accuracy=2.0),
        log=None,
    )
    sr.loop.train(sr.model, 0.2)  # an optimizer with state before the step
    before = copy.deepcopy(sr.loop.optimizer.state_dict())
    weights = {k: v.clone() for k, v in sr.model.state_dict().items()}
    masks = {n: p.detach() != 0 for n, p in sr.model.named_parameters() if n.endswith("weight")}
    model, _, steps, rollbacks = sr._prune(sr.model, 0.5, masks)
    assert (steps, rollbacks) == (0, 1)  # 0.5 rolled back, 0.25 is below min_rate
    after = sr.loop.optimizer.state_dict()
    for i, st in before["state"].items():
        for key, value in st.items():
            assert torch.equal(after["state"][i][key], value), (i, key)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_best_prefers_the_more_accurate_of_equal_sizes(trained):
    f = lambda *a: None  # noqa: E731
    sr = SqueezeRelease(trained, torch.randn(1, 64), f, f, schedule=Schedule(cycles=2, tolerance=0.05, reference_accuracy=0.9), log=None)

    def record(cycle, stored, nnz, accuracy):
        return CycleRecord(cycle=cycle, sparsity=0.5, params=stored, stored=stored, nnz=nnz, macs=1, accuracy=accuracy, seconds=1.0,
                           prune_steps=1, rollbacks=0, released=0, optimizer_rebuilt=False)

    sr.history = [record(1, 1000, 990, 0.87), record(2, 1000, 1000, 0.89), record(3, 2000, 2000, 0.95)]
    sr.models = ["first", "second", "third"]
    assert sr.best() == (1, "second")  # same size: the more accurate, despite 10 more nonzeros
    assert sr.best(tolerance=0.0) == (2, "third")  # nothing within 0: the most accurate


def test_distillation_loss_is_zero_only_at_the_teacher():
    from srfx.supervised import distillation_loss

    torch.manual_seed(0)
    teacher = torch.randn(8, 5)
    assert distillation_loss(teacher.clone(), teacher, 4.0).abs() < 1e-6
    other = torch.randn(8, 5)
    assert distillation_loss(other, teacher, 4.0) > 0
    # the T**2 factor: for the same softened distributions, doubling T quadruples the loss
    assert torch.allclose(distillation_loss(2 * other, 2 * teacher, 8.0), 4 * distillation_loss(other, teacher, 4.0))


def test_group_pruner_with_loss_measured_costs_drives_the_cycle(digits, trained):
    """The group pruner ranked by taylor_costs inside the driver: whole units go, so every
    cycle's compressed model is dense (nnz = stored) and smaller than the one before."""
    from srfx.group_pruning import group_pruner

    torch.set_num_threads(1)
    (x, y), _ = digits
    pruner = group_pruner(x[:1], loss=F.cross_entropy, batches=[(x[:256], y[:256]), (x[256:512], y[256:512])])
    sr = _driver(digits, trained, Schedule(cycles=2, target_sparsity=0.4, recovery_epochs=0.3, finetune_epochs=0.3, tolerance=0.5), pruner=pruner)
    sr.run()
    stored = [r.stored for r in sr.history]
    assert stored[0] < count_stored(trained) and stored[1] < stored[0]
    assert all(r.nnz == r.stored for r in sr.history)


def test_models_masked_by_torch_prune_or_parametrize_are_driven_with_their_masks(digits, trained):
    """The driver bakes the masks a model carries into its own copy (deepcopy refused
    torch.nn.utils.prune's computed weight; parametrize's weight was no Parameter, so nothing
    looked prunable); those weights stay pruned, and the user's model keeps its masks."""
    import torch.nn.utils.parametrize as parametrize
    from torch.nn.utils import prune

    torch.set_num_threads(1)
    (x, y), (vx, vy) = digits

    class Keep(nn.Module):
        def __init__(self, keep):
            super().__init__()
            self.register_buffer("keep", keep)

        def forward(self, w):
            return w * self.keep

    pruned, parametrized = copy.deepcopy(trained), copy.deepcopy(trained)
    prune.l1_unstructured(pruned[0], "weight", amount=0.5)
    keep = torch.rand(64, 64, generator=torch.Generator().manual_seed(1)) > 0.5
    parametrize.register_parametrization(parametrized[0], "weight", Keep(keep))
    for model, masked in ((pruned, pruned[0].weight_mask.bool()), (parametrized, keep)):
        sr = SqueezeRelease.supervised(
            model, x[:8], TensorBatches(x, y, 64, True), TensorBatches(vx, vy, 500, False), lr=1e-3, log=None,
            schedule=Schedule(cycles=1, target_sparsity=0.6, recovery_epochs=0.25, finetune_epochs=0.25, tolerance=1.0),
        )
        assert sparsity_of(sr.model) > 0.25  # layer 0's masked half counts as pruned from the start
        sr.run()
        assert not sr.model[0].weight[~masked].any()  # ... and stays pruned through training
    assert hasattr(pruned[0], "weight_orig") and parametrize.is_parametrized(parametrized[0])


def test_nothing_to_prune_is_an_error_and_a_pruner_that_frees_nothing_stops_the_cycle(digits, trained):
    import srfx

    torch.set_num_threads(1)
    (x, y), (vx, vy) = digits
    frozen = copy.deepcopy(trained).requires_grad_(False)
    with pytest.raises(srfx.InputError, match="nothing to prune"):
        SqueezeRelease.supervised(frozen, x[:8], TensorBatches(x, y, 64, True), TensorBatches(vx, vy, 500, False))
    trains = []
    sr = SqueezeRelease.supervised(
        trained, x[:8], TensorBatches(x, y, 64, True), TensorBatches(vx, vy, 500, False), log=None,
        pruner=lambda model, sparsity, masks: dict(masks),  # never frees a weight
        schedule=Schedule(cycles=1, target_sparsity=0.9, recovery_epochs=0.25, finetune_epochs=0.25, tolerance=1.0),
    )
    train = sr.train_fn
    sr.train_fn = lambda model, epochs, masks: (trains.append(epochs), train(model, epochs, masks))[1]
    sr.run()
    assert sr.history[0].prune_steps == 0 and trains == [0.25]  # the fine-tuning only: no recovery for nothing


def test_the_standard_loop_refuses_empty_loaders_and_a_nan_loss():
    import srfx

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(srfx.InputError, match="validation loader is empty"):
        SupervisedLoop([(x, y)], []).evaluate(m)  # an accuracy of 0 would have accepted every step
    with pytest.raises(srfx.InputError, match="training loader gave no batches"):
        SupervisedLoop([], [(x, y)]).train(m, 1)
    with pytest.raises(FloatingPointError, match="nan"):
        SupervisedLoop([(x * float("nan"), y)], [(x, y)]).train(m, 1)


def test_a_loader_that_keeps_its_own_position_is_checkpointed():
    """Loaders with state_dict/load_state_dict (torchdata's StatefulDataLoader, the CIFAR
    bench's) are saved and restored with the loop, so a resumed run sees the same batches."""

    class Positioned(list):
        def __init__(self, batches):
            super().__init__(batches)
            self.epoch = 0

        def state_dict(self):
            return {"epoch": self.epoch}

        def load_state_dict(self, state):
            self.epoch = state["epoch"]

    m = nn.Sequential(nn.Linear(4, 3))
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    train = Positioned(batches)
    train.epoch = 7
    state = SupervisedLoop(train, batches).state_dict(m)
    fresh = Positioned(batches)
    SupervisedLoop(fresh, batches).load_state_dict(m, state)
    assert fresh.epoch == 7
