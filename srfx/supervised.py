"""The standard supervised training loop for :class:`srfx.cycle.SqueezeRelease`, with
optional distillation, a cosine learning rate per call, progress bars, optimizer state that
follows a minimize (:meth:`SupervisedLoop.adopt`) and a state for checkpoints."""
from __future__ import annotations

import math
import sys
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import InputError
from .modes import evaluating

__all__ = ["SupervisedLoop", "TensorBatches", "accuracy", "carry_optimizer_state", "distillation_loss"]


def _stateful(loader) -> bool:
    """Does the loader keep its own position (``state_dict``/``load_state_dict``, as
    torchdata's StatefulDataLoader does)? Then a checkpoint holds it."""
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


def accuracy(model: nn.Module, batches: Iterable) -> float:
    """Top-1 accuracy of ``model`` over ``(x, y)`` batches, measured in eval mode without
    changing the modes the model's submodules were in."""
    correct = total = 0
    with evaluating(model), torch.no_grad():
        for x, y in batches:
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    if total == 0:  # an accuracy of 0 would silently pass every rollback check against it
        raise InputError("no batches to evaluate on: the validation loader is empty")
    return correct / total


class TensorBatches:
    """Minibatches of in-memory tensors for :class:`SupervisedLoop`: what a DataLoader would
    give, without per-sample indexing. ``y`` is anything indexable by an index tensor with a
    length (labels, or labels and teacher logits together); reshuffled on every pass with a
    generator seeded by ``seed`` when ``shuffle``.

    ``transform(x_batch, generator) -> x_batch`` (e.g. a random augmentation) is applied to each
    batch and draws its randomness from the same generator, so a checkpointed run that saves the
    generator's state resumes with the same augmented batches."""

    def __init__(self, x, y, batch_size: int, shuffle: bool, seed: int = 0, transform: Optional[Callable] = None):
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.transform = transform
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        idx = torch.randperm(len(self.y), generator=self.generator) if self.shuffle else torch.arange(len(self.y))
        for b in idx.split(self.batch_size):
            x = self.x[b]
            yield (self.transform(x, self.generator) if self.transform is not None else x), self.y[b]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T**2 * KL(softmax(teacher / T) || softmax(student / T))`` over the last axis, batch mean
    (Hinton et al.; the ``T**2`` keeps its gradients on the scale of cross-entropy's)."""
    T = temperature
    return F.kl_div(F.log_softmax(student_logits / T, -1), F.log_softmax(teacher_logits / T, -1), log_target=True, reduction="batchmean") * T * T


def _slice_state(state: dict, cuts: dict[int, torch.Tensor], shape) -> Optional[dict]:
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            for axis, keep in cuts.items():
                v = v.index_select(axis, keep)
            if tuple(v.shape) != tuple(shape):
                return None
        out[k] = v.clone() if isinstance(v, torch.Tensor) else v
    return out


def carry_optimizer_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer, old_model: nn.Module, new_model: nn.Module, kept: dict,
                          rebuilt: Iterable[str] = ()) -> int:
    """Give ``new`` (an optimizer over ``new_model``'s parameters) the per-parameter state of
    ``old`` (over ``old_model``'s): momentum, Adam's moments and step, sliced with ``kept``
    (parameter name -> axis -> kept indices: a compress report's ``kept``, or
    :func:`srfx.cycle.kept_indices`), carried whole where name and shape match, left fresh
    where neither fits and for the names in ``rebuilt`` (a compress report's ``rebuilt``:
    tensors compensation or BatchNorm folding recomputed, whose old state describes other
    numbers even where the shape matches). Returns how many parameters got state.

        >>> small = srfx.compress(model, x)                                   # doctest: +SKIP
        >>> new = torch.optim.Adam(small.parameters(), lr=1e-3)              # doctest: +SKIP
        >>> report = small.meta["srfx_report"]                               # doctest: +SKIP
        >>> carry_optimizer_state(opt, new, model, small, report.kept, report.rebuilt)  # doctest: +SKIP
    """
    carried = 0
    old_params = dict(old_model.named_parameters())
    held = {id(p) for group in new.param_groups for p in group["params"]}
    fresh = set(rebuilt)
    for name, p in new_model.named_parameters():
        q = old_params.get(name)
        if q is None or q not in old.state or id(p) not in held or name in fresh:  # only what ``new`` optimizes
            continue
        sliced = _slice_state(old.state[q], kept.get(name, {}), p.shape)
        if sliced is not None:
            new.state[p] = sliced
            carried += 1
    return carried


