"""Removing dead channels: srfx.compress vs Torch-Pruning, and the latency srfx's output gains.

For each timm model (random weights, eval mode) build a model with "dead" channels: with a
fixed seed, zero ``--kill-rate`` of the output rows of every Conv2d/Linear weight, and give
every BatchNorm nonzero random running_mean and bias (running_var in [0.5, 1.5]), so a dead
channel still carries a constant (BN shift, conv bias) into the rest of the network.

Then, on the same model:

(a) srfx: ``srfx.compress(model, x)``: wall time, parameters before/after, max relative
    output error vs the original on a fresh input (and the error srfx's own check reports);
(b) Torch-Pruning removing the same dead channels: on a deep copy, build a
    ``tp.DependencyGraph``; for each Conv2d whose output rows are all zero,
    ``dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=dead)`` and
    ``group.prune()`` when ``dg.check_pruning_group(group)``: wall time (build + pruning),
    parameters after, max relative output error vs the original. TP drops the constants
    that dead channels still emit, and prunes every layer coupled to the conv at those
    indices, so its error is expected to be large;
(c) inference latency of the original and srfx's output (median of ``--repeats`` runs after
    a warm-up, batch 1 and 8, ``torch.set_num_threads(2)``), reported as original/srfx.

Relative error is max|a - b| / max|a| over the logits (srfx's own definition).
Prints a table and writes bench/results/compress_vs_tp.json.

    python bench/compress_vs_tp.py [--models resnet50 densenet121] [--kill-rate 0.25] [--repeats 5]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys

import torch
import torch.nn as nn
from tabulate import tabulate

import _common as C

DEFAULT_MODELS = ["resnet50", "efficientnet_b0", "mobilenetv3_large_100", "densenet121", "regnety_008"]


# --------------------------------------------------------------------------- the model

def make_dead(model: nn.Module, kill_rate: float, seed: int) -> dict:
    """Wake zero-initialized scales, then zero ``kill_rate`` of each Conv2d/Linear's output rows
    (at least one row always survives) and randomize BatchNorm shifts; returns {module name:
    sorted dead rows}."""
    # first wake what timm zero-initializes (BatchNorm scales of last blocks, heads, layer
    # scales): left at zero they silence whole branches and inflate every ratio
    C.kill_channels(model, rate=0.0, seed=seed, columns=False)
    g = torch.Generator().manual_seed(seed)
    dead = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                n = mod.weight.shape[0]
                k = min(n - 1, int(round(kill_rate * n)))
                if k > 0:
                    idx = torch.randperm(n, generator=g)[:k].sort().values
                    mod.weight[idx] = 0
                    dead[name] = idx.tolist()
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                c = mod.num_features

                def nonzero(c=c):  # |v| in [0.1, 1.0], random sign: never zero
                    sign = torch.randint(0, 2, (c,), generator=g).float() * 2 - 1
                    return sign * (0.1 + 0.9 * torch.rand(c, generator=g))

                if mod.running_mean is not None:
                    mod.running_mean.copy_(nonzero())
                    mod.running_var.copy_(0.5 + torch.rand(c, generator=g))
                if mod.bias is not None:
                    mod.bias.copy_(nonzero())
    return dead


def dead_rows(conv: nn.Conv2d) -> list[int]:
    w = conv.weight.detach().flatten(1)
    return torch.nonzero((w == 0).all(dim=1)).flatten().tolist()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def rel_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    if expected.shape != actual.shape:
        return float("inf")
    e, a = expected.double(), actual.double()
    scale = e.abs().max().item()
    err = (e - a).abs().max().item()
    return err / scale if scale > 0 else err


# --------------------------------------------------------------------------- the tools

def run_srfx(model: nn.Module, x: torch.Tensor, x_fresh: torch.Tensor, y_fresh: torch.Tensor) -> tuple[dict, nn.Module | None]:
    import srfx

    out: dict = {}
    try:
        t, small = C.timed(lambda: srfx.compress(model, x))
    except Exception as exc:
        out["error"] = C.short_error(exc, 600)
        return out, None
    rep = small.meta.get(srfx.REPORT_KEY)
    with torch.inference_mode():
        y = small(x_fresh)
    out.update({
        "time_s": t,
        "params_after": n_params(small),
        "max_rel_error": rel_error(y_fresh, y),
        "reported_max_rel_error": getattr(rep, "max_rel_error", None),
        "macs_before": getattr(rep, "macs_before", None),
        "macs_after": getattr(rep, "macs_after", None),
        "stored_before": getattr(rep, "stored_before", None),
        "stored_after": getattr(rep, "stored_after", None),
        "groups": len(getattr(rep, "groups", ())),
        "groups_shrunk": sum(1 for gp in getattr(rep, "groups", ()) if gp.kept < gp.channels),
        "warnings": list(getattr(rep, "warnings", ())),
    })
    return out, small


def tp_prune_dead(model: nn.Module, x: torch.Tensor) -> dict:
    """Prune, in place, the all-zero output rows of every Conv2d of ``model`` (a copy)."""
    import torch_pruning as tp

    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    stats = {"convs_with_dead_rows": 0, "groups_pruned": 0, "groups_rejected": 0, "conv_rows_requested": 0, "prune_errors": []}
    for conv in convs:
        idxs = dead_rows(conv)  # now, after earlier groups may have removed some of them
        if not idxs:
            continue
        stats["convs_with_dead_rows"] += 1
        try:
            group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=idxs)
            if dg.check_pruning_group(group):
                group.prune()
                stats["groups_pruned"] += 1
                stats["conv_rows_requested"] += len(idxs)
            else:
                stats["groups_rejected"] += 1
        except Exception as exc:  # keep going: one bad group should not hide the rest
            stats["prune_errors"].append(C.short_error(exc))
    return stats


def run_tp(original: nn.Module, x: torch.Tensor, x_fresh: torch.Tensor, y_fresh: torch.Tensor) -> dict:
    work = copy.deepcopy(original)  # TP prunes in place: never hand it the original
    out: dict = {}
    try:
        t, stats = C.timed(lambda: tp_prune_dead(work, x))
    except Exception as exc:
        out["error"] = C.short_error(exc, 600)
        return out
    out.update(stats)
    out["time_s"] = t
    out["params_after"] = n_params(work)
    try:
        with torch.inference_mode():
            y = work(x_fresh)
        out["max_rel_error"] = rel_error(y_fresh, y)
    except Exception as exc:
        out["forward_error"] = C.short_error(exc)
    return out


# --------------------------------------------------------------------------- latency

def latency(models: dict, batch: int, repeats: int, seed: int) -> dict:
    """Median seconds per forward of each model, runs interleaved so that load drift on a
    shared machine hits every model alike."""
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    times = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up
            m(x)
        for _ in range(repeats):
            for k, m in models.items():
                t, _ = C.timed(lambda: m(x))
                times[k].append(t)
    return {k: {"median_s": statistics.median(v), "best_s": min(v), "runs_s": v} for k, v in times.items()}


# --------------------------------------------------------------------------- driver

def bench_model(name: str, kill_rate: float, repeats: int, batches: list[int], seed: int) -> dict:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False).eval()
    dead = make_dead(model, kill_rate, seed)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    x_fresh = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(seed + 1))
    with torch.inference_mode():
        y_fresh = model(x_fresh)
    row: dict = {
        "model": name,
        "params_before": n_params(model),
        "layers_with_dead_rows": len(dead),
        "dead_rows": sum(len(v) for v in dead.values()),
    }
    fp = C.state_fingerprint(model)

    row["srfx"], small = run_srfx(model, x, x_fresh, y_fresh)
    row["original_untouched_after_srfx"] = C.state_fingerprint(model) == fp
    row["tp"] = run_tp(model, x, x_fresh, y_fresh)
    row["original_untouched_after_tp"] = C.state_fingerprint(model) == fp

    if small is not None and repeats > 0:
        row["latency"] = {}
        for b in batches:
            lat = latency({"original": model, "srfx": small}, b, repeats, seed + 2)
            lat["speedup_original_over_srfx"] = C.ratio(lat["original"]["median_s"], lat["srfx"]["median_s"])
            lat["speedup_original_over_srfx_best"] = C.ratio(lat["original"]["best_s"], lat["srfx"]["best_s"])
            row["latency"][f"batch{b}"] = lat
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(ap, models=DEFAULT_MODELS, threads=2, out="compress_vs_tp.json")
    ap.add_argument("--kill-rate", type=float, default=0.25, help="share of output rows zeroed per Conv2d/Linear (default 0.25)")
    ap.add_argument("--repeats", type=int, default=5, help="timed latency runs per model and batch size, after 1 warm-up; 0 skips latency (default 5)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args(argv)
    if not 0.0 <= args.kill_rate < 1.0:
        ap.error("--kill-rate must be in [0, 1)")
    if args.repeats < 0:
        ap.error("--repeats must be >= 0")

    run = C.run_models("compress_vs_tp", args.models,
                       lambda name: bench_model(name, args.kill_rate, args.repeats, args.batches, args.seed), threads=args.threads)
    rows = run.rows
    path = C.write_json(args.out, run.payload(
        "compress_vs_tp", kill_rate=args.kill_rate, seed=args.seed, latency_repeats=args.repeats, batches=args.batches,
    ))

    notes = []
    size_rows, lat_rows = [], []
    for r in rows:
        if "error" in r:
            notes.append(f"{r['model']}: {r['error']}")
            continue
        s, t = r["srfx"], r["tp"]
        pb = r["params_before"]
        size_rows.append([
            r["model"], f"{pb / 1e6:.2f}",
            C.fmt(s.get("time_s"), ".2f"),
            "-" if "params_after" not in s else f"{s['params_after'] / 1e6:.2f} ({pb / s['params_after']:.2f}x)",
            C.fmt(s.get("max_rel_error"), ".1e"),
            C.fmt(t.get("time_s"), ".2f"),
            "-" if "params_after" not in t else f"{t['params_after'] / 1e6:.2f} ({pb / t['params_after']:.2f}x)",
            C.fmt(t.get("max_rel_error"), ".1e"),
            f"{t.get('groups_pruned', '-')}/{t.get('groups_rejected', '-')}/{len(t.get('prune_errors', ())) if 'error' not in t else '-'}",
            C.fmt(C.ratio(t.get("time_s"), s.get("time_s")), ".2f"),
        ])
        if "error" in s:
            notes.append(f"{r['model']}: srfx.compress failed: {s['error']}")
        if "error" in t:
            notes.append(f"{r['model']}: Torch-Pruning failed: {t['error']}")
        if "forward_error" in t:
            notes.append(f"{r['model']}: Torch-Pruning's pruned model does not run: {t['forward_error']}")
        errs = t.get("prune_errors", [])
        for e in sorted(set(errs)):
            notes.append(f"{r['model']}: Torch-Pruning group error (x{errs.count(e)}): {e}")
        if not (r["original_untouched_after_srfx"] and r["original_untouched_after_tp"]):
            notes.append(f"{r['model']}: THE ORIGINAL MODEL CHANGED (srfx ok: {r['original_untouched_after_srfx']}, TP ok: {r['original_untouched_after_tp']})")
        for b, lat in r.get("latency", {}).items():
            lat_rows.append([
                r["model"], b.replace("batch", ""),
                f"{lat['original']['median_s'] * 1e3:.1f}", f"{lat['srfx']['median_s'] * 1e3:.1f}",
                C.fmt(lat["speedup_original_over_srfx"], ".2f"),
                f"{lat['original']['best_s'] * 1e3:.1f}", f"{lat['srfx']['best_s'] * 1e3:.1f}",
                C.fmt(lat["speedup_original_over_srfx_best"], ".2f"),
            ])

    print()
    print(f"Dead-channel removal, kill rate {args.kill_rate}, seed {args.seed}, {torch.get_num_threads()} threads "
          f"(params in millions; error = max relative logit error vs the original on a fresh input)")
    print(tabulate(size_rows, headers=["model", "params", "srfx s", "srfx params", "srfx err", "TP s", "TP params", "TP err", "TP groups pruned/rejected/failed", "TP s / srfx s"], disable_numparse=True))
    if lat_rows:
        print()
        print(f"Inference latency, {args.repeats} interleaved run(s) after 1 warm-up (ms), original vs srfx output; speedup = original / srfx")
        print(tabulate(lat_rows, headers=["model", "batch", "orig med ms", "srfx med ms", "speedup (med)", "orig best ms", "srfx best ms", "speedup (best)"], disable_numparse=True))
    print(f"load average at start/end: {run.loadavg_start} / {run.loadavg_end} (on a shared machine medians swing by several x; 'best' is the steadier figure)")
    for n in notes:
        print("note:", n)
    print(f"wrote {path.relative_to(path.parent.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
