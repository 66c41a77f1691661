"""LeNet-300-100 on MNIST: a dense baseline, iterative magnitude pruning (IMP) + one compress,
Squeeze-Release (srfx.cycle.SqueezeRelease) and its ablations, all selected on a 5,000-image
validation split of the training set and tested once on the 10,000 test images.

    python bench/squeeze_release_mnist.py                       # every method, the README numbers
    python bench/squeeze_release_mnist.py --methods dense sr --out trial   # a trial run

Methods (``--methods``):

* ``dense``: 784-300-100-10, Adam with a cosine learning rate, ``--dense-epochs``; the teacher.
* ``imp``: global magnitude pruning in ``--imp-rounds`` rounds to ``--imp-sparsity`` (fine-tuning
  after each round with the masks fixed), then one :func:`srfx.compress`.
* ``sr``: Squeeze-Release. Each cycle prunes whole inputs and hidden units (``unit_pruner``:
  the mean of a removed input is folded into the bias, and each chunk comes from the layer whose
  removal raises the distillation loss on a fixed 5,000-image training batch least per weight
  freed), fine-tunes, compresses exactly, releases, until the deployable model stores at most
  ``--target-params``. Training distills from the dense model. Afterwards the last
  ``--finals`` cycles' compressed models each get ``--final-epochs`` of fine-tuning: a
  ratio/accuracy curve; the JSON's headline is the smallest one within ``--tolerance`` of the
  dense validation accuracy (else the most accurate).
* ablations, each with the training budget (optimizer steps) of ``sr``'s smallest model:
  ``oneshot`` (the same pruner in one long schedule on the full-size masked model, one compress
  at the end), ``scratch`` (the final ``sr`` architecture, same kept inputs, trained from
  random init with the same distillation; ``scratch-smallest``: the same for the smallest
  architecture the cycles reached), ``sr-magnitude`` / ``sr-magnitude-norelease`` (the
  cycle with plain global magnitude masks as before issue 5, with and without release).
  ``sr-norelease`` (the unit cycle without release) is available but equals ``sr``: whole-unit
  pruning leaves no zeros inside the compacted weights, so there is nothing to release.

``--augment N`` trains every method, the dense baseline and teacher included, on images shifted
by up to N pixels (the teacher labels each shifted image itself); the README's second MNIST
table is ``--augment 1 --out squeeze_release_mnist_shift1``.

Each method writes ``bench/results/<out>_<method>.json`` (dataset, model, method, dense_params,
params = stored parameters of the deployable compressed model, nnz, ratio = dense_params /
params, nnz_ratio, dense_accuracy, accuracy = test, seconds, widths, inputs_kept, config, and
for the cycle methods the per-cycle history and the curve) and
``bench/results/<out>_<method>.pt2``: the compressed model behind the normalization, exported
with torch.export, taking N x 1 x 28 x 28 float32 images in [0, 1] (any N) and returning logits.
``bench/plot_squeeze_release.py`` draws the ratio/accuracy plot from the JSON files.
"""
from __future__ import annotations

import argparse
import copy
import gzip
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # _common, also when imported from elsewhere (tests)

import srfx  # noqa: E402
from _common import export_dynamic_batch, git_state  # noqa: E402
from srfx.cycle import ReleaseSettings, Schedule, SqueezeRelease, SupervisedLoop, TensorBatches, sparsity_of, unit_pruner  # noqa: E402
from srfx.supervised import distillation_loss  # noqa: E402
from srfx.passes import apply_masks, magnitude_masks  # noqa: E402
from srfx.passes.mask import prunable_parameters  # noqa: E402
from srfx.report import count_nonzero, count_parameters, count_stored  # noqa: E402

FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
MEAN, STD = 0.1307, 0.3081


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise SystemExit(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist(data_dir: Path):
    """(train_x, train_y, test_x, test_y): float32 images flattened to 784 and normalized,
    int64 labels. A missing folder or file is an error naming every missing file."""
    data_dir = Path(data_dir)
    missing = [name for name in FILES.values() if not (data_dir / name).is_file()]
    if missing:
        raise SystemExit(f"MNIST not found in {data_dir}: missing {', '.join(missing)} (pass the folder holding the four IDX .gz files with --data)")
    arr = {k: _read_idx(data_dir / v) for k, v in FILES.items()}

    def images(a):
        x = torch.from_numpy(a.astype(np.float32) / 255.0).reshape(len(a), -1)
        return (x - MEAN) / STD

    return images(arr["train_x"]), torch.from_numpy(arr["train_y"].astype(np.int64)), images(arr["test_x"]), torch.from_numpy(arr["test_y"].astype(np.int64))


class PairTargets:
    """Labels and teacher logits, indexed together (what :class:`TensorBatches` yields as targets)."""

    def __init__(self, labels, logits):
        self.labels, self.logits = labels, logits

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, idx):
        return self.labels[idx], self.logits[idx]


