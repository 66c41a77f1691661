"""The benches' deployment and ablation helpers: the MNIST bench's compressed model (input
gather included) behind the normalization, torch.export-ed with a dynamic batch, loads back
and matches; the CIFAR scratch ablation rebuilds the compressed architecture."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn as nn

import srfx

BENCH = Path(__file__).resolve().parent.parent / "bench" / "squeeze_release_mnist.py"


def _cifar_bench():
    spec = importlib.util.spec_from_file_location("squeeze_release_cifar", BENCH.parent / "squeeze_release_cifar.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _bench():
    spec = importlib.util.spec_from_file_location("squeeze_release_mnist", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_export_pt2_dynamic_batch_matches(tmp_path):
    bench = _bench()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(784, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 10)).eval()
    with torch.no_grad():
        m[0].weight[:, :300] = 0  # dropped pixels: the compressed model gathers the rest
        m[0].weight[3] = 0
    small = srfx.compress(m, torch.randn(4, 784))
    assert any("gather" in n for n, _ in small.named_buffers())
    path = tmp_path / "model.pt2"
    bench.export_pt2(small, path)
    loaded = torch.export.load(str(path)).module()
    for n in (1, 3, 17):  # any batch size
        images = torch.rand(n, 1, 28, 28)
        with torch.no_grad():
            expected = m((images.flatten(1) - bench.MEAN) / bench.STD)
            got = loaded(images)
        assert got.shape == (n, 10)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_random_shift_moves_whole_images_by_at_most_the_given_pixels():
    bench = _bench()
    fill = -1.0
    x = torch.full((64, 28 * 28), fill)
    x[:, 14 * 28 + 14] = 5.0  # one bright pixel in the middle of every image
    out = bench.random_shift(2, fill=fill)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    rows, cols = (out.view(64, 28, 28) == 5.0).nonzero()[:, 1:].T
    assert len(rows) == 64  # the pixel survives once in every image, nothing else changes
    assert ((rows - 14).abs() <= 2).all() and ((cols - 14).abs() <= 2).all()
    assert len({(int(r), int(c)) for r, c in zip(rows, cols)}) > 10  # offsets really vary
    assert ((out == fill) | (out == 5.0)).all()
    edge = torch.zeros(1, 28, 28)
    edge[0, 0, :] = 5.0  # a top row shifted down leaves the fill behind
    moved = bench.random_shift(1, fill=fill)(edge.view(1, -1).repeat(32, 1), torch.Generator().manual_seed(1)).view(32, 28, 28)
    assert (moved == fill).any()


def test_cifar_scratch_rebuilds_the_compressed_convnext_and_counts_the_budget():
    """The scratch ablation's timm ConvNeXt has exactly the compressed model's parameter
    shapes (so the same stored size), freshly initialized; its epoch budget counts every
    recovery (rolled-back steps too) and fine-tuning up to the selected cycle."""
    import pytest

    timm = pytest.importorskip("timm")
    from srfx.group_pruning import group_masks
    from srfx.passes import apply_masks

    spec = importlib.util.spec_from_file_location("squeeze_release_cifar_scratch", BENCH.parent / "squeeze_release_cifar_scratch.py")
    scratch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scratch)
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    apply_masks(model, group_masks(model, x, 0.6))
    small = srfx.compress(model, x)
    shapes = {n: tuple(p.shape) for n, p in small.named_parameters()}
    assert shapes["stem.0.weight"][0] < 40 or shapes["stages.3.blocks.0.conv_dw.weight"][0] < 320
    fresh = scratch.narrow_convnext("convnext_atto", shapes)
    assert {n: tuple(p.shape) for n, p in fresh.named_parameters()} == shapes
    fc1 = fresh.stages[2].blocks[0].mlp.fc1
    assert fc1.bias.abs().sum() == 0 and 0.01 < float(fc1.weight.detach().std()) < 0.03  # timm's init, not the compressed weights
    assert fresh(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    history = [{"prune_steps": 3, "rollbacks": 1}, {"prune_steps": 1, "rollbacks": 2}, {"prune_steps": 5, "rollbacks": 0}]
    result = {"config": {"dense_epochs": 6, "recovery": 0.5, "finetune": [2, 3, 4]}, "history": history, "selected_cycle": 1}
    assert scratch.budget_epochs(result) == 6 + (4 * 0.5 + 2) + (3 * 0.5 + 3)
    result["config"]["finetune"] = [1]
    assert scratch.budget_epochs(result) == 6 + (2 + 1) + (1.5 + 1)


def _fake_cifar(folder: Path, n_train: int, n_test: int) -> None:
    """JPEG parts in the layout of ../shared/datasets/cifar10 (jpeg bytes, offsets, y): noise
    images whose mean brightness is their label, so a little training learns something."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, n in (("train_part00.npz", n_train), ("test_part00.npz", n_test)):
        y = rng.integers(0, 10, n)
        blobs = []
        for label in y:
            img = np.clip(rng.normal(20 + 22 * label, 10, (32, 32, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            blobs.append(buf.getvalue())
        offsets = np.cumsum([0] + [len(b) for b in blobs])
        np.savez(folder / name, jpeg=np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets=offsets, y=y)


def test_cifar_bench_runs_end_to_end_with_distillation(tmp_path, monkeypatch):
    """The CIFAR bench on a small fake dataset, one short cycle with distillation and its own
    learning rate: it writes the issue's JSON fields with the options it ran with, and a .pt2
    that loads, has the recorded parameter count and takes any batch of images in [0, 1]."""
    import json

    import pytest

    pytest.importorskip("timm")
    bench = _cifar_bench()
    data = tmp_path / "cifar10"
    data.mkdir()
    _fake_cifar(data, 5000 + 256, 200)  # the fixed split holds out 5,000 for validation
    (tmp_path / "bench" / "results").mkdir(parents=True)
    monkeypatch.setattr(bench, "ROOT", tmp_path)  # results go to tmp_path, not the repo
    argv = ["--data", str(data), "--dense-epochs", "1", "--cycles", "1", "--sparsity", "0.3", "--finetune", "0.25",
            "--recovery", "0.25", "--max-prune-steps", "1", "--prune-rate", "0.3", "--tolerance", "1.0",
            "--scores", "taylor", "--calibration", "64", "--distill", "0.5", "--cycle-lr", "1e-3",
            "--batch", "64", "--threads", "1", "--checkpoint", str(tmp_path / "cycle.ckpt"), "--out", "smoke"]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "bench" / "results" / "smoke.json").read_text())
    assert (tmp_path / "cycle.ckpt").exists() and result["config"]["checkpoint"] == str(tmp_path / "cycle.ckpt")
    assert bench.main(argv) == 0  # a rerun resumes from the finished cycle's checkpoint: the same result
    again = json.loads((tmp_path / "bench" / "results" / "smoke.json").read_text())
    assert (again["stored"], again["accuracy"], again["history"][0]["prune_steps"]) == (result["stored"], result["accuracy"], result["history"][0]["prune_steps"])
    for field in ("dataset", "model", "method", "dense_params", "params", "nnz", "ratio", "dense_accuracy", "accuracy", "seconds"):
        assert field in result
    assert result["config"]["distill"] == 0.5 and result["config"]["cycle_lr"] == 1e-3
    assert result["params"] < result["dense_params"] and result["ratio"] == pytest.approx(result["dense_params"] / result["stored"])
    program = torch.export.load(str(tmp_path / "bench" / "results" / "smoke.pt2"))
    assert sum(p.numel() for p in program.parameters()) == result["params"]
    assert program.module()(torch.rand(3, 3, 32, 32)).shape == (3, 10)


class _Interrupted(Exception):
    pass


def test_cifar_dense_training_resumes_from_its_checkpoint_bit_for_bit(tmp_path):
    """Dense training killed in its third epoch and rerun with the same checkpoint ends with
    exactly the weights of an uninterrupted run (model, AdamW, one-cycle schedule, dropout RNG
    and data order all restored); a checkpoint written for other training is refused."""
    import numpy as np
    import pytest

    bench = _cifar_bench()
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (96, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 96)

    def fresh():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))

    def loader():
        return bench._loader(x, y, 32, True, True, seed=0)

    reference = bench.train_dense(fresh(), loader(), 4, 1e-2)

    class Killed:  # a loader that dies in its third pass, as a process killed mid-epoch
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        @property
        def epoch(self):
            return self.inner.epoch

        @epoch.setter
        def epoch(self, value):
            self.inner.epoch = value

        def __iter__(self):
            for i, batch in enumerate(self.inner):
                if self.inner.epoch == 3 and i == 1:
                    raise _Interrupted
                yield batch

    checkpoint = tmp_path / "dense.partial"
    key = {"model": "tiny"}
    with pytest.raises(_Interrupted):
        bench.train_dense(fresh(), Killed(loader()), 4, 1e-2, checkpoint=checkpoint, key=key)
    assert torch.load(checkpoint, weights_only=False)["done"] == 2 * 3  # two finished epochs of 3 batches
    torch.manual_seed(123)  # whatever the process did before the rerun
    resumed = bench.train_dense(fresh(), loader(), 4, 1e-2, checkpoint=checkpoint, key=key)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(SystemExit, match="other training"):
        bench.train_dense(fresh(), loader(), 5, 1e-2, checkpoint=checkpoint, key=key)


