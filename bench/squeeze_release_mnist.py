"""LeNet-300-100 on MNIST: dense baseline, iterative magnitude pruning (IMP) + one compress, and
Squeeze-Release (srfx.cycle.SqueezeRelease).

    python bench/squeeze_release_mnist.py [--data ../shared/datasets/mnist] [--threads 1]
    python bench/squeeze_release_mnist.py --dense-epochs 20 --imp-rounds 10 --imp-epochs 3 \\
        --cycles 6 --sr-sparsity 0.9 --sr-finetune 3 --sr-recovery 1     # a longer run

Model selection uses a 5,000-image validation split of the training set (seeded); test
accuracy is measured once per method on the selected model. For each method a JSON file
``bench/results/<name>_<method>.json`` holds dataset, model, method, dense_params, params
(of the compressed model), nnz, ratio (dense_params / stored parameters of the deployable
compressed model), nnz_ratio (dense_params / nnz), dense_accuracy, accuracy (test), seconds,
plus the configuration and, for Squeeze-Release, the per-cycle history. The defaults finish in
about 1-3 minutes on one thread
(4 dense epochs; IMP 5 rounds to 98%; Squeeze-Release 4 cycles at 97% per cycle).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import srfx  # noqa: E402
from srfx.cycle import SqueezeRelease, SupervisedLoop, sparsity_of  # noqa: E402
from srfx.passes import apply_masks, magnitude_masks  # noqa: E402
from srfx.report import count_nonzero, count_parameters, count_stored  # noqa: E402

FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}


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
        return (x - 0.1307) / 0.3081

    return images(arr["train_x"]), torch.from_numpy(arr["train_y"].astype(np.int64)), images(arr["test_x"]), torch.from_numpy(arr["test_y"].astype(np.int64))


class Batches:
    """Minibatches of in-memory tensors (reshuffled every pass with a seeded generator when
    ``shuffle``): what a DataLoader would give, without per-sample indexing."""

    def __init__(self, x, y, batch_size, shuffle, seed=0):
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self):
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        idx = torch.randperm(len(self.y), generator=self.gen) if self.shuffle else torch.arange(len(self.y))
        for b in idx.split(self.batch_size):
            yield self.x[b], self.y[b]


def lenet_300_100() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def record(args, method, dense_params, dense_acc, small, acc, seconds, **extra) -> dict:
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
        "widths": [m.out_features for m in small.modules() if isinstance(m, nn.Linear)],
        "inputs_kept": next(m.in_features for m in small.modules() if isinstance(m, nn.Linear)),
    }
    out.update(extra)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "mnist")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ft-lr", type=float, default=5e-4, help="learning rate while pruning / fine-tuning")
    p.add_argument("--dense-epochs", type=float, default=4)
    p.add_argument("--tolerance", type=float, default=0.01, help="allowed validation-accuracy drop vs dense")
    p.add_argument("--imp-sparsity", type=float, default=0.98)
    p.add_argument("--imp-rounds", type=int, default=5)
    p.add_argument("--imp-epochs", type=float, default=1)
    p.add_argument("--cycles", type=int, default=4)
    p.add_argument("--sr-sparsity", type=float, default=0.97, help="target sparsity per cycle (of the current compacted model)")
    p.add_argument("--sr-recovery", type=float, default=0.5, help="epochs after each adaptive pruning step")
    p.add_argument("--sr-finetune", type=float, default=1, help="epochs of fine-tuning per cycle with masks fixed")
    p.add_argument("--sr-release-epochs", type=float, default=0.0, help="epochs of unmasked training after each release")
    p.add_argument("--sr-rate", type=float, default=0.6, help="initial fraction of remaining weights pruned per step")
    p.add_argument("--release-scale", type=float, default=0.1)
    p.add_argument("--max-output-change", type=float, default=None)
    p.add_argument("--methods", nargs="+", default=["imp", "sr"], choices=["imp", "sr"])
    p.add_argument("--name", default="squeeze_release_mnist")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x, y, test_x, test_y = load_mnist(args.data)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
    tr, va = perm[5000:], perm[:5000]
    train = Batches(x[tr], y[tr], args.batch_size, True, args.seed)
    val = Batches(x[va], y[va], 1000, False)
    test = Batches(test_x, test_y, 1000, False)
    example = x[va[:8]]
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}

    # -- dense -----------------------------------------------------------------------
    t0 = time.perf_counter()
    dense = lenet_300_100()
    loop = SupervisedLoop(train, val, lr=args.lr)
    loop.train(dense, args.dense_epochs)
    dense_val = loop.evaluate(dense)
    dense_test = SupervisedLoop(train, test).evaluate(dense)
    dense_s = time.perf_counter() - t0
    dense_params = count_parameters(dense)
    print(f"dense LeNet-300-100: {dense_params} params, val {dense_val:.4f}, test {dense_test:.4f} ({dense_s:.0f} s)", flush=True)
    tester = SupervisedLoop(train, test)
    rows = [("dense", dense_params, count_nonzero(dense), "1.00x", "1.00x", f"{dense_test:.4f}", f"{dense_s:.0f}")]
    out = {}

    # -- IMP + one compress ----------------------------------------------------------
    if "imp" in args.methods:
        t0 = time.perf_counter()
        model = copy.deepcopy(dense)
        loop = SupervisedLoop(train, val, lr=args.ft_lr)
        masks, kept = None, []
        for r in range(1, args.imp_rounds + 1):
            target = 1 - (1 - args.imp_sparsity) ** (r / args.imp_rounds)
            masks = magnitude_masks(model, target, existing=masks)
            apply_masks(model, masks)
            loop.train(model, args.imp_epochs, masks)
            acc = loop.evaluate(model)
            kept.append((target, acc, copy.deepcopy(model)))
            print(f"IMP round {r}: {sparsity_of(model):.1%} sparse, val {acc:.4f}", flush=True)
        ok = [k for k in kept if k[1] >= dense_val - args.tolerance]
        target, val_acc, chosen = ok[-1] if ok else max(kept, key=lambda k: k[1])
        small = srfx.compress(chosen.eval(), example)
        seconds = time.perf_counter() - t0
        acc = tester.evaluate(small)
        out["imp"] = record(args, "imp+compress", dense_params, dense_test, small, acc, seconds, val_accuracy=val_acc, sparsity=target, config=config)
        print(small.meta[srfx.REPORT_KEY], flush=True)

    # -- Squeeze-Release -------------------------------------------------------------
    if "sr" in args.methods:
        t0 = time.perf_counter()
        sr = SqueezeRelease.supervised(
            dense, example, train, val,
            lr=args.ft_lr,
            cycles=args.cycles,
            target_sparsity=args.sr_sparsity,
            prune_rate=args.sr_rate,
            tolerance=args.tolerance,
            reference_accuracy=dense_val,
            recovery_epochs=args.sr_recovery,
            finetune_epochs=args.sr_finetune,
            release_epochs=args.sr_release_epochs,
            release_scale=args.release_scale,
            calibration_batch=example if args.max_output_change is not None else None,
            max_output_change=args.max_output_change,
            seed=args.seed,
        )
        sr.run()
        seconds = time.perf_counter() - t0
        print(sr.table(), flush=True)
        i, small = sr.best()
        acc = tester.evaluate(small)
        out["sr"] = record(
            args, "squeeze-release", dense_params, dense_test, small, acc, seconds,
            val_accuracy=sr.history[i].accuracy, selected_cycle=i + 1,
            history=[r.as_dict() for r in sr.history], config=config,
        )

    for key, r in out.items():
        path = results_dir / f"{args.name}_{key}.json"
        path.write_text(json.dumps(r, indent=2) + "\n")
        rows.append((r["method"], r["params"], r["nnz"], f"{r['ratio']:.2f}x", f"{r['nnz_ratio']:.2f}x", f"{r['accuracy']:.4f}", f"{r['seconds']:.0f}"))
        print(f"wrote {path.relative_to(ROOT)}  (widths {r['widths']}, inputs kept {r['inputs_kept']})")
    from tabulate import tabulate

    print(tabulate(rows, headers=["method", "stored params", "nnz", "ratio (dense/stored)", "nnz ratio", "test acc", "s"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
