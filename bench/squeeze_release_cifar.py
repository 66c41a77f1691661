"""A timm ConvNeXt on CIFAR-10: dense baseline, then Squeeze-Release with group pruning.

    python bench/squeeze_release_cifar.py [--data ../shared/datasets/cifar10] [--model convnext_atto]
        [--dense-epochs 4] [--dense-cache PATH] [--seed 0] [--cycle-seed S] [--cycles 3] [--sparsity 0.5 0.7 0.8]
        [--finetune 1] [--recovery 0.25] [--tolerance 0.02] [--select-tolerance T] [--prune-rate 0.5] [--min-rate 0.03125]
        [--max-prune-steps 30] [--optimizer-state rebuild] [--scores relative] [--calibration 2048]
        [--distill 0] [--temperature 4] [--cycle-lr LR] [--train-subset N] [--batch 128]
        [--lr 2e-3] [--threads 2] [--checkpoint PATH] [--out squeeze_release_cifar]

A laptop-CPU budget by default (convnext_atto, a few epochs): the dense baseline is far from a
converged CIFAR model, so read the ratio at accuracy *relative to that baseline*. The cycle
prunes whole channels (:func:`srfx.group_pruning.group_pruner`: atoms of srfx's coupling
analysis, LayerNorm streams included), fine-tunes with the masks fixed, compresses exactly,
releases, and repeats; model selection on a 5,000-image validation split of the training set,
test accuracy once at the end.

Options:

* ``--dense-epochs``: dense training (AdamW, weight decay 0.05, one-cycle learning rate peaking
  at ``--lr``, label smoothing 0.1, random crops and flips). ``--dense-cache PATH``: if PATH
  exists, load the trained dense model from it instead of training (the file records model,
  dense epochs, seed, lr, batch and train subset; a file written for other values is refused
  with a message naming them); otherwise train and save it there. The cache also holds the
  torch RNG state and the training loader's epoch counter after dense training, so a run from
  the cache continues exactly like one that trained. While it trains, ``PATH.partial`` holds the
  state after each epoch: rerun the same command after an interruption and dense training
  continues from it, bit for bit.
* ``--seed``: torch's seed (weight initialization) and the training data order; the
  validation split is always the same (seed 0). ``--cycle-seed S`` reseeds torch, the training
  data order and release's noise after dense training: another run of the cycle from the same
  dense model (and the same ``--dense-cache``).
* ``--cycles``, ``--sparsity`` (one value or one per cycle: the fraction of the cycle's
  starting model's Linear/Conv weights to prune), ``--finetune`` (fine-tuning epochs, one value
  or one per cycle), ``--recovery`` (training epochs after each pruning step), ``--tolerance``
  (a pruning step is rolled back when validation accuracy falls more than this below the dense
  validation accuracy), ``--select-tolerance`` (the smallest cycle whose fine-tuned model is
  within this of the dense validation accuracy is reported; default: ``--tolerance``),
  ``--prune-rate`` (each step prunes this fraction of the remaining weights; halved on every
  rollback), ``--min-rate`` (a cycle stops pruning once the rate falls below it),
  ``--max-prune-steps`` (accepted steps plus rollbacks per cycle), ``--optimizer-state``
  (``rebuild``: a fresh optimizer after each release; ``slice``: AdamW's state sliced to the
  kept channels): passed to :meth:`srfx.cycle.SqueezeRelease.supervised`, which trains with
  AdamW at ``--cycle-lr`` (default ``--lr`` / 4) and a cosine learning rate per call.
* ``--distill W``: the cycle's loss is ``(1 - W) * cross-entropy + W * T**2 * KL`` to the dense
  model's softmax at temperature ``--temperature`` (the dense model is the teacher, on the same
  augmented images); 0 (default): cross-entropy only.
* ``--scores``: how the group pruner ranks channels. ``relative``: weight RMS relative to the
  channel's group; ``taylor``: :func:`srfx.group_pruning.taylor_costs`, the first-order loss
  cost per weight freed, measured with cross-entropy on the first ``--calibration`` training
  images (unaugmented, batches of 256, the same images at every step).
* ``--target-params N``: pruning stops once the compressed model stores at most N parameters
  (:class:`srfx.cycle.Schedule` ``target_params``). ``--budget-epochs E``: the ablations at
  another run's budget. The cycles' training (every optimizer step, rolled-back steps
  included) is counted, and the last cycle's model is fine-tuned for the rest of E epochs
  (one cosine schedule, a fresh optimizer) and reported instead of the selected cycle. With
  ``--cycles 1`` this is the issue's "one minimize at the end": one long pruning schedule on
  the full-size masked model, one minimize, then fine-tuning.
* ``--train-subset N``: the first N training images only (0: all 45,000); ``--batch``,
  ``--threads`` (torch threads), ``--out`` (result name).
* ``--checkpoint PATH``: the cycle's state after every stage (pruned, fine-tuned, minimized,
  released; the training loader's position included); the same command rerun after an
  interruption resumes from it, losing at most the stage in progress.

Writes ``bench/results/<out>.json`` (dataset, model, method, dense_params, params, stored, nnz,
ratio = dense_params / stored, nnz_ratio, dense_accuracy and accuracy (test), dense_val_accuracy,
selected_cycle (0-based index into history), seconds, config, history, curve: every cycle's
ratio, validation and test accuracy, the test column reported only) and ``<out>.pt2``: the
compressed model behind the normalization, exported with torch.export, taking N x 3 x 32 x 32
float32 images in [0, 1] (any N) and returning logits.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # _common, also when imported from elsewhere (tests)

from _common import export_dynamic_batch, git_state  # noqa: E402
from srfx.cycle import Schedule, SqueezeRelease  # noqa: E402
from srfx.group_pruning import group_pruner  # noqa: E402
from srfx.report import count_nonzero, count_parameters, count_stored  # noqa: E402
from srfx.supervised import accuracy  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _cifar_parts(folder: Path, split: str) -> list[Path]:
    parts = sorted(Path(folder).glob(f"{split}_part*.npz"))
    if not parts:
        raise SystemExit(
            f"CIFAR-10 not found in {folder}: expected {split}_part*.npz (JPEG parts with "
            "'jpeg', 'offsets', 'y'). Pass --data; the originals are at https://www.cs.toronto.edu/~kriz/cifar.html"
        )
    return parts


def _decode_cifar_parts(parts: list[Path]):
    """uint8 N x 32 x 32 x 3 images and int64 labels from JPEG parts."""
    from PIL import Image

    xs, ys = [], []
    for part in parts:
        with np.load(part) as z:
            jpeg, offsets = z["jpeg"], z["offsets"]
            xs += [np.asarray(Image.open(io.BytesIO(jpeg[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB")) for i in range(len(offsets) - 1)]
            ys.append(z["y"].astype(np.int64))
    return np.stack(xs), np.concatenate(ys)


def load_cifar10(folder: Path):
    """(train_x, train_y, test_x, test_y) as uint8 N x 32 x 32 x 3 and int64 labels, decoded from
    the JPEG parts in ``folder`` (see ../shared/datasets/README.md). Missing files are named."""
    train, test = _cifar_parts(folder, "train"), _cifar_parts(folder, "test")
    return (*_decode_cifar_parts(train), *_decode_cifar_parts(test))


def load_cifar10_test(folder: Path):
    """(test_x, test_y) only: what evaluating a published model needs."""
    return _decode_cifar_parts(_cifar_parts(folder, "test"))


class Deployable(nn.Module):
    """Images N x 3 x 32 x 32 in [0, 1] -> normalized -> model: what the .pt2 holds."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, images):
        return self.model((images - self.mean) / self.std)