def random_shift(max_shift: int, side: int = 28, fill: float = -MEAN / STD):
    """A :class:`TensorBatches` transform: each flattened ``side`` x ``side`` image moves by a
    random whole-pixel offset in [-max_shift, max_shift] on both axes; uncovered pixels get
    ``fill`` (the normalized background)."""

    def shift(xb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, s = len(xb), max_shift
        padded = F.pad(xb.view(n, side, side), (s, s, s, s), value=fill)
        dy, dx = (torch.randint(-s, s + 1, (n, 1), generator=generator) for _ in range(2))
        rows = (torch.arange(side) + s + dy)[:, :, None]
        cols = (torch.arange(side) + s + dx)[:, None, :]
        return padded[torch.arange(n)[:, None, None], rows, cols].reshape(n, -1)

    return shift


class TeacherLabeled:
    """Batches of ``loader`` with targets (labels, teacher logits of the batch as given): the
    teacher labels each augmented image itself, so student and teacher see the same view."""

    def __init__(self, loader: TensorBatches, teacher: nn.Module):
        self.loader, self.teacher = loader, teacher.eval()
        self.generator = loader.generator

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for xb, yb in self.loader:
            with torch.no_grad():
                logits = self.teacher(xb)
            yield xb, (yb, logits)  # outside no_grad: the consumer trains while we are suspended


def lenet_300_100() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


class Deployable(nn.Module):
    """What the .pt2 holds: images N x 1 x 28 x 28 in [0, 1] -> normalized, flattened -> model."""

    def __init__(self, model: nn.Module, mean: float = MEAN, std: float = STD):
        super().__init__()
        self.model, self.mean, self.std = model, mean, std

    def forward(self, images):
        return self.model((images.flatten(1) - self.mean) / self.std)


def export_pt2(model: nn.Module, path: Path, image_shape=(1, 28, 28), mean: float = MEAN, std: float = STD) -> None:
    """torch.export ``Deployable(model)`` with a dynamic batch dimension to ``path``."""
    export_dynamic_batch(Deployable(model.eval(), mean, std).eval(), torch.rand(4, *image_shape), path)


def widths_of(model: nn.Module) -> list[int]:
    return [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]


def inputs_kept(model: nn.Module) -> int:
    return next(m.in_features for m in model.modules() if isinstance(m, nn.Linear))


def record(method, dense_params, dense_acc, small, acc, seconds, **extra) -> dict:
    stored, nnz = count_stored(small), count_nonzero(small)
    out = {
        "dataset": "mnist",
        "model": "lenet-300-100",
        "method": method,
        "dense_params": dense_params,
        "params": stored,
        "nnz": nnz,
        "ratio": dense_params / max(1, stored),
        "nnz_ratio": dense_params / max(1, nnz),
        "dense_accuracy": dense_acc,
        "accuracy": acc,
        "seconds": seconds,
        "widths": widths_of(small),
        "inputs_kept": inputs_kept(small),
    }
    out.update(extra)
    out["git"] = git_state()  # the commit the numbers came from
    return out


class Gathered(nn.Module):
    """A from-scratch model on the inputs ``keep`` (for the ``scratch`` ablation)."""

    def __init__(self, keep: torch.Tensor, widths: list[int]):
        super().__init__()
        self.register_buffer("keep", keep.clone())
        layers, n = [], len(keep)
        for i, w in enumerate(widths):
            layers.append(nn.Linear(n, w))
            if i + 1 < len(widths):
                layers.append(nn.ReLU())
            n = w
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x.index_select(-1, self.keep))


