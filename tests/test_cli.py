"""The ``srfx`` command and what it writes: torch.export programs, ONNX run in onnxruntime,
torch.save; checkpoints loaded with weights_only=True and clear errors for bad files."""
import subprocess
import sys

import pytest
import torch

from srfx.cli import main
from helpers import assert_close, kill_channels
from architectures import ResidualCNN

SPEC = "tests.architectures:ResidualCNN"
SHAPE = "2,3,8,8"


@pytest.fixture()
def checkpoint(tmp_path):
    model = kill_channels(ResidualCNN(), rate=0.4, seed=7).eval()
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return model, str(path)


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("suffix", [".pt2", ".onnx", ".pt"])
def test_compress_writes_a_model_that_matches(tmp_path, checkpoint, capsys, suffix):
    model, ckpt = checkpoint
    out = str(tmp_path / f"small{suffix}")
    code, text, err = _run(["compress", SPEC, "--input-shape", SHAPE, "--checkpoint", ckpt, "--out", out], capsys)
    assert code == 0, err
    assert "stored (params + float buffers)" in text and f"wrote {out}" in text
    x = torch.randn(5, 3, 8, 8)  # another batch size: the batch dimension is dynamic
    with torch.no_grad():
        expected = model(x)
        if suffix == ".pt2":
            actual = torch.export.load(out).module()(x)
        elif suffix == ".pt":
            actual = torch.load(out, weights_only=False)(x)
        else:
            import onnxruntime as ort

            session = ort.InferenceSession(out)
            actual = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert_close(expected, actual)


def test_missing_checkpoint(capsys):
    code, _, err = _run(["compress", SPEC, "--input-shape", SHAPE, "--checkpoint", "/no/such/file.pt"], capsys)
    assert code == 2 and "no such file" in err


def test_garbage_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    code, _, err = _run(["compress", SPEC, "--input-shape", SHAPE, "--checkpoint", str(bad)], capsys)
    assert code == 2 and "weights_only=True" in err


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil()}, path)
    code, out, err = _run(["compress", SPEC, "--input-shape", SHAPE, "--checkpoint", str(path)], capsys)
    assert code == 2 and "this must never run" not in out


def test_checkpoint_for_another_model(tmp_path, capsys):
    path = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 3).state_dict(), path)
    code, _, err = _run(["compress", SPEC, "--input-shape", SHAPE, "--checkpoint", str(path)], capsys)
    assert code == 2 and "does not match" in err


def test_named_things_that_are_wrong_are_messages_with_exit_2(tmp_path, capsys, checkpoint):
    """Each of these was a traceback once (or, for --out, came only after the whole compress)."""
    model, _ = checkpoint
    state = model.state_dict()
    state["fc.weight"] = torch.zeros(3, 5)  # a checkpoint of a model with another width
    wrong_shape = tmp_path / "wrong_shape.pt"
    torch.save(state, wrong_shape)
    tiny = tmp_path / "tiny.pt"
    tiny.write_bytes(b"PK\x03")
    cases = [
        (["--checkpoint", str(wrong_shape)], "fc.weight: file (3, 5)"),
        (["--checkpoint", str(tiny)], "weights_only=True"),
        (["--out", str(tmp_path / "no" / "such" / "dir" / "a.pt2")], "no directory"),
        (["--input-shape", "2,x,8"], "--input-shape 2,x,8"),
    ]
    for extra, message in cases:
        argv = ["compress", SPEC, "--input-shape", SHAPE] + extra if "--input-shape" not in extra else ["compress", SPEC] + extra
        code, out, err = _run(argv, capsys)
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)
        assert "wrote" not in out
    code, _, err = _run(["compress", "timm:no_such_model_xyz"], capsys)
    assert code == 2 and "cannot load timm:no_such_model_xyz" in err
    with pytest.raises(SystemExit) as exit_:
        main(["compress", SPEC, "--input-shape", SHAPE, "--sparsity", "1.5"])
    assert exit_.value.code == 2 and "[0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--cycles", "0"])


def test_unknown_output_format(capsys, tmp_path):
    code, _, err = _run(["compress", SPEC, "--input-shape", SHAPE, "--out", str(tmp_path / "x.bin")], capsys)
    assert code == 2 and ".pt2" in err


def test_groups_subcommand_and_console_script():
    proc = subprocess.run(
        [sys.executable, "-m", "srfx", "groups", SPEC, "--input-shape", "1,3,8,8", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.lstrip().startswith("[")


def test_demo_quick_prints_the_cycle_table(capsys):
    pytest.importorskip("sklearn")
    main(["demo", "--quick", "--cycles", "2"])  # the command line reaches run_demo(quick=True)
    out = capsys.readouterr().out
    assert "dense MLP 64-128-64-10" in out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("cycle"))
    assert all(col in header for col in ("stored", "nnz", "MACs", "widths", "accuracy"))
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in ("1", "2")]
    assert len(rows) == 2
    stored = [int(r[2]) for r in rows]
    assert stored[1] <= stored[0] < 64 * 128 + 128 * 64 + 64 * 10 + 128 + 64 + 10  # it shrank, then did not grow
    assert "compressed: widths" in out


def test_groups_reports_a_factory_that_cannot_build_and_takes_instances(capsys):
    """`srfx groups` caught only four exception types from the factory (a TypeError was a
    traceback), and a module instance was called as if it were a factory."""
    from srfx.groups_view import main as groups_main

    code = groups_main(["tests.models_for_tools:needs_an_argument", "--input-shape", "1,4"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot load" in err and "TypeError" in err
    code = groups_main(["tests.models_for_tools:an_instance", "--input-shape", "1,4"])
    assert code == 0 and "groups" in capsys.readouterr().out
    code, _, err = _run(["compress", "tests.models_for_tools:an_instance", "--input-shape", "1,4"], capsys)
    assert code == 0, err
