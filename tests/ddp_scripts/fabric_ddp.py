"""2-process CPU Fabric run: each rank trains rows ``rank::2`` of every global batch through ``reduce_loss``."""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric

from lightning_reweight import LossReweighting, reduce_loss
from tests.doors._common import N, Tiny, data, global_batches

if __name__ == "__main__":
    out = Path(sys.argv[1])
    cb = LossReweighting("linupper", warmup_steps=2, num_samples=N, log_every_n_steps=1)
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp", callbacks=[cb])
    fabric.launch()
    module = Tiny()
    model, optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=0.5))
    x, y = data()
    rank = fabric.global_rank
    for index in global_batches(2):
        local = index[rank::2]
        loss = reduce_loss(model, F.cross_entropy(model(x[local]), y[local], reduction="none"), local)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    torch.save({k: v.clone() for k, v in cb.table.state_dict()["columns"].items()}, out / f"table_{rank}.pt")
