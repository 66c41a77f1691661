"""Coupling groups of timm models, as tools/show_groups.py reports them.

Golden files in tests/golden/ are ``show_groups.py MODEL --detail PREFIX`` renderings;
``SRFX_UPDATE_GOLDEN=1`` rewrites them (read the diff before keeping it).
"""
from __future__ import annotations

import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from srfx.facts import ParamKey, Ref

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(REPO / "tools"))

import show_groups as sg  # noqa: E402

timm = pytest.importorskip("timm")


@lru_cache(maxsize=None)
def coupling(name: str):
    model, shape = sg.load_model(f"timm:{name}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch-1 CPU convs: one thread is as fast, and immune to a busy machine
    try:
        return sg.analyze(model, shape)
    finally:
        torch.set_num_threads(threads)


def group_of_writer(c, owner: str):
    groups = [g for g in c.groups if owner in g.writers]
    assert len(groups) == 1, f"{owner} writes {len(groups)} groups"
    return groups[0]


def detail_rows(c, group) -> dict[str, str]:
    """``{"writer features.conv0": "0..63", ...}`` from :func:`sg.group_detail`."""
    rows = {}
    for line in sg.group_detail(c, group).splitlines()[2:]:
        kind, owner, slices = line.split()
        rows[f"{kind} {owner}"] = slices
    return rows


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("SRFX_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with SRFX_UPDATE_GOLDEN=1 and check it by eye"
    assert text == path.read_text(), f"{name} changed; if intended, rerun with SRFX_UPDATE_GOLDEN=1 and review the diff"


def golden_text(model: str, prefixes: list[str]) -> str:
    cmd = " ".join(["python tools/show_groups.py", f"timm:{model}"] + [f"--detail {p}" for p in prefixes])
    return f"# {cmd}\n" + sg.render_detail(coupling(model), prefixes) + "\n"


# --- resnet50 --------------------------------------------------------------------------------
def test_resnet50_layer1_stream():
    c = coupling("resnet50")
    g = group_of_writer(c, "layer1.0.conv3")
    assert g.channels == 256 and g.prunable
    assert set(g.writers) == {"layer1.0.conv3", "layer1.0.downsample.0", "layer1.1.conv3", "layer1.2.conv3"}
    assert set(g.readers) == {"layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1", "layer2.0.downsample.0"}
    assert set(g.ops) == {"layer1.0.bn3", "layer1.0.downsample.1", "layer1.1.bn3", "layer1.2.bn3"}
    rows = detail_rows(c, g)
    assert set(rows.values()) == {"0..255"}  # a residual sum: every member covers every channel


def test_resnet50_cli():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "tools/show_groups.py", "timm:resnet50"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.rstrip().splitlines()
    assert lines[-1].startswith("39 groups, 38 shrinkable,") and lines[-1].endswith("barriers: none")
    assert "layer1.0.downsample.0" in proc.stdout and "… 2 more" in proc.stdout


# --- convnext_tiny ---------------------------------------------------------------------------
def test_convnext_tiny_stage0_stream():
    c = coupling("convnext_tiny")
    g = group_of_writer(c, "stem.0")
    assert g.channels == 96 and g.prunable
    assert g.writers == ("stem.0",) + tuple(f"stages.0.blocks.{i}.mlp.fc2" for i in range(3))
    assert set(g.readers) == {f"stages.0.blocks.{i}.mlp.fc1" for i in range(3)} | {"stages.1.downsample.1"}
    blocks = [f"stages.0.blocks.{i}.{m}" for i in range(3) for m in ("conv_dw", "norm", "gamma")]
    assert g.ops == ("stem.1", *blocks, "stages.1.downsample.0")  # the LayerNorms and depthwise convs
    assert len(g.mixed) == 5 and all("LayerNorm statistics read all 96 channels" in m for m in g.mixed)
    # layer scale: gamma is sliced with the stream (its parameter axis is in the group) ...
    for i in range(3):
        assert c.group_of(Ref(ParamKey(f"stages.0.blocks.{i}.gamma"), (0,))).id == g.id
    assert set(detail_rows(c, g).values()) == {"0..95"}


def test_convnext_tiny_layer_scale_listed_as_op():
    g = group_of_writer(coupling("convnext_tiny"), "stem.0")
    assert "stages.0.blocks.0.gamma" in g.ops


# --- vit_small_patch16_224 -------------------------------------------------------------------
def test_vit_small_stream():
    c = coupling("vit_small_patch16_224")
    g = group_of_writer(c, "patch_embed.proj")
    assert g.channels == 384 and g.prunable
    expected = {"patch_embed.proj", "pos_embed"} | {f"blocks.{i}.{m}" for i in range(12) for m in ("attn.proj", "mlp.fc2")}
    assert expected <= set(g.writers)
    assert {f"blocks.{i}.{m}" for i in range(12) for m in ("attn.qkv", "mlp.fc1")} | {"head"} <= set(g.readers)
    assert {f"blocks.{i}.{m}" for i in range(12) for m in ("norm1", "norm2")} | {"norm"} <= set(g.ops)
    # the class token's channels are the stream's channels
    assert c.group_of(Ref(ParamKey("cls_token"), (2,))).id == g.id
    assert c.group_of(Ref(ParamKey("pos_embed"), (2,))).id == g.id
    assert set(detail_rows(c, g).values()) == {"0..383"}


def test_vit_small_cls_token_is_writer():
    assert "cls_token" in group_of_writer(coupling("vit_small_patch16_224"), "patch_embed.proj").writers


# --- densenet121 -----------------------------------------------------------------------------
def test_densenet121_concat_offsets():
    c = coupling("densenet121")
    g = group_of_writer(c, "features.conv0")
    assert g.channels == 256 and g.prunable
    rows = detail_rows(c, g)
    block = "features.denseblock1.denselayer"
    expected = {"writer features.conv0": "0..63", "op features.norm0": "0..63"}
    for k in range(1, 7):
        start = 64 + 32 * (k - 1)
        expected[f"writer {block}{k}.conv2"] = f"{start}..{start + 31}"
        expected[f"reader {block}{k}.conv1"] = f"0..{start - 1}"  # all earlier features
        expected[f"op {block}{k}.norm1"] = f"0..{start - 1}"
    expected["reader features.transition1.conv"] = "0..255"
    expected["op features.transition1.norm"] = "0..255"
    assert rows == expected
    nxt = detail_rows(c, group_of_writer(c, "features.transition1.conv"))
    assert nxt["writer features.transition1.conv"] == "0..127"
    assert nxt["writer features.denseblock2.denselayer12.conv2"] == "480..511"


def test_densenet121_golden():
    check_golden("densenet121_denseblock1.txt", golden_text("densenet121", ["features.denseblock1", "features.transition1"]))


# --- mobilenetv3_large_100 -------------------------------------------------------------------
def test_mobilenetv3_squeeze_excite():
    c = coupling("mobilenetv3_large_100")
    g = group_of_writer(c, "blocks.2.0.conv_pw")
    assert g.channels == 72 and g.prunable
    assert g.writers == ("blocks.2.0.conv_pw", "blocks.2.0.se.conv_expand")  # the SE gate multiplies channel-wise
    assert g.readers == ("blocks.2.0.se.conv_reduce", "blocks.2.0.conv_pwl")
    assert g.ops == ("blocks.2.0.bn1", "blocks.2.0.conv_dw", "blocks.2.0.bn2")
    se = group_of_writer(c, "blocks.2.0.se.conv_reduce")
    assert (se.channels, se.readers) == (24, ("blocks.2.0.se.conv_expand",))


def test_mobilenetv3_golden():
    check_golden("mobilenetv3_large_100_blocks.2.0.txt", golden_text("mobilenetv3_large_100", ["blocks.2.0"]))


def test_mobilenetv3_head_shrinkable():
    c = coupling("mobilenetv3_large_100")
    assert group_of_writer(c, "conv_head").prunable
    assert group_of_writer(c, "classifier").fixed is None
