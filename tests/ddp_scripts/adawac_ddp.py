"""2-process CPU DDP run of AdaWAC; each rank saves its table, its local per-step rows and the weights.

Usage: python adawac_ddp.py OUT_DIR
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight import IndexedDataset, reduce_loss
from lightning_reweight.callbacks.adawac import AdaWAC

N = 21  # uneven shards (11 + 10 before padding)


class TinyPair(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 1)
        self.records = []

    def training_step(self, batch, batch_idx):
        x, x2, y, index = batch
        p1, p2 = self.net(x).squeeze(1), self.net(x2).squeeze(1)
        sup, cons = (p1 - y) ** 2, (p1 - p2) ** 2
        self.records.append(dict(index=index.clone(), sup=sup.detach().float().clone(), cons=cons.detach().float().clone()))
        return reduce_loss(self, sup, index, consistency=cons, sparse=index % 2 == 0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 4, generator=g)
    ds = IndexedDataset(TensorDataset(x, x + 0.3 * torch.randn(N, 4, generator=g), torch.randn(N, generator=g)))
    cb = AdaWAC(eta=2.0, log_every_n_steps=1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, callbacks=[cb], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    model = TinyPair()
    trainer.fit(model, DataLoader(ds, batch_size=4, shuffle=True))
    torch.save({"table": {k: v.clone() for k, v in cb.table.columns.items()}, "records": model.records, "n": N,
                "weight": model.net.weight.detach()}, out / f"rank{trainer.global_rank}.pt")