CYCLE_SEED_STREAM = 1_000_000


def _loader(x, y, batch, shuffle, augment, seed=0):
    """Batches of normalized float images (random crop with 4-pixel padding and flips when
    ``augment``), regenerated on every pass."""

    class _Batches:
        def __init__(self):
            self.epoch = 0
            self.seed = seed  # the pass's order and crops come from seed + epoch

        def __len__(self):
            return (len(x) + batch - 1) // batch

        def state_dict(self):  # SqueezeRelease checkpoints hold the data order's position
            return {"epoch": self.epoch, "seed": self.seed}

        def load_state_dict(self, state):
            self.epoch, self.seed = state["epoch"], state["seed"]

        def __iter__(self):
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self.epoch += 1
            order = torch.randperm(len(x), generator=g) if shuffle else torch.arange(len(x))
            mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
            for i in range(0, len(x), batch):
                idx = order[i : i + batch]
                imgs = torch.from_numpy(x[idx.numpy()]).permute(0, 3, 1, 2).float() / 255
                if augment:
                    imgs = F.pad(imgs, (4, 4, 4, 4), mode="reflect")
                    dx, dy = torch.randint(0, 9, (2,), generator=g).tolist()
                    imgs = imgs[:, :, dy : dy + 32, dx : dx + 32]
                    if torch.rand(1, generator=g).item() < 0.5:
                        imgs = imgs.flip(3)
                yield (imgs - mean) / std, torch.from_numpy(y[idx.numpy()])

    return _Batches()


