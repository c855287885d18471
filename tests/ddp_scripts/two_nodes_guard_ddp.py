"""Two "nodes" x one CPU process each (global rank != local rank on node 1), launched externally by the test.

Usage (once per node, with NODE_RANK, LOCAL_RANK=0, WORLD_SIZE=2, MASTER_ADDR, MASTER_PORT set):
    python two_nodes_guard_ddp.py OUT_DIR MODE      MODE = ok | seed | table

``ok``: WeightedSampler + SamplerState (cross-rank guard on) + LossReweighting for 2 epochs; each rank saves its
global and local rank, the planned global sequences and the indices it trained on. ``seed``: node 1 builds its
sampler with another seed; ``table``: node 1 corrupts one row of the LossReweighting table at the start of epoch
1. Both must be caught by the guard on every rank; each rank saves the error message.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight import IndexedDataset, reduce_loss
from lightning_reweight.callbacks import LossReweighting, SamplerState
from lightning_reweight.callbacks.consistency import RankConsistencyError
from lightning_reweight.samplers import WeightedSampler

N = 30


class Recorder(pl.LightningModule):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.net = torch.nn.Linear(3, 2)
        self.seen, self.sampler = [], None

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 2, (N,), generator=g)
        ds = IndexedDataset(TensorDataset(torch.randn(N, 3, generator=g), y), targets=y)
        seed = 1 if self.mode == "seed" and self.trainer.global_rank == 1 else 0
        self.sampler = WeightedSampler(torch.rand(N, generator=g) + 0.1, seed=seed)
        return DataLoader(ds, batch_size=3, sampler=self.sampler)

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.seen.append((self.current_epoch, index.tolist()))
        return reduce_loss(self, F.cross_entropy(self.net(x), y, reduction="none"), index, target=y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class CorruptTable(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1 and trainer.global_rank == 1:
            table = next(cb for cb in trainer.callbacks if isinstance(cb, LossReweighting)).table
            table.columns["ema_loss"][5] += 1.0


if __name__ == "__main__":
    out, mode = Path(sys.argv[1]), sys.argv[2]
    model = Recorder(mode)
    callbacks = [SamplerState(), LossReweighting(rule="linupper", warmup_steps=0, log_every_n_steps=0)]
    if mode == "table":
        callbacks.append(CorruptTable())
    trainer = pl.Trainer(accelerator="cpu", num_nodes=2, devices=1, strategy="ddp", max_epochs=2, logger=False,
                         use_distributed_sampler=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=out, callbacks=callbacks)
    error = ""
    try:
        trainer.fit(model)
    except RankConsistencyError as err:
        error = str(err)
    result = {"global_rank": trainer.global_rank, "local_rank": trainer.local_rank, "node_rank": trainer.node_rank,
              "sampler_rank": model.sampler.rank, "world": trainer.world_size, "seen": model.seen, "error": error,
              "globals": [model.sampler.global_indices(e) for e in range(2)]}
    torch.save(result, out / f"rank{trainer.global_rank}.pt")
