"""Helpers shared by the benchmark scripts (not a benchmark itself).

The scripts run as ``python bench/<script>.py`` from the repository root, so this file is
importable as ``_common`` (Python puts the script's folder first on ``sys.path``).
"""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def quiet_warnings() -> None:
    """Torch-Pruning warns about unwrapped parameters (cls_token, layer-scale gamma) on every
    build; the message is the same each run and drowns the tables."""
    warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch_pruning")


@contextmanager
def no_gc():
    """Collect first, then keep the collector out of the timed region."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    with no_gc():
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
    return dt, out


def summary(times: list[float]) -> dict:
    return {
        "best_s": min(times),
        "median_s": statistics.median(times),
        "runs_s": list(times),
    }


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def fmt(v, spec: str = ".3f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def git_state() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "srfx", "passes"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip())
    except Exception:  # git missing: the numbers are still worth writing
        rev, dirty = "", None
    return {"commit": rev, "srfx_sources_dirty": dirty}


def environment() -> dict:
    import timm
    import torch_pruning as tp

    import srfx

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torch_pruning": getattr(tp, "__version__", "?"),
        "srfx": srfx.__version__,
        "torch_threads": torch.get_num_threads(),
        **git_state(),
    }


def loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def state_fingerprint(model: torch.nn.Module) -> dict:
    """Cheap identity of every tensor of a model: shape and float64 sum (catches in-place
    pruning or rewriting of the original)."""
    out = {}
    with torch.no_grad():
        for k, v in model.state_dict().items():
            out[k] = (tuple(v.shape), float(v.double().sum()) if v.is_floating_point() else int(v.sum()))
    return out


def add_common_args(ap, *, models: list[str] | None, threads: int, out: str, models_help: str | None = None) -> None:
    """The options every benchmark takes: --models, --threads, --seed, --out."""
    ap.add_argument("--models", nargs="+", default=models, help=models_help)
    ap.add_argument("--threads", type=int, default=threads, help=f"torch.set_num_threads (default {threads})")
    ap.add_argument("--seed", type=int, default=0, help="seed for weights, masks and inputs (default 0)")
    ap.add_argument("--out", default=out, help=f"file name under bench/results/ (default {out})")


@dataclass
class Run:
    """What :func:`run_models` hands back: one row per model, plus the run's conditions."""

    rows: list
    wall_s: float
    loadavg_start: str
    loadavg_end: str

    def payload(self, benchmark: str, **fields) -> dict:
        """The JSON every benchmark writes: its name, its own fields, the environment,
        the wall time and the load average, then the rows."""
        return {
            "benchmark": benchmark,
            **fields,
            "environment": environment(),
            "wall_s": self.wall_s,
            "loadavg_start": self.loadavg_start,
            "loadavg_end": self.loadavg_end,
            "models": self.rows,
        }


def run_models(
    tag: str,
    names: list[str],
    bench_one: Callable[[str], dict],
    *,
    threads: int,
    error_row: Callable[[str, BaseException], dict] | None = None,
    progress: Callable[[int, int, dict], str] | None = None,
) -> Run:
    """Set the thread count, quiet Torch-Pruning's warnings and run ``bench_one(name)`` for
    each model. An exception becomes a row (``error_row``, default ``{"model", "error"}``)
    and the run goes on. Prints ``[tag] name ...`` to stderr before each model, or
    ``progress(i, n, row)`` after it."""
    torch.set_num_threads(threads)
    quiet_warnings()
    t_start, load0 = time.perf_counter(), loadavg()
    rows = []
    for name in names:
        if progress is None:
            print(f"[{tag}] {name} ...", file=sys.stderr, flush=True)
        try:
            row = bench_one(name)
        except Exception as exc:  # e.g. an unknown model name: record it and go on
            row = error_row(name, exc) if error_row else {"model": name, "error": short_error(exc, 600)}
        rows.append(row)
        if progress is not None:
            print(progress(len(rows), len(names), row), file=sys.stderr, flush=True)
        gc.collect()
    return Run(rows, time.perf_counter() - t_start, load0, loadavg())


def short_error(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


from srfx.testing import kill_channels  # noqa: E402,F401  (kept importable as C.kill_channels)


def export_dynamic_batch(wrapped, example, path) -> None:
    """torch.export ``wrapped`` (taking one ``images`` batch like ``example``) with a dynamic
    batch dimension and save it to ``path``: the benches' deployable .pt2 files."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.export.export(wrapped, (example,), dynamic_shapes={"images": {0: batch}})
    torch.export.save(program, str(path))
