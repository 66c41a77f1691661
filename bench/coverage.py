"""Coverage: does srfx.compress stay exact, and does it shrink anything, across timm's zoo?

For each timm model (``pretrained=False``, eval mode, input ``(1, *pretrained_cfg.input_size)``;
tier TV: torchvision's, ``weights=None``, 224 x 224, 299 for inception_v3)
kill random channels with ``_common.kill_channels`` (the logic of ``tests/helpers.py``: zero
rows/columns of every Linear/Conv weight, nonzero random BatchNorm statistics and scales,
un-zeroed zero-init heads and layer-scale gammas; by default also other near-zero layer
scales the helper's name test misses, ``--canonical`` turns that off). timm's initialization
is seeded with ``torch.manual_seed(--seed)``, so a run is reproducible. Then record:

* the front end that traced it (``srfx.trace(model, x).front_end``) and the modules it kept
  whole because fx could not trace them (tier C is made of such models);
* coupling groups, shrinkable groups (no ``fixed`` reason), groups that shrank, and the
  channels removed (sum over ``report.groups`` of ``channels - kept``);
* exactness: ``max|a - b| / max|a|`` of ``compress``'s output against the original on a
  fresh input (not one srfx verified on) and srfx's own verification error, both at most
  ``--threshold`` (srfx's rtol for the dtype: 1e-5 in float32). A float32 model that is not
  exact is compressed again in float64 (same weights): an error near 1e-15 there means
  float32 rounding (the plan is right), anything else a wrong result. Also the
  *sensitivity* ``max|f(x) - f(fresh)| / max|f(x)|`` of the original: where the output barely
  depends on the input (below 100x the threshold) a wrong channel could hide, and the table
  says ``yes (weak)``;
* parameters and stored tensors (params + float buffers) before/after, compress time.

``srfx.VerificationError`` is a mismatch caught by srfx itself: the script then reruns
``compress(verify=False)`` to measure the error and sizes of the rejected module. Other
``srfx.SrfxError`` subclasses are typed refusals; any other exception is a bug in srfx and
its type, message and innermost frames are recorded. For models that do not shrink, or fail,
the most frequent group ``fixed`` reasons and barriers (from ``srfx.analyze``) are recorded.

Prints a table and a summary line, writes bench/results/coverage.json (``--out``).

    python bench/coverage.py [--tier A|B|C|TV|all] [--models resnet18 ...] [--kill-rate 0.3] [--seed 0]
        [--dtype float32|float64] [--threshold T] [--canonical] [--no-recheck64] [--threads 1] [--out coverage.json]
"""
from __future__ import annotations

import argparse
import collections
import re
import sys
import time
import traceback
import warnings

import torch
from tabulate import tabulate

import _common as C

TIER_A = [
    "resnet18", "resnet50", "resnext50_32x4d", "regnety_002", "mobilenetv2_050", "mobilenetv3_large_100",
    "efficientnet_b0", "densenet121", "inception_v3", "convnext_atto", "vit_tiny_patch16_224", "mixer_s16_224",
]
TIER_B = [
    "ecaresnet26t", "resnetv2_50x1_bit", "nf_regnet_b0", "res2net50_26w_4s", "resnest14d", "skresnet18", "dpn48b",
    "hrnet_w18_small", "cspresnet50", "cs3darknet_focus_s", "rexnet_100", "ghostnet_050", "mixnet_s", "fasternet_t0",
    "repvgg_a0", "mobilenetv4_hybrid_medium", "convnextv2_atto", "poolformer_s12", "caformer_s18",
    "inception_next_atto", "mambaout_femto", "focalnet_tiny_srf", "levit_128s", "deit3_small_patch16_224",
    "cait_xxs24_224", "eva02_tiny_patch14_224", "swin_tiny_patch4_window7_224", "pvt_v2_b0", "xcit_nano_12_p16_224",
    "gmlp_ti16_224",
]
# plain fx cannot trace some of their blocks (control flow on shapes, proxy iteration): srfx
# keeps those module instances whole and compresses the rest
TIER_C = ["mobilevit_xxs", "tiny_vit_5m_224", "nest_tiny", "mvitv2_tiny", "convit_tiny", "efficientvit_m0"]
# torchvision's own implementations (``tv:`` + name for torchvision.models.get_model): other code
# for familiar architectures (nn.MultiheadAttention encoders, its Swin and MaxViT, channel shuffle)
TIER_TV = [f"tv:{n}" for n in (
    "resnet18", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1",
    "mnasnet0_5", "efficientnet_b0", "regnet_y_400mf", "densenet121", "googlenet", "inception_v3", "convnext_tiny",
    "vit_b_16", "swin_t", "maxvit_t",
)]
TIERS = {"A": TIER_A, "B": TIER_B, "C": TIER_C, "TV": TIER_TV, "all": TIER_A + TIER_B}


