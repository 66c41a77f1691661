#!/usr/bin/env python
"""Show the channel-coupling groups srfx finds in a model.

    python tools/show_groups.py timm:resnet50
    python tools/show_groups.py timm:densenet121 --detail features.denseblock1
    python tools/show_groups.py mypackage.models:make_net --input-shape 1,3,32,32 --json

MODEL is ``timm:NAME`` (``timm.create_model(NAME, pretrained=False)``) or
``package.module:callable`` (called with no arguments; must return an ``nn.Module``).
The model is analyzed in eval mode on one random tensor of ``--input-shape`` (default for
timm models: the model's ``pretrained_cfg["input_size"]`` with batch 1).

The table has one row per coupling group that has at least one writer or reader
(``--all``: every group). ``--json`` prints the same groups as a JSON list, with the
full name lists. ``--detail PREFIX`` prints, for every group touching a module under
PREFIX, which channels each writer, reader and per-channel op covers: the group's
channels are numbered 0..n-1 in their order along the group's widest tensor, so the
offsets of concatenations are visible.

The same as ``srfx groups``; this tool imports srfx, srfx never imports it.
"""
import sys

from srfx.groups_view import *  # noqa: F401,F403  (the functions tests and users import from here)
from srfx.groups_view import HEADERS, KEEP, __all__, main  # noqa: F401
from srfx.models import load_model, parse_shape  # noqa: F401

if __name__ == "__main__":
    sys.exit(main(prog="show_groups.py"))
