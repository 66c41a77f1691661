"""Ablation for the CIFAR-10 cycle: its selected architecture trained from scratch.

    python bench/squeeze_release_cifar_scratch.py --run squeeze_release_cifar_convnext_atto_v5
        [--data ../shared/datasets/cifar10] [--epochs E] [--full-width] [--checkpoint PATH] [--seed 0] [--threads 2]

Is the cycle better than training the small network directly? This reads the run's
``bench/results/<run>.json`` and ``<run>.pt2`` (written by ``bench/squeeze_release_cifar.py``),
builds a fresh timm ConvNeXt with the compressed model's widths (per-stage stream widths and
per-block MLP widths, taken from the parameter shapes in the .pt2; plain LayerNorms over the
kept channels), initialized the way timm initializes it, and trains it with the dense recipe
(``train_dense``: AdamW, one-cycle, label smoothing, crops and flips) for the epochs the
selected cycle's model had seen in all: the dense epochs plus every recovery epoch (rolled-back
steps included) and every fine-tuning epoch up to the selected cycle. ``--epochs`` overrides
that budget. ``--full-width`` trains the unpruned model instead, with the same recipe and
budget: the dense baseline the cycle's model would be compared with had it been given as many
epochs (the cycle's own baseline has only ``--dense-epochs``). ``--save-dense-cache PATH`` then
saves it in the ``--dense-cache`` format of ``squeeze_release_cifar.py``: seed, recipe and data
order are the same, so it is the model that script trains with ``--dense-epochs`` set to the
budget (bit for bit at the same ``--threads``), and a cycle can start from it.
``--checkpoint PATH`` writes the training state after every epoch and, when PATH exists,
continues from it: an interrupted run rerun with the same options ends where it would have.

Writes ``bench/results/<run>_scratch.json`` (the fields of the cycle's JSON: dataset, model,
method, dense_params, params, stored, nnz, ratio, nnz_ratio, dense_accuracy, accuracy (test),
val_accuracy, epochs, seconds, config, git) and ``<run>_scratch.pt2`` (N x 3 x 32 x 32 images
in [0, 1] -> logits); with ``--full-width``, ``<run>_dense_budget.json`` and ``.pt2``.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import git_state  # noqa: E402
from squeeze_release_cifar import accuracy, cifar_data, dense_cache_key, export_pt2, save_dense_cache, train_dense  # noqa: E402
from srfx.report import count_nonzero, count_parameters, count_stored  # noqa: E402


def budget_epochs(result: dict) -> float:
    """Epochs the selected cycle's model had seen: dense training, then per cycle up to the
    selected one every pruning step's recovery (accepted or rolled back) and the fine-tuning."""
    cfg = result["config"]
    finetune = cfg["finetune"]
    epochs = float(cfg["dense_epochs"])
    for i, record in enumerate(result["history"][: result["selected_cycle"] + 1]):
        epochs += (record["prune_steps"] + record["rollbacks"]) * cfg["recovery"]
        epochs += finetune[i] if len(finetune) > 1 else finetune[0]
    return epochs


