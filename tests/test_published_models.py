"""The compressed models the README quotes are committed as ``bench/results/<name>.pt2``: each
loads with ``torch.export.load``, holds as many parameters as its JSON says, takes a dynamic
batch of images in [0, 1] in the dataset's natural shape, and, where the dataset is at
``$SRFX_DATASETS`` (default ``../shared/datasets``), scores the test accuracy its JSON records.

The accuracy is compared within 0.1 point: the bench measured it with the normalization outside
the exported module, so rounding may flip a handful of borderline images, not more."""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DATASETS = Path(os.environ.get("SRFX_DATASETS", ROOT.parent / "shared" / "datasets"))

# the rows the README reports as results (the headline and selected models of each table)
PUBLISHED = [
    "squeeze_release_mnist_sr",
    "squeeze_release_mnist_shift1_sr",
    "squeeze_release_mnist_shift1_long_sr",
    "squeeze_release_mnist_min_rate_ft240_sr",
    "squeeze_release_cifar_convnext_atto_v5",
    "squeeze_release_cifar_convnext_atto_v6_dense37",
    "squeeze_release_cifar_convnext_atto_v7b_distill_lr",
    "squeeze_release_cifar_convnext_atto_v8_long_finetune",
    "squeeze_release_cifar_convnext_atto_v9_distill_lr_ft16",
    "squeeze_release_cifar_convnext_atto_v10_dense83",
    "squeeze_release_cifar_convnext_atto_v10_dense83_seed1",
    "squeeze_release_cifar_convnext_atto_v10_dense83_oneshot",
]

SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


@functools.cache
def _mnist_test(folder: Path):
    """The test images N x 1 x 28 x 28 in [0, 1] (what the .pt2 takes) and labels, read with
    the MNIST bench's own IDX reader."""
    sys.path.insert(0, str(ROOT / "bench"))
    from squeeze_release_mnist import FILES, _read_idx

    x = torch.from_numpy(_read_idx(folder / FILES["test_x"]).astype(np.float32) / 255).unsqueeze(1)
    return x, torch.from_numpy(_read_idx(folder / FILES["test_y"]).astype(np.int64))


@functools.cache
def _cifar_test(folder: Path):
    sys.path.insert(0, str(ROOT / "bench"))
    from squeeze_release_cifar import load_cifar10_test

    x, y = load_cifar10_test(folder)
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(y)


TEST_SETS = {"mnist": (_mnist_test, "t10k-images-idx3-ubyte.gz"), "cifar10": (_cifar_test, "test_part00.npz")}


@pytest.fixture(scope="module", params=PUBLISHED)
def published(request):
    name = request.param
    pt2 = RESULTS / f"{name}.pt2"
    assert pt2.is_file(), f"{pt2.name} is quoted in the README but not in bench/results"
    record = json.loads((RESULTS / f"{name}.json").read_text())
    return name, torch.export.load(str(pt2)), record


def test_published_model_has_the_recorded_size_and_a_dynamic_batch(published):
    name, program, record = published
    assert sum(p.numel() for p in program.parameters()) == record["params"], name
    module = program.module()
    for n in (1, 3):
        out = module(torch.rand(n, *SHAPES[record["dataset"]]))
        assert out.shape == (n, 10) and torch.isfinite(out).all()


def test_published_model_scores_the_recorded_test_accuracy(published):
    name, program, record = published
    load, probe = TEST_SETS[record["dataset"]]
    folder = DATASETS / record["dataset"]
    if not (folder / probe).is_file():
        pytest.skip(f"{folder / probe} not found (set SRFX_DATASETS to the folder holding mnist/ and cifar10/)")
    x, y = load(folder)
    module = program.module()
    with torch.no_grad():
        correct = sum(int((module(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum()) for i in range(0, len(x), 1000))
    assert abs(correct / len(y) - record["accuracy"]) <= 0.001, (name, correct / len(y), record["accuracy"])
