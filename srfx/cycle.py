"""Squeeze-Release: prune, fine-tune, minimize exactly, release, repeat (DESIGN.md section 6).

The numbers named below (rates, epochs, tolerance, targets) are fields of :class:`Schedule`;
the release's noise calibration is :class:`ReleaseSettings`. One cycle:

1. **prune** the current model towards the cycle's target sparsity (of the Linear/Conv weights,
   plus ``include``) with an adaptive schedule: each step asks the ``pruner`` for masks at
   ``rate`` of the remaining weights more, trains ``recovery_epochs`` with the masks fixed and
   evaluates; if validation accuracy fell below ``reference - tolerance`` the step is rolled back
   (weights restored, and the built-in loop's optimizer state) and the rate halved; below
   ``min_rate`` the cycle stops pruning where it is.
   The pruner is pluggable: ``pruner(model, sparsity, masks) -> masks`` (it may also adjust kept
   weights in place, e.g. fold a removed input's mean into a bias; a rollback restores them).
   ``"magnitude"`` (default) and ``"unit"`` are global magnitude masks with the plain and the
   structure-aware score of :func:`srfx.passes.mask.magnitude_masks`; :func:`unit_pruner` removes
   whole inputs/units (:func:`srfx.passes.mask.unit_masks`).
2. **fine-tune** ``finetune_epochs`` with the masks fixed;
3. **minimize**: :func:`srfx.compress` (verified: same function, smaller dense GraphModule) of
   :func:`ungather` (model): from cycle 2 on, the model's first layer reads its inputs through
   the ``index_select`` an earlier compress inserted; undoing it gives the pruners the full
   input width to work on (compress itself would now narrow the gather too: ``index_select``
   has a rule);
4. record the cycle (:class:`CycleRecord`: params, stored, nonzeros, MACs, widths, accuracy,
   seconds) in ``history``;
5. **release** (unless it is the last cycle; ``ReleaseSettings(enabled=False)`` is the ablation
   that keeps the zeros pruned and trains the compacted model under its masks): the exact zeros
   left in the compacted weights become calibrated noise (:func:`srfx.passes.release`), all
   weights trainable again. The parameter shapes changed, so the optimizer state must follow:
   with ``optimizer_state="slice"`` and the built-in :class:`SupervisedLoop` the state
   (momentum, Adam's moments and step) is sliced with the indices the compress kept (its
   report's ``kept``, see :func:`kept_indices`); ``"rebuild"`` (default) starts a fresh
   optimizer through the ``rebuild_optimizer`` hook. The next cycle first trains
   ``release_epochs`` (default 0) with every weight free.

``target_params`` ends the run early once the compressed model stores no more than that: each
cycle's target is capped so as not to overshoot it by much, a pruning step whose exact
minimization (measured with an unverified :func:`srfx.compress`) would store less than
``overshoot * target_params`` is retried at half the rate, and pruning stops at the first step
that is small enough.

The training and evaluation are the user's: ``train(model, epochs, masks) -> model`` (keep
masked weights at zero, e.g. :func:`srfx.passes.apply_masks` after each step; ``epochs`` may be
fractional) and ``evaluate(model) -> float`` (higher is better, e.g. validation accuracy).
:meth:`SqueezeRelease.supervised` wires :class:`SupervisedLoop` (cross-entropy, optional
distillation from a teacher, Adam, optional cosine learning rate per call).

**Checkpoints.** With ``checkpoint`` (a file path) the driver saves its state after every stage
(pruned, fine-tuned, minimized, released) and ``run()`` resumes from that file, so an
interrupted run loses at most the stage in progress. The state holds the model, masks,
history, compressed models, the torch RNG state and, for :class:`SupervisedLoop`, its optimizer
state and its loaders' ``generator`` states; a resumed run repeats the uninterrupted one when
training draws its randomness from those. The file also records the settings it was written
with (schedule, ``include``, release, optimizer handling, the starting model's parameter
shapes, the standard loop's optimizer): a driver with other settings refuses it rather than
continue someone else's run. Files are written with ``torch.save`` (load them only from trusted
places: they hold GraphModules).

**Progress.** ``progress=True`` shows a bar per cycle stage (tqdm when installed, else a plain
status line on stderr); ``log=None`` silences the text log.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn as nn
from tabulate import tabulate

from .pruners import Pruner, kept_indices, magnitude_pruner, ungather, unit_pruner
from .errors import InputError
from .passes.mask import prunable_parameters
from .report import count_macs, count_nonzero, count_parameters, count_stored
from .tracing import bake_masks, private_copy
from .supervised import SupervisedLoop, TensorBatches, _Progress, carry_optimizer_state

__all__ = ["SqueezeRelease", "Schedule", "ReleaseSettings", "SupervisedLoop", "CycleRecord", "TensorBatches", "sparsity_of", "kept_indices", "carry_optimizer_state", "unit_pruner", "magnitude_pruner", "ungather"]

def sparsity_of(model: nn.Module, include: Iterable[str] = ()) -> float:
    """Fraction of exact zeros among the prunable weights (Linear/Conv weights + ``include``)."""
    from srfx.passes.mask import prunable_parameters

    params = prunable_parameters(model, include)
    total = sum(p.numel() for p in params.values())
    zeros = sum(int((p == 0).sum()) for p in params.values())
    return zeros / total if total else 0.0


def _widths(model: nn.Module) -> tuple:
    mods = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    if not mods:
        return ()
    return (mods[0].weight.shape[1],) + tuple(m.weight.shape[0] for m in mods)


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
    widths: tuple = ()  # (inputs of the first Linear/Conv, outputs of each Linear/Conv)
    optimizer: str = ""  # "rebuilt", "sliced (n of m tensors)", "" (no hook, last cycle)
    stage_seconds: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


_STAGES = ("start", "pruned", "finetuned", "minimized", "released")  # what a checkpoint's "stage" can say


@dataclass(frozen=True)
class Schedule:
    """How far and how carefully the cycles prune (see the module docstring).

    ``target_sparsity`` and ``finetune_epochs`` take one value or one per cycle. ``tolerance``
    is the accuracy a pruning step may cost against ``reference_accuracy`` (default: the
    model's own accuracy before the first cycle); a step that costs more is rolled back and
    ``prune_rate`` (the fraction of the remaining weights one step prunes) halved, down to
    ``min_rate``. ``target_params`` ends the run once the compressed model stores no more
    than that (``overshoot``: how far below it a step may land before it is retried smaller)."""

    cycles: int = 3
    target_sparsity: Union[float, Sequence[float]] = 0.9
    target_params: Optional[int] = None
    overshoot: float = 0.95
    prune_rate: float = 0.5
    min_rate: float = 1 / 32
    max_prune_steps: int = 30
    tolerance: float = 0.01
    reference_accuracy: Optional[float] = None
    recovery_epochs: float = 1.0
    finetune_epochs: Union[float, Sequence[float]] = 2.0
    release_epochs: float = 0.0

    def __post_init__(self):
        if self.cycles < 1:
            raise ValueError(f"cycles must be >= 1, got {self.cycles}")
        if len(self.targets) != self.cycles or not all(0.0 <= t < 1.0 for t in self.targets):
            raise ValueError(f"target_sparsity must be in [0, 1) (one value, or one per cycle), got {self.target_sparsity}")
        if len(self.finetune) != self.cycles:
            raise ValueError(f"finetune_epochs: one value or one per cycle, got {self.finetune_epochs}")
        if not 0.0 < self.prune_rate < 1.0:
            raise ValueError(f"prune_rate must be in (0, 1), got {self.prune_rate}")
        if not 0.0 < self.min_rate <= self.prune_rate:
            raise ValueError(f"min_rate must be in (0, prune_rate={self.prune_rate}], got {self.min_rate}")
        if not 0.0 < self.overshoot <= 1.0:
            raise ValueError(f"overshoot must be in (0, 1], got {self.overshoot}")
        if self.max_prune_steps < 1:
            raise ValueError(f"max_prune_steps must be >= 1, got {self.max_prune_steps}")
        if self.target_params is not None and self.target_params < 1:
            raise ValueError(f"target_params must be a positive parameter count, got {self.target_params}")
        negative = [name for name in ("tolerance", "recovery_epochs", "release_epochs") if not getattr(self, name) >= 0]
        negative += ["finetune_epochs"] if not all(e >= 0 for e in self.finetune) else []
        if negative:  # NaN too: a NaN tolerance rolled every step back
            raise ValueError(f"{', '.join(negative)} must be numbers >= 0")

    @property
    def targets(self) -> list[float]:
        """The target sparsity of each cycle."""
        return _per_cycle(self.target_sparsity, self.cycles)

    @property
    def finetune(self) -> list[float]:
        """The fine-tuning epochs of each cycle."""
        return _per_cycle(self.finetune_epochs, self.cycles)


def _per_cycle(value, cycles: int) -> list:
    return [value] * cycles if isinstance(value, (int, float)) else list(value)


@dataclass(frozen=True)
class ReleaseSettings:
    """What :func:`srfx.passes.release` does after each cycle but the last. ``enabled=False``
    is the ablation that keeps the zeros pruned (the compacted model trains on under its
    masks). ``scale``/``mode``/``calibration_batch``/``max_output_change``: the noise
    calibration (see the pass)."""

    enabled: bool = True
    scale: float = 0.1
    mode: str = "relative"
    calibration_batch: Any = None
    max_output_change: Optional[float] = None

    def kwargs(self) -> dict:
        return dict(scale=self.scale, mode=self.mode, calibration_batch=self.calibration_batch, max_output_change=self.max_output_change)


class SqueezeRelease:
    """Driver of prune -> fine-tune -> minimize -> release cycles; see the module docstring.

    ``schedule`` (:class:`Schedule`) says how far each cycle prunes, ``release``
    (:class:`ReleaseSettings`) what happens to the zeros after it. ``run()`` returns the last
    cycle's compressed GraphModule; ``history`` has one :class:`CycleRecord` per cycle and
    ``models`` the compressed module of each cycle.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Any,
        train: Callable[[nn.Module, float, dict], nn.Module],
        evaluate: Callable[[nn.Module], float],
        *,
        schedule: Schedule = Schedule(),
        release: ReleaseSettings = ReleaseSettings(),
        pruner: Union[str, Pruner] = "magnitude",
        include: Iterable[str] = (),
        optimizer_state: str = "rebuild",
        rebuild_optimizer: Optional[Callable[[nn.Module], Any]] = None,
        checkpoint: Union[str, os.PathLike, None] = None,
        progress: bool = False,
        seed: int = 0,
        log: Optional[Callable[[str], None]] = print,
    ):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a srfx.cycle.Schedule, got {type(schedule).__name__}")
        if not isinstance(release, ReleaseSettings):
            raise TypeError(f"release must be a srfx.cycle.ReleaseSettings, got {type(release).__name__}")
        if optimizer_state not in ("rebuild", "slice"):
            raise ValueError(f"optimizer_state must be 'rebuild' or 'slice', got {optimizer_state!r}")
        if isinstance(pruner, str):
            if pruner not in ("magnitude", "unit"):
                raise ValueError(f"pruner must be 'magnitude', 'unit' or a callable, got {pruner!r}")
            if schedule.target_params is not None:
                warnings.warn(f"target_params with pruner={pruner!r}: each cycle's target assumes every weight it prunes leaves the "
                              "deployable model, which scattered zeros seldom do, so the run may stop short of target_params; "
                              "srfx.cycle.unit_pruner or srfx.group_pruning.group_pruner remove whole units", stacklevel=2)
            pruner = magnitude_pruner(pruner, include)
        if not isinstance(model, nn.Module):
            raise InputError(f"SqueezeRelease takes a torch.nn.Module, got {type(model).__name__}")
        # the driver trains its own copy, with the masks the model carries (torch.nn.utils.prune,
        # parametrize, as torch.ao sparsifiers leave them) baked in as exact zeros
        self.model = bake_masks(private_copy(model))
        self._start_shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters()}
        if not prunable_parameters(self.model, include):
            raise InputError("nothing to prune: the model has no trainable Linear/Conv weights"
                             + (f" and no trainable parameter matches include={tuple(include)}" if include else " (see include=)"))
        self.example_input = example_input
        self.train_fn, self.evaluate_fn = train, evaluate
        self.schedule, self.release_settings = schedule, release
        self.pruner, self.include = pruner, tuple(include)
        self.reference_accuracy = schedule.reference_accuracy
        self.rebuild_optimizer, self.optimizer_state = rebuild_optimizer, optimizer_state
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.progress, self.seed = progress, seed
        self.log = log or (lambda s: None)
        self.loop: Optional[SupervisedLoop] = None
        self.history: list[CycleRecord] = []
        self.models: list[fx.GraphModule] = []
        self.release_reports: list = []

    @classmethod
    def supervised(cls, model: nn.Module, example_input: Any, train_loader: Iterable, val_loader: Iterable, *, lr: float = 1e-3, optimizer=torch.optim.Adam, loss: Callable = torch.nn.functional.cross_entropy, teacher: Optional[nn.Module] = None, distill: float = 0.5, temperature: float = 4.0, lr_schedule: str = "constant", **kwargs) -> "SqueezeRelease":
        """The standard loop (:class:`SupervisedLoop`): Adam (or ``optimizer``) on cross-entropy
        (or ``loss(output, target)``), optionally distilled from ``teacher``; validation
        accuracy. ``kwargs`` go to the constructor (``schedule``, ``release``, ``pruner``, ...)."""
        loop = SupervisedLoop(train_loader, val_loader, lr=lr, optimizer=optimizer, loss=loss, teacher=teacher, distill=distill, temperature=temperature, lr_schedule=lr_schedule, progress=kwargs.get("progress", False))
        driver = cls(model, example_input, loop.train, loop.evaluate, rebuild_optimizer=loop.rebuild_optimizer, **kwargs)
        driver.loop = loop
        return driver

    # -- one cycle's stages --------------------------------------------------------------

    def _prune(self, model: nn.Module, target: float, masks: dict) -> tuple[nn.Module, dict, int, int]:
        from srfx.passes import apply_masks

        sched = self.schedule
        floor = self.reference_accuracy - sched.tolerance
        rate, steps, rollbacks = sched.prune_rate, 0, 0
        s = sparsity_of(model, self.include)
        bar = _Progress(sched.max_prune_steps, "prune", self.progress)
        while s < target - 1e-9 and steps + rollbacks < sched.max_prune_steps:
            s_next = min(target, 1.0 - (1.0 - s) * (1.0 - rate))
            snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
            optimizer_snapshot = self._optimizer_state()
            new_masks = self.pruner(model, s_next, masks)
            apply_masks(model, new_masks)
            if sparsity_of(model, self.include) <= s:
                model.load_state_dict(snapshot)
                self.log(f"  the pruner freed nothing at {s_next:.1%}: pruning stops at {s:.1%}")
                break
            if sched.target_params is not None and rate / 2 >= sched.min_rate and self._deployable(model) < sched.overshoot * sched.target_params:
                model.load_state_dict(snapshot)  # far below target_params: a smaller step lands nearer
                rate /= 2
                continue
            model = self.train_fn(model, sched.recovery_epochs, new_masks)
            acc = self.evaluate_fn(model)
            if acc >= floor:
                masks, steps = new_masks, steps + 1
                s = sparsity_of(model, self.include)
                self.log(f"  prune step -> {s:.1%} sparsity, accuracy {acc:.4f} (rate {rate:.3g})")
                bar.update(1, f"{s:.1%} sparse, acc {acc:.4f}")
                if s_next >= target:  # measured sparsity can sit a hair below it (integer k)
                    break
                if sched.target_params is not None and self._deployable(model) <= sched.target_params:
                    self.log(f"  deployable size at most target_params={sched.target_params}: pruning stops")
                    break
            else:
                model.load_state_dict(snapshot)
                self._restore_optimizer(optimizer_snapshot)  # the rejected recovery's moments go too
                rollbacks += 1
                bar.update(1, f"rollback, rate {rate / 2:.3g}")
                self.log(f"  prune step to {s_next:.1%} rolled back: accuracy {acc:.4f} < {floor:.4f}; rate {rate:.3g} -> {rate / 2:.3g}")
                rate /= 2
                if rate < sched.min_rate:
                    break
        bar.close()
        return model, masks, steps, rollbacks

    def _optimizer_state(self) -> Optional[dict]:
        """The built-in loop's optimizer state (a user's ``train`` keeps its own)."""
        if self.loop is None or self.loop.optimizer is None:
            return None
        return copy.deepcopy(self.loop.optimizer.state_dict())

    def _restore_optimizer(self, state: Optional[dict]) -> None:
        if self.loop is None or self.loop.optimizer is None:
            return
        if state is None:  # the optimizer was born in the rejected step: the next one starts fresh
            self.loop.optimizer = None
        else:
            self.loop.optimizer.load_state_dict(state)

    def _deployable(self, model: nn.Module) -> int:
        """Stored parameters of the model's exact minimization (unverified: only its size counts)."""
        import srfx

        return count_stored(srfx.compress(ungather(model.eval(), self.example_input), self.example_input, verify=False))

    def _cycle_target(self, c: int, model: nn.Module) -> float:
        t = self.schedule.targets[c]
        if self.schedule.target_params is not None:  # aim at target_params, do not overshoot it by much
            from srfx.passes.mask import prunable_parameters

            prunable = sum(p.numel() for p in prunable_parameters(model, self.include).values())
            over = count_stored(model) - self.schedule.target_params
            t = min(t, sparsity_of(model, self.include) + max(0, over) / max(1, prunable), 0.999)
        return t

    # -- checkpoints ---------------------------------------------------------------------

    def _save(self, state: dict) -> None:
        if self.checkpoint is None:
            return
        state = dict(state, history=self.history, models=self.models, release_reports=self.release_reports, reference_accuracy=self.reference_accuracy, rng=torch.get_rng_state(), settings=self._settings())
        if self.loop is not None:
            state["loop"] = self.loop.state_dict(state["model"])
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint.with_name(self.checkpoint.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint)  # a crash while writing leaves the previous checkpoint

    def _settings(self) -> dict:
        """What a checkpoint must have been written with to be resumed by this driver: the
        schedule, what is pruned and how the optimizer state moves, the starting model's
        parameter shapes, and the built-in loop's optimizer."""
        settings = {
            "schedule": {k: v for k, v in asdict(self.schedule).items() if k != "reference_accuracy"},
            "include": self.include, "optimizer_state": self.optimizer_state,
            "release": {f.name: getattr(self.release_settings, f.name) if f.name != "calibration_batch" else getattr(self.release_settings, f.name) is not None
                        for f in dataclasses.fields(self.release_settings)},
            "model": self._start_shapes,
        }
        if self.loop is not None:
            make = self.loop.make_optimizer  # a class, a function or a functools.partial of one: its name, no address
            settings["optimizer"] = getattr(make, "__qualname__", None) or getattr(getattr(make, "func", None), "__qualname__", type(make).__name__)
        return settings

    def _load(self) -> Optional[dict]:
        if self.checkpoint is None or not self.checkpoint.exists():
            return None
        try:
            state = torch.load(self.checkpoint, weights_only=False)
            keys = ("history", "models", "release_reports", "reference_accuracy", "rng", "cycle", "stage", "model")
            missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
        except Exception as exc:  # truncated, not a torch file, unpicklable: say which file
            raise InputError(f"checkpoint {self.checkpoint} cannot be read ({type(exc).__name__}: {exc}); delete it to start over") from exc
        if missing:
            raise InputError(f"checkpoint {self.checkpoint} is not a SqueezeRelease checkpoint (no {', '.join(missing)}); delete it to start over")
        theirs, ours = state.get("settings"), self._settings()
        if theirs is not None and theirs != ours:
            diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise InputError(f"checkpoint {self.checkpoint} was written by a run with other {', '.join(diff)}: "
                             "resume with the settings it was written with, or pass another checkpoint path")
        self.history, self.models, self.release_reports = list(state["history"]), list(state["models"]), list(state["release_reports"])
        self.reference_accuracy = state["reference_accuracy"]
        torch.set_rng_state(state["rng"])
        if self.loop is not None and "loop" in state:
            self.loop.load_state_dict(state["model"], state["loop"])
        self.log(f"resumed from {self.checkpoint}: cycle {state['cycle'] + 1}, after stage '{state['stage']}'")
        return state

    def _done(self, small: Optional[fx.GraphModule]) -> bool:
        target = self.schedule.target_params
        return target is not None and small is not None and count_stored(small) <= target

    def run(self) -> fx.GraphModule:
        import srfx
        from srfx.passes import apply_masks, release
        from srfx.passes.mask import prunable_parameters

        st = self._load()
        if st is None:
            model = self.model
            if self.reference_accuracy is None:
                self.reference_accuracy = self.evaluate_fn(model)
            masks = {n: p.detach() != 0 for n, p in prunable_parameters(model, self.include).items()}
            st = {"cycle": 0, "stage": "start", "model": model, "masks": masks, "small": None, "info": {}}
        self.log(f"reference accuracy {self.reference_accuracy:.4f}, tolerance {self.schedule.tolerance}")
        c, stage, model, masks, small, info = st["cycle"], st["stage"], st["model"], st["masks"], st["small"], dict(st["info"])
        cycles = self.schedule.cycles
        bar = _Progress(cycles, "cycles", self.progress)
        bar.update(c)
        while c < cycles:
            if stage == "minimized" and (c + 1 == cycles or self._done(small)):
                break  # the last cycle is not released
            if stage == "released":
                c, stage, info = c + 1, "start", {}
                bar.update(1)
                continue
            def save(s):
                nonlocal stage
                stage = s
                self._save({"cycle": c, "stage": s, "model": model, "masks": masks, "small": small, "info": info})

            t0 = time.perf_counter()
            if stage == "start":
                target = self._cycle_target(c, model)
                self.log(f"cycle {c + 1}/{cycles}: target sparsity {target:.1%}")
                if c > 0 and self.schedule.release_epochs > 0:  # the released weights train freely before pruning again
                    model = self.train_fn(model, self.schedule.release_epochs, masks)
                model, masks, info["steps"], info["rollbacks"] = self._prune(model, target, masks)
                info["seconds"] = {"prune": time.perf_counter() - t0}
                save("pruned")
            elif stage == "pruned":
                model = self.train_fn(model, self.schedule.finetune[c], masks)
                apply_masks(model, masks)
                info["sparsity"] = sparsity_of(model, self.include)
                info["seconds"]["finetune"] = time.perf_counter() - t0
                save("finetuned")
            elif stage == "finetuned":
                small = srfx.compress(ungather(model.eval(), self.example_input), self.example_input)
                if self.optimizer_state == "slice" and self.loop is not None:  # where the optimizer state goes
                    info["cuts"] = kept_indices(model, self.example_input, small.meta[srfx.REPORT_KEY].kept)
                    info["rebuilt"] = small.meta[srfx.REPORT_KEY].rebuilt
                info["accuracy"] = self.evaluate_fn(small)
                info["seconds"]["minimize"] = time.perf_counter() - t0
                self.models.append(small)
                self._record(c, small, info, released=0, optimizer="")
                save("minimized")
            elif stage == "minimized":
                if self.release_settings.enabled:
                    new, masks, rep = release(small, seed=self.seed + c, include=self.include, **self.release_settings.kwargs())
                    self.release_reports.append(rep)
                    released = rep.released
                else:  # ablation: the zeros stay pruned, the compacted model trains on under its masks
                    new = copy.deepcopy(small)
                    masks = {n: p.detach() != 0 for n, p in prunable_parameters(new, self.include).items()}
                    released = 0
                optimizer = ""
                if info.get("cuts") is not None:
                    done, total = self.loop.adopt(new, model, info["cuts"], info.get("rebuilt", ()))
                    optimizer = f"sliced ({done} of {total} tensors)"
                elif self.rebuild_optimizer is not None:
                    self.rebuild_optimizer(new)
                    optimizer = "rebuilt"
                model = new
                info["seconds"]["release"] = time.perf_counter() - t0
                self.history[-1] = self._replace(self.history[-1], released=released, optimizer_rebuilt=bool(optimizer), optimizer=optimizer, stage_seconds=dict(info["seconds"]), seconds=sum(info["seconds"].values()))
                save("released")
        bar.close()
        self.model = model
        return small

    def _record(self, c: int, small: fx.GraphModule, info: dict, released: int, optimizer: str) -> None:
        record = CycleRecord(
            cycle=c + 1,
            sparsity=info["sparsity"],
            params=count_parameters(small),
            stored=count_stored(small),
            nnz=count_nonzero(small),
            macs=count_macs(small),
            accuracy=info["accuracy"],
            seconds=sum(info["seconds"].values()),
            prune_steps=info["steps"],
            rollbacks=info["rollbacks"],
            released=released,
            optimizer_rebuilt=False,
            widths=_widths(small),
            optimizer=optimizer,
            stage_seconds=dict(info["seconds"]),
        )
        self.history.append(record)
        self.log(
            f"cycle {c + 1}: stored {record.stored}, nnz {record.nnz}, MACs {record.macs}, widths {list(record.widths)}, "
            f"accuracy {record.accuracy:.4f}, {record.seconds:.1f} s"
        )

    @staticmethod
    def _replace(r: CycleRecord, **kw) -> CycleRecord:
        return dataclasses.replace(r, **kw)

    def best(self, tolerance: Optional[float] = None) -> tuple[int, fx.GraphModule]:
        """Index and module of the smallest (stored) cycle whose accuracy is within ``tolerance``
        (default: the driver's) of the reference; the most accurate cycle if none is."""
        if not self.history:
            raise RuntimeError("no cycle has finished yet: call run() first")
        tol = self.schedule.tolerance if tolerance is None else tolerance
        ok = [i for i, r in enumerate(self.history) if r.accuracy >= self.reference_accuracy - tol]
        # the smallest; at equal size the more accurate (later cycles trained longer), then fewer nonzeros
        i = min(ok, key=lambda i: (self.history[i].stored, -self.history[i].accuracy, self.history[i].nnz, -i)) if ok else max(range(len(self.history)), key=lambda i: self.history[i].accuracy)
        return i, self.models[i]

    def table(self) -> str:
        rows = [(r.cycle, f"{r.sparsity:.1%}", r.stored, r.nnz, r.macs, "-".join(map(str, r.widths)), f"{r.accuracy:.4f}", f"{r.seconds:.1f}", r.prune_steps, r.rollbacks, r.released) for r in self.history]
        return tabulate(rows, headers=["cycle", "sparsity", "stored", "nnz", "MACs", "widths", "accuracy", "s", "steps", "rollbacks", "released"])