def narrow_convnext(model_name: str, shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    """A fresh timm ConvNeXt (conv MLP) whose every parameter has the shape ``shapes`` names
    (qualname -> shape, as in the compressed model), timm's initialization throughout."""
    import timm
    from timm.models.convnext import _init_weights

    def width(name):
        if name not in shapes:
            raise SystemExit(f"{name} not in the compressed model's parameters: not a timm ConvNeXt compressed by srfx?")
        return shapes[name][0]

    stages = sorted({int(m.group(1)) for n in shapes if (m := re.match(r"stages\.(\d+)\.", n))})
    dims = tuple(width(f"stages.{s}.blocks.0.conv_dw.weight") for s in stages)
    model = timm.create_model(model_name, pretrained=False, num_classes=shapes["head.fc.weight"][0], dims=dims)
    for name, module in model.named_modules():
        if name.endswith(".mlp") and isinstance(module.fc1, nn.Conv2d):
            hidden, dim = width(f"{name}.fc1.weight"), module.fc1.in_channels
            module.fc1, module.fc2 = nn.Conv2d(dim, hidden, 1), nn.Conv2d(hidden, dim, 1)
            _init_weights(module.fc1), _init_weights(module.fc2)
    got = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if got != shapes:
        diff = sorted(set(got.items()) ^ set(shapes.items()))[:6]
        raise SystemExit(f"could not rebuild the compressed architecture with timm {model_name}: {diff}")
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="name of a squeeze_release_cifar.py result in bench/results (without .json)")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "cifar10")
    ap.add_argument("--epochs", type=float, default=None, help="training epochs (default: the selected cycle's budget)")
    ap.add_argument("--full-width", action="store_true", help="train the unpruned model instead (a dense baseline at the cycle's budget)")
    ap.add_argument("--save-dense-cache", type=Path, default=None, metavar="PATH",
                    help="with --full-width: save the trained model as a --dense-cache file for squeeze_release_cifar.py --dense-epochs E (the same model it would train)")
    ap.add_argument("--checkpoint", type=Path, default=None, metavar="PATH",
                    help="write the training state to PATH after each epoch and continue from it if it exists (same run, width, epochs, seed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    results = ROOT / "bench" / "results"
    run_json, run_pt2 = results / f"{args.run}.json", results / f"{args.run}.pt2"
    for path in (run_json, run_pt2):
        if not path.exists():
            raise SystemExit(f"{path} not found: run bench/squeeze_release_cifar.py with --out {args.run} first (it writes both)")
    cycle = json.loads(run_json.read_text())
    cfg = cycle["config"]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()

    if args.full_width:
        import timm

        model = timm.create_model(cycle["model"], pretrained=False, num_classes=10)
        name, method = f"{args.run}_dense_budget", f"dense at the budget of {args.run}: the unpruned model, dense recipe, same epochs"
    else:
        program = torch.export.load(str(run_pt2))
        shapes = {n.removeprefix("model."): tuple(program.state_dict[n].shape) for n in program.graph_signature.parameters}
        model = narrow_convnext(cycle["model"], shapes)
        name, method = f"{args.run}_scratch", f"scratch: the architecture of {args.run}, dense recipe, same epochs"
    epochs = args.epochs if args.epochs is not None else budget_epochs(cycle)
    print(f"{method}: {count_parameters(model)} parameters (the cycle's model: {cycle['stored']}), {epochs:g} epochs", flush=True)

    data = cifar_data(args.data, cfg["batch"], cfg.get("train_subset", 0), args.seed)
    train, val, test = data.train, data.val, data.test
    checkpoint_key = {"run": args.run, "full_width": args.full_width, "epochs": epochs, "seed": args.seed, "lr": cfg["lr"], "batch": cfg["batch"]}
    model = train_dense(model, train, epochs, cfg["lr"], checkpoint=args.checkpoint, key=checkpoint_key)
    if args.full_width and args.save_dense_cache is not None:
        key = dense_cache_key(cycle["model"], epochs, args.seed, cfg["lr"], cfg["batch"], cfg.get("train_subset", 0))
        save_dense_cache(args.save_dense_cache, key, model, train)
        print(f"dense model saved to {args.save_dense_cache} (use with --dense-epochs {epochs:g})", flush=True)
    val_acc, test_acc = accuracy(model, val), accuracy(model, test)
    stored = count_stored(model)
    result = {
        "dataset": "cifar10", "model": cycle["model"], "method": method,
        "dense_params": cycle["dense_params"], "params": count_parameters(model), "stored": stored, "nnz": count_nonzero(model),
        "ratio": cycle["dense_params"] / stored, "nnz_ratio": cycle["dense_params"] / max(1, count_nonzero(model)),
        "dense_accuracy": cycle["dense_accuracy"], "accuracy": test_acc, "val_accuracy": val_acc,
        "cycle_accuracy": cycle["accuracy"], "epochs": epochs, "seconds": time.time() - t0,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "git": git_state(),
    }
    out = results / f"{name}.json"
    out.write_text(json.dumps(result, indent=2))
    export_pt2(model, out.with_suffix(".pt2"))
    print(f"{name}: {result['ratio']:.2f}x at test {test_acc:.4f} (validation {val_acc:.4f}) vs the cycle's {cycle['accuracy']:.4f} "
          f"and dense {cycle['dense_accuracy']:.4f}; wrote {out.relative_to(ROOT)} and .pt2", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
