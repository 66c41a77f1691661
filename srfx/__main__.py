"""``python -m srfx ...`` is the ``srfx`` command (``python -m srfx demo``: the built-in example)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
