"""Immutable descriptions that channel rules return and the analysis consumes.

A *value* is one tensor in the graph: ``ValueKey(node_name, element)`` where ``element`` is
``-1`` for a plain tensor and ``i`` for the i-th tensor of a tuple output (``split``). A
*parameter* is ``ParamKey(qualified_name)``. A channel dimension of either is a :class:`Ref`:
the value plus the axes it spans (several axes when a reshape split channels into heads; the
flat channel index runs over them in the order given).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np

__all__ = ["ValueKey", "ParamKey", "Ref", "Link", "Role", "Mix", "Effects"]


@dataclass(frozen=True)
class ValueKey:
    node: str
    element: int = -1

    def __str__(self) -> str:
        return self.node if self.element < 0 else f"{self.node}[{self.element}]"


@dataclass(frozen=True)
class ParamKey:
    qualname: str

    def __str__(self) -> str:
        return self.qualname


@dataclass(frozen=True)
class Ref:
    """A channel dimension: ``value`` and the ``axes`` it spans."""

    value: Union[ValueKey, ParamKey]
    axes: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.value}@{','.join(map(str, self.axes))}"


@dataclass(frozen=True, eq=False)
class Link:
    """Channel ``pairs[0][i]`` of ``a`` is the same channel as ``pairs[1][i]`` of ``b``.

    ``pairs=None`` means the identity (same size, channel i of a is channel i of b).
    """

    a: Ref
    b: Ref
    pairs: Optional[tuple[np.ndarray, np.ndarray]] = None


@dataclass(frozen=True)
class Role:
    """What an op does with a channel dimension, for reports and for the rewrite.

    kind: ``writer`` (produces the channels: conv/linear output, cls token added in),
    ``reader`` (consumes them through weights it can slice: next conv/linear),
    ``op`` (per-channel op inside the group: BN, activation, layer scale, depthwise conv).
    ``owner`` is the module or parameter qualified name, or the node name for functions.
    ``fold`` names how a reader folds a constant channel into its bias (see passes.minimize).
    """

    kind: str
    ref: Ref
    owner: str
    node: str
    fold: Optional[str] = None  # "linear", "conv" (any constant), "zero_only" (padding sees c)
    weight: Optional[str] = None  # reader/writer weight qualname
    bias: Optional[str] = None
    in_axis: int = 1  # the weight axis that reads the input channels


@dataclass(frozen=True, eq=False)
class Mix:
    """Channels of ``ref`` with equal ``labels`` are mixed (LayerNorm statistics, GroupNorm
    groups, softmax over channels): they are kept or removed all together."""

    ref: Ref
    labels: np.ndarray
    reason: str


@dataclass(frozen=True)
class Effects:
    """Everything one node means for channels. Output dims are created for the ``outputs``
    refs; input dims a rule does not mention in links, roles, needs or fixed are fixed by
    the analysis (a rule cannot silently lose a channel)."""

    outputs: tuple[Ref, ...] = ()
    links: tuple[Link, ...] = ()
    roles: tuple[Role, ...] = ()
    mixes: tuple[Mix, ...] = ()
    needs: tuple[tuple[Ref, str], ...] = ()  # every channel read (model output, reductions)
    fixed: tuple[tuple[Ref, str], ...] = ()  # channels that must stay as they are, and why
    meta: dict = field(default_factory=dict, hash=False, compare=False)  # rewrite hints
