"""Measuring a user's module in eval mode without losing the modes it was in.

``model.eval(); ...; model.train(was)`` puts every submodule back to ``was``: a BatchNorm or
Dropout the user had switched to eval inside a training model (freezing norm statistics while
fine-tuning is common) silently trains again afterwards. :func:`evaluating` puts back each
submodule's own flag.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn

__all__ = ["evaluating"]


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block; afterwards every submodule's ``training``
    flag is what it was before."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, was in modes:
            m.training = was
