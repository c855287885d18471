"""2-process CPU DDP run of EATA during ``trainer.test``; each rank saves its adapted state.

Usage: python tta_ddp.py OUT_DIR E_MARGIN
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight.callbacks.tta import EATA
from tests.callbacks.tta_reference import make_data, make_model


def run(cb):
    model = make_model()
    x, y = make_data(32)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", inference_mode=False, callbacks=[cb],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    trainer.test(model, DataLoader(TensorDataset(x, y), batch_size=8), verbose=False)
    state = cb.state_dict()
    return trainer.global_rank, {"adapted": state["adapted"], "counters": state["counters"],
                                 "optimizer": state["optimizer"]["state"], "extra": state["extra"]}


if __name__ == "__main__":
    out, e_margin = Path(sys.argv[1]), float(sys.argv[2])
    fx, fy = make_data(16, seed=5)
    fisher = DataLoader(TensorDataset(fx, fy), batch_size=8)
    rank, eata = run(EATA(e_margin=e_margin, d_margin=0.4, fisher_alpha=3.0, fisher_dataloader=fisher, lr=1e-2))
    torch.save({"rank": rank, "eata": eata}, out / f"rank{rank}.pt")
