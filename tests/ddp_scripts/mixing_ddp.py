"""2-process CPU DDP run of a StreamMixture (Cooldown, upsample): records each rank's keys; phases full/part/resume.

Usage: python mixing_ddp.py OUT_DIR PHASE
  full:   12 steps uninterrupted; a checkpoint after step 5 (OUT_DIR/part.ckpt, written mid-run)
  resume: from OUT_DIR/part.ckpt to 12 steps
Each rank writes OUT_DIR/{phase}_rank{r}.pt with its per-step keys, domains and the mixture state.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_reweight import StreamMixing
from lightning_reweight.data.text import CharWindows
from lightning_reweight.models.lm import CharTransformerLM
from lightning_reweight.samplers.mixture import StreamMixture

SIZES = (30, 9, 3)


def mixture(batch_size: int) -> StreamMixture:
    sources = [CharWindows(torch.randint(0, 256, (n * 8 + 1,), generator=torch.Generator().manual_seed(k),
                                         dtype=torch.uint8), 8) for k, n in enumerate(SIZES)]
    return StreamMixture(sources, names=["big", "mid", "tiny"], batch_size=batch_size, seed=3)


class Recorder(pl.Callback):
    def __init__(self, ckpt_at=None, path=None):
        self.keys, self.domains, self.ckpt_at, self.path = [], [], ckpt_at, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.keys.append(batch["key"].clone())
        self.domains.append(batch["domain"].clone())
        if self.ckpt_at is not None and trainer.global_step == self.ckpt_at:
            trainer.save_checkpoint(self.path)  # mid-run, as ModelCheckpoint would


def run(out: Path, phase: str, devices: int = 2, batch_size: int = 4, ckpt: Path | None = None) -> dict:
    pl.seed_everything(0)
    torch.manual_seed(0)
    model = CharTransformerLM(d_model=8, n_layers=1, n_heads=2, max_len=8, lr=1e-2)
    rec = Recorder(ckpt_at=5 if phase == "full" else None, path=out / "part.ckpt")
    mix = mixture(batch_size)
    cb = StreamMixing(mode="upsample", schedule="cooldown", log_every_n_steps=0)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         max_steps=12, max_epochs=-1, callbacks=[cb, rec], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, default_root_dir=str(out))
    trainer.fit(model, train_dataloaders=DataLoader(mix, batch_size=None), ckpt_path=str(ckpt) if ckpt else None)
    return {"keys": rec.keys, "domains": rec.domains, "mixture": mix.state_dict(), "rank": trainer.global_rank}


if __name__ == "__main__":
    out, phase = Path(sys.argv[1]), sys.argv[2]
    result = run(out, phase, ckpt=out / "part.ckpt" if phase == "resume" else None)
    torch.save(result, out / f"{phase}_rank{result['rank']}.pt")
