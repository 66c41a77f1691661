"""Render srfx's channel-coupling groups: a table, JSON, or per-channel detail.

Used by ``srfx groups MODEL`` and ``tools/show_groups.py MODEL`` (the same command line).
The table has one row per coupling group that has at least one writer or reader (``--all``:
every group). ``--json`` prints the same groups as a JSON list, with the full name lists.
``--detail PREFIX`` prints, for every group touching a module under PREFIX, which channels
each writer, reader and per-channel op covers: the group's channels are numbered 0..n-1 in
their order along the group's widest tensor, so the offsets of concatenations are visible.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
from tabulate import tabulate

from .api import analyze as _analyze
from .compensation import norm_absorption
from .coupling import Coupling, Dim, Group
from .errors import SrfxError
from .facts import ValueKey
from .models import load_model, parse_shape

__all__ = [
    "load_model", "parse_shape", "analyze", "visible_groups", "group_rows", "groups_json",
    "needed", "compensation", "summary", "render_table", "atom_order", "format_slices", "group_detail", "render_detail", "main",
]

HEADERS = ["id", "channels", "writers", "readers", "per-channel ops", "shrinkable"]
KEEP = 3  # names shown per table cell before "… N more"
REASON_WIDTH = 60


def analyze(model: nn.Module, shape: Sequence[int], seed: int = 0) -> Coupling:
    """``srfx.analyze`` on one random tensor of ``shape``."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return _analyze(model, x)


# --- table and JSON ----------------------------------------------------------------------
def visible_groups(coupling: Coupling, show_all: bool = False) -> list[Group]:
    """Groups with at least one writer or reader (every group with ``show_all``)."""
    return [g for g in coupling.groups if show_all or g.writers or g.readers]


def _abbrev(names: Sequence[str], keep: int = KEEP) -> list[str]:
    if len(names) <= keep + 1:
        return list(names)
    return list(names[:keep]) + [f"… {len(names) - keep} more"]


def needed(coupling: Coupling, group: Group) -> tuple[str, ...]:
    """Why channels of ``group`` must all be kept though it is not fixed (model output,
    reductions over channels): ``coupling.needs`` of its dims."""
    members = set(group.dims)
    return tuple(dict.fromkeys(reason for did, reason in coupling.needs if did in members))


def _first(label: str, reasons: Sequence[str]) -> str:
    more = f" (… {len(reasons) - 1} more)" if len(reasons) > 1 else ""
    return f"\n{label}: {reasons[0]}{more}" if reasons else ""


def compensation(coupling: Coupling, group: Group) -> dict:
    """The group's LayerNorm/RMSNorm owners that compensate_ln can narrow (their channels
    leave when constant at the norm's input) and those it cannot, with why."""
    members = set(group.dims)
    able, blocked = [], {}
    for norm in norm_absorption(coupling):
        if norm.in_dim in members:
            if norm.why_not is None:
                able.append(norm.owner)
            else:
                blocked[norm.owner] = norm.why_not
    return {"norms": able, "blocked": blocked}


def _compensation_text(coupling: Coupling, group: Group) -> str:
    comp = compensation(coupling, group)
    total = len(comp["norms"]) + len(comp["blocked"])
    if not total:
        return ""
    text = f"\ncompensable: {len(comp['norms'])} of {total} norms (compensate_ln)"
    if comp["blocked"]:
        owner, why = next(iter(comp["blocked"].items()))
        text += f"; not {owner}: {why} (only gamma = 0 channels leave there)"
    return text


def _shrinkable(coupling: Coupling, group: Group) -> str:
    text = "yes" if group.fixed is None else f"no: {group.fixed}"
    return text + _first("mixed", group.mixed) + _compensation_text(coupling, group) + _first("kept", needed(coupling, group))


def group_rows(coupling: Coupling, show_all: bool = False) -> list[list]:
    """One table row per group, columns as in ``HEADERS``; long name lists abbreviated."""
    return [
        [g.id, g.channels, "\n".join(_abbrev(g.writers)), "\n".join(_abbrev(g.readers)), "\n".join(_abbrev(g.ops)), _shrinkable(coupling, g)]
        for g in visible_groups(coupling, show_all)
    ]


def groups_json(coupling: Coupling, show_all: bool = False) -> list[dict]:
    """The groups as JSON-ready dicts, never abbreviated."""
    return [
        {
            "id": g.id,
            "channels": g.channels,
            "writers": list(g.writers),
            "readers": list(g.readers),
            "ops": list(g.ops),
            "prunable": g.prunable,
            "reason": g.fixed,
            "mixed": list(g.mixed),
            "compensable": compensation(coupling, g),
            "needed": list(needed(coupling, g)),
        }
        for g in visible_groups(coupling, show_all)
    ]


