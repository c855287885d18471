"""2-process CPU DDP run of LossReweighting; each rank saves its table and last weights.

Usage: python loss_reweighting_ddp.py OUT_DIR
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight import IndexedDataset, LossReweighting, reduce_loss


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        losses = F.cross_entropy(self.net(x), y, reduction="none")
        return reduce_loss(self, losses, index)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Recorder(pl.Callback):
    """Collect the global batches every rank saw, to check both ranks weighted the same samples."""

    def __init__(self, cb):
        self.cb, self.seen = cb, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(self.cb.table["weight"].clone())


if __name__ == "__main__":
    out = Path(sys.argv[1])
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    # 37 samples: uneven shards (19 + 18 before padding) exercise the variable-size gather
    ds = IndexedDataset(TensorDataset(torch.randn(37, 4, generator=g), torch.randint(0, 3, (37,), generator=g)))
    cb = LossReweighting("linupper", r=0.4, warmup_steps=2, log_every_n_steps=1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, callbacks=[cb],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Tiny(), DataLoader(ds, batch_size=5, shuffle=True))
    from lightning_reweight.distributed import gather_rows, is_distributed

    rank = trainer.global_rank
    # uneven per-rank row counts: rank r contributes r + 2 rows of (index, value, 2-d extra)
    n = rank + 2
    uneven, rejected = None, None
    if is_distributed():
        uneven, sizes = gather_rows([torch.arange(n) + 100 * rank, torch.full((n,), float(rank)), torch.ones(n, 2) * rank])
    # exactness of the DDP reduction with uneven shards: rank 0 holds 3 samples, rank 1 holds 5; the
    # rank-averaged gradient (what DDP does) must equal the single-process weighted-mean gradient
    grad_err = None
    if is_distributed():
        import torch.distributed as dist

        probe = Tiny()
        probe._trainer = trainer
        trainer.training = True
        gx = torch.randn(8, 4, generator=torch.Generator().manual_seed(5))
        gy = torch.arange(8) % 3
        gi = torch.arange(8) + 10
        part = slice(0, 3) if rank == 0 else slice(3, 8)
        losses = F.cross_entropy(probe.net(gx[part]), gy[part], reduction="none")
        loss = reduce_loss(probe, losses, gi[part])
        grads = torch.autograd.grad(loss, list(probe.net.parameters()))
        grads = [g.clone() for g in grads]
        for g_ in grads:
            dist.all_reduce(g_)
            g_ /= dist.get_world_size()
        full = F.cross_entropy(probe.net(gx), gy, reduction="none")
        w = cb.rule(full.detach())
        ref = torch.autograd.grad((w * full).mean(), list(probe.net.parameters()))
        grad_err = max(float((a - b).abs().max()) for a, b in zip(grads, ref))
    # a bad input on one rank only must stop every rank together (no hang) and change no rank's table
    rejected = None
    if is_distributed():
        before = cb.table["count"].clone()
        nan_on_rank1 = torch.ones(2, requires_grad=True) * (float("nan") if rank == 1 else 1.0)
        bad_index_on_rank0 = torch.tensor([0, 37]) if rank == 0 else torch.tensor([0, 1])
        messages = []
        for losses_, index_ in ((nan_on_rank1, torch.tensor([0, 1])), (torch.ones(2, requires_grad=True), bad_index_on_rank0)):
            try:
                reduce_loss(probe, losses_, index_)
                messages.append(None)
            except (ValueError, IndexError) as err:
                messages.append(f"{type(err).__name__}: {err}")
        rejected = {"messages": messages, "unchanged": bool(torch.equal(before, cb.table["count"]))}
    torch.save({"table": cb.table.state_dict(), "rank": rank, "uneven": uneven, "grad_err": grad_err, "rejected": rejected,
                "weight": trainer.lightning_module.net.weight.detach()}, out / f"rank{rank}.pt")
