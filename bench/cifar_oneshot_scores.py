"""How the group pruner's channel ranking alone matters: one-shot masks on a trained dense model,
no fine-tuning, ranked by relative weight RMS vs by loss cost per weight freed (taylor_costs).

    python bench/cifar_oneshot_scores.py --dense-cache PATH [--data ../shared/datasets/cifar10]
        [--sparsity 0.3 0.5 0.7] [--calibration 2048] [--threads 2]

``PATH`` is a dense model saved by ``bench/squeeze_release_cifar.py --dense-cache PATH`` (or by
``squeeze_release_cifar_scratch.py --full-width --save-dense-cache PATH``). The costs are measured
like the bench's ``--scores taylor``: cross-entropy on the first ``--calibration`` training images,
unaugmented, batches of 256. Prints validation accuracy per sparsity and ranking, and writes
``bench/results/cifar_oneshot_scores.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import git_state  # noqa: E402
from squeeze_release_cifar import _loader, accuracy, cifar_data  # noqa: E402
from srfx.group_pruning import atom_table, group_masks, taylor_costs  # noqa: E402
from srfx.passes import apply_masks  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense-cache", type=Path, required=True, metavar="PATH")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "cifar10")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--calibration", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if not args.dense_cache.exists():
        raise SystemExit(f"{args.dense_cache} not found: write it with bench/squeeze_release_cifar.py --dense-cache {args.dense_cache}")
    torch.set_num_threads(args.threads)
    import timm

    cached = torch.load(args.dense_cache, map_location="cpu", weights_only=False)
    key = cached["key"]
    model = timm.create_model(key["model"], pretrained=False, num_classes=10)
    model.load_state_dict(cached["state_dict"])
    model.eval()
    data = cifar_data(args.data, key["batch"], key["train_subset"], key["seed"])
    n = args.calibration
    calibration = list(_loader(data.train_x[:n], data.train_y[:n], 256, False, False))
    example = torch.randn(1, 3, 32, 32)
    atoms = atom_table(model, example)
    costs = {"relative": None, "taylor": taylor_costs(model, atoms, F.cross_entropy, calibration)}
    rows = []
    dense = accuracy(model, data.val)
    print(f"dense {key['model']} ({key['dense_epochs']:g} epochs): validation {dense:.4f}", flush=True)
    for sparsity in args.sparsity:
        for ranking, cost in costs.items():
            masked = copy.deepcopy(model)
            apply_masks(masked, group_masks(masked, example, sparsity, atoms=atoms, costs=cost))
            rows.append({"sparsity": sparsity, "ranking": ranking, "val_accuracy": accuracy(masked, data.val)})
            print(f"{sparsity:.0%} {ranking:>8}: validation {rows[-1]['val_accuracy']:.4f}", flush=True)
    out = ROOT / "bench" / "results" / "cifar_oneshot_scores.json"
    out.write_text(json.dumps({"dense": key, "dense_val_accuracy": dense, "rows": rows, "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "git": git_state()}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