def _reason_kind(reason: str) -> str:
    """A reason without its node name, so equal causes count together
    ("layer1_0_add: operands ..." -> "operands ...")."""
    head, sep, tail = reason.partition(": ")
    kind = tail if sep and re.fullmatch(r"[\w.]+", head) else reason
    return re.sub(r"\b\d+\b", "N", kind)[:160]


def _top(reasons, k: int = 5) -> list:
    counts = collections.Counter(_reason_kind(r) for r in reasons if r)
    return [[kind, n] for kind, n in counts.most_common(k)]


def _bug_frames(exc: BaseException, k: int = 3) -> list[str]:
    frames = traceback.extract_tb(exc.__traceback__)
    return [f"{f.filename.split('/work/main/')[-1]}:{f.lineno} {f.name}: {(f.line or '').strip()}" for f in frames[-k:]]


def _rel_err(expected: torch.Tensor, actual: torch.Tensor) -> float:
    e, a = expected.double(), actual.double()
    if e.shape != a.shape:
        return float("inf")
    scale = e.abs().max().item()
    err = (e - a).abs().max().item()
    return err / scale if scale > 0 else err


def _analysis_reasons(model, x, rec) -> None:
    """Why nothing (or too little) shrinks: group fixed reasons and barriers."""
    import srfx

    try:
        cp = srfx.analyze(model, x)
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        rec["analysis_error"] = C.short_error(exc)
        return
    rec.setdefault("groups", len(cp.groups))
    rec.setdefault("shrinkable_groups", sum(1 for g in cp.groups if g.fixed is None))
    rec["fixed_reasons"] = _top([g.fixed for g in cp.groups if g.fixed])
    rec["barriers"] = _top(list(cp.barriers.values()))
    rec["n_barriers"] = len(cp.barriers)


def build(name: str, kill_rate: float, seed: int, fresh_seed: int, wake_scales: bool, dtype: torch.dtype):
    """The model with dead channels, the example input and a fresh input (all seeded)."""
    torch.manual_seed(seed)  # timm and torchvision initialize from the global generator: same weights every run
    if name.startswith("tv:"):
        model, size = _torchvision_model(name[3:])
    else:
        import timm

        model = timm.create_model(name, pretrained=False).eval()
        size = tuple((model.pretrained_cfg or {}).get("input_size", (3, 224, 224)))
    C.kill_channels(model, rate=kill_rate, seed=seed, wake_scales=wake_scales)
    model = model.to(dtype)
    x = torch.randn((1, *size), generator=torch.Generator().manual_seed(seed)).to(dtype)
    fresh = torch.randn((1, *size), generator=torch.Generator().manual_seed(fresh_seed)).to(dtype)
    return model, x, fresh


def _torchvision_model(name: str):
    """A torchvision model without weights, in eval mode, and its input size."""
    import torchvision

    extra = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **extra).eval()
    return model, (3, 299, 299) if name == "inception_v3" else (3, 224, 224)


def recheck_float64(name: str, kill_rate: float, seed: int, fresh_seed: int, wake_scales: bool) -> float | str:
    """A float32 model that is not exact, again in float64 (same weights): an error near 1e-15
    means float32 rounding, not a wrong plan."""
    import srfx

    try:
        model, x, fresh = build(name, kill_rate, seed, fresh_seed, wake_scales, torch.float64)
        small = srfx.compress(model, x, verify=False)
        with torch.no_grad():
            return _rel_err(model(fresh), small(fresh))
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        return C.short_error(exc)


