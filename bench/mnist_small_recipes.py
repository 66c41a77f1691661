"""Can a better training recipe lift the ~40x MNIST model to within 0.5 points of the dense one?

    python bench/mnist_small_recipes.py [--data ../shared/datasets/mnist] [--epochs 160] [--variants ref ema ...]

The issue's MNIST goal (39x at test accuracy within 0.5 points of LeNet-300-100's 98.39%)
was missed by the cycle's 40.95x model (97.62%). The cycle's own ablations say it finds an
architecture (which pixels, how wide), and that architecture trained from scratch does as
well. So this trains that architecture, 99 kept pixels and widths 39-52-10 (pixels read from
the cycle's committed ``squeeze_release_mnist_min_rate_ft240_sr.pt2``), from scratch under
one recipe change at a time, all distilling from the same dense teacher the bench trains
(20 epochs, Adam, cosine; seed 0, same 5k validation split), and reports validation and
test accuracy. Two more rows vary the widths at about the same size, and one uses the
198 pixels of the cycle's 15.7x model.

Recipe (``ref``): Adam 1e-3, cosine to 0 over ``--epochs`` epochs, batch 128,
0.7 * T^2 KL(teacher || student) at T = 4 + 0.3 * cross-entropy. Each variant changes one
thing (see VARIANTS). Per-pixel standardization and ZCA whitening are linear maps of the
inputs that fold into the first layer exactly, so they change the training, not the model.
The mixup rows match the teacher's function on random convex combinations of two training
images (the teacher labels each mixed image itself; Beyer et al. 2022).

Writes ``bench/results/<out>.json`` (per variant: params, val_accuracy, accuracy (test),
seconds, and the dense teacher's accuracies).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import git_state  # noqa: E402
from squeeze_release_mnist import Gathered, lenet_300_100, load_mnist  # noqa: E402
from srfx.supervised import distillation_loss  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SMALLEST = RESULTS / "squeeze_release_mnist_min_rate_ft240_sr.pt2"  # the cycle's 40.95x model
HEADLINE = RESULTS / "squeeze_release_mnist_sr.pt2"  # the cycle's 15.7x model (198 pixels)


class Data:
    def __init__(self, data_dir: Path):
        x, y, self.test_x, self.test_y = load_mnist(data_dir)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        tr, va = perm[5000:], perm[:5000]
        self.x, self.y, self.val_x, self.val_y = x[tr], y[tr], x[va], y[va]


def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def kept_pixels(pt2: Path) -> torch.Tensor:
    if not pt2.exists():
        raise SystemExit(f"{pt2} is missing: it is committed with the repository (bench/squeeze_release_mnist.py writes it)")
    program = torch.export.load(str(pt2))
    return next(v for k, v in program.state_dict.items() if "gather" in k).long()


def train(model, data: Data, epochs: int, loss_fn, *, lr=1e-3, batch=128, ema=None, weight_decay=0.0, seed=0):
    """Adam (AdamW with ``weight_decay``), cosine to 0 per step; ``loss_fn(model, idx, g)``.
    With ``ema``, returns the exponential moving average of the weights (decay ``ema``)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay) if weight_decay else torch.optim.Adam(model.parameters(), lr=lr)
    n = len(data.x)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(n / batch))
    average = copy.deepcopy(model) if ema else None
    for _ in range(epochs):
        model.train()
        order = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            loss = loss_fn(model, order[i : i + batch], g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if average is not None:
                with torch.no_grad():
                    for a, p in zip(average.parameters(), model.parameters()):
                        a.lerp_(p, 1 - ema)
    return average if average is not None else model


class Objectives:
    """The losses the variants train with, over the teacher's logits on the training set."""

    def __init__(self, data: Data, teacher: nn.Module):
        self.data, self.teacher = data, teacher
        with torch.no_grad():
            self.logits = teacher(data.x)

    def kd(self, weight=0.7, temperature=4.0):
        def loss(model, idx, g):
            out = model(self.data.x[idx])
            return weight * distillation_loss(out, self.logits[idx], temperature) + (1 - weight) * F.cross_entropy(out, self.data.y[idx])
        return loss

    def logit_mse(self):
        return lambda model, idx, g: F.mse_loss(model(self.data.x[idx]), self.logits[idx])

    def mixup(self, temperature=1.0, clean=0.0):
        """Match the teacher on mixed images (lambda ~ U(0, 1)); ``clean`` adds the ref loss on
        the unmixed batch with that weight."""
        ref = self.kd()

        def loss(model, idx, g):
            xb = self.data.x[idx]
            lam = torch.rand(len(idx), 1, generator=g)
            mixed = lam * xb + (1 - lam) * xb[torch.randperm(len(idx), generator=g)]
            with torch.no_grad():
                target = self.teacher(mixed)
            out = distillation_loss(model(mixed), target, temperature)
            return out + clean * ref(model, idx, g) if clean else out
        return loss


class Preprocessed(nn.Module):
    """A fixed affine map of the kept pixels (folds into the first Linear), then the MLP."""

    def __init__(self, keep, matrix, shift, widths):
        super().__init__()
        self.register_buffer("keep", keep)
        self.register_buffer("matrix", matrix)
        self.register_buffer("shift", shift)
        self.net = Gathered(torch.arange(len(keep)), widths).net

    def forward(self, x):
        return self.net(x.index_select(-1, self.keep) @ self.matrix.T + self.shift)


def preprocessing(data: Data, keep: torch.Tensor, kind: str, eps: float = 1e-2):
    xs = data.x[:, keep].double()
    mean, std = xs.mean(0), xs.std(0).clamp_min(1e-3)
    if kind == "std":
        matrix = torch.diag(1 / std)
    else:  # zca
        evals, evecs = torch.linalg.eigh(torch.cov((xs - mean).T))
        matrix = evecs @ torch.diag((evals + eps).rsqrt()) @ evecs.T
    return matrix.float(), (-(matrix @ mean)).float()


def variants(obj: Objectives):
    """name -> (pixels, widths, loss, train options, preprocessing or None)."""
    s, h = "smallest", "headline"
    return {
        "ref": (s, [39, 52, 10], obj.kd(), {}, None),
        "distill-only": (s, [39, 52, 10], obj.kd(weight=1.0), {}, None),
        "T2": (s, [39, 52, 10], obj.kd(temperature=2.0), {}, None),
        "T8": (s, [39, 52, 10], obj.kd(temperature=8.0), {}, None),
        "logit-mse": (s, [39, 52, 10], obj.logit_mse(), {}, None),
        "lr3e-3": (s, [39, 52, 10], obj.kd(), {"lr": 3e-3}, None),
        "batch32": (s, [39, 52, 10], obj.kd(), {"batch": 32}, None),
        "ema0.999": (s, [39, 52, 10], obj.kd(), {"ema": 0.999}, None),
        "adamw1e-2": (s, [39, 52, 10], obj.kd(), {"weight_decay": 1e-2}, None),
        "mixup-T1": (s, [39, 52, 10], obj.mixup(), {}, None),
        "mixup-T1+ref": (s, [39, 52, 10], obj.mixup(clean=1.0), {}, None),
        "pixel-std": (s, [39, 52, 10], obj.kd(), {}, "std"),
        "zca": (s, [39, 52, 10], obj.kd(), {}, "zca"),
        "widths-50-30": (s, [50, 30, 10], obj.kd(), {}, None),
        "widths-30-80": (s, [30, 80, 10], obj.kd(), {}, None),
        "198px-25-40": (h, [25, 40, 10], obj.kd(), {}, None),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "mnist")
    ap.add_argument("--epochs", type=int, default=160)
    ap.add_argument("--variants", nargs="+", default=None, help="names from VARIANTS (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="mnist_small_recipes")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = Data(args.data)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    teacher = train(lenet_300_100(), data, 20, lambda m, idx, g: F.cross_entropy(m(data.x[idx]), data.y[idx])).eval()
    dense = {"val_accuracy": accuracy(teacher, data.val_x, data.val_y), "accuracy": accuracy(teacher, data.test_x, data.test_y),
             "params": sum(p.numel() for p in teacher.parameters()), "seconds": time.perf_counter() - t0}
    print(f"dense teacher: val {dense['val_accuracy']:.4f}, test {dense['accuracy']:.4f}", flush=True)
    pixels = {"smallest": kept_pixels(SMALLEST), "headline": kept_pixels(HEADLINE)}
    table = variants(Objectives(data, teacher))
    rows = {}
    for name in args.variants or list(table):
        where, widths, loss, options, pre = table[name]
        keep = pixels[where]
        torch.manual_seed(1)
        if pre is None:
            model = Gathered(keep, widths)
        else:
            model = Preprocessed(keep, *preprocessing(data, keep, pre), widths)
        params = sum(p.numel() for p in model.parameters())
        t0 = time.perf_counter()
        model = train(model, data, args.epochs, loss, **options)
        rows[name] = {"pixels": len(keep), "widths": widths, "params": params, "ratio": dense["params"] / params,
                      "val_accuracy": accuracy(model, data.val_x, data.val_y), "accuracy": accuracy(model, data.test_x, data.test_y),
                      "seconds": time.perf_counter() - t0}
        r = rows[name]
        print(f"{name:14s} {r['pixels']}-{'-'.join(map(str, widths))} {params} params ({r['ratio']:.1f}x): "
              f"val {r['val_accuracy']:.4f}, test {r['accuracy']:.4f} ({r['seconds']:.0f} s)", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.out}.json"
    out.write_text(json.dumps({"benchmark": "mnist_small_recipes", "epochs": args.epochs, "dense": dense, "variants": rows,
                               "git": git_state()}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