class _Progress:
    """tqdm when installed, a status line otherwise; nothing when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.enabled, self.bar, self.n, self.total, self.desc = enabled, None, 0, total, desc
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int = 1, status: str = "") -> None:
        if not self.enabled:
            return
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            if status:
                self.bar.set_postfix_str(status, refresh=False)
        else:
            sys.stderr.write(f"\r{self.desc} {self.n}/{self.total} {status}".ljust(79)[:120])
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


class SupervisedLoop:
    """The common supervised case: cross-entropy (or ``loss``) over a train DataLoader, accuracy
    over a validation DataLoader. Keeps one optimizer across calls and rebuilds it when the
    model's parameters changed (a new module after minimize/release, or new shapes), unless
    :meth:`adopt` carried its state over.

    ``teacher`` (a module, run in eval mode for each batch and left in the modes it was given)
    adds distillation: ``(1 - distill) * CE + distill * T**2 *
    KL(softmax(teacher/T) || softmax(student/T))``. ``lr_schedule="cosine"`` anneals the learning
    rate from ``lr`` to 0 within each :meth:`train` call. ``progress=True`` shows a bar per call.
    """

    def __init__(
        self,
        train_loader: Iterable,
        val_loader: Iterable,
        *,
        lr: float = 1e-3,
        optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
        loss: Callable = F.cross_entropy,
        teacher: Optional[nn.Module] = None,
        distill: float = 0.5,
        temperature: float = 4.0,
        lr_schedule: str = "constant",
        progress: bool = False,
        **optimizer_kwargs,
    ):
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        self.train_loader, self.val_loader = train_loader, val_loader
        self.lr, self.make_optimizer, self.loss, self.optimizer_kwargs = lr, optimizer, loss, optimizer_kwargs
        self.teacher = teacher
        self.distill, self.temperature, self.lr_schedule, self.progress = distill, temperature, lr_schedule, progress
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.rebuilds = 0
        self.steps = 0  # optimizer steps taken over all calls (the training budget spent)
        self._key = None

    @staticmethod
    def _params_key(model: nn.Module):
        return tuple((id(p), tuple(p.shape)) for p in model.parameters())

    def rebuild_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        self.optimizer = self.make_optimizer(model.parameters(), lr=self.lr, **self.optimizer_kwargs)
        self._key = self._params_key(model)
        self.rebuilds += 1
        return self.optimizer

    def adopt(self, new: nn.Module, old: nn.Module, cuts: dict[str, dict[int, torch.Tensor]], rebuilt: Iterable[str] = ()) -> tuple[int, int]:
        """A fresh optimizer for ``new`` whose per-parameter state is ``old``'s state sliced by
        ``cuts`` (parameter name -> axis -> kept indices; see :func:`kept_indices`); parameters
        of the same name and shape carry their state over whole, except those in ``rebuilt``.
        Returns (tensors sliced or carried, tensors of ``new``)."""
        previous = self.optimizer
        self.rebuild_optimizer(new)
        done = carry_optimizer_state(previous, self.optimizer, old, new, cuts, rebuilt) if previous is not None else 0
        return done, len(list(new.parameters()))

    def _loss(self, out, x, y):
        loss = self.loss(out, y)
        if self.teacher is not None and self.distill > 0:
            with evaluating(self.teacher), torch.no_grad():  # the user's teacher keeps its modes
                t = self.teacher(x)
            loss = (1 - self.distill) * loss + self.distill * distillation_loss(out, t, self.temperature)
        return loss

    def train(self, model: nn.Module, epochs: float, masks: Optional[dict] = None) -> nn.Module:
        from srfx.passes import apply_masks

        if self.optimizer is None or self._key != self._params_key(model):
            self.rebuild_optimizer(model)
        opt = self.optimizer
        try:
            per_epoch = len(self.train_loader)
        except TypeError:
            per_epoch = None
        steps = math.ceil(epochs * per_epoch) if per_epoch is not None else None
        steps_left = steps
        bar = _Progress(steps or 0, "train", self.progress and bool(steps))
        model.train()
        done = 0
        for _ in range(math.ceil(epochs)):
            for x, y in self.train_loader:
                if steps_left is not None and steps_left <= 0:
                    break
                if self.lr_schedule == "cosine" and steps:
                    for g in opt.param_groups:
                        g["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * done / steps))
                opt.zero_grad(set_to_none=True)
                loss = self._loss(model(x), x, y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss is {float(loss.detach())} at step {done + 1} of this call: the weights would "
                                             "turn to NaN (a lower learning rate, or a look at the data, usually helps)")
                loss.backward()
                opt.step()
                if masks:
                    apply_masks(model, masks)
                done += 1
                self.steps += 1
                if steps_left is not None:
                    steps_left -= 1
                bar.update()
        bar.close()
        if epochs > 0 and done == 0:
            raise InputError("the training loader gave no batches")
        return model.eval()

    def evaluate(self, model: nn.Module, loader: Optional[Iterable] = None) -> float:
        return accuracy(model, self.val_loader if loader is None else loader)

    # what a checkpoint needs to resume the same run
    def state_dict(self, model: nn.Module) -> dict:
        names = {id(p): n for n, p in model.named_parameters()}
        opt = None
        if self.optimizer is not None and self._key == self._params_key(model):
            opt = {names[id(p)]: s for p, s in self.optimizer.state.items() if id(p) in names}
        loaders = (self.train_loader, self.val_loader)
        gens = [getattr(dl, "generator", None) for dl in loaders]
        return {"optimizer": opt, "generators": [g.get_state() if isinstance(g, torch.Generator) else None for g in gens],
                "loaders": [dl.state_dict() if _stateful(dl) else None for dl in loaders], "rebuilds": self.rebuilds, "steps": self.steps}

    def load_state_dict(self, model: nn.Module, state: dict) -> None:
        self.rebuild_optimizer(model)
        self.rebuilds, self.steps = state["rebuilds"], state["steps"]
        if state["optimizer"] is not None:
            params = dict(model.named_parameters())
            for name, s in state["optimizer"].items():
                self.optimizer.state[params[name]] = s
        for dl, g in zip((self.train_loader, self.val_loader), state["generators"]):
            if g is not None and isinstance(getattr(dl, "generator", None), torch.Generator):
                dl.generator.set_state(g)
        for dl, own in zip((self.train_loader, self.val_loader), state.get("loaders", (None, None))):
            if own is not None and _stateful(dl):
                dl.load_state_dict(own)
