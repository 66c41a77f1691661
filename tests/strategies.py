"""Hypothesis strategies that build small random ``nn.Module``s with random structured sparsity.

Every model is an instance of one of the small classes below; hypothesis draws its structure
(depths, widths, kernels, strides, branches). Values come from a ``torch.Generator`` seeded
by a drawn integer; *which* weights are zero is drawn by hypothesis per layer (so failures
shrink to few killed rows / columns):

* rows     -- whole output units / channels of a Linear or Conv (axis 0 of the weight)
* cols     -- whole input units / channels (axis 1 of the weight)
* density  -- a fraction of individual weights zeroed at random
* zero_bias-- the layer's bias set to zero
* bn_zero  -- BatchNorm weight (gamma) entries set to zero

Everything not killed is nonzero random: biases, BN beta and running_mean in particular, so
dead channels carry nonzero constants that readers must fold into their biases.

Every family strategy takes ``kill`` (False: no masks) and ``spare``: with ``spare=True``
the :func:`lifelines` entries stay nonzero, so every layer output keeps a live channel;
with ``spare=False`` whole layers and branches may die.

A drawn value is a :class:`Case`: the model (float32, eval mode) plus the input shape.
``case.at(torch.float64)`` gives a float64 copy for the tight checks.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

__all__ = [
    "ACTIVATIONS", "Case", "MLP", "CNN", "ResNet", "ResMLP", "CatSplit", "SE", "GroupedNet",
    "mlps", "cnns", "residuals", "cat_splits", "se_nets", "grouped_nets", "any_model", "FAMILIES",
    "randomize", "apply_masks", "random_masks", "lifelines", "fresh_input",
]

class WhereLeaky(nn.Module):
    """A leaky ReLU written with a comparison and torch.where."""

    threshold = 0.0

    def forward(self, x):
        return torch.where(x > self.threshold, x, 0.1 * x)


class StepGate(nn.Module):
    """x where x >= 0.25, else 0: a comparison used as a mask."""

    threshold = 0.25

    def forward(self, x):
        return x * (x >= self.threshold)


ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
    "where_leaky": WhereLeaky,
    "step_gate": StepGate,
    "prelu": nn.PReLU,  # one shared slope (test_rules covers one slope per channel)
}


# --------------------------------------------------------------------------------------
# model classes
# --------------------------------------------------------------------------------------
class MLP(nn.Module):
    """``layers[i]`` is the i-th Linear; ``acts[i]`` follows it (the last one only if
    ``final_act``)."""

    def __init__(self, in_features: int, widths: list[int], acts: list[str], biases: list[bool], final_act: bool = False):
        super().__init__()
        self.layers = nn.ModuleList()
        prev = in_features
        for w, b in zip(widths, biases):
            self.layers.append(nn.Linear(prev, w, bias=b))
            prev = w
        n_acts = len(widths) if final_act else len(widths) - 1
        self.acts = nn.ModuleList(ACTIVATIONS[a]() for a in acts[:n_acts])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.acts):
                x = self.acts[i](x)
        return x


class CNN(nn.Module):
    """Conv2d (+ BatchNorm2d) + ReLU blocks, global average pool, Linear head."""

    def __init__(self, in_ch: int, blocks: list[tuple], pool: str, n_out: int):
        # blocks: (out_ch, kernel, padding, stride, bias, bn)
        super().__init__()
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        prev = in_ch
        for out_ch, k, pad, stride, bias, bn in blocks:
            self.convs.append(nn.Conv2d(prev, out_ch, k, stride=stride, padding=pad, bias=bias))
            self.bns.append(nn.BatchNorm2d(out_ch) if bn else nn.Identity())
            prev = out_ch
        self.pool = pool
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(prev, n_out)

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = torch.relu(bn(conv(x)))
        if self.pool == "mean":
            x = x.mean((2, 3))
        else:
            x = torch.flatten(self.gap(x), 1)
        return self.head(x)


class ResBlock(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, k: int, stride: int, bias: bool, proj: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, k, stride=stride, padding=k // 2, bias=bias)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, cout, k, padding=k // 2, bias=bias)
        self.bn2 = nn.BatchNorm2d(cout)
        if proj or cin != cout or stride != 1:
            self.proj = nn.Conv2d(cin, cout, 1, stride=stride, bias=bias)
            self.proj_bn = nn.BatchNorm2d(cout)
        else:
            self.proj = None

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        s = x if self.proj is None else self.proj_bn(self.proj(x))
        return torch.relu(y + s)


class ResNet(nn.Module):
    def __init__(self, in_ch: int, stem: int, blocks: list[tuple], n_out: int):
        # blocks: (mid, cout, kernel, stride, bias, proj)
        super().__init__()
        self.stem = nn.Conv2d(in_ch, stem, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(stem)
        self.blocks = nn.ModuleList()
        prev = stem
        for mid, cout, k, stride, bias, proj in blocks:
            self.blocks.append(ResBlock(prev, mid, cout, k, stride, bias, proj))
            prev = cout
        self.head = nn.Linear(prev, n_out)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean((2, 3)))


class ResMLP(nn.Module):
    """``x = fc_in(x); x = x + fc2(act(fc1(x)))`` per block; Linear head."""

    def __init__(self, in_features: int, width: int, hiddens: list[int], act: str, n_out: int):
        super().__init__()
        self.fc_in = nn.Linear(in_features, width)
        self.fc1 = nn.ModuleList(nn.Linear(width, h) for h in hiddens)
        self.fc2 = nn.ModuleList(nn.Linear(h, width) for h in hiddens)
        self.act = ACTIVATIONS[act]()
        self.head = nn.Linear(width, n_out)

    def forward(self, x):
        x = self.fc_in(x)
        for f1, f2 in zip(self.fc1, self.fc2):
            x = x + f2(self.act(f1(x)))
        return self.head(x)


class CatSplit(nn.Module):
    """Channel concat and split. ``mode``:

    * ``cat``       -- two conv branches of the stem output, ``torch.cat`` along channels
    * ``split``     -- ``torch.split`` the stem's channels into two sizes, a conv per part,
                       merged by ``cat`` or ``add``
    * ``chunk``     -- ``torch.chunk(x, 2, 1)`` then as ``split``
    * ``cat_split`` -- cat two branches, then split the concatenation at another boundary
    * ``slice``     -- a window ``x[:, lo:hi]`` of the stem's channels for one conv and a list
                       ``x[:, picks]`` (any order, repeats allowed) for the other; channels
                       outside both are unread
    """

    def __init__(self, in_ch: int, stem: int, mode: str, a: int, b: int, cut: int, merge: str, k: int, tail: int, n_out: int,
                 window: tuple[int, int] = (0, 1), picks: tuple[int, ...] = (0,)):
        super().__init__()
        self.mode, self.merge, self.cut = mode, merge, cut
        self.window, self.picks = window, list(picks)
        self.stem = nn.Conv2d(in_ch, stem, 1)
        self.stem_bn = nn.BatchNorm2d(stem)
        if mode == "cat":
            self.conv_a = nn.Conv2d(stem, a, k, padding=k // 2)
            self.conv_b = nn.Conv2d(stem, b, k, padding=k // 2)
            merged = a + b
        elif mode == "slice":
            self.sizes = [window[1] - window[0], len(picks)]
            self.conv_a = nn.Conv2d(self.sizes[0], a, k, padding=k // 2)
            self.conv_b = nn.Conv2d(self.sizes[1], b if merge == "cat" else a, k, padding=k // 2)
            merged = a + b if merge == "cat" else a
        elif mode in ("split", "chunk"):
            first = cut if mode == "split" else math.ceil(stem / 2)
            self.sizes = [first, stem - first]
            self.conv_a = nn.Conv2d(self.sizes[0], a, k, padding=k // 2)
            self.conv_b = nn.Conv2d(self.sizes[1], b if merge == "cat" else a, k, padding=k // 2)
            merged = a + b if merge == "cat" else a
        else:  # cat_split
            self.conv_a = nn.Conv2d(stem, a, k, padding=k // 2)
            self.conv_b = nn.Conv2d(stem, b, k, padding=k // 2)
            self.sizes = [cut, a + b - cut]
            self.conv_p = nn.Conv2d(self.sizes[0], a, 1)
            self.conv_q = nn.Conv2d(self.sizes[1], b, 1)
            merged = a + b
        self.bn = nn.BatchNorm2d(merged)
        self.tail = nn.Conv2d(merged, tail, 1)
        self.head = nn.Linear(tail, n_out)
        self.a = a

    def lifelines(self):
        """Besides channel 0 of every layer: channel 0 of the second branch."""
        weights, bns = [], []
        if self.mode in ("split", "chunk"):
            weights.append(("stem", self.sizes[0], 0))
            bns.append(("stem_bn", self.sizes[0]))
        if self.mode == "slice":  # the first channel of each piece
            for c in (self.window[0], self.picks[0]):
                weights.append(("stem", c, 0))
                bns.append(("stem_bn", c))
        if self.mode == "cat_split":
            cut = self.sizes[0]
            weights.append(("conv_a", cut, 0) if cut < self.a else ("conv_b", cut - self.a, 0))  # q's first
            weights.append(("conv_p", 0, self.a) if self.a < cut else ("conv_q", 0, self.a - cut))  # conv_b's first
        if self.mode in ("cat", "cat_split") or self.merge == "cat":
            weights.append(("tail", 0, self.a))
            bns.append(("bn", self.a))
        return weights, bns

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        if self.mode == "cat":
            y = torch.cat([torch.relu(self.conv_a(x)), torch.relu(self.conv_b(x))], 1)
        elif self.mode == "slice":
            p, q = x[:, self.window[0] : self.window[1]], x[:, self.picks]
            p, q = torch.relu(self.conv_a(p)), torch.relu(self.conv_b(q))
            y = torch.cat([p, q], 1) if self.merge == "cat" else p + q
        elif self.mode in ("split", "chunk"):
            if self.mode == "split":
                p, q = torch.split(x, self.sizes, dim=1)
            else:
                p, q = torch.chunk(x, 2, dim=1)
            p, q = torch.relu(self.conv_a(p)), torch.relu(self.conv_b(q))
            y = torch.cat([p, q], 1) if self.merge == "cat" else p + q
        else:
            y = torch.cat([torch.relu(self.conv_a(x)), torch.relu(self.conv_b(x))], 1)
            p, q = torch.split(y, self.sizes, dim=1)
            y = torch.cat([self.conv_p(p), self.conv_q(q)], 1)
        y = torch.relu(self.bn(y))
        y = torch.relu(self.tail(y))
        return self.head(y.mean((2, 3)))


class SE(nn.Module):
    """x * sigmoid(conv_expand(relu(conv_reduce(mean(x))))) between a stem and a tail."""

    def __init__(self, in_ch: int, ch: int, reduced: int, k: int, tail: int, n_out: int, pool: str):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, ch, k, padding=k // 2)
        self.stem_bn = nn.BatchNorm2d(ch)
        self.conv_reduce = nn.Conv2d(ch, reduced, 1)
        self.conv_expand = nn.Conv2d(reduced, ch, 1)
        self.pool = pool
        self.tail = nn.Conv2d(ch, tail, 1)
        self.tail_bn = nn.BatchNorm2d(tail)
        self.head = nn.Linear(tail, n_out)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        s = x.mean((2, 3), keepdim=True) if self.pool == "mean" else F.adaptive_avg_pool2d(x, 1)
        s = self.conv_expand(torch.relu(self.conv_reduce(s)))
        x = x * torch.sigmoid(s)
        x = torch.relu(self.tail_bn(self.tail(x)))
        return self.head(x.mean((2, 3)))


class GroupedNet(nn.Module):
    """stem conv, then a depthwise (groups=C, channel multiplier ``mult``) or grouped
    (1 < groups < C) conv + BN + ReLU, a pointwise conv, pool, head."""

    def __init__(self, in_ch: int, ch: int, kind: str, groups: int, mult: int, k: int, pad: int, pw: int, n_out: int):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, ch, 1)
        self.stem_bn = nn.BatchNorm2d(ch)
        g = ch if kind == "depthwise" else groups
        self.gconv = nn.Conv2d(ch, g * mult if kind == "depthwise" else ch * mult, k, padding=pad, groups=g)
        self.g_bn = nn.BatchNorm2d(self.gconv.out_channels)
        self.pw = nn.Conv2d(self.gconv.out_channels, pw, 1)
        self.head = nn.Linear(pw, n_out)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(self.g_bn(self.gconv(x)))
        x = torch.relu(self.pw(x))
        return self.head(x.mean((2, 3)))


# --------------------------------------------------------------------------------------
# values and masks
# --------------------------------------------------------------------------------------
@dataclass
class Case:
    model: nn.Module  # float32, eval mode, values and masks applied
    input_shape: tuple[int, ...]
    family: str
    masks: dict = field(default_factory=dict, repr=False)  # layer name -> what was killed

    def at(self, dtype: torch.dtype) -> nn.Module:
        return copy.deepcopy(self.model).to(dtype).eval()

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        killed = {k: {f: x for f, x in v.items() if f != "spare" and x} for k, v in self.masks.items()}
        killed = {k: v for k, v in killed.items() if v}
        return f"Case({self.family}, input={self.input_shape}, masks={killed},\nmodel={self.model})"


def fresh_input(shape, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _nonzero(shape, g, scale=1.0, offset=0.1) -> torch.Tensor:
    """Random values bounded away from zero: sign * (offset + |N(0, 1)|) * scale."""
    v = torch.randn(shape, generator=g, dtype=torch.float64)
    return (torch.sign(v) + (v == 0)) * (offset + v.abs()) * scale


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> None:
    """Dense nonzero random values everywhere (weights ~ 1/sqrt(fan_in))."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(_nonzero(m.weight.shape, g, 1.0 / math.sqrt(fan_in)))
            if m.bias is not None:
                m.bias.copy_(_nonzero(m.bias.shape, g, 0.5))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(_nonzero(m.weight.shape, g, 1.0))
            m.bias.copy_(_nonzero(m.bias.shape, g, 0.5))
            m.running_mean.copy_(_nonzero(m.running_mean.shape, g, 0.5))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g, dtype=torch.float64))


