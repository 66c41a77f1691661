"""Plot deployable ratio vs test accuracy for the MNIST Squeeze-Release bench.

    python bench/plot_squeeze_release.py [--prefix squeeze_release_mnist] [--out squeeze_release_mnist.png]

Reads ``bench/results/<prefix>_*.json`` written by ``bench/squeeze_release_mnist.py --out
<prefix>`` (other runs whose prefix starts the same are left out): one
marker per method at its headline model, plus each cycle method's fine-tuned curve (its
``curve`` entries, test accuracy), and a line at the dense accuracy minus 0.5 points.
Needs matplotlib (the ``dev`` extra).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prefix", default="squeeze_release_mnist")
    p.add_argument("--out", default=None, help="PNG under bench/results/ (default: <prefix>.png)")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(f.read_text()) for f in sorted(RESULTS.glob(f"{args.prefix}_*.json"))]
    # the glob also matches longer prefixes (squeeze_release_mnist_shift1_*): keep this run's own
    runs = [r for r in runs if r.get("config", {}).get("out", args.prefix) == args.prefix]
    if not runs:
        raise SystemExit(f"no {args.prefix}_*.json in {RESULTS}")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = runs[0]["dense_accuracy"]
    for i, r in enumerate(runs):
        color = f"C{i}"
        if r.get("curve"):
            pts = sorted((c["ratio"], c["test_accuracy"]) for c in r["curve"])
            ax.plot([a for a, _ in pts], [100 * b for _, b in pts], "-", color=color, alpha=0.5)
        ax.plot(r["ratio"], 100 * r["accuracy"], "o", color=color, label=f"{r['method']} ({r['ratio']:.1f}x, {100 * r['accuracy']:.2f}%)")
    ax.axhline(100 * dense - 0.5, color="gray", ls="--", lw=1, label=f"dense {100 * dense:.2f}% - 0.5")
    ax.axvline(39, color="gray", ls=":", lw=1, label="39x")
    ax.set_xscale("log")
    ax.set_xlabel("deployable ratio (dense params / stored params of the compressed model)")
    ax.set_ylabel("MNIST test accuracy (%)")
    ax.set_title("LeNet-300-100 on MNIST")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = RESULTS / (args.out or f"{args.prefix}.png")
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
