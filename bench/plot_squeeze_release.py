"""Plot deployable ratio vs test accuracy for the Squeeze-Release benches (MNIST, CIFAR-10).

    python bench/plot_squeeze_release.py [--prefix squeeze_release_mnist] [--out squeeze_release_mnist.png]
    python bench/plot_squeeze_release.py --runs NAME [NAME ...] --out squeeze_release_cifar.png

Reads ``bench/results/<prefix>_*.json`` written by ``bench/squeeze_release_mnist.py --out
<prefix>`` (other runs whose prefix starts the same are left out), or the named results
(``--runs``, any bench's JSON): one marker per run at its reported model, plus each cycle run's
fine-tuned curve (its ``curve`` entries, test accuracy). A dashed line marks the issue's
accuracy goal below each dense model's test accuracy (0.5 points on MNIST, 1 on CIFAR-10;
dense rows, ratio 1, get their own line), a dotted one its size goal (39x, 14.8x).
Needs matplotlib (the ``dev`` extra).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# dataset -> (accuracy points a compressed model may lose, deployable ratio to reach): issue 5's goals
GOALS = {"mnist": (0.5, 39.0), "cifar10": (1.0, 14.8)}
TITLES = {"mnist": "MNIST", "cifar10": "CIFAR-10"}


def load_runs(prefix: str | None, names: list[str] | None) -> list[dict]:
    """The results to plot, in the order given (``--runs``) or sorted by name (``--prefix``)."""
    if names:
        missing = [n for n in names if not (RESULTS / f"{n}.json").exists()]
        if missing:
            raise SystemExit(f"not in {RESULTS}: {', '.join(f'{n}.json' for n in missing)}")
        return [json.loads((RESULTS / f"{n}.json").read_text()) for n in names]
    runs = [json.loads(f.read_text()) for f in sorted(RESULTS.glob(f"{prefix}_*.json"))]
    # the glob also matches longer prefixes (squeeze_release_mnist_shift1_*): keep this run's own
    runs = [r for r in runs if r.get("config", {}).get("out", prefix) == prefix]
    if not runs:
        raise SystemExit(f"no {prefix}_*.json in {RESULTS}")
    return runs


def dense_references(runs: list[dict]) -> list[float]:
    """Test accuracies the goal is read against: each run's dense baseline and any dense row."""
    refs = {r["dense_accuracy"] for r in runs} | {r["accuracy"] for r in runs if abs(r["ratio"] - 1) < 1e-9}
    return sorted(refs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prefix", default="squeeze_release_mnist")
    p.add_argument("--runs", nargs="+", default=None, metavar="NAME", help="result names in bench/results (without .json) instead of --prefix")
    p.add_argument("--labels", nargs="+", default=None, help="legend labels for --runs (default: each run's method)")
    p.add_argument("--out", default=None, help="PNG under bench/results/ (default: <prefix>.png)")
    args = p.parse_args(argv)
    if args.runs and not args.out:
        raise SystemExit("--runs needs --out")
    if args.labels and len(args.labels) != len(args.runs or []):
        raise SystemExit("--labels needs one label per --runs name")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(args.prefix, args.runs)
    dataset = runs[0]["dataset"]
    tolerance, goal = GOALS.get(dataset, (1.0, None))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    palette = [f"C{i}" for i in range(10)] if len(runs) <= 10 else [plt.cm.tab20(i % 20) for i in range(len(runs))]
    for i, r in enumerate(runs):
        color = palette[i]  # tab20 past ten runs: the default cycle repeats its colours
        if r.get("curve"):
            pts = sorted((c["ratio"], c["test_accuracy"]) for c in r["curve"])
            ax.plot([a for a, _ in pts], [100 * b for _, b in pts], "-", color=color, alpha=0.5)
        label = args.labels[i] if args.labels else r["method"]
        ax.plot(r["ratio"], 100 * r["accuracy"], "o", color=color, label=f"{label} ({r['ratio']:.3g}x, {100 * r['accuracy']:.2f}%)")
    for j, ref in enumerate(dense_references(runs)):
        ax.axhline(100 * ref - tolerance, color="gray", ls="--", lw=1, alpha=1.0 if j == 0 else 0.5,
                   label=f"dense {100 * ref:.2f}% - {tolerance:g}")
    if goal:
        ax.axvline(goal, color="gray", ls=":", lw=1, label=f"{goal:g}x")
    ax.set_xscale("log")
    ax.set_xlabel("deployable ratio (dense params / stored params of the compressed model)")
    ax.set_ylabel(f"{TITLES.get(dataset, dataset)} test accuracy (%)")
    model = "LeNet-300-100" if dataset == "mnist" else runs[0]["model"]
    ax.set_title(f"{model} on {TITLES.get(dataset, dataset)}")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = RESULTS / (args.out or f"{args.prefix}.png")
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
