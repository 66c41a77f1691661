"""What the torch.compile backend's weight check costs per call, and what minimizing gains.

For each model (random weights, ``kill_channels`` at ``--kill-rate``, eval, no_grad) this times
one call of

* ``plain``: ``torch.compile(model, backend=INNER)``, the baseline;
* ``versions``: ``srfx.Backend(INNER, check_weights="versions")``: tensor identity and version
  counters before each call;
* ``values``: ``srfx.Backend(INNER)`` (the default): also compares every weight with the copy
  taken when it minimized, which catches writes through ``.data``;

and prints each as a ratio to ``plain`` (below 1: faster than the unminimized graph). The
inner backend is ``eager`` by default (inductor's compile takes minutes on two cores; pass
``--inner inductor`` where that is fine). Medians of ``--repeats`` timed calls after warm-up;
the three variants alternate call by call so that load on the machine hits them alike.
Writes ``bench/results/backend_overhead.json``.

    python bench/backend_overhead.py [--models mlp resnet18] [--batch 1 8] [--repeats 50]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn
from tabulate import tabulate

import _common as C
import srfx

SHAPES = {"mlp": (784,), "resnet18": (3, 64, 64), "vit_tiny_patch16_224": (3, 64, 64)}


def build(name: str, kill_rate: float, seed: int) -> nn.Module:
    if name == "mlp":
        model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    else:
        import timm

        kwargs = {"img_size": 64} if name.startswith("vit") else {}
        model = timm.create_model(name, pretrained=False, **kwargs)
    C.kill_channels(model, rate=kill_rate, seed=seed)
    return model.eval()


def bench_one(name: str, args) -> list[dict]:
    rows = []
    for batch in args.batch:
        torch._dynamo.reset()
        model = build(name, args.kill_rate, args.seed)
        x = torch.randn(batch, *SHAPES[name], generator=torch.Generator().manual_seed(args.seed))
        variants = {
            "plain": torch.compile(model, backend=args.inner, dynamic=False),
            "versions": torch.compile(model, backend=srfx.Backend(args.inner, check_weights="versions", warn=False), dynamic=False),
            "values": torch.compile(model, backend=srfx.Backend(args.inner, warn=False), dynamic=False),
        }
        times = {k: [] for k in variants}
        with torch.no_grad():
            for f in variants.values():  # compile and minimize outside the timed calls
                for _ in range(3):
                    f(x)
            for _ in range(args.repeats):
                for k, f in variants.items():
                    dt, _ = C.timed(lambda: f(x))
                    times[k].append(dt)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({
            "model": name, "batch": batch, "parameters": sum(p.numel() for p in model.parameters()),
            **{f"{k}_median_s": v for k, v in med.items()},
            "versions_over_plain": med["versions"] / med["plain"], "values_over_plain": med["values"] / med["plain"],
        })
        print(f"[backend_overhead] {name} batch {batch}: versions {rows[-1]['versions_over_plain']:.2f}x, "
              f"values {rows[-1]['values_over_plain']:.2f}x of plain", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(ap, models=["mlp", "resnet18", "vit_tiny_patch16_224"], threads=1, out="backend_overhead.json")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--kill-rate", type=float, default=0.5)
    ap.add_argument("--inner", default="eager")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", module="srfx")
    torch.set_num_threads(args.threads)
    t0, load0 = time.perf_counter(), C.loadavg()
    rows = [row for name in args.models for row in bench_one(name, args)]
    table = [(r["model"], r["batch"], f"{1e3 * r['plain_median_s']:.2f}", f"{r['versions_over_plain']:.2f}", f"{r['values_over_plain']:.2f}") for r in rows]
    print(tabulate(table, headers=["model", "batch", "plain ms", "versions / plain", "values / plain"]))
    run = C.Run(rows, time.perf_counter() - t0, load0, C.loadavg())
    path = C.write_json(args.out, run.payload("backend_overhead", inner=args.inner, kill_rate=args.kill_rate, repeats=args.repeats, git=C.git_state()))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
