"""Analysis time: srfx's coupling analysis vs Torch-Pruning's dependency graph.

For each timm model (random weights, eval mode, input 1x3x224x224) time, side by side
in one run:

- srfx: ``srfx.analyze(model, x)``: fx tracing (of an internal deep copy), shape propagation
  on the example input, and the coupling-group analysis;
- Torch-Pruning: ``tp.DependencyGraph().build_dependency(model, example_inputs=x)``: one
  traced forward pass (autograd graph) and the dependency graph.

Each tool gets one untimed warm-up run per model, then ``--repeats`` timed runs, alternating
srfx and TP, each on a fresh deep copy of the model made outside the timed region. Prints
best and median seconds and the ratio TP/srfx (> 1: srfx is faster) and writes
bench/results/analysis_time.json.

    python bench/analysis_time.py [--models resnet50 vit_small_patch16_224] [--repeats 3]
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn as nn
from tabulate import tabulate

import _common as C

DEFAULT_MODELS = ["resnet50", "convnext_tiny", "vit_small_patch16_224", "efficientnet_b0"]


class ForwardX(nn.Module):
    """``forward(x) = model(x)``: hides forward arguments that have defaults (timm's ViT has
    ``forward(x, attn_mask=None, is_causal=False)``), which fx turns into extra placeholders."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def run_srfx(model: nn.Module, x: torch.Tensor):
    import srfx

    return srfx.analyze(model, x)


def run_tp(model: nn.Module, x: torch.Tensor):
    import torch_pruning as tp

    return tp.DependencyGraph().build_dependency(model, example_inputs=x)


def bench_model(name: str, repeats: int, wrap: bool, seed: int) -> dict:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    row: dict = {"model": name, "params": sum(p.numel() for p in model.parameters()), "wrapped": False}

    # warm-up (also: does each tool handle the model as it is?)
    try:
        coupling = run_srfx(copy.deepcopy(model), x)
    except Exception as exc:
        row["srfx_error_unwrapped"] = C.short_error(exc)
        if not wrap:
            coupling = None
        else:
            model = ForwardX(model).eval()
            row["wrapped"] = True
            try:
                coupling = run_srfx(copy.deepcopy(model), x)
            except Exception as exc2:
                row["srfx_error"] = C.short_error(exc2)
                coupling = None
    try:
        dg = run_tp(copy.deepcopy(model), x)
    except Exception as exc:
        row["tp_error"] = C.short_error(exc)
        dg = None

    srfx_ok, tp_ok = coupling is not None, dg is not None
    if srfx_ok:
        row["srfx_groups"] = len(coupling.groups)
        row["srfx_prunable_groups"] = sum(1 for g in coupling.groups if g.prunable)
    if tp_ok:
        try:
            row["tp_groups"] = sum(1 for _ in dg.get_all_groups())
        except Exception as exc:  # informative only
            row["tp_groups_error"] = C.short_error(exc)
    del coupling, dg

    t_srfx, t_tp, t_copy = [], [], []
    for _ in range(repeats):
        if srfx_ok:
            m = copy.deepcopy(model)
            t, _out = C.timed(lambda m=m: run_srfx(m, x))
            t_srfx.append(t)
            del m, _out
        if tp_ok:
            m = copy.deepcopy(model)
            t, _out = C.timed(lambda m=m: run_tp(m, x))
            t_tp.append(t)
            del m, _out
        # srfx.analyze deep-copies the model internally (the original is never traced in
        # place); time one deepcopy so a reader can see that share of the srfx time.
        t, m = C.timed(lambda: copy.deepcopy(model))
        t_copy.append(t)
        del m

    row["srfx"] = C.summary(t_srfx) if t_srfx else None
    row["tp"] = C.summary(t_tp) if t_tp else None
    row["deepcopy"] = C.summary(t_copy)
    row["ratio_tp_over_srfx_median"] = C.ratio(row["tp"] and row["tp"]["median_s"], row["srfx"] and row["srfx"]["median_s"])
    row["ratio_tp_over_srfx_best"] = C.ratio(row["tp"] and row["tp"]["best_s"], row["srfx"] and row["srfx"]["best_s"])
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(ap, models=DEFAULT_MODELS, threads=2, out="analysis_time.json")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per tool and model, after one warm-up (default 3)")
    ap.add_argument("--no-wrap", action="store_true",
                    help="do not retry a model srfx rejects behind a forward(x) wrapper (see ForwardX)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    run = C.run_models("analysis_time", args.models, lambda name: bench_model(name, args.repeats, not args.no_wrap, args.seed),
                       threads=args.threads)
    rows = run.rows
    table = []
    notes = []
    for r in rows:
        if "error" in r:
            table.append([r["model"]] + ["-"] * 8)
            notes.append(f"{r['model']}: {r['error']}")
            continue
        s, t, d = r.get("srfx"), r.get("tp"), r["deepcopy"]
        label = r["model"] + (" *" if r["wrapped"] else "")
        table.append([
            label,
            C.fmt(s and s["best_s"]), C.fmt(s and s["median_s"]),
            C.fmt(t and t["best_s"]), C.fmt(t and t["median_s"]),
            C.fmt(r["ratio_tp_over_srfx_best"], ".2f"),
            C.fmt(r["ratio_tp_over_srfx_median"], ".2f"),
            C.fmt(d["median_s"]),
            f"{r.get('srfx_groups', '-')}/{r.get('tp_groups', '-')}",
        ])
        if r["wrapped"]:
            notes.append(f"{r['model']} *: srfx rejected the bare model ({r['srfx_error_unwrapped']}); "
                         "both tools timed on ForwardX(model), forward(x) = model(x)")
        for k in ("srfx_error", "tp_error"):
            if k in r:
                notes.append(f"{r['model']}: {k}: {r[k]}")
    headers = ["model", "srfx best s", "srfx med s", "TP best s", "TP med s", "TP/srfx (best)", "TP/srfx (med)", "deepcopy s", "groups srfx/TP"]
    print()
    print(f"Analysis time, input 1x3x224x224, {args.repeats} timed run(s) after 1 warm-up, {torch.get_num_threads()} threads")
    print(tabulate(table, headers=headers, disable_numparse=True))
    print(f"load average at start/end: {run.loadavg_start} / {run.loadavg_end} (other processes share these cores: prefer 'best')")
    print("TP/srfx > 1 means srfx's analysis is faster. srfx time includes its internal deepcopy of the model (column 'deepcopy s').")
    for n in notes:
        print("note:", n)

    path = C.write_json(args.out, run.payload("analysis_time", input_shape=[1, 3, 224, 224], repeats=args.repeats, warmup=1))
    print(f"wrote {path.relative_to(path.parent.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