class CifarData(NamedTuple):
    """The loaders of the fixed split (5,000 validation images, seed 0) and the training images."""

    train: Any
    val: Any
    test: Any
    train_x: np.ndarray
    train_y: np.ndarray
    n_val: int
    n_test: int


def cifar_data(folder: Path, batch: int, train_subset: int, seed: int) -> CifarData:
    """CIFAR-10 from ``folder``: augmented, shuffled training batches (data order ``seed``;
    ``train_subset``: the first N training images only, 0 for all), unaugmented validation
    and test batches of 500."""
    tx, ty, sx, sy = load_cifar10(folder)
    order = np.random.default_rng(0).permutation(len(tx))
    val_idx, train_idx = order[:5000], order[5000:]
    if train_subset:
        train_idx = train_idx[:train_subset]
    train = _loader(tx[train_idx], ty[train_idx], batch, True, True, seed=seed)
    val = _loader(tx[val_idx], ty[val_idx], 500, False, False)
    test = _loader(sx, sy, 500, False, False)
    return CifarData(train, val, test, tx[train_idx], ty[train_idx], len(val_idx), len(sx))


def export_pt2(model: nn.Module, path: Path) -> None:
    """``Deployable(model)`` as a .pt2 taking N x 3 x 32 x 32 images in [0, 1] (any N)."""
    export_dynamic_batch(Deployable(model).eval(), torch.rand(2, 3, 32, 32), path)


