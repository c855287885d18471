"""2-process CPU DDP run of WeightedSampler + SamplerState; each rank saves the indices it trained on.

Runs: (1) 2 uninterrupted epochs; (2) 1.5 epochs with a mid-epoch checkpoint; (3) resume from it;
(4) ``use_distributed_sampler=True`` must raise. Usage: python weighted_sampler_ddp.py OUT_DIR
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight.callbacks.sampling import SamplerState
from lightning_reweight.data import IndexedDataset
from lightning_reweight.samplers import WeightedSampler

N = 45  # odd: the global draw is padded by one index


class Recorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.seen = []
        self.sampler = None

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        ds = IndexedDataset(TensorDataset(torch.randn(N, 2, generator=g)))
        self.sampler = WeightedSampler(torch.rand(N, generator=g) + 0.1, seed=11)  # ranks from torch.distributed
        return DataLoader(ds, batch_size=3, sampler=self.sampler)

    def training_step(self, batch, batch_idx):
        x, index = batch
        self.seen.append((self.current_epoch, index.tolist()))
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def trainer(root, **kw):
    kw.setdefault("use_distributed_sampler", False)
    kw.setdefault("callbacks", [SamplerState()])
    return pl.Trainer(default_root_dir=root, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                      enable_progress_bar=False, enable_model_summary=False, **kw)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    full = Recorder()
    t = trainer(out / "full", max_epochs=2, enable_checkpointing=False)
    t.fit(full)
    rank = t.global_rank
    globals_ = [full.sampler.global_indices(e) for e in range(2)]

    first = Recorder()
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=10, save_top_k=-1)
    trainer(out / "a", max_epochs=2, max_steps=10, callbacks=[SamplerState(), ckpt]).fit(first)
    second = Recorder()
    trainer(out / "b", max_epochs=2, enable_checkpointing=False).fit(second, ckpt_path=str(out / "ckpt" / "epoch=1-step=10.ckpt"))

    raised = ""
    try:
        trainer(out / "c", max_steps=1, use_distributed_sampler=True, enable_checkpointing=False).fit(Recorder())
    except RuntimeError as err:
        raised = str(err)
    torch.save({"rank": rank, "full": full.seen, "globals": globals_, "resumed": first.seen + second.seen,
                "len": len(full.sampler), "raised": raised}, out / f"rank{rank}.pt")
