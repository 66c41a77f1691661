"""tools/show_groups.py on small models: formatting helpers, JSON, CLI (in process and as a script)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import srfx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import show_groups as sg  # noqa: E402

import models_for_tools as mft  # noqa: E402  (tests/ is on sys.path via conftest)

JSON_KEYS = {"id", "channels", "writers", "readers", "ops", "prunable", "reason"}


@lru_cache(maxsize=None)
def tiny():
    return sg.analyze(mft.tiny_cnn(), (1, 3, 8, 8))


@lru_cache(maxsize=None)
def chain():
    return sg.analyze(mft.residual_chain(), (1, 3, 4, 4))


def group_with_writer(coupling, owner):
    return next(g for g in coupling.groups if owner in g.writers)


# --- helpers ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ids, text",
    [([], ""), ([4], "4"), ([0, 1, 2, 3], "0..3"), ([0, 1, 2, 5, 7, 8], "0..2,5,7..8"), ([3, 2, 1], "3,2,1"), ([0, 0, 1, 1], "0,0..1,1")],
)
def test_format_slices(ids, text):
    assert sg.format_slices(ids) == text


def test_parse_shape():
    assert sg.parse_shape("1,3,224,224") == (1, 3, 224, 224)
    assert sg.parse_shape(" 2, 3 ,8,8 ") == (2, 3, 8, 8)
    assert sg.parse_shape("1x3x32x32") == (1, 3, 32, 32)
    for bad in ["", "a,b", "1,0,3", "1,-3", "1,x", "1,,3"]:
        with pytest.raises(ValueError):
            sg.parse_shape(bad)


def test_load_model_callable():
    model, shape = sg.load_model("models_for_tools:tiny_cnn")
    assert isinstance(model, mft.TinyCNN) and not model.training and shape is None
    model, _ = sg.load_model("models_for_tools:TinyCNN")  # a class is a callable too
    assert isinstance(model, mft.TinyCNN)
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        sg.load_model("models_for_tools:not_a_module")
    with pytest.raises(ValueError, match="neither"):
        sg.load_model("models_for_tools")


# --- groups ----------------------------------------------------------------------------------
def test_groups_json_keys_and_names():
    c = tiny()
    groups = json.loads(json.dumps(sg.groups_json(c)))
    assert groups and all(JSON_KEYS <= set(g) for g in groups)
    model = mft.tiny_cnn()
    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    for g in groups:
        assert isinstance(g["id"], int) and isinstance(g["channels"], int) and isinstance(g["prunable"], bool)
        assert g["prunable"] == (g["reason"] is None)
        assert set(g["writers"]) | set(g["readers"]) | set(g["ops"]) <= names
    by_writer = {w: g for g in groups for w in g["writers"]}
    assert by_writer["stem.0"]["writers"] == ["stem.0", "block.3"]  # residual stream
    assert by_writer["stem.0"]["readers"] == ["block.0", "a", "b.0"]
    assert by_writer["a"] is by_writer["b.0"] and by_writer["a"]["channels"] == 10  # concat
    assert by_writer["a"]["ops"] == ["b.1"] and by_writer["a"]["readers"] == ["mix"]
    inp = next(g for g in groups if g["readers"] == ["stem.0"])
    assert inp["channels"] == 3 and not inp["prunable"] and "not traced" in inp["reason"]


def test_hidden_groups_and_all():
    c = tiny()
    shown = sg.groups_json(c)
    every = sg.groups_json(c, show_all=True)
    assert len(every) == len(c.groups) == len(shown) + 1
    hidden = [g for g in every if g not in shown]
    assert hidden[0]["ops"] == ["offset"] and not hidden[0]["writers"] and not hidden[0]["readers"]
    assert "1 group without writers or readers not shown" in sg.summary(c)
    assert "not shown" not in sg.summary(c, show_all=True)


def test_rows_abbreviate_but_json_does_not():
    c = chain()
    g = group_with_writer(c, "stem")
    assert len(g.writers) == 9 and len(g.readers) == 9
    row = next(r for r in sg.group_rows(c) if r[0] == g.id)
    assert row[2].split("\n") == ["stem", "convs.0", "convs.1", "… 6 more"]
    assert row[3].split("\n") == ["convs.0", "convs.1", "convs.2", "… 6 more"]
    full = next(j for j in sg.groups_json(c) if j["id"] == g.id)
    assert full["writers"] == ["stem"] + [f"convs.{i}" for i in range(8)]
    assert full["readers"] == [f"convs.{i}" for i in range(8)] + ["out"]


def test_table_and_summary():
    c = tiny()
    text = sg.render_table(c)
    for header in sg.HEADERS:
        assert header in text
    last = text.splitlines()[-1]
    shown = sg.visible_groups(c)
    n_shrink = sum(g.prunable for g in shown)
    chans = sum(g.channels for g in shown if g.prunable)
    assert last.startswith(f"{len(shown)} groups, {n_shrink} shrinkable, {chans} channels in shrinkable groups; barriers: none")
    assert "no: axis (1,) of x is not traced" in text
    assert "kept: model output" in text


def test_summary_lists_barriers():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(torch.special.erfcx(self.a(x)))  # no channel rule for erfcx

    c = sg.analyze(Opaque(), (1, 3, 4, 4))
    assert c.barriers, "erfcx is expected to be a barrier; pick another op if srfx learned it"
    line = sg.summary(c)
    node = next(iter(c.barriers))
    assert f"barriers: {node} (" in line
    assert any(r[5].startswith("no: ") for r in sg.group_rows(c) if "a" in r[2].split("\n"))


def test_mixed_reasons_shown():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    c = sg.analyze(model, (2, 4))
    g = group_with_writer(c, "0")
    assert g.mixed
    row = next(r for r in sg.group_rows(c) if r[0] == g.id)
    assert row[5].startswith("yes\nmixed: ") and g.mixed[0] in row[5]
    assert next(j for j in sg.groups_json(c) if j["id"] == g.id)["mixed"] == list(g.mixed)


def test_detail_shows_concat_offsets():
    text = sg.render_detail(tiny(), ["a", "b"])
    cat = text.split("\n\n")[-1].splitlines()
    assert cat[0].startswith("group ") and "10 channels, shrinkable: yes" in cat[0]
    rows = [line.split() for line in cat[2:]]
    assert rows == [["writer", "a", "0..5"], ["writer", "b.0", "6..9"], ["reader", "mix", "0..9"], ["op", "b.1", "6..9"]]
    assert sg.render_detail(tiny(), ["nothing.here"]).startswith("no group")
    # prefixes are whole name components: "b" does not select block.0's group
    inner = group_with_writer(tiny(), "block.0")
    assert f"group {inner.id}:" not in sg.render_detail(tiny(), ["b"])
    assert f"group {inner.id}:" in sg.render_detail(tiny(), ["block"])


# --- forward with defaulted arguments --------------------------------------------------------
def test_defaulted_forward_args_are_bound():
    model = mft.defaulted_forward()
    c = sg.analyze(model, (1, 3, 4, 4))
    assert [g["writers"] for g in sg.groups_json(c)] == [["conv"], [], ["out"]]
    assert type(model) is mft.DefaultedForward  # the caller's instance is untouched


def test_srfx_accepts_defaulted_forward_args():
    srfx.analyze(mft.defaulted_forward(), torch.randn(1, 3, 4, 4))


# --- command line ----------------------------------------------------------------------------
def test_main_json(capsys):
    assert sg.main(["models_for_tools:tiny_cnn", "--input-shape", "1,3,8,8", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)
    assert all(JSON_KEYS <= set(g) for g in groups) and len(groups) == 6


def test_main_table_all_detail(capsys):
    assert sg.main(["models_for_tools:tiny_cnn", "--input-shape", "1,3,8,8", "--all"]) == 0
    out = capsys.readouterr().out
    assert "offset" in out and out.rstrip().splitlines()[-1].startswith("7 groups")
    assert sg.main(["models_for_tools:tiny_cnn", "--input-shape", "1,3,8,8", "--detail", "mix"]) == 0
    assert "writer mix" in " ".join(capsys.readouterr().out.split())


def test_main_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        sg.main(["models_for_tools:tiny_cnn"])  # no default shape for a callable
    assert exc.value.code == 2 and "--input-shape is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sg.main(["models_for_tools:tiny_cnn", "--input-shape", "1,x"])
    with pytest.raises(SystemExit):
        sg.main(["models_for_tools:tiny_cnn", "--input-shape", "1,3,8,8", "--json", "--detail", "a"])
    assert sg.main(["no_such_module_xyz:f", "--input-shape", "1,3"]) == 2
    assert "cannot load" in capsys.readouterr().err
    assert sg.main(["models_for_tools:tiny_cnn", "--input-shape", "1,5,8,8"]) == 1  # srfx InputError
    assert "srfx could not analyze" in capsys.readouterr().err


def test_script_from_repo_root():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "tools/show_groups.py", "tests.models_for_tools:tiny_cnn", "--input-shape", "1,3,8,8", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    groups = json.loads(proc.stdout)
    assert {"stem.0", "block.3"} <= {w for g in groups for w in g["writers"]}
