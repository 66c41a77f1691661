"""``python -m srfx demo``: the built-in example."""
import argparse

from .demo import run_demo


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m srfx")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="prune an MLP on scikit-learn digits and compress it")
    demo.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo(sparsity=args.sparsity)


if __name__ == "__main__":
    main()