def kept_inputs(small: nn.Module, n: int = 784) -> torch.Tensor:
    bufs = [b for name, b in small.named_buffers() if "gather" in name]
    return bufs[0] if bufs else torch.arange(n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "mnist")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ft-lr", type=float, default=5e-4, help="learning rate while pruning / fine-tuning (cosine within each call)")
    p.add_argument("--dense-epochs", type=float, default=20)
    p.add_argument("--tolerance", type=float, default=0.005, help="allowed validation-accuracy drop vs dense for the headline")
    p.add_argument("--prune-tolerance", type=float, default=0.03, help="rollback threshold of the pruning steps (vs dense validation accuracy)")
    p.add_argument("--augment", type=int, default=0, metavar="PIXELS", help="train every method (the dense baseline too) on images shifted by up to this many pixels; 0: none")
    p.add_argument("--distill", type=float, default=0.7, help="weight of the distillation term (0: plain cross-entropy)")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--imp-sparsity", type=float, default=0.98)
    p.add_argument("--imp-rounds", type=int, default=8)
    p.add_argument("--imp-epochs", type=float, default=2)
    p.add_argument("--target-params", type=int, default=6800, help="stop the cycles once the deployable model stores at most this")
    p.add_argument("--cycles", type=int, default=12)
    p.add_argument("--sr-sparsity", type=float, default=0.3, help="target sparsity per cycle (of the current compacted model)")
    p.add_argument("--sr-rate", type=float, default=0.1, help="fraction of remaining weights pruned per step")
    p.add_argument("--sr-min-rate", type=float, default=1 / 32, help="the rate is halved (on a rollback, or when a step would land below --sr-overshoot x --target-params) down to this")
    p.add_argument("--sr-overshoot", type=float, default=0.95, help="a step whose deployable size lands below this x --target-params is retried at half the rate")
    p.add_argument("--sr-recovery", type=float, default=3, help="epochs after each adaptive pruning step")
    p.add_argument("--sr-finetune", type=float, default=2, help="epochs of fine-tuning per cycle with masks fixed")
    p.add_argument("--sr-release-epochs", type=float, default=0.0)
    p.add_argument("--release-scale", type=float, default=0.1)
    p.add_argument("--optimizer-state", choices=["rebuild", "slice"], default="slice")
    p.add_argument("--final-epochs", type=float, default=80, help="fine-tuning of each selected compressed model")
    p.add_argument("--finals", type=int, default=4, help="how many of the last cycles get the final fine-tuning (the curve)")
    p.add_argument("--methods", nargs="+", default=["dense", "imp", "sr", "oneshot", "scratch", "sr-magnitude", "sr-magnitude-norelease"],
                   choices=["dense", "imp", "sr", "sr-norelease", "oneshot", "scratch", "sr-magnitude", "sr-magnitude-norelease"])
    p.add_argument("--out", default="squeeze_release_mnist", help="file name prefix under bench/results/")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x, y, test_x, test_y = load_mnist(args.data)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
    tr, va = perm[5000:], perm[:5000]
    augment = random_shift(args.augment) if args.augment > 0 else None
    train = TensorBatches(x[tr], y[tr], args.batch_size, True, args.seed, transform=augment)
    val = TensorBatches(x[va], y[va], 1000, False)
    test = TensorBatches(test_x, test_y, 1000, False)
    example = x[va[:8]]
    calib_x, calib_y = x[tr[:5000]], y[tr[:5000]]
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    tester = SupervisedLoop(train, test)
    out: dict[str, dict] = {}
    models: dict[str, nn.Module] = {}

    written = set()
    smallest_models: dict[str, nn.Module] = {}

    def flush():  # each method's files as soon as it is done: a crash later loses nothing
        for key, r in out.items():
            if key in written:
                continue
            path = results_dir / f"{args.out}_{key}.json"
            path.write_text(json.dumps(r, indent=2) + "\n")
            export_pt2(models[key], path.with_suffix(".pt2"))
            written.add(key)
            print(f"wrote {path.relative_to(ROOT)} and .pt2  (widths {r['widths']}, inputs kept {r['inputs_kept']})", flush=True)

    def reseed():  # every method sees the same data order, whichever ran before it
        train.generator.manual_seed(args.seed)
        distilled.generator.manual_seed(args.seed)

    def loop(lr, teacher=None):
        if teacher is None:
            return SupervisedLoop(train, val, lr=lr, lr_schedule="cosine", progress=args.progress)
        return SupervisedLoop(distilled, val, lr=lr, loss=kd_targets, lr_schedule="cosine", progress=args.progress)

    def objective(out, labels, teacher_logits):  # the one training objective of every method
        return args.distill * distillation_loss(out, teacher_logits, args.temperature) + (1 - args.distill) * F.cross_entropy(out, labels)

    def kd_targets(out, target):  # with the teacher's logits carried by the loader
        return objective(out, *target)

    # -- dense (always: every other method starts from it) -------------------------------
    t0 = time.perf_counter()
    dense = lenet_300_100()
    loop(args.lr).train(dense, args.dense_epochs)
    dense_val = tester.evaluate(dense, val)
    dense_test = tester.evaluate(dense)
    dense_s = time.perf_counter() - t0
    dense_params = count_parameters(dense)
    print(f"dense LeNet-300-100: {dense_params} params, val {dense_val:.4f}, test {dense_test:.4f} ({dense_s:.0f} s)", flush=True)
    if "dense" in args.methods:
        d = srfx.compress(dense.eval(), example)
        out["dense"] = record("dense", dense_params, dense_test, d, dense_test, dense_s, val_accuracy=dense_val, config=config)
        models["dense"] = d
    with torch.no_grad():
        calib_t = dense(calib_x)
        if augment is None:  # the teacher's logits once, not per batch
            distilled = TensorBatches(x[tr], PairTargets(y[tr], dense(x[tr])), args.batch_size, True, args.seed)
        else:
            distilled = TeacherLabeled(TensorBatches(x[tr], y[tr], args.batch_size, True, args.seed, transform=augment), dense)

    def kd_loss(model):  # the greedy unit pruner's yardstick: distillation + CE on a fixed train batch
        with torch.no_grad():
            return float(objective(model(calib_x), calib_y, calib_t))

    def finetune(small, epochs):  # zeros stay zero (unit pruning leaves none; magnitude masks do)
        m = copy.deepcopy(small)
        lp = loop(args.ft_lr, dense if args.distill > 0 else None)
        lp.train(m, epochs, {n: p.detach() != 0 for n, p in prunable_parameters(m).items()})
        return m, lp.steps

    def run_cycles(method, budget_steps=None, pruner=None, release=True, **schedule):
        """The cycle driver, then fine-tuning of the last ``--finals`` compressed models; with
        ``budget_steps`` only the last one, for whatever that budget leaves (the ablations).
        ``schedule``: what differs from the command line's :class:`Schedule`."""
        t0 = time.perf_counter()
        reseed()
        sr = SqueezeRelease.supervised(
            dense, example, distilled if args.distill > 0 else train, val,
            lr=args.ft_lr, loss=kd_targets if args.distill > 0 else F.cross_entropy, lr_schedule="cosine",
            schedule=Schedule(**{
                "cycles": args.cycles, "target_sparsity": args.sr_sparsity, "target_params": args.target_params,
                "prune_rate": args.sr_rate, "min_rate": args.sr_min_rate, "overshoot": args.sr_overshoot, "tolerance": args.prune_tolerance, "reference_accuracy": dense_val,
                "recovery_epochs": args.sr_recovery, "finetune_epochs": args.sr_finetune, "release_epochs": args.sr_release_epochs,
                "max_prune_steps": 30, **schedule,
            }),
            release=ReleaseSettings(enabled=release, scale=args.release_scale),
            pruner=pruner or unit_pruner(calib_x, compensate=True, loss=kd_loss, chunks=3),
            optimizer_state=args.optimizer_state, progress=args.progress, seed=args.seed,
        )
        sr.run()
        print(sr.table(), flush=True)
        steps = sr.loop.steps  # the cycles' optimizer steps; each curve point adds its own fine-tuning
        curve, final_steps = [], {}
        first = max(0, len(sr.models) - (args.finals if budget_steps is None else 1))
        for i in range(first, len(sr.models)):
            epochs = args.final_epochs if budget_steps is None else max(0, budget_steps - steps) / len(train)
            m, s = finetune(sr.models[i], epochs)
            final_steps[i] = s
            curve.append({"cycle": i + 1, "params": count_stored(m), "ratio": dense_params / count_stored(m), "val_accuracy": tester.evaluate(m, val), "model": m})
            print(f"{method}: cycle {i + 1} fine-tuned: {curve[-1]['params']} params ({curve[-1]['ratio']:.1f}x), val {curve[-1]['val_accuracy']:.4f}", flush=True)
        ok = [c for c in curve if c["val_accuracy"] >= dense_val - args.tolerance]
        chosen = min(ok, key=lambda c: c["params"]) if ok else max(curve, key=lambda c: c["val_accuracy"])
        smallest = min(curve, key=lambda c: c["params"])
        smallest_models[method] = smallest["model"]
        for c in curve:  # the curve's points get a test accuracy (reported, never used to select)
            c["test_accuracy"] = tester.evaluate(c["model"])
        seconds = time.perf_counter() - t0
        small = chosen["model"]
        budget = steps + final_steps[len(sr.models) - 1]  # what the last (smallest) model cost
        res = record(
            method, dense_params, dense_test, small, tester.evaluate(small), seconds,
            val_accuracy=chosen["val_accuracy"], dense_val_accuracy=dense_val, selected_cycle=chosen["cycle"], train_steps=steps + final_steps[chosen["cycle"] - 1],
            epochs=(steps + final_steps[chosen["cycle"] - 1]) / len(train), budget_steps=budget, smallest={k: v for k, v in smallest.items() if k != "model"},
            curve=[{k: v for k, v in c.items() if k != "model"} for c in curve],
            history=[r.as_dict() for r in sr.history], config=config,
        )
        return res, small, budget, sr

    sr_steps, sr_small = None, None
    if "sr" in args.methods:
        out["sr"], models["sr"], sr_steps, sr = run_cycles("squeeze-release")
        sr_small = sr.models[-1]
    flush()
    if "sr-norelease" in args.methods:
        out["sr-norelease"], models["sr-norelease"], _, _ = run_cycles("squeeze-release, no release", budget_steps=sr_steps, release=False)
    flush()
    # -- IMP + one compress ----------------------------------------------------------------
    if "imp" in args.methods:
        t0 = time.perf_counter()
        reseed()
        model = copy.deepcopy(dense)
        lp = loop(args.ft_lr, dense if args.distill > 0 else None)
        masks, kept = None, []
        for r in range(1, args.imp_rounds + 1):
            target = 1 - (1 - args.imp_sparsity) ** (r / args.imp_rounds)
            masks = magnitude_masks(model, target, existing=masks)
            apply_masks(model, masks)
            lp.train(model, args.imp_epochs, masks)
            acc = lp.evaluate(model)
            kept.append((target, acc, copy.deepcopy(model)))
            print(f"IMP round {r}: {sparsity_of(model):.1%} sparse, val {acc:.4f}", flush=True)
        ok = [k for k in kept if k[1] >= dense_val - args.tolerance]
        target, val_acc, chosen = ok[-1] if ok else max(kept, key=lambda k: k[1])
        small = srfx.compress(chosen.eval(), example)
        out["imp"] = record("imp+compress", dense_params, dense_test, small, tester.evaluate(small), time.perf_counter() - t0, val_accuracy=val_acc, sparsity=target, train_steps=lp.steps, config=config)
        models["imp"] = small

    flush()
    # -- one compress at the end: the same pruner in one long schedule, same budget ----------
    if "oneshot" in args.methods:
        res, small, steps, _ = run_cycles("unit pruning, one minimize at the end", budget_steps=sr_steps, cycles=1, target_sparsity=0.99, prune_rate=args.sr_rate, max_prune_steps=200)
        out["oneshot"], models["oneshot"] = res, small

    flush()
    # -- the final architecture from scratch, same budget ------------------------------------
    if "scratch" in args.methods and sr_small is not None:
        # both the headline architecture and the smallest one the cycles reached
        for key, arch in (("scratch", models["sr"]), ("scratch-smallest", smallest_models["squeeze-release"])):
            t0 = time.perf_counter()
            reseed()
            torch.manual_seed(args.seed + 1)
            m = Gathered(kept_inputs(arch), widths_of(arch))
            lp = loop(args.lr, dense if args.distill > 0 else None)
            lp.train(m, sr_steps / len(train))
            small = srfx.compress(m.eval(), example)
            name = "final architecture from scratch" + (" (smallest)" if key != "scratch" else "")
            out[key] = record(name, dense_params, dense_test, small, tester.evaluate(small), time.perf_counter() - t0, val_accuracy=tester.evaluate(small, val), train_steps=lp.steps, epochs=lp.steps / len(train), config=config)
            models[key] = small

    flush()
    for key, release in (("sr-magnitude", True), ("sr-magnitude-norelease", False)):
        if key in args.methods:  # the cycle as before issue 5: where release has zeros to work on
            name = "squeeze-release, magnitude masks" + ("" if release else ", no release")
            out[key], models[key], _, _ = run_cycles(name, budget_steps=sr_steps, pruner="magnitude", cycles=4, target_sparsity=0.97, prune_rate=0.6, recovery_epochs=1, release=release)

    flush()
    from tabulate import tabulate

    rows = [(r["method"], r["params"], r["nnz"], f"{r['ratio']:.2f}x", f"{r['nnz_ratio']:.1f}x", f"{r.get('val_accuracy', float('nan')):.4f}", f"{r['accuracy']:.4f}", f"{r['seconds']:.0f}") for r in out.values()]
    print(f"dense: val {dense_val:.4f}, test {dense_test:.4f}")
    print(tabulate(rows, headers=["method", "stored params", "nnz", "ratio", "nnz ratio", "val acc", "test acc", "s"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