def lifelines(model: nn.Module) -> tuple[set, set]:
    """Weight entries ``(layer, row, col)`` and BN entries ``(bn, index)`` that stay nonzero
    so every channel group keeps at least one live channel: entry (0, 0) of every weighted
    layer and gamma 0 of every BatchNorm (channel 0 flows from the input to the output),
    plus what a model's ``lifelines()`` adds for its other branches."""
    weights, bns = set(), set()
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            weights.add((name, 0, 0))
        elif isinstance(m, nn.BatchNorm2d):
            bns.add((name, 0))
    if hasattr(model, "lifelines"):
        w, b = model.lifelines()
        weights |= set(w)
        bns |= set(b)
    return weights, bns


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict, seed: int) -> None:
    g = torch.Generator().manual_seed(seed ^ 0x5EED)
    mods = dict(model.named_modules())
    for name, spec in masks.items():
        m = mods[name]
        if isinstance(m, nn.BatchNorm2d):
            for i in spec["bn_zero"]:
                m.weight[i] = 0.0
            continue
        w = m.weight
        for r in spec["rows"]:
            w[r] = 0.0
        for c in spec["cols"]:
            w[:, c] = 0.0
        if spec["density"]:
            kill = torch.rand(w.shape, generator=g) < spec["density"]
            for r, c in spec.get("spare", ()):
                kill[r, c] = False
            w[kill] = 0.0
        if spec["zero_bias"] and m.bias is not None:
            m.bias.zero_()