def run_model(name: str, kill_rate: float, seed: int, threshold: float, fresh_seed: int, wake_scales: bool = True,
              dtype: torch.dtype = torch.float32, recheck64: bool = True) -> dict:
    import srfx

    rec: dict = {"model": name, "status": "ok"}
    t0 = time.perf_counter()
    model, x, fresh = build(name, kill_rate, seed, fresh_seed, wake_scales, dtype)
    rec["input_size"] = list(x.shape[1:])
    rec["build_s"] = time.perf_counter() - t0
    try:  # how much the output depends on the input: a check below ~100x the threshold is weak
        with torch.no_grad():
            rec["sensitivity"] = _rel_err(model(x), model(fresh))
    except Exception as exc:  # noqa: BLE001
        rec.update(status="setup_error", error=C.short_error(exc, 600))
        return rec
    try:
        traced = srfx.trace(model, x)
        rec["front_end"], rec["kept_whole"] = traced.front_end, sorted(traced.untraceable)
    except srfx.SrfxError as exc:
        rec["front_end"] = None
        rec.update(status=type(exc).__name__, error=C.short_error(exc, 600))
        return rec
    except Exception as exc:  # noqa: BLE001 - a bug in srfx: record it
        rec["front_end"] = None
        rec.update(status="bug", error=C.short_error(exc, 600), frames=_bug_frames(exc))
        return rec

    small = None
    try:
        dt, small = C.timed(lambda: srfx.compress(model, x))
        rec["compress_s"] = dt
    except srfx.VerificationError as exc:
        rec.update(status="VerificationError", error=C.short_error(exc, 600), srfx_rel_err=exc.max_rel_error)
        try:  # the wrong module itself: its sizes and error on the fresh input
            dt, small = C.timed(lambda: srfx.compress(model, x, verify=False))
            rec["compress_s"] = dt
        except Exception as exc2:  # noqa: BLE001
            rec["rerun_error"] = C.short_error(exc2)
    except srfx.SrfxError as exc:
        rec.update(status=type(exc).__name__, error=C.short_error(exc, 600))
    except Exception as exc:  # noqa: BLE001 - a bug in srfx: record it
        rec.update(status="bug", error=C.short_error(exc, 600), frames=_bug_frames(exc))

    if small is not None:
        r = small.meta[srfx.REPORT_KEY]
        rec.update(
            groups=len(r.groups),
            shrinkable_groups=sum(1 for gp in r.groups if gp.fixed is None),
            shrunk_groups=sum(1 for gp in r.groups if gp.kept < gp.channels),
            channels=sum(gp.channels for gp in r.groups),
            channels_removed=sum(gp.channels - gp.kept for gp in r.groups),
            params_before=r.params_before, params_after=r.params_after,
            stored_before=r.stored_before, stored_after=r.stored_after,
            params_ratio=r.params_before / max(1, r.params_after),
            stored_ratio=r.ratio,
        )
        if r.max_rel_error is not None:
            rec["srfx_rel_err"] = r.max_rel_error
        try:
            with torch.no_grad():
                rec["rel_err"] = _rel_err(model(fresh), small(fresh))
            # exact: on the fresh input, and on srfx's own verification inputs
            rec["exact"] = rec["rel_err"] <= threshold and rec.get("srfx_rel_err", 0.0) <= threshold
            if rec["status"] == "ok" and not rec["exact"]:
                rec["status"] = "mismatch"  # srfx's own verification passed, the fresh input did not
        except Exception as exc:  # noqa: BLE001 - running the result failed: a bug
            rec.update(status="bug", error=C.short_error(exc, 600), frames=_bug_frames(exc))
    if rec.get("exact") is False and recheck64 and dtype == torch.float32:
        rec["float64_rel_err"] = recheck_float64(name, kill_rate, seed, fresh_seed, wake_scales)
    if rec["status"] != "ok" or rec.get("params_ratio", 1.0) < 1.005 or rec.get("shrunk_groups", 0) == 0:
        _analysis_reasons(model, x, rec)
    return rec


