"""Squeeze-Release: prune, fine-tune, minimize exactly, release, repeat (DESIGN.md section 6).

One cycle:

1. **prune** the current model towards ``target_sparsity`` (global magnitude masks over the
   Linear/Conv weights) with an adaptive schedule: each step prunes ``rate`` of the remaining
   weights, trains ``recovery_epochs`` with the masks fixed and evaluates; if validation accuracy
   fell below ``reference - tolerance`` the step is rolled back (weights restored) and the rate
   halved; below ``min_rate`` the cycle stops pruning where it is;
2. **fine-tune** ``finetune_epochs`` with the masks fixed (the training loop re-zeroes masked
   weights after every optimizer step);
3. **minimize**: :func:`srfx.compress` (verified: same function, smaller dense GraphModule);
4. record the cycle (params, stored, nonzeros, MACs, accuracy, seconds) in ``history``;
5. **release** (unless it is the last cycle): the exact zeros left in the compacted weights become
   calibrated noise (:func:`srfx.passes.release`), all weights trainable again; the parameter
   shapes changed, so the optimizer is rebuilt (``rebuild_optimizer`` hook; the built-in
   :class:`SupervisedLoop` does it itself). The next cycle first trains ``release_epochs``
   (default 0) with every weight free, so released positions can grow before pruning again.

The training and evaluation are the user's: ``train(model, epochs, masks) -> model`` (``masks``:
name -> bool keep-mask; keep masked weights at zero, e.g. :func:`srfx.passes.apply_masks` after
each step; ``epochs`` may be fractional) and ``evaluate(model) -> float`` (higher is better,
e.g. validation accuracy). A ``train`` callable that builds its optimizer on each call needs no
hook; one that keeps an optimizer across calls must rebuild it in ``rebuild_optimizer(model)``.
:meth:`SqueezeRelease.supervised` wires the standard classification loop from DataLoaders.

Not yet: checkpoint/resume between cycles, progress bars, slicing optimizer state (momentum,
Adam moments) with the minimize indices instead of rebuilding the optimizer.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

from .report import count_macs, count_nonzero, count_parameters, count_stored

__all__ = ["SqueezeRelease", "SupervisedLoop", "CycleRecord", "sparsity_of"]


def sparsity_of(model: nn.Module, include: Iterable[str] = ()) -> float:
    """Fraction of exact zeros among the prunable weights (Linear/Conv weights + ``include``)."""
    from srfx.passes.mask import prunable_parameters

    params = prunable_parameters(model, include)
    total = sum(p.numel() for p in params.values())
    zeros = sum(int((p == 0).sum()) for p in params.values())
    return zeros / total if total else 0.0


@dataclass(frozen=True)
class CycleRecord:
    cycle: int
    sparsity: float  # of the prunable weights, before minimize
    params: int  # of the compressed model
    stored: int
    nnz: int
    macs: int
    accuracy: float  # evaluate(compressed model)
    seconds: float
    prune_steps: int  # accepted pruning steps
    rollbacks: int
    released: int  # weights released after this cycle (0 for the last)
    optimizer_rebuilt: bool

    def as_dict(self) -> dict:
        return asdict(self)


class SupervisedLoop:
    """The common supervised case: cross-entropy (or ``loss``) over a train DataLoader, accuracy
    over a validation DataLoader. Keeps one optimizer and rebuilds it whenever the model's
    parameters changed (a new module after minimize/release, or different shapes)."""

    def __init__(
        self,
        train_loader: Iterable,
        val_loader: Iterable,
        *,
        lr: float = 1e-3,
        optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
        loss: Callable = F.cross_entropy,
        **optimizer_kwargs,
    ):
        self.train_loader, self.val_loader = train_loader, val_loader
        self.lr, self.make_optimizer, self.loss, self.optimizer_kwargs = lr, optimizer, loss, optimizer_kwargs
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.rebuilds = 0
        self._key = None

    @staticmethod
    def _params_key(model: nn.Module):
        return tuple((id(p), tuple(p.shape)) for p in model.parameters())

    def rebuild_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        self.optimizer = self.make_optimizer(model.parameters(), lr=self.lr, **self.optimizer_kwargs)
        self._key = self._params_key(model)
        self.rebuilds += 1
        return self.optimizer

    def train(self, model: nn.Module, epochs: float, masks: Optional[dict] = None) -> nn.Module:
        from srfx.passes import apply_masks

        if self.optimizer is None or self._key != self._params_key(model):
            self.rebuild_optimizer(model)
        opt = self.optimizer
        try:
            per_epoch = len(self.train_loader)
        except TypeError:
            per_epoch = None
        steps_left = math.ceil(epochs * per_epoch) if per_epoch is not None else None
        full = math.ceil(epochs)
        model.train()
        for _ in range(full):
            for x, y in self.train_loader:
                if steps_left is not None and steps_left <= 0:
                    break
                opt.zero_grad(set_to_none=True)
                self.loss(model(x), y).backward()
                opt.step()
                if masks:
                    apply_masks(model, masks)
                if steps_left is not None:
                    steps_left -= 1
        return model.eval()

    def evaluate(self, model: nn.Module) -> float:
        was = model.training
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in self.val_loader:
                correct += int((model(x).argmax(1) == y).sum())
                total += len(y)
        model.train(was)
        return correct / max(1, total)


class SqueezeRelease:
    """Driver of prune -> fine-tune -> minimize -> release cycles; see the module docstring.

    ``run()`` returns the last cycle's compressed GraphModule; ``history`` has one
    :class:`CycleRecord` per cycle and ``models`` the compressed module of each cycle.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Any,
        train: Callable[[nn.Module, float, dict], nn.Module],
        evaluate: Callable[[nn.Module], float],
        *,
        cycles: int = 3,
        target_sparsity: Union[float, Sequence[float]] = 0.9,
        prune_rate: float = 0.5,
        min_rate: float = 1 / 32,
        tolerance: float = 0.01,
        reference_accuracy: Optional[float] = None,
        recovery_epochs: float = 1.0,
        finetune_epochs: float = 2.0,
        release_epochs: float = 0.0,
        max_prune_steps: int = 30,
        release_scale: float = 0.1,
        release_mode: str = "relative",
        calibration_batch: Any = None,
        max_output_change: Optional[float] = None,
        rebuild_optimizer: Optional[Callable[[nn.Module], Any]] = None,
        include: Iterable[str] = (),
        seed: int = 0,
        log: Optional[Callable[[str], None]] = print,
    ):
        if cycles < 1:
            raise ValueError(f"cycles must be >= 1, got {cycles}")
        targets = [target_sparsity] * cycles if isinstance(target_sparsity, (int, float)) else list(target_sparsity)
        if len(targets) != cycles or not all(0.0 <= t < 1.0 for t in targets):
            raise ValueError(f"target_sparsity must be in [0, 1) (one value, or one per cycle), got {target_sparsity}")
        if not 0.0 < prune_rate < 1.0:
            raise ValueError(f"prune_rate must be in (0, 1), got {prune_rate}")
        self.model = copy.deepcopy(model)  # the driver trains its own copy
        self.example_input = example_input
        self.train_fn, self.evaluate_fn = train, evaluate
        self.cycles, self.targets = cycles, targets
        self.prune_rate, self.min_rate, self.tolerance = prune_rate, min_rate, tolerance
        self.reference_accuracy = reference_accuracy
        self.recovery_epochs, self.finetune_epochs, self.max_prune_steps = recovery_epochs, finetune_epochs, max_prune_steps
        self.release_epochs = release_epochs
        self.release_kwargs = dict(scale=release_scale, mode=release_mode, calibration_batch=calibration_batch, max_output_change=max_output_change)
        self.rebuild_optimizer = rebuild_optimizer
        self.include = tuple(include)
        self.seed = seed
        self.log = log or (lambda s: None)
        self.history: list[CycleRecord] = []
        self.models: list[fx.GraphModule] = []
        self.release_reports: list = []

    @classmethod
    def supervised(cls, model: nn.Module, example_input: Any, train_loader: Iterable, val_loader: Iterable, *, lr: float = 1e-3, optimizer=torch.optim.Adam, **kwargs) -> "SqueezeRelease":
        """The standard loop: Adam (or ``optimizer``) on cross-entropy, validation accuracy."""
        loop = SupervisedLoop(train_loader, val_loader, lr=lr, optimizer=optimizer)
        driver = cls(model, example_input, loop.train, loop.evaluate, rebuild_optimizer=loop.rebuild_optimizer, **kwargs)
        driver.loop = loop
        return driver

    # -- one cycle's stages --------------------------------------------------------------

    def _prune(self, model: nn.Module, target: float, masks: dict) -> tuple[nn.Module, dict, int, int]:
        from srfx.passes import apply_masks, magnitude_masks

        floor = self.reference_accuracy - self.tolerance
        rate, steps, rollbacks = self.prune_rate, 0, 0
        s = sparsity_of(model, self.include)
        while s < target - 1e-9 and steps + rollbacks < self.max_prune_steps:
            s_next = min(target, 1.0 - (1.0 - s) * (1.0 - rate))
            snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
            new_masks = magnitude_masks(model, s_next, include=self.include, existing=masks)
            apply_masks(model, new_masks)
            model = self.train_fn(model, self.recovery_epochs, new_masks)
            acc = self.evaluate_fn(model)
            if acc >= floor:
                masks, steps = new_masks, steps + 1
                s = sparsity_of(model, self.include)
                self.log(f"  prune step -> {s:.1%} sparsity, accuracy {acc:.4f} (rate {rate:.3g})")
                if s_next >= target:  # measured sparsity can sit a hair below it (integer k)
                    break
            else:
                model.load_state_dict(snapshot)
                rollbacks += 1
                self.log(f"  prune step to {s_next:.1%} rolled back: accuracy {acc:.4f} < {floor:.4f}; rate {rate:.3g} -> {rate / 2:.3g}")
                rate /= 2
                if rate < self.min_rate:
                    break
        return model, masks, steps, rollbacks

    def _rebuild(self, model: nn.Module) -> bool:
        if self.rebuild_optimizer is None:
            return False
        self.rebuild_optimizer(model)
        return True

    def run(self) -> fx.GraphModule:
        import srfx
        from srfx.passes import apply_masks, release

        model = self.model
        if self.reference_accuracy is None:
            self.reference_accuracy = self.evaluate_fn(model)
        self.log(f"reference accuracy {self.reference_accuracy:.4f}, tolerance {self.tolerance}")
        from srfx.passes.mask import prunable_parameters

        masks = {n: p.detach() != 0 for n, p in prunable_parameters(model, self.include).items()}
        small = None
        for c in range(self.cycles):
            t0 = time.perf_counter()
            self.log(f"cycle {c + 1}/{self.cycles}: target sparsity {self.targets[c]:.1%}")
            if c > 0 and self.release_epochs > 0:  # the released weights train freely before pruning again
                model = self.train_fn(model, self.release_epochs, masks)
            model, masks, steps, rollbacks = self._prune(model, self.targets[c], masks)
            model = self.train_fn(model, self.finetune_epochs, masks)
            apply_masks(model, masks)
            sparsity = sparsity_of(model, self.include)
            small = srfx.compress(model.eval(), self.example_input)
            acc = self.evaluate_fn(small)
            released, rebuilt = 0, False
            if c + 1 < self.cycles:
                model, masks, rep = release(small, seed=self.seed + c, include=self.include, **self.release_kwargs)
                self.release_reports.append(rep)
                released = rep.released
                rebuilt = self._rebuild(model)
            record = CycleRecord(
                cycle=c + 1,
                sparsity=sparsity,
                params=count_parameters(small),
                stored=count_stored(small),
                nnz=count_nonzero(small),
                macs=count_macs(small),
                accuracy=acc,
                seconds=time.perf_counter() - t0,
                prune_steps=steps,
                rollbacks=rollbacks,
                released=released,
                optimizer_rebuilt=rebuilt,
            )
            self.history.append(record)
            self.models.append(small)
            self.log(
                f"cycle {c + 1}: stored {record.stored}, nnz {record.nnz}, MACs {record.macs}, accuracy {acc:.4f}, "
                f"{record.seconds:.1f} s; released {released}"
            )
        self.model = model
        return small

    def best(self, tolerance: Optional[float] = None) -> tuple[int, fx.GraphModule]:
        """Index and module of the smallest (stored) cycle whose accuracy is within ``tolerance``
        (default: the driver's) of the reference; the most accurate cycle if none is."""
        tol = self.tolerance if tolerance is None else tolerance
        ok = [i for i, r in enumerate(self.history) if r.accuracy >= self.reference_accuracy - tol]
        i = min(ok, key=lambda i: (self.history[i].stored, self.history[i].nnz, -i)) if ok else max(range(len(self.history)), key=lambda i: self.history[i].accuracy)
        return i, self.models[i]

    def table(self) -> str:
        rows = [(r.cycle, f"{r.sparsity:.1%}", r.params, r.stored, r.nnz, r.macs, f"{r.accuracy:.4f}", f"{r.seconds:.1f}", r.prune_steps, r.rollbacks, r.released) for r in self.history]
        return tabulate(rows, headers=["cycle", "sparsity", "params", "stored", "nnz", "MACs", "accuracy", "s", "steps", "rollbacks", "released"])