@st.composite
def random_masks(draw, model: nn.Module, kill: bool = True, spare: bool = True, keep_whole=frozenset()) -> dict:
    """Per weighted layer / BatchNorm: which rows, columns, weights, biases, gammas die.

    ``kill=False``: nothing dies. ``spare=True``: the :func:`lifelines` entries survive, so
    no channel group dies whole; ``spare=False``: anything may die. Modules named in
    ``keep_whole`` get no mask."""
    masks = {}
    keep_w, keep_bn = lifelines(model) if spare else (set(), set())
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            n_out, n_in = m.weight.shape[:2]
            if not kill or name in keep_whole:
                masks[name] = {"rows": [], "cols": [], "density": 0.0, "zero_bias": False}
                continue
            spared = sorted((r, c) for (l, r, c) in keep_w if l == name)
            rows = [r for r in range(n_out) if r not in {r for r, _ in spared}]
            cols = [c for c in range(n_in) if c not in {c for _, c in spared}]
            masks[name] = {
                "rows": sorted(draw(st.sets(st.sampled_from(rows), max_size=len(rows)))) if rows else [],
                "cols": sorted(draw(st.sets(st.sampled_from(cols), max_size=len(cols)))) if cols else [],
                "density": draw(st.sampled_from([0.0, 0.0, 0.3, 0.7])),
                "zero_bias": draw(st.booleans()) if m.bias is not None else False,
                "spare": spared,
            }
        elif isinstance(m, nn.BatchNorm2d):
            idx = [i for i in range(m.num_features) if (name, i) not in keep_bn]
            masks[name] = {"bn_zero": sorted(draw(st.sets(st.sampled_from(idx), max_size=len(idx)))) if kill and idx and name not in keep_whole else []}
    return masks