def test_cifar_cycle_seed_changes_the_data_order_only_from_where_it_is_set():
    """--cycle-seed reseeds the training loader in place: passes before it are the --seed
    run's, passes after it follow an order no --seed run's epochs reach."""
    import numpy as np

    bench = _cifar_bench()
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), np.arange(40)
    a, b = bench._loader(x, y, 40, True, True, seed=0), bench._loader(x, y, 40, True, True, seed=0)
    assert torch.equal(next(iter(a))[1], next(iter(b))[1])  # the same dense pass
    b.seed = bench.CYCLE_SEED_STREAM * 2  # what --cycle-seed 1 sets after dense training
    orders = {tuple(next(iter(a))[1].tolist()), tuple(next(iter(b))[1].tolist())}
    assert len(orders) == 2 and a.epoch == b.epoch == 2


def test_cifar_bench_one_minimize_at_the_end_spends_the_given_budget(tmp_path, monkeypatch):
    """--cycles 1 --budget-epochs E (the one-minimize ablation): the cycle's training, rolled-back
    steps included, and the final fine-tuning add up to E epochs of optimizer steps; the
    reported model is the fine-tuned last one, and --target-params stops pruning at that size."""
    import json

    import pytest

    pytest.importorskip("timm")
    bench = _cifar_bench()
    data = tmp_path / "cifar10"
    data.mkdir()
    _fake_cifar(data, 5000 + 256, 200)
    (tmp_path / "bench" / "results").mkdir(parents=True)
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    spent = []
    real_spend = bench.spend_budget

    def spy(driver, budget_epochs, batches_per_epoch):
        before = driver.loop.steps
        small, info = real_spend(driver, budget_epochs, batches_per_epoch)
        spent.append((before, driver.loop.steps, batches_per_epoch))
        return small, info

    monkeypatch.setattr(bench, "spend_budget", spy)
    dense_params = 3_377_730  # convnext_atto, 10 classes
    target = dense_params // 2
    argv = ["--data", str(data), "--dense-epochs", "0.25", "--cycles", "1", "--sparsity", "0.9", "--finetune", "0",
            "--recovery", "0.25", "--max-prune-steps", "4", "--prune-rate", "0.3", "--min-rate", "0.3", "--tolerance", "1.0",
            "--target-params", str(target), "--budget-epochs", "1.5", "--batch", "64", "--threads", "1", "--out", "oneshot"]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "bench" / "results" / "oneshot.json").read_text())
    before, after, per_epoch = spent[0]
    assert after == pytest.approx(1.5 * per_epoch, abs=1)  # the whole budget, no more
    assert result["cycle_epochs"] == pytest.approx(before / per_epoch) and result["extra_epochs"] > 0
    assert result["method"] == "group pruning, one minimize at the end"
    assert result["stored"] <= target and result["dense_params"] == dense_params
    assert result["curve"][-1]["cycle"] == "last + budget" and result["curve"][-1]["test_accuracy"] == result["accuracy"]