def train_dense(model, loader, epochs, lr, checkpoint: Path | None = None, key: dict | None = None):
    """The dense recipe: AdamW, one-cycle learning rate, label smoothing 0.1, for ``epochs``
    passes over ``loader``. With ``checkpoint``, the state after each full pass (model,
    optimizer, schedule, RNG, data order) is written there and a later call with the same
    file and ``key`` continues from it: an interrupted run loses at most one epoch and ends
    bit for bit where an uninterrupted one would."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = max(1, int(epochs * len(loader)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    key = {"steps": steps, **(key or {})}
    done = _resume_dense(checkpoint, key, model, opt, sched, loader) if checkpoint is not None else 0
    model.train()
    while done < steps:
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            if done >= steps:
                break
        if checkpoint is not None:
            _save_atomically(checkpoint, {"key": key, "done": done, "model": model.state_dict(), "opt": opt.state_dict(),
                                          "sched": sched.state_dict(), "rng": torch.get_rng_state(), "loader_epoch": loader.epoch})
            print(f"  dense training: {done}/{steps} steps, checkpoint {checkpoint}", flush=True)
    return model.eval()


def _resume_dense(checkpoint: Path, key: dict, model, opt, sched, loader) -> int:
    """Steps already done according to ``checkpoint`` (0 if it does not exist), with the
    training state restored from it; a file written for other training is refused."""
    if not checkpoint.exists():
        return 0
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if state.get("key") != key:
        raise SystemExit(f"checkpoint {checkpoint} was written for other training ({key_mismatch(state.get('key'), key)}); "
                         "pass another path or delete it")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    torch.set_rng_state(state["rng"])
    loader.epoch = state["loader_epoch"]
    print(f"  dense training resumed from {checkpoint} at step {state['done']}/{key['steps']}", flush=True)
    return state["done"]


def _save_atomically(path: Path, obj) -> None:
    """torch.save to a temporary file, then rename: a kill mid-write leaves the last good file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def key_mismatch(stored, expected: dict) -> str:
    """What differs between the key a file was written with and this run's, for the message."""
    stored = stored if isinstance(stored, dict) else {}
    diff = ", ".join(f"{k}: file {stored.get(k)!r} vs run {expected.get(k)!r}" for k in sorted(set(stored) | set(expected), key=str)
                     if stored.get(k) != expected.get(k))
    return diff or f"file key {stored!r}"


def dense_cache_key(model: str, dense_epochs: float, seed: int, lr: float, batch: int, train_subset: int) -> dict:
    """What a ``--dense-cache`` file must have been trained with to stand in for dense training."""
    return {"model": model, "dense_epochs": dense_epochs, "seed": seed, "lr": lr, "batch": batch, "train_subset": train_subset}


