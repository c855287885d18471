"""A tiny classification problem run through every door on the same global batches."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from lightning_reweight import reduce_loss

N, D, C, BATCH = 24, 5, 3, 8  # 3 global batches per epoch


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)


def global_batches(epochs: int = 2) -> list[torch.Tensor]:
    """The global index batches of every step (a fixed order: epoch e visits a fixed permutation)."""
    out = []
    for e in range(epochs):
        order = torch.randperm(N, generator=torch.Generator().manual_seed(100 + e))
        out += [order[i:i + BATCH] for i in range(0, N, BATCH)]
    return out


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(D, C)
        self.x, self.y = data()

    def forward(self, x):
        return self.net(x)

    def per_sample(self, index):
        return F.cross_entropy(self(self.x[index]), self.y[index], reduction="none")

    def training_step(self, batch, batch_idx):
        (index,) = batch
        return reduce_loss(self, self.per_sample(index), index, **step_extras(self, index))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class FixedBatches(torch.utils.data.Dataset):
    """One item per step: this rank's share ``global[rank::world]`` of that step's global batch."""

    def __init__(self, batches, rank=0, world=1):
        self.batches = [b[rank::world] for b in batches]

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return (self.batches[i],)


def collate(items):
    return items[0]


def step_extras(model, index):
    """What every callback may read: group ids (class 0 vs the rest) and a consistency loss (AdaWAC)."""
    x, y = data()
    logits = model(x[index])
    return {"group": (y[index] == 0).long(), "target": y[index],
            "consistency": (logits - logits.roll(1, 0)).pow(2).mean(1)}


def train_on_shards(reweighter, model: nn.Module, rank: int = 0, world: int = 1, epochs: int = 2) -> None:
    """SGD (lr 0.5) through ``reweighter`` over ``global_batches(epochs)``, this rank on its rows
    ``index[rank::world]``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = data()
    for index in global_batches(epochs):
        local = index[rank::world]
        reweighter.reduce(F.cross_entropy(model(x[local]), y[local], reduction="none"), local).backward()
        optimizer.step()
        optimizer.zero_grad()


def spawn_gloo(fn: Callable[[int, int, Path], None], out: Path, world: int = 2) -> None:
    """Run ``fn(rank, world, out)`` in ``world`` CPU processes joined by a gloo process group (a free local port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_worker, args=(fn, world, port, out), nprocs=world)


def _gloo_worker(rank: int, fn: Callable[[int, int, Path], None], world: int, port: int, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, out)
        dist.barrier()  # no rank tears the group down while another still has a collective in flight
    finally:
        dist.destroy_process_group()