def summary(coupling: Coupling, show_all: bool = False) -> str:
    groups = visible_groups(coupling, show_all)
    shrinkable = [g for g in groups if g.prunable]
    text = f"{len(groups)} groups, {len(shrinkable)} shrinkable, {sum(g.channels for g in shrinkable)} channels in shrinkable groups"
    barriers = [f"{node} ({reason})" for node, reason in coupling.barriers.items()]
    text += "; barriers: " + (", ".join(_abbrev(barriers, 5)) if barriers else "none")
    hidden = len(coupling.groups) - len(groups)
    if hidden:
        text += f"; {hidden} group{'s' if hidden > 1 else ''} without writers or readers not shown (--all)"
    return text


def render_table(coupling: Coupling, show_all: bool = False) -> str:
    table = tabulate(
        group_rows(coupling, show_all), headers=HEADERS, tablefmt="simple_grid",
        maxcolwidths=[None, None, None, None, None, REASON_WIDTH], disable_numparse=True,
    )
    return table + "\n" + summary(coupling, show_all)


# --- per-channel detail ----------------------------------------------------------------------
def _group_dims(coupling: Coupling, group: Group) -> list[Dim]:
    return [coupling.dims[d] for d in group.dims]


def atom_order(coupling: Coupling, group: Group) -> tuple[dict[int, int], Dim]:
    """Number the group's atoms 0..n-1 by first appearance along its widest tensor (the
    first such value in graph order; parameters only if the group has no value), then along
    the other dims in order. Returns the numbering and the dim that set the order."""
    dims = _group_dims(coupling, group)
    values = [d for d in dims if isinstance(d.ref.value, ValueKey)] or dims
    ref = max(values, key=lambda d: (d.size, -d.id))
    order: dict[int, int] = {}
    for d in [ref] + dims:
        for a in coupling.atoms(d).tolist():
            order.setdefault(a, len(order))
    return order, ref


def format_slices(ids: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0..2,5,7..8"`` (runs of consecutive numbers)."""
    ids = list(ids)
    parts, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}..{ids[j]}")
        i = j + 1
    return ",".join(parts)


def group_detail(coupling: Coupling, group: Group) -> str:
    """Which channels (numbered as in :func:`atom_order`) each role of ``group`` covers."""
    order, ref = atom_order(coupling, group)
    head = f"group {group.id}: {group.channels} channels, shrinkable: {_shrinkable(coupling, group).replace(chr(10), '; ')}"
    lines = [head, f"  order: along {ref.ref} ({ref.size} channels)"]
    members = set(group.dims)
    rows, seen = [], set()
    for kind in ("writer", "reader", "op"):
        for role in coupling.roles:
            if role.kind != kind:
                continue
            dim = coupling.dim(role.ref)
            if dim.id not in members:
                continue
            row = (kind, role.owner, format_slices(order[a] for a in coupling.atoms(dim).tolist()))
            if row not in seen:
                seen.add(row)
                rows.append(row)
    width = max((len(owner) for _, owner, _ in rows), default=0)
    lines += [f"  {kind:<6} {owner:<{width}}  {slices}" for kind, owner, slices in rows]
    return "\n".join(lines)


def _touches(group: Group, prefix: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for name in group.writers + group.readers + group.ops)


def render_detail(coupling: Coupling, prefixes: Sequence[str]) -> str:
    """:func:`group_detail` of every group with a writer, reader or op under a prefix."""
    groups = [g for g in coupling.groups if any(_touches(g, p) for p in prefixes)]
    if not groups:
        return f"no group has a writer, reader or op under {', '.join(prefixes)}"
    return "\n\n".join(group_detail(coupling, g) for g in groups)


# --- command line ----------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="srfx groups", description="Show srfx channel-coupling groups of a model.")
    p.add_argument("model", metavar="MODEL", help="timm:NAME or package.module:callable")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (default for timm: the model's input_size)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the groups as a JSON list")
    out.add_argument("--detail", action="append", metavar="PREFIX", help="per-channel slices of the groups touching modules under PREFIX (repeatable)")
    p.add_argument("--all", action="store_true", help="also show groups without writers or readers")
    return p


def main(argv: Optional[Sequence[str]] = None, prog: str = "srfx groups") -> int:
    parser = _parser()
    parser.prog = prog
    args = parser.parse_args(argv)
    try:
        shape = parse_shape(args.input_shape) if args.input_shape else None
    except ValueError as exc:
        parser.error(str(exc))
    try:
        model, default_shape = load_model(args.model)
    except Exception as exc:  # an unknown timm name, a factory that raises: the model named cannot be built
        print(f"{prog}: cannot load {args.model}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    shape = shape or default_shape
    if shape is None:
        parser.error("--input-shape is required for package.module:callable models")
    try:
        coupling = analyze(model, shape)
    except SrfxError as exc:
        print(f"{prog}: srfx could not analyze {args.model}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(groups_json(coupling, args.all), indent=2))
    elif args.detail:
        print(render_detail(coupling, args.detail))
    else:
        print(render_table(coupling, args.all))
    return 0
