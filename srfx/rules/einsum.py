"""``torch.einsum``: channels follow their letters.

Each axis of each operand carries a letter of the equation (``...`` expanded to positional
letters, right-aligned as einsum broadcasts them). A channel on a letter that reaches the
output goes to that output axis, linked with the same letter's axis in every other operand (one
channel of a batch letter lives or dies in every operand at once; an operand whose axis no rule
tracked is created fixed, so the group stays). A channel on a contracted letter is read as a
whole, as a matrix product's inner axis is (every channel needed). Anything else stays: a
channel dim spanning several axes (heads x dims), a letter repeated in one operand (a
diagonal), sizes that broadcast, the sublist form. The output of a
product of operands is not constant where one operand is, so no constants are claimed. The
equation names no sizes, so minimize leaves the call as it is.
"""
from __future__ import annotations

import collections

import torch

from ..facts import Effects, Link
from ..registry import ChannelRule, register_instance

__all__ = ["Einsum"]


def _letters(term: str, rank: int, width: int):
    """Tokens of one side of the equation: letters, and ("...", i) for ellipsis axis i of the
    ``width`` broadcast axes; None if the term does not fit ``rank`` axes."""
    if term.count("...") > 1:
        return None
    head, dots, tail = term.partition("...")
    if not (head + tail).isalpha():
        return None
    if not dots:
        return list(term) if len(term) == rank else None
    n = rank - len(head) - len(tail)
    if n < 0:
        return None
    return list(head) + [("...", width - n + i) for i in range(n)] + list(tail)


def _parse(equation: str, shapes: list):
    """(tokens per operand, output tokens) or a reason why the equation is not followed."""
    equation = equation.replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        return "operand count"
    widths = [len(s) - len(t.replace("...", "")) for t, s in zip(terms, shapes) if "..." in t]
    width = max(widths, default=0)
    tokens = [_letters(t, len(s), width) for t, s in zip(terms, shapes)]
    if any(t is None for t in tokens):
        return "an equation it cannot read"
    if any(len(set(t)) != len(t) for t in tokens):
        return "a letter repeated in one operand (a diagonal)"
    if arrow:
        out = _letters(rhs, len(rhs.replace("...", "")) + (width if "..." in rhs else 0), width)
        if out is None or len(set(out)) != len(out):
            return "an equation it cannot read"
    else:  # implicit output: broadcast axes, then the letters used once, in alphabetical order
        counts = collections.Counter(tok for t in tokens for tok in t)
        out = [("...", i) for i in range(width)] + sorted(tok for tok, n in counts.items() if n == 1 and isinstance(tok, str))
    sizes: dict = {}
    for t, shape in zip(tokens, shapes):
        for tok, size in zip(t, shape):
            if sizes.setdefault(tok, size) != size:
                return "axes that broadcast"
    return tokens, out


class Einsum(ChannelRule):
    name = "einsum"

    def effects(self, node, env):
        equation = env.concrete(node.args[0]) if node.args else None
        operands = list(node.args[1:])
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
        tensors = env.tensor_args()
        shapes = [env.shape(t) for t in operands]
        parsed = "the sublist form" if not isinstance(equation, str) else (
            "an operand that is not a tensor" if any(s is None for s in shapes) else _parse(equation, shapes))
        if isinstance(parsed, str):
            return Effects(fixed=tuple((r, f"{node.name}: einsum with {parsed}") for t in tensors for r in env.dims(t)))
        tokens, out_tokens = parsed
        out_axis = {tok: i for i, tok in enumerate(out_tokens)}
        dims = [{r.axes: r for r in env.dims(t)} for t in operands]
        links, needs, fixed, outs = [], [], [], {}
        for by_axes in dims:
            for axes, r in by_axes.items():
                if len(axes) > 1:  # heads x dims and the like: the other operands' letters are not split alike
                    fixed.append((r, f"{node.name}: einsum on a channel dim spanning several axes"))
        # a letter that reaches the output: one channel of it in every operand that has it
        for (tok, o) in out_axis.items():
            carriers = [(t, toks.index(tok), by_axes) for t, toks, by_axes in zip(operands, tokens, dims) if tok in toks]
            if not any((a,) in by_axes for _, a, by_axes in carriers):
                continue  # no tracked channel on this letter
            out = outs[o] = env.out((o,))
            for t, a, by_axes in carriers:  # an operand's axis nothing tracked is created fixed
                links.append(Link(by_axes.get((a,), env.dim_at(t, (a,))), out))
        # a contracted letter: read as a whole, as a matrix product's inner axis
        for t, toks, by_axes in zip(operands, tokens, dims):
            for a, tok in enumerate(toks):
                if tok not in out_axis and (a,) in by_axes:
                    needs.append((by_axes[(a,)], f"{node.name}: contracted by einsum"))
        return Effects(outputs=tuple(outs.values()), links=tuple(links), needs=tuple(needs), fixed=tuple(fixed))


register_instance(Einsum(), torch.einsum)
