"""Squeeze-Release under DistributedDataParallel (CPU, gloo): every rank ends with the same model.

    torchrun --standalone --nproc_per_node 2 examples/ddp_squeeze_release.py [--out DIR]

Every rank runs the same :class:`srfx.cycle.SqueezeRelease` driver on the same model; only the
user's ``train`` callable is distributed. It wraps the model in ``DistributedDataParallel`` on
each call (the driver hands over a new, smaller module after every minimize/release, and DDP
binds to a module's parameters) and trains on this rank's shard of the data; DDP averages the
gradients, so the weights stay identical on all ranks. ``evaluate`` sums correct counts over
the ranks, so every rank sees the same accuracy and takes the same prune/rollback decisions;
magnitude masks, :func:`srfx.compress` and the seeded release are deterministic functions of
identical weights. Nothing in the driver needs to know about the process group.

With ``--out DIR`` each rank writes ``rank<r>.json`` (a hash of its final state_dict, sizes,
accuracy) and ``rank<r>.pt`` (its outputs on a fixed batch); ``tests/test_ddp.py`` checks that
they agree.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from srfx.cycle import Schedule, SqueezeRelease
from srfx.passes import apply_masks
from srfx.report import count_parameters


def digits():
    """scikit-learn's bundled 8x8 digits, split the same way on every rank."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.75 * len(y))
    return (x[perm[:cut]], y[perm[:cut]]), (x[perm[cut:]], y[perm[cut:]])


def state_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


class ShardedTraining:
    """The user's side: ``train(model, epochs, masks)`` under DDP, ``evaluate(model)`` over all ranks."""

    def __init__(self, train, val, *, batch_size=64, lr=1e-2, seed=0):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.x, self.y = train[0][self.rank::self.world], train[1][self.rank::self.world]  # this rank's shard
        self.val = (val[0][self.rank::self.world], val[1][self.rank::self.world])
        self.batch_size, self.lr = batch_size, lr
        self.generator = torch.Generator().manual_seed(seed + self.rank)
        self.calls = 0

    def train(self, model: nn.Module, epochs: float, masks=None) -> nn.Module:
        ddp = DDP(model)  # broadcasts rank 0's weights, then all-reduces gradients
        opt = torch.optim.Adam(ddp.parameters(), lr=self.lr)
        steps_per_epoch = -(-len(self.y) // self.batch_size)
        steps = max(1, round(epochs * steps_per_epoch))
        ddp.train()
        done = 0
        while done < steps:
            order = torch.randperm(len(self.y), generator=self.generator)
            for i in range(0, len(order), self.batch_size):
                if done >= steps:
                    break
                idx = order[i:i + self.batch_size]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(ddp(self.x[idx]), self.y[idx]).backward()
                opt.step()
                if masks:
                    apply_masks(model, masks)
                done += 1
        self.calls += 1
        return ddp.module.eval()

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        was = model.training
        model.eval()
        x, y = self.val
        counts = torch.tensor([float((model(x).argmax(1) == y).sum()), float(len(y))], dtype=torch.float64)
        dist.all_reduce(counts)  # same number on every rank: same decisions everywhere
        model.train(was)
        return float(counts[0] / counts[1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write rank<r>.json / rank<r>.pt here")
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.8)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial model everywhere (DDP would broadcast rank 0's anyway)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 48), nn.ReLU(), nn.Linear(48, 10))
    train, val = digits()
    loop = ShardedTraining(train, val)
    loop.train(model, 2.0)  # a dense start

    driver = SqueezeRelease(
        model, train[0][:8], loop.train, loop.evaluate,
        schedule=Schedule(
            cycles=args.cycles, target_sparsity=args.sparsity, prune_rate=0.5, tolerance=0.03,
            recovery_epochs=0.5, finetune_epochs=1.0, max_prune_steps=4,
        ),
        seed=0,
        log=print if rank == 0 else None,
    )
    small = driver.run()

    probe = val[0][:32]
    with torch.no_grad():
        outputs = small(probe)
    summary = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "state_hash": state_hash(small),
        "params_dense": count_parameters(model),
        "params_final": count_parameters(small),
        "accuracy": driver.history[-1].accuracy,
        "train_calls": loop.calls,
    }
    if rank == 0:
        print(driver.table())
        print(json.dumps({k: summary[k] for k in ("world_size", "params_dense", "params_final", "accuracy")}))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"rank{rank}.json").write_text(json.dumps(summary))
        torch.save(outputs, args.out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