def _error_cell(r: dict) -> str:
    if r["status"] == "ok":
        return ""
    text = r["status"]
    if r["status"] == "VerificationError" and r.get("srfx_rel_err") is not None:
        text += f" (srfx rel err {r['srfx_rel_err']:.1e})"
    elif r.get("error"):
        text += ": " + r["error"].partition(": ")[2][:70]
    f64 = r.get("float64_rel_err")
    if isinstance(f64, float):
        text += f"; float64 rel err {f64:.0e}" + (" (float32 rounding)" if f64 <= 1e-10 else " (WRONG)")
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(ap, models=None, threads=1, out="coverage.json", models_help="timm model names (default: the --tier lists)")
    ap.add_argument("--tier", choices=sorted(TIERS), default="all",
                    help="A, B, C (partly untraceable), TV (torchvision's models) or all = A and B (default all)")
    ap.add_argument("--kill-rate", type=float, default=0.3, help="share of rows zeroed per Linear/Conv (default 0.3)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="model and input dtype (default float32); float64 makes the check strong where the output barely depends on the input")
    ap.add_argument("--threshold", type=float, default=None,
                    help="relative error counted as exact (default: srfx's rtol for the dtype, 1e-5 for float32, 1e-10 for float64)")
    ap.add_argument("--canonical", action="store_true",
                    help="kill channels exactly as tests/helpers.py does (no extra waking of near-zero layer scales)")
    ap.add_argument("--no-recheck64", action="store_true",
                    help="do not recompress a float32 model that is not exact in float64 (which tells rounding from a wrong plan)")
    args = ap.parse_args(argv)
    from srfx.verify import TOLERANCES

    dtype = getattr(torch, args.dtype)
    if args.threshold is None:
        args.threshold = TOLERANCES[dtype][0]
    warnings.filterwarnings("ignore")
    models = args.models or TIERS[args.tier]
    tier_of = {m: "A" for m in TIER_A} | {m: "B" for m in TIER_B} | {m: "C" for m in TIER_C} | {m: "TV" for m in TIER_TV}

    def one(name: str) -> dict:
        t0 = time.perf_counter()
        try:
            rec = run_model(name, args.kill_rate, args.seed, args.threshold, fresh_seed=args.seed + 1000,
                            wake_scales=not args.canonical, dtype=dtype, recheck64=not args.no_recheck64)
        except Exception as exc:  # noqa: BLE001 - model construction etc.: not srfx's fault
            rec = {"model": name, "status": "setup_error", "error": C.short_error(exc, 600)}
        rec["tier"] = tier_of.get(name, "-")
        rec["wall_s"] = time.perf_counter() - t0
        return rec

    def progress(i: int, n: int, rec: dict) -> str:
        return (
            f"[{i}/{n}] {rec['model']}: {rec['status']} rel_err={C.fmt(rec.get('rel_err'), '.1e')} "
            f"params x{C.fmt(rec.get('params_ratio'), '.2f')} compress {C.fmt(rec.get('compress_s'), '.1f')}s "
            f"(wall {rec['wall_s']:.1f}s)" + (f"  {rec['error'][:200]}" if rec.get("error") else "")
        )

    run = C.run_models("coverage", models, one, threads=args.threads, progress=progress)
    records = run.rows
    rows = []
    for r in records:
        exact = "-" if r.get("exact") is None else ("yes" if r["exact"] else "NO")
        if r.get("exact") and r.get("sensitivity", 1.0) < 100 * args.threshold:
            exact = "yes (weak)"
        rows.append((
            r["model"], r.get("front_end") or "-", exact, C.fmt(r.get("rel_err"), ".1e"), C.fmt(r.get("sensitivity"), ".0e"),
            f"{r.get('shrunk_groups', '-')}/{r.get('shrinkable_groups', '-')}/{r.get('groups', '-')}",
            r.get("channels_removed", "-"), C.fmt(r.get("params_ratio"), ".2f"), C.fmt(r.get("stored_ratio"), ".2f"),
            C.fmt(r.get("compress_s"), ".1f"), _error_cell(r),
        ))
    print(tabulate(rows, headers=["model", "front end", "exact", "rel err", "sens", "groups shrunk/shrinkable/all",
                                  "ch removed", "params x", "stored x", "compress s", "error"], disable_numparse=True))
    n_exact = sum(1 for r in records if r.get("exact"))
    counts = collections.Counter(r["status"] for r in records)
    no_shrink = [r["model"] for r in records if r.get("exact") and r.get("params_ratio", 0) < 1.005]
    weak = [r["model"] for r in records if r.get("exact") and r.get("sensitivity", 1.0) < 100 * args.threshold]
    summary = (f"exact {n_exact}/{len(records)}; " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
               + f"; exact but no shrink (params x < 1.005) {len(no_shrink)}" + (f" ({', '.join(no_shrink)})" if no_shrink else "")
               + (f"; weak checks (sensitivity < {100 * args.threshold:g}): {', '.join(weak)}" if weak else ""))
    print(summary)
    path = C.write_json(args.out, run.payload(
        "coverage", kill_rate=args.kill_rate, wake_scales=not args.canonical, dtype=args.dtype, seed=args.seed,
        threshold=args.threshold, summary=summary,
    ))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