def _finish(draw, model: nn.Module, input_shape, family: str, kill: bool = True, spare: bool = True, keep_whole=frozenset()) -> Case:
    seed = draw(st.integers(0, 2**31 - 1))
    randomize(model, seed)
    masks = draw(random_masks(model, kill, spare, keep_whole))
    apply_masks(model, masks, seed)
    return Case(model.float().eval(), tuple(input_shape), family, masks)


# --------------------------------------------------------------------------------------
# structure strategies
# --------------------------------------------------------------------------------------
_acts = st.sampled_from(sorted(ACTIVATIONS))
_BATCH = 2


@st.composite
def mlp_models(draw, min_depth: int = 1, max_depth: int = 4, activations=None) -> MLP:
    depth = draw(st.integers(min_depth, max_depth))
    in_features = draw(st.integers(1, 12))
    widths = draw(st.lists(st.integers(1, 12), min_size=depth, max_size=depth))
    acts = draw(st.lists(activations if activations is not None else _acts, min_size=depth, max_size=depth))
    biases = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    final_act = draw(st.booleans())
    return MLP(in_features, widths, acts, biases, final_act)


@st.composite
def mlps(draw, kill: bool = True, spare: bool = True, **kw) -> Case:
    model = draw(mlp_models(**kw))
    return _finish(draw, model, (_BATCH, model.layers[0].in_features), "mlp", kill, spare)


