"""Squeeze-Release under torchrun + DistributedDataParallel (2 CPU ranks, gloo): same model on every rank."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("sklearn", reason="the DDP example trains on scikit-learn's digits")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp_squeeze_release.py"


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available")
def test_all_ranks_end_with_the_same_minimized_model(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLE), "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=EXAMPLE.parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["state_hash"] == ranks[1]["state_hash"]
    assert ranks[0]["accuracy"] == ranks[1]["accuracy"]
    assert ranks[0]["params_final"] < ranks[0]["params_dense"]  # really minimized
    assert ranks[0]["train_calls"] > 2  # the driver trained through DDP more than once
    outputs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(outputs[0], outputs[1])
