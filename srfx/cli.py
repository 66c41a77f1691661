"""The ``srfx`` command: ``srfx demo``, ``srfx groups MODEL``, ``srfx compress MODEL --out FILE``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = ["main", "load_checkpoint", "save_compressed"]

FORMATS = {".pt2": "torch.export program (loads with torch.export.load, no srfx needed)", ".onnx": "ONNX", ".pt": "torch.save of the GraphModule"}


class CliError(Exception):
    """A problem with what the command line named (a file, a format); exit status 2."""


def load_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Load a state dict into ``model`` with ``weights_only=True`` (no code runs from the file)."""
    file = Path(path)
    if not file.is_file():
        raise CliError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # the file is the user's: any failure to read it is a message, not a traceback
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CliError(f"checkpoint {path} is not a plain state dict torch.load(weights_only=True) accepts: {first}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CliError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict of tensors")
    own = model.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise CliError(f"checkpoint {path} does not match the model's shapes: {'; '.join(wrong[:5])}")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CliError(
            f"checkpoint {path} does not match the model: missing {list(result.missing_keys)[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]}"
        )


def check_out(path: str) -> None:
    """Refuse an ``--out`` that cannot be written before any work is done."""
    if Path(path).suffix not in FORMATS:
        raise CliError(f"--out {path}: use one of {', '.join(FORMATS)} ({'; '.join(f'{k}: {v}' for k, v in FORMATS.items())})")
    if not Path(path).resolve().parent.is_dir():
        raise CliError(f"--out {path}: no directory {Path(path).resolve().parent}")


def save_compressed(gm: torch.fx.GraphModule, example: torch.Tensor, path: str) -> None:
    check_out(path)
    suffix = Path(path).suffix
    if suffix == ".pt":
        torch.save(gm, path)
        return
    # export with a batch of at least 2 so the batch dimension stays dynamic
    example = example if example.shape[0] > 1 else example.expand(2, *example.shape[1:]).contiguous()
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    if suffix == ".pt2":
        torch.export.save(torch.export.export(gm, (example,), dynamic_shapes=dynamic), path)
    else:
        torch.onnx.export(gm, (example,), path, dynamo=True, dynamic_shapes=dynamic)


def _compress(args) -> int:
    import srfx
    from srfx.models import load_model, parse_shape

    if args.out:
        check_out(args.out)
    try:
        model, default_shape = load_model(args.model)
    except Exception as exc:  # an unknown timm name, a factory that raises: the model named cannot be built
        raise CliError(f"cannot load {args.model}: {type(exc).__name__}: {exc}") from exc
    try:
        shape = parse_shape(args.input_shape) if args.input_shape else default_shape
    except ValueError as exc:
        raise CliError(f"--input-shape {args.input_shape}: {exc}") from exc
    if shape is None:
        raise CliError("--input-shape is required for package.module:callable models")
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    small = srfx.compress(model, x, sparsity=args.sparsity, verify=not args.no_verify)
    print(small.meta[srfx.REPORT_KEY])
    if args.out:
        save_compressed(small, x, args.out)
        print(f"wrote {args.out}")
    return 0


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="srfx", description="Exact structural minimization of pruned PyTorch networks.")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a short Squeeze-Release of an MLP on scikit-learn digits")
    demo.add_argument("--sparsity", type=_fraction, default=0.9, help="fraction of the weights the cycles aim to remove, in [0, 1)")
    demo.add_argument("--cycles", type=_positive, default=4)
    demo.add_argument("--quick", action="store_true", help="a few seconds: less training per step")
    sub.add_parser("groups", help="show the channel-coupling groups of MODEL (see srfx groups -h)", add_help=False)
    c = sub.add_parser("compress", help="compress MODEL (optionally from a checkpoint) and save it")
    c.add_argument("model", metavar="MODEL", help="timm:NAME or package.module:callable")
    c.add_argument("--checkpoint", help="state dict to load (torch.load with weights_only=True)")
    c.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224")
    c.add_argument("--sparsity", type=_fraction, help="apply global magnitude masking first, in [0, 1)")
    c.add_argument("--out", help="where to save: .pt2 (torch.export), .onnx, or .pt (torch.save)")
    c.add_argument("--no-verify", action="store_true", help="skip the equivalence check")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "groups":
        from .groups_view import main as groups_main

        return groups_main(argv[1:], prog="srfx groups")
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(sparsity=args.sparsity, quick=args.quick, cycles=args.cycles)
        return 0
    from .errors import SrfxError

    try:
        return _compress(args)
    except CliError as exc:
        print(f"srfx compress: {exc}", file=sys.stderr)
        return 2
    except SrfxError as exc:
        print(f"srfx compress: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