@st.composite
def cnn_models(draw, min_blocks: int = 1, max_blocks: int = 3):
    in_ch = draw(st.integers(1, 4))
    size = draw(st.integers(4, 8))
    n = draw(st.integers(min_blocks, max_blocks))
    blocks, h = [], size
    for _ in range(n):
        k = draw(st.sampled_from([1, 3]))
        pad = draw(st.sampled_from([0, 1]))
        if k > h + 2 * pad:
            pad = 1
        if k > h + 2 * pad:
            k = 1
        stride = draw(st.integers(1, 2))
        h = (h + 2 * pad - k) // stride + 1
        blocks.append((draw(st.integers(1, 8)), k, pad, stride, draw(st.booleans()), draw(st.booleans())))
    pool = draw(st.sampled_from(["mean", "adaptive"]))
    model = CNN(in_ch, blocks, pool, draw(st.integers(1, 5)))
    return model, (_BATCH, in_ch, size, size)


@st.composite
def cnns(draw, kill: bool = True, spare: bool = True, **kw) -> Case:
    model, shape = draw(cnn_models(**kw))
    return _finish(draw, model, shape, "cnn", kill, spare)


@st.composite
def residuals(draw, kill: bool = True, spare: bool = True) -> Case:
    if draw(st.booleans()):
        in_f = draw(st.integers(1, 8))
        hiddens = draw(st.lists(st.integers(1, 8), min_size=1, max_size=3))
        model = ResMLP(in_f, draw(st.integers(1, 8)), hiddens, draw(_acts), draw(st.integers(1, 4)))
        return _finish(draw, model, (_BATCH, in_f), "resmlp", kill, spare)
    in_ch = draw(st.integers(1, 3))
    size = draw(st.integers(4, 7))
    stem = draw(st.integers(1, 6))
    blocks, prev = [], stem
    for _ in range(draw(st.integers(1, 2))):
        cout = draw(st.one_of(st.just(prev), st.integers(1, 6)))
        blocks.append((draw(st.integers(1, 6)), cout, draw(st.sampled_from([1, 3])), draw(st.integers(1, 2)), draw(st.booleans()), draw(st.booleans())))
        prev = cout
    model = ResNet(in_ch, stem, blocks, draw(st.integers(1, 4)))
    return _finish(draw, model, (_BATCH, in_ch, size, size), "resnet", kill, spare)


