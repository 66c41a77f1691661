"""Shared test helpers: killing channels, snapshots of a model's state, tolerances."""
from __future__ import annotations


import torch
import torch.nn as nn

from srfx.testing import kill_channels as _kill_channels
from srfx.verify import TOLERANCES


def snapshot(model: nn.Module) -> dict:
    """Everything of the user's that srfx must leave alone."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        "ids": [id(p) for p in model.parameters()],
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["ids"] == before["ids"]
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k


def assert_close(expected: torch.Tensor, actual: torch.Tensor) -> None:
    rtol, atol = TOLERANCES[expected.dtype]
    scale = expected.abs().max().item()
    err = (expected - actual).abs().max().item()
    assert err <= atol + rtol * scale, f"max abs error {err:.3e} vs scale {scale:.3e}"


def kill_channels(model: nn.Module, rate: float = 0.3, seed: int = 0, columns: bool = True) -> nn.Module:
    """``srfx.testing.kill_channels`` without waking other near-zero scales (the tests' models
    pin their expectations on exactly these values)."""
    return _kill_channels(model, rate, seed, columns, wake_scales=False)


def report(gm):
    return gm.meta["srfx_report"]
