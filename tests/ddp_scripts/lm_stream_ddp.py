"""2-process CPU DDP run of the streaming char LM: records each rank's keys; phases full / part / resume.

Usage: python lm_stream_ddp.py OUT_DIR TEXT_FILE PHASE
  full:   60 steps uninterrupted
  part:   25 steps, then a checkpoint (OUT_DIR/part.ckpt)
  resume: from OUT_DIR/part.ckpt to 60 steps
Each rank writes OUT_DIR/{phase}_rank{r}.pt with its per-step keys, the LossReweighting table and the stream
state.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_reweight import LossReweighting
from lightning_reweight.data.text import CharStreamDataModule
from lightning_reweight.models.lm import CharTransformerLM


class KeyRecorder(pl.Callback):
    def __init__(self):
        self.keys = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.keys.append(batch["key"].clone())


if __name__ == "__main__":
    out, text, phase = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    pl.seed_everything(0)
    dm = CharStreamDataModule(path=text, seq_len=16, batch_size=4, seed=1, num_workers=1)
    model = CharTransformerLM(d_model=16, n_layers=1, n_heads=2, max_len=16, lr=1e-2, sample_keys="exact")
    rec = KeyRecorder()
    cb = LossReweighting("linupper", warmup_steps=2, log_every_n_steps=0)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=25 if phase == "part" else 60,
                         max_epochs=-1, callbacks=[rec, cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm, ckpt_path=str(out / "part.ckpt") if phase == "resume" else None)
    if phase == "part":
        trainer.save_checkpoint(out / "part.ckpt")
    torch.save({"keys": rec.keys, "table": cb.table.state_dict(), "stream": dm.state_dict(),
                "params": [p.detach().clone() for p in model.parameters()]},
               out / f"{phase}_rank{trainer.global_rank}.pt")
