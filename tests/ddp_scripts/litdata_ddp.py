"""2-process CPU DDP run of the char LM on LitData chunks: records each rank's keys; phases full / part / resume
/ early.

Usage: python litdata_ddp.py OUT_DIR TEXT_FILE PHASE
  full:   50 steps uninterrupted (one epoch is 42 steps: the run crosses an epoch)
  part:   20 steps, then a checkpoint (OUT_DIR/part.ckpt)
  resume: from OUT_DIR/part.ckpt to 50 steps
  early:  the StreamingDataset is built BEFORE trainer.fit (the mistake): every rank must refuse before step 0
Each rank writes OUT_DIR/{phase}_rank{r}.pt with its per-step keys and the LossReweighting table (early: the
error message).
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_reweight import LossReweighting
from lightning_reweight.data import LitDataTextModule, TextWindowDataset
from lightning_reweight.models.lm import CharTransformerLM


class KeyRecorder(pl.Callback):
    def __init__(self):
        self.keys = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.keys.append(batch["key"].clone())


class EarlyDataModule(pl.LightningDataModule):
    """The mistake: the StreamingDataset is constructed in __init__, before the DDP processes exist."""

    def __init__(self, data_dir):
        super().__init__()
        self.train_set = TextWindowDataset(data_dir, seed=1)

    def train_dataloader(self):
        from litdata import StreamingDataLoader

        return StreamingDataLoader(self.train_set, batch_size=4)


if __name__ == "__main__":
    out, text, phase = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    pl.seed_everything(0)
    # no loader workers here: forking a worker out of a process whose gloo threads hold locks can hang at random
    # (the 1-process tests cover workers)
    dm = LitDataTextModule(path=text, data_dir=str(out / "chunks"), seq_len=16, batch_size=4, seed=1,
                           num_workers=0)
    if phase == "early":
        dm = EarlyDataModule(str(out / "chunks"))
    model = CharTransformerLM(d_model=16, n_layers=1, n_heads=2, max_len=16, lr=1e-2, sample_keys="exact")
    rec = KeyRecorder()
    cb = LossReweighting("linupper", warmup_steps=2, log_every_n_steps=0)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=20 if phase == "part" else 50,
                         max_epochs=-1, callbacks=[rec, cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0)
    if phase == "early":
        try:
            trainer.fit(model, datamodule=dm)
            result = {"error": None, "steps": trainer.global_step}
        except RuntimeError as err:
            result = {"error": f"{type(err).__name__}: {err}", "steps": trainer.global_step}
        torch.save(result, out / f"early_rank{trainer.global_rank}.pt")
        sys.exit(0)
    trainer.fit(model, datamodule=dm, ckpt_path=str(out / "part.ckpt") if phase == "resume" else None)
    if phase == "part":
        trainer.save_checkpoint(out / "part.ckpt")
    torch.save({"keys": rec.keys, "table": cb.table.state_dict(),
                "params": [p.detach().clone() for p in model.parameters()]},
               out / f"{phase}_rank{trainer.global_rank}.pt")