def save_dense_cache(path: Path, key: dict, model: nn.Module, loader) -> None:
    """The trained dense model with the torch RNG state and the loader's epoch after training,
    so that a run from the file continues exactly like one that trained."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "state_dict": model.state_dict(), "rng": torch.get_rng_state(), "loader_epoch": loader.epoch}, path)


def spend_budget(driver: SqueezeRelease, budget_epochs: float, batches_per_epoch: int) -> tuple[nn.Module, dict]:
    """Fine-tune the driver's last model for what its cycles left of ``budget_epochs`` (every
    optimizer step counts, rolled-back steps too), so that an ablation ends at another run's
    training budget. One cosine schedule with a fresh optimizer (the copy's parameters are new
    to the loop). Not checkpointed: a rerun repeats this fine-tuning from the last cycle."""
    used = driver.loop.steps / batches_per_epoch
    extra = max(0.0, budget_epochs - used)
    small = copy.deepcopy(driver.models[-1])
    if extra > 0:
        small = driver.loop.train(small, extra)
    return small, {"budget_epochs": budget_epochs, "cycle_epochs": used, "extra_epochs": extra}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "cifar10")
    ap.add_argument("--model", default="convnext_atto")
    ap.add_argument("--dense-epochs", type=float, default=4)
    ap.add_argument("--dense-cache", type=Path, default=None, metavar="PATH",
                    help="load the trained dense model from PATH if it exists (same model/dense epochs/seed/lr/batch/subset), else train and save it there")
    ap.add_argument("--seed", type=int, default=0, help="torch seed and training data order (the validation split is fixed)")
    ap.add_argument("--cycle-seed", type=int, default=None,
                    help="reseed torch and the training data order after dense training: another run of the cycle from the same dense model (default: continue --seed's streams)")
    ap.add_argument("--checkpoint", type=Path, default=None, metavar="PATH",
                    help="the cycle's checkpoint (SqueezeRelease checkpoint=): written after every stage, resumed from when it exists")
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.8], help="target sparsity: one value or one per cycle")
    ap.add_argument("--finetune", type=float, nargs="+", default=[1.0], help="fine-tuning epochs: one value or one per cycle")
    ap.add_argument("--recovery", type=float, default=0.25, help="epochs after each pruning step")
    ap.add_argument("--tolerance", type=float, default=0.02, help="accuracy a pruning step may cost (validation)")
    ap.add_argument("--select-tolerance", type=float, default=None, help="the reported cycle is the smallest within this of the dense validation accuracy (default: --tolerance)")
    ap.add_argument("--prune-rate", type=float, default=0.5, help="fraction of the remaining weights each pruning step takes (halved on rollback)")
    ap.add_argument("--min-rate", type=float, default=1 / 32, help="a cycle stops pruning when the rate falls below this")
    ap.add_argument("--max-prune-steps", type=int, default=30, help="pruning steps (accepted + rolled back) per cycle at most")
    ap.add_argument("--target-params", type=int, default=None, help="stop pruning once the compressed model stores at most this many parameters")
    ap.add_argument("--budget-epochs", type=float, default=None,
                    help="the cycle's training budget in epochs: the last model is fine-tuned for whatever the cycles left of it and reported (the ablations)")
    ap.add_argument("--optimizer-state", choices=["rebuild", "slice"], default="rebuild", help="after a release: fresh optimizer or sliced state")
    ap.add_argument("--scores", choices=["relative", "taylor"], default="relative", help="group pruner's channel ranking (see above)")
    ap.add_argument("--calibration", type=int, default=2048, help="training images the taylor scores are measured on")
    ap.add_argument("--distill", type=float, default=0.0, help="weight of distillation from the dense model in the cycle's loss (0: none)")
    ap.add_argument("--temperature", type=float, default=4.0, help="distillation temperature")
    ap.add_argument("--cycle-lr", type=float, default=None, help="the cycle's AdamW learning rate (default: --lr / 4)")
    ap.add_argument("--train-subset", type=int, default=0, help="use only the first N training images (0: all)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="squeeze_release_cifar")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import timm

    t0 = time.time()
    data = cifar_data(args.data, args.batch, args.train_subset, args.seed)
    train, val, test = data.train, data.val, data.test
    print(f"data: {len(data.train_x)} train, {data.n_val} validation, {data.n_test} test ({time.time() - t0:.0f} s)", flush=True)

    model = timm.create_model(args.model, pretrained=False, num_classes=10)
    dense_params = count_parameters(model)
    cache_key = dense_cache_key(args.model, args.dense_epochs, args.seed, args.lr, args.batch, args.train_subset)
    if args.dense_cache is not None and args.dense_cache.exists():
        cached = torch.load(args.dense_cache, map_location="cpu", weights_only=False)
        stored_key = cached.get("key", {}) if isinstance(cached, dict) else {}
        if stored_key != cache_key:
            raise SystemExit(f"--dense-cache {args.dense_cache} was written for another dense model ({key_mismatch(stored_key, cache_key)}); "
                             "pass another path or delete the file")
        model.load_state_dict(cached["state_dict"])
        model.eval()
        torch.set_rng_state(cached["rng"])
        train.epoch = cached["loader_epoch"]
        print(f"dense model loaded from {args.dense_cache}", flush=True)
    else:
        partial = args.dense_cache.with_name(args.dense_cache.name + ".partial") if args.dense_cache is not None else None
        model = train_dense(model, train, args.dense_epochs, args.lr, checkpoint=partial, key=cache_key)
        if args.dense_cache is not None:
            save_dense_cache(args.dense_cache, cache_key, model, train)
            print(f"dense model saved to {args.dense_cache}", flush=True)
    dense_val, dense_test = accuracy(model, val), accuracy(model, test)
    if args.cycle_seed is not None:  # a stream of data orders no --seed run reaches (those use seed + epoch)
        torch.manual_seed(args.cycle_seed)
        train.seed = CYCLE_SEED_STREAM * (args.cycle_seed + 1)
    print(f"dense {args.model}: {dense_params} parameters, validation {dense_val:.4f}, test {dense_test:.4f} ({time.time() - t0:.0f} s)", flush=True)

    example = torch.randn(1, 3, 32, 32)
    schedule = Schedule(
        cycles=args.cycles, target_sparsity=args.sparsity[0] if len(args.sparsity) == 1 else args.sparsity,
        finetune_epochs=args.finetune[0] if len(args.finetune) == 1 else args.finetune,
        recovery_epochs=args.recovery, tolerance=args.tolerance, prune_rate=args.prune_rate, min_rate=args.min_rate,
        max_prune_steps=args.max_prune_steps, reference_accuracy=dense_val, target_params=args.target_params,
    )
    if args.scores == "taylor":
        n = args.calibration
        pruner = group_pruner(example, loss=F.cross_entropy, batches=list(_loader(data.train_x[:n], data.train_y[:n], 256, False, False)))
    else:
        pruner = group_pruner(example)
    teacher = model if args.distill > 0 else None  # the driver trains its own copy; this one stays dense
    driver = SqueezeRelease.supervised(
        model, example, train, val, lr=args.lr / 4 if args.cycle_lr is None else args.cycle_lr, optimizer=torch.optim.AdamW,
        lr_schedule="cosine", teacher=teacher, distill=args.distill, temperature=args.temperature,
        schedule=schedule, pruner=pruner, optimizer_state=args.optimizer_state, seed=args.cycle_seed or 0, checkpoint=args.checkpoint,
    )
    small = driver.run()
    print(driver.table(), flush=True)
    cycle, small = driver.best(args.tolerance if args.select_tolerance is None else args.select_tolerance)
    curve = []  # every cycle's model on the test set too: reported, never used to select
    for record, cycle_model in zip(driver.history, driver.models):
        curve.append({"cycle": record.cycle, "stored": record.stored, "ratio": dense_params / record.stored,
                      "val_accuracy": record.accuracy, "test_accuracy": accuracy(cycle_model, test)})
        print(f"cycle {record.cycle}: {curve[-1]['ratio']:.2f}x, validation {record.accuracy:.4f}, test {curve[-1]['test_accuracy']:.4f}", flush=True)
    method, budget = "squeeze-release (group pruning)", {}
    if args.budget_epochs is not None:
        small, budget = spend_budget(driver, args.budget_epochs, len(train))
        cycle = len(driver.models) - 1
        curve.append({"cycle": "last + budget", "stored": count_stored(small), "ratio": dense_params / count_stored(small),
                      "val_accuracy": accuracy(small, val), "test_accuracy": accuracy(small, test)})
        print(f"the last model after {budget['extra_epochs']:.2f} more epochs: validation {curve[-1]['val_accuracy']:.4f}, "
              f"test {curve[-1]['test_accuracy']:.4f}", flush=True)
        method = "group pruning, one minimize at the end" if args.cycles == 1 else "squeeze-release (group pruning), at a fixed budget"
    test_acc = accuracy(small, test)
    stored = count_stored(small)
    result = {
        "dataset": "cifar10", "model": args.model, "method": method,
        "dense_params": dense_params, "params": count_parameters(small), "stored": stored, "nnz": count_nonzero(small),
        "ratio": dense_params / stored, "nnz_ratio": dense_params / max(1, count_nonzero(small)),
        "dense_accuracy": dense_test, "accuracy": test_acc, "dense_val_accuracy": dense_val,
        "selected_cycle": cycle, "seconds": time.time() - t0, "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "history": [r.as_dict() for r in driver.history], "curve": curve, **budget, "git": git_state(),
    }
    out = ROOT / "bench" / "results" / f"{args.out}.json"
    out.write_text(json.dumps(result, indent=2))
    export_pt2(small, out.with_suffix(".pt2"))
    print(f"{args.model}: {result['ratio']:.2f}x deployable ({result['nnz_ratio']:.1f}x nonzeros) at test {test_acc:.4f} "
          f"vs dense {dense_test:.4f}; wrote {out.relative_to(ROOT)} and .pt2", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
