"""The README's Python examples run as printed, and the outputs their comments promise hold.

Each ```python block of README.md is executed. Blocks that use names the README leaves to the
reader (``model``, ``x``, ``opt``, loaders) get them from a small prelude here: a pruned MLP and
its data, the smallest thing that makes the block mean what the README says. Claims written in
a block's comments (a ratio, a layer width) are read from the README itself and checked against
what the block printed, so a README edit that changes a claim changes the test with it.
"""
from __future__ import annotations

import contextlib
import io
import linecache
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import kill_channels

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _block(marker: str) -> str:
    """The one README block containing ``marker`` (an error if it went missing or is ambiguous)."""
    found = [b for b in _python_blocks() if marker in b]
    assert len(found) == 1, f"README: {len(found)} python blocks contain {marker!r}"
    return found[0]


def _run(code: str, namespace: dict | None = None) -> tuple[dict, str]:
    """Run a README block under a name of its own that linecache knows: tracebacks show the
    block's lines, and code that reads a function's source (dynamo tokenizes the whole file a
    frame comes from) reads the block, not README.md, which is no Python."""
    ns = dict(namespace or {})
    out = io.StringIO()
    text = README.read_text()
    name = f"<README.md block at line {text[: text.index(code)].count(chr(10)) + 1}>"
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    with contextlib.redirect_stdout(out):
        exec(compile(code, name, "exec"), ns)
    return ns, out.getvalue()


def _pruned_mlp(seed: int = 0) -> nn.Module:
    """784-300-100-10 with a third of each layer's units dead."""
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    return kill_channels(model, rate=1 / 3, seed=seed, columns=False).eval()


def test_every_python_block_is_covered_here():
    """A new README example needs a test below; this names the one that has none."""
    markers = ["timm.create_model(\"resnet50\"", "backend=\"srfx\"", "transformers.BertConfig",
               "carry_optimizer_state", "vit_small_patch16_224", "SqueezeRelease.supervised"]
    for block in _python_blocks():
        assert any(m in block for m in markers), f"README python block without a test in tests/test_readme.py:\n{block}"


def test_compress_and_plan_example():
    ns, printed = _run(_block('timm.create_model("resnet50"'))
    assert isinstance(ns["small"], torch.fx.GraphModule)
    assert "verified" in printed


def test_compile_backend_example():
    model, x = _pruned_mlp(), torch.randn(4, 784)
    torch._dynamo.reset()
    try:
        ns, printed = _run(_block('backend="srfx"'), {"model": model, "x": x})
    finally:
        torch._dynamo.reset()
    assert torch.allclose(ns["y"], model(x), rtol=1e-5, atol=1e-6)
    record = ns["backend"].records[-1]
    assert "minimized" in printed and str(record) in printed
    # the comment's "parameters 266610 -> N": the dense count is the model's, and it shrank
    claimed_before = int(re.search(r"parameters (\d+) ->", _block('backend="srfx"')).group(1))
    assert sum(p.numel() for p in model.parameters()) == claimed_before
    after = int(re.search(r"parameters \d+ -> (\d+)", printed).group(1))
    assert after < claimed_before


def test_huggingface_example():
    pytest.importorskip("transformers")
    torch._dynamo.reset()
    try:
        ns, printed = _run(_block("transformers.BertConfig"))
    finally:
        torch._dynamo.reset()
    assert str(ns["backend"].records[-1]) in printed


def test_optimizer_state_example():
    model, x = _pruned_mlp(), torch.randn(8, 784)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(x).square().mean().backward()
    opt.step()
    ns, _ = _run(_block("carry_optimizer_state"), {"torch": torch, "srfx": __import__("srfx"), "model": model, "x": x, "opt": opt})
    small, new_opt = ns["small"], ns["new_opt"]
    assert small.get_submodule("0").out_features < 300
    first = new_opt.state[small.get_parameter("0.weight")]
    kept_rows = ns["kept"]["0.weight"][0]
    assert torch.equal(first["exp_avg"], opt.state[model[0].weight]["exp_avg"][kept_rows])


def test_layernorm_stream_example():
    code = _block("vit_small_patch16_224")
    ns, printed = _run(code)
    report_claim = re.search(r"# ([\d.]+x); (\d+) norms compensated", code)
    width_claim = re.search(r"Linear\(in_features=(\d+)", code)
    assert report_claim and width_claim, "the README's ViT example lost the claims this test checks"
    ratio, norms = report_claim.groups()
    assert ratio in printed and f"{norms} norms compensated" in printed, printed
    assert ns["small"].get_submodule("blocks.0.attn.qkv").in_features == int(width_claim.group(1))


def test_squeeze_release_example(tmp_path, monkeypatch):
    from srfx.cycle import TensorBatches

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(384, 16)
    y = teacher(x).argmax(1)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    prelude = {
        "model": model, "example": x[:4], "calibration": x[:128],
        "train_loader": TensorBatches(x[:256], y[:256], 64, True), "val_loader": TensorBatches(x[256:], y[256:], 128, False),
    }
    monkeypatch.chdir(tmp_path)  # the example writes its checkpoint to the working directory
    ns, printed = _run(_block("SqueezeRelease.supervised"), prelude)
    small, sr = ns["small"], ns["sr"]
    assert isinstance(small, torch.fx.GraphModule) and len(sr.history) >= 1
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert "cycle" in printed and (tmp_path / "sr.ckpt").is_file()
    cycle, best = ns["cycle"], ns["best"]
    assert 1 <= cycle <= len(sr.history) and isinstance(best, nn.Module)


def test_submodules_the_readme_names_resolve_after_import_srfx():
    """``import srfx`` then ``srfx.cycle...``, as the README writes it, in a fresh interpreter
    (in this process another test may already have imported the submodules)."""
    import subprocess
    import sys

    names = sorted(set(re.findall(r"`srfx\.([a-z_]+)\.[A-Za-z_]+", README.read_text())))
    assert {"cycle", "group_pruning", "verify"} <= set(names), names
    code = "import srfx\n" + "".join(f"srfx.{n}\n" for n in names)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
