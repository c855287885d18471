"""2-process CPU DDP run of ImportanceSampling, then of GroupBalancing (upsample, Cooldown switching inside an
epoch); each rank saves its score table, the distributions it installed, the global draws and the indices it
trained on.

Usage: python importance_sampling_ddp.py OUT_DIR
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight import IndexedDataset, reduce_loss
from lightning_reweight.callbacks.balancing import GroupBalancing
from lightning_reweight.callbacks.importance import ImportanceSampling

N = 45  # odd: uneven shards


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 3)
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.seen.append((self.current_epoch, index.tolist()))
        z = self.net(x)
        losses = F.cross_entropy(z, y, reduction="none")
        proxy = (z.softmax(-1) - F.one_hot(y, 3).float()).norm(dim=-1)
        return reduce_loss(self, losses, index, target=y, grad_norm_proxy=proxy)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Snap(ImportanceSampling):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.snapshots = []

    def on_train_epoch_end(self, trainer, pl_module):
        super().on_train_epoch_end(trainer, pl_module)
        self.snapshots.append(self.sampler.pending_probabilities().clone())


if __name__ == "__main__":
    out = Path(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    ds = IndexedDataset(TensorDataset(torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)))
    cb = Snap(reset_scores=False, seed=3)  # keep the table so its final state is compared
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, callbacks=[cb], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False)
    model = Tiny()
    trainer.fit(model, DataLoader(ds, batch_size=4, shuffle=True))
    sampler = cb.sampler
    # the global draw of each epoch from the distribution that epoch used
    globals_ = []
    weights = [torch.full((N,), 1.0 / N, dtype=torch.float64)] + cb.snapshots[:-1]
    for epoch, w in enumerate(weights):
        sampler.set_weights(w)
        globals_.append(sampler.global_indices(epoch))

    # GroupBalancing: same global draw on both ranks, disjoint shards, tau switch at step 9 of 18
    labels = torch.tensor([0] * 30 + [1] * 10 + [2] * 5)
    balanced = IndexedDataset(TensorDataset(torch.randn(N, 4, generator=g), labels), targets=labels)
    gb = GroupBalancing(mode="upsample", schedule="cooldown", tau_start=float("inf"), unit="step", seed=5)
    t2 = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, callbacks=[gb], logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    use_distributed_sampler=False)
    model2 = Tiny()
    t2.fit(model2, DataLoader(balanced, batch_size=4, shuffle=True))
    balance = {"seen": model2.seen, "globals": [gb.sampler.global_indices(e) for e in range(3)],
               "len": len(gb.sampler), "total_steps": gb.sampler.total_steps,
               "batch_size": gb.sampler.batch_size}

    torch.save({"balance": balance, "rank": trainer.global_rank, "table": {k: cb.table[k].clone() for k in ("is_score", "is_seen", "count")},
                "snapshots": cb.snapshots, "globals": globals_, "seen": model.seen}, out / f"rank{trainer.global_rank}.pt")
