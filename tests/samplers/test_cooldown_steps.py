"""Cooldown with ``unit="step"`` counts real batches: 100 samples, batch 32, 10 epochs = 4
batches per epoch (the last one holds 4 samples), 40 steps; the switch at one half lands at step 20 in both
upsample and upweight mode (it used to land at step 25 in upsample mode, counting full batches)."""

import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight import IndexedDataset, reduce_loss
from lightning_reweight.callbacks.balancing import GroupBalancing

LABELS = torch.tensor([0] * 80 + [1] * 15 + [2] * 5)  # 100 samples


class Recorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 3)
        self.seen, self.taus = [], []

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.seen.append(index.clone())
        balancing = next(cb for cb in self.trainer.callbacks if isinstance(cb, GroupBalancing))
        self.taus.append(balancing.tau(self.trainer))
        return reduce_loss(self, F.cross_entropy(self.net(x), y, reduction="none"), index, target=y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(mode):
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(IndexedDataset(TensorDataset(torch.randn(100, 4, generator=g), LABELS), targets=LABELS),
                        batch_size=32, shuffle=True)
    cb = GroupBalancing(mode=mode, schedule="cooldown", tau_start=math.inf, tau_end=1.0, unit="step", seed=3,
                        log_every_n_steps=0)
    model = Recorder()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=10, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[cb])
    trainer.fit(model, loader)
    assert trainer.global_step == 40 and [len(s) for s in model.seen[:4]] == [32, 32, 32, 4]
    return cb, model


def test_upsample_switch_lands_at_step_20():
    cb, model = _fit("upsample")
    sampler = cb.sampler
    assert sampler.batches_per_epoch() == 4 and sampler.total_steps == 40
    switch_steps = []  # the training step at which each temperature stretch begins
    for epoch in range(10):
        for lo, _, tau in sampler.segments(epoch):
            switch_steps.append((epoch * 4 + lo // 32, tau))
    first_cool = min(step for step, tau in switch_steps if tau == 1.0)
    assert first_cool == 20
    assert all(tau == math.inf for step, tau in switch_steps if step < 20)
    # and the draws show it: balanced groups before step 20, proportional after (group 2 is 5 % of the data)
    share = [float((LABELS[idx] == 2).float().mean()) for idx in model.seen]
    before, after = sum(share[:20]) / 20, sum(share[20:]) / 20
    assert before > 0.2 and after < 0.12


def test_upweight_switch_lands_at_step_20_too():
    cb, model = _fit("upweight")
    assert model.taus[:20] == [math.inf] * 20 and model.taus[20:] == [1.0] * 20