@st.composite
def cat_splits(draw, kill: bool = True, spare: bool = True) -> Case:
    in_ch = draw(st.integers(1, 3))
    size = draw(st.integers(3, 6))
    mode = draw(st.sampled_from(["cat", "split", "chunk", "cat_split", "slice"]))
    stem = draw(st.integers(2, 8))
    a, b = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    lo = draw(st.integers(0, stem - 1))
    window = (lo, draw(st.integers(lo + 1, stem)))
    picks = tuple(draw(st.lists(st.integers(0, stem - 1), min_size=1, max_size=5)))
    if mode == "split":
        cut = draw(st.integers(1, stem - 1))
    elif mode == "cat_split":
        cut = draw(st.integers(1, a + b - 1))
    else:
        cut = 0
    merge = draw(st.sampled_from(["cat", "add"]))
    k = draw(st.sampled_from([1, 3]))
    model = CatSplit(in_ch, stem, mode, a, b, cut, merge, k, draw(st.integers(1, 6)), draw(st.integers(1, 4)), window, picks)
    return _finish(draw, model, (_BATCH, in_ch, size, size), f"catsplit-{mode}", kill, spare)


@st.composite
def se_nets(draw, kill: bool = True, spare: bool = True) -> Case:
    in_ch = draw(st.integers(1, 3))
    size = draw(st.integers(3, 6))
    model = SE(
        in_ch, draw(st.integers(1, 8)), draw(st.integers(1, 4)), draw(st.sampled_from([1, 3])),
        draw(st.integers(1, 6)), draw(st.integers(1, 4)), draw(st.sampled_from(["mean", "adaptive"])),
    )
    return _finish(draw, model, (_BATCH, in_ch, size, size), "se", kill, spare)


@st.composite
def grouped_nets(draw, kill: bool = True, spare: bool = True, kind=None, dense_stem: bool = False) -> Case:
    """``dense_stem``: the stem and its BatchNorm are not masked, so no channel the grouped
    conv reads is a constant."""
    in_ch = draw(st.integers(1, 3))
    size = draw(st.integers(3, 6))
    kind = kind or draw(st.sampled_from(["depthwise", "grouped"]))
    if kind == "depthwise":
        ch, groups = draw(st.integers(1, 8)), 0
    else:
        groups = draw(st.integers(2, 3))
        ch = groups * draw(st.integers(2, 3))  # groups < ch: not depthwise
    model = GroupedNet(
        in_ch, ch, kind, groups, draw(st.integers(1, 2)), draw(st.sampled_from([1, 3])),
        draw(st.sampled_from([0, 1])), draw(st.integers(1, 6)), draw(st.integers(1, 4)),
    )
    keep = frozenset({"stem", "stem_bn"}) if dense_stem else frozenset()
    return _finish(draw, model, (_BATCH, in_ch, size, size), kind, kill, spare, keep)


FAMILIES = {
    "mlp": mlps,
    "cnn": cnns,
    "residual": residuals,
    "catsplit": cat_splits,
    "se": se_nets,
    "grouped": grouped_nets,
}


def any_model(kill: bool = True, spare: bool = True):
    return st.one_of(*(f(kill=kill, spare=spare) for f in FAMILIES.values()))
