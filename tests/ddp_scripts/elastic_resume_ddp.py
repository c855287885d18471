"""Elastic resume: one CPU run per call on DEVICES processes, for four samplers in turn, optionally resumed.

Usage: python elastic_resume_ddp.py OUT_DIR DEVICES SAVE_STEPS [CKPT_ROOT STEP]

For each kind (``weighted`` = WeightedSampler + SamplerState + LossReweighting, ``rs2``, ``temperature`` =
GroupBalancing upsample with a step-unit Cooldown, ``importance`` = ImportanceSampling) it trains 4 epochs of
60 samples, batch 4 per rank, with a frozen model (lr = 0, so per-sample losses and hence the tables do not
depend on the order of the batches), writes a checkpoint after each step in SAVE_STEPS (comma-separated,
``OUT_DIR/<kind>/step=S.ckpt``)
and, with CKPT_ROOT, resumes from ``CKPT_ROOT/<kind>/step=STEP.ckpt``. Each rank saves what it trained on
(epoch, global step, indices), the LossReweighting table and the importance distribution to
``OUT_DIR/rank<r>.pt``.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Checkpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight import IndexedDataset, reduce_loss
from lightning_reweight.callbacks import GroupBalancing, ImportanceSampling, LossReweighting, SamplerState
from lightning_reweight.samplers import RS2Sampler, WeightedSampler

N, BATCH, EPOCHS = 60, 4, 4
KINDS = ("weighted", "rs2", "temperature", "importance")


def dataset():
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.zeros(40), torch.ones(15), torch.full((5,), 2.0)]).long()[torch.randperm(N, generator=g)]
    return IndexedDataset(TensorDataset(torch.randn(N, 3, generator=g), y), targets=y), g


class Recorder(pl.LightningModule):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.layer = torch.nn.Linear(3, 3)
        self.seen = []

    def train_dataloader(self):
        ds, g = dataset()
        if self.kind == "weighted":
            return DataLoader(ds, batch_size=BATCH, sampler=WeightedSampler(torch.rand(N, generator=g) + 0.1, seed=7))
        if self.kind == "rs2":
            return DataLoader(ds, batch_size=BATCH, sampler=RS2Sampler(N, fraction=1.0, seed=3))
        return DataLoader(ds, batch_size=BATCH, shuffle=True)  # the callback installs its sampler

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.seen.append((self.current_epoch, self.global_step, index.tolist()))
        losses = F.cross_entropy(self.layer(x), y, reduction="none")
        return reduce_loss(self, losses, index, target=y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class SaveAt(Checkpoint):
    """Save a checkpoint when the global step reaches one of ``steps`` (at a train batch end)."""

    def __init__(self, dirpath, steps):
        self.dirpath, self.steps = Path(dirpath), set(steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.steps:
            trainer.save_checkpoint(self.dirpath / f"step={trainer.global_step}.ckpt")


def callbacks(kind):
    if kind == "weighted":
        return [SamplerState(), LossReweighting(rule="linupper", warmup_steps=0, log_every_n_steps=0)]
    if kind == "rs2":
        return [SamplerState()]
    if kind == "temperature":
        return [GroupBalancing(mode="upsample", schedule="cooldown", unit="step", seed=5, log_every_n_steps=0)]
    return [ImportanceSampling(score="loss", seed=9, log_every_n_steps=0)]


if __name__ == "__main__":
    out, devices = Path(sys.argv[1]), int(sys.argv[2])
    save_steps = [int(s) for s in sys.argv[3].split(",") if s]
    ckpt_root, step = (Path(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) > 5 else (None, None)
    results, rank = {}, 0
    for kind in KINDS:
        pl.seed_everything(0)
        model, cbs = Recorder(kind), callbacks(kind)
        ckpt = SaveAt(out / kind, save_steps)
        trainer = pl.Trainer(default_root_dir=out, accelerator="cpu", devices=devices,
                             strategy="ddp" if devices > 1 else "auto", max_epochs=EPOCHS, logger=False,
                             use_distributed_sampler=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[*cbs, ckpt])
        path = str(ckpt_root / kind / f"step={step}.ckpt") if ckpt_root is not None else None
        trainer.fit(model, ckpt_path=path)
        rank = trainer.global_rank
        record = {"seen": model.seen, "world": trainer.world_size}
        for cb in cbs:
            if isinstance(cb, LossReweighting):
                record["table"] = {k: v.clone() for k, v in cb.table.columns.items()}
            if isinstance(cb, ImportanceSampling):
                record["probs"] = cb.sampler.pending_probabilities().clone()
                record["table"] = {k: v.clone() for k, v in cb.table.columns.items()}
        results[kind] = record
    torch.save(results, out / f"rank{rank}.pt")
