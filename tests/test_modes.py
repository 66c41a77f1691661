"""srfx measures a user's model in eval mode and gives back every submodule's own mode: a
BatchNorm frozen (eval) inside a training model stays frozen, a teacher is never trained."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from srfx.group_pruning import atom_table, taylor_costs
from srfx.modes import evaluating
from srfx.passes import release
from srfx.passes.mask import unit_masks
from srfx.supervised import SupervisedLoop, TensorBatches, accuracy


def _half_frozen():
    """A training model whose BatchNorm the user froze (and a Dropout left training)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    model.train()
    model[1].eval()
    return model


def _modes(model):
    return [m.training for m in model.modules()]


def test_evaluating_restores_each_submodule_even_on_error():
    model = _half_frozen()
    before = _modes(model)
    try:
        with evaluating(model):
            assert not any(_modes(model))
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert _modes(model) == before == [True, True, False, True, True, True]


def test_measurements_leave_a_frozen_batchnorm_frozen():
    model = _half_frozen()
    before = _modes(model)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    taylor_costs(model, atom_table(model, x[:2]), F.cross_entropy, [(x, y)])
    assert _modes(model) == before
    unit_masks(model, 0.2, calibration_batch=x, compensate=True)
    assert _modes(model) == before
    release(model, calibration_batch=x, max_output_change=0.5)
    assert _modes(model) == before
    SupervisedLoop(None, TensorBatches(x, y, 8, False)).evaluate(model)
    assert _modes(model) == before
    with torch.no_grad():
        expected = float((model.eval()(x).argmax(-1) == y).float().mean())
    model.train()
    model[1].eval()
    assert accuracy(model, [(x[:10], y[:10]), (x[10:], y[10:])]) == expected  # eval-mode outputs, over all batches
    assert _modes(model) == before


def test_the_teacher_is_run_in_eval_mode_and_left_as_given():
    """A teacher passed in train mode: its BatchNorm statistics do not move while the student
    trains (it ran in eval mode), and its modes are the user's afterwards."""
    teacher = _half_frozen()
    teacher[1].train()  # wholly in train mode: running the teacher in train mode would update these
    stats = (teacher[1].running_mean.clone(), teacher[1].running_var.clone())
    before = _modes(teacher)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    student = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    loop = SupervisedLoop(TensorBatches(x, y, 8, True), None, teacher=teacher, distill=0.5)
    assert _modes(teacher) == before
    loop.train(student, 1)
    assert _modes(teacher) == before
    assert torch.equal(teacher[1].running_mean, stats[0]) and torch.equal(teacher[1].running_var, stats[1])
