"""bench/plot_squeeze_release.py: which results it plots and against which dense accuracies."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

PLOT = Path(__file__).resolve().parent.parent / "bench" / "plot_squeeze_release.py"


def _plot(results: Path):
    spec = importlib.util.spec_from_file_location("plot_squeeze_release", PLOT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.RESULTS = results
    return mod


def _write(results: Path, name: str, **fields) -> None:
    (results / f"{name}.json").write_text(json.dumps({"dataset": "cifar10", "model": "convnext_atto", "config": {}, **fields}))


def test_named_runs_are_plotted_against_every_dense_baseline_they_name(tmp_path):
    pytest.importorskip("matplotlib")
    plot = _plot(tmp_path)
    curve = [{"ratio": 5.0, "test_accuracy": 0.70}, {"ratio": 15.6, "test_accuracy": 0.708}]
    _write(tmp_path, "cycle", method="cycle", ratio=15.6, accuracy=0.708, dense_accuracy=0.7122, curve=curve)
    _write(tmp_path, "dense_budget", method="dense, 83 epochs", ratio=1.0, accuracy=0.735, dense_accuracy=0.7122)
    runs = plot.load_runs(None, ["cycle", "dense_budget"])
    assert [r["method"] for r in runs] == ["cycle", "dense, 83 epochs"]
    assert plot.dense_references(runs) == [0.7122, 0.735]  # the cycle's own baseline and the longer-trained one
    assert plot.main(["--runs", "cycle", "dense_budget", "--out", "cifar.png"]) == 0
    assert (tmp_path / "cifar.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="missing.json"):
        plot.main(["--runs", "cycle", "missing", "--out", "x.png"])
    with pytest.raises(SystemExit, match="one label per"):
        plot.main(["--runs", "cycle", "dense_budget", "--labels", "only one", "--out", "x.png"])
