"""Item 5: what ``accumulate_grad_batches > 1`` means for the weights.

Definition (docs/lm.md): weights are normalised per micro-batch. Each micro-batch's ``reduce_loss`` returns
its own weighted mean (weights of mean 1 over that micro-batch's global batch) and Lightning divides it by
``accumulate_grad_batches``, so the accumulated gradient is the average over the micro-batches of each
micro-batch's weighted-mean gradient. Warm-up counts optimizer steps (``trainer.global_step``: all
micro-batches of one optimizer step see the same step), and per-sample tables are updated once per
micro-batch.
"""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight import IndexedDataset, LossReweighting, reduce_loss
from lightning_reweight.rules import create_rule
from tests.helpers import make_trainer


class Linear(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        losses = F.cross_entropy(self.net(x), y, reduction="none")
        return reduce_loss(self, losses, index)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


class Spy(pl.Callback):
    def __init__(self, cb):
        self.cb, self.seen = cb, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((trainer.global_step, self.cb.last_weights.clone()))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)


def test_accumulated_gradient_is_the_mean_of_micro_batch_weighted_means(tmp_path):
    x, y = _data()
    cb = LossReweighting("linupper", warmup_steps=0, log_every_n_steps=0)
    model = Linear()
    w0 = [p.detach().clone() for p in model.parameters()]
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=4, shuffle=False)
    make_trainer([cb], tmp_path, max_steps=1, accumulate_grad_batches=2).fit(model, loader)
    # reference: micro-batches [0:4] and [4:8], each normalised on its own, averaged
    ref = torch.nn.Linear(4, 3)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), w0):
            p.copy_(q)
    rule = create_rule("linupper")
    total = 0.0
    for part in (slice(0, 4), slice(4, 8)):
        losses = F.cross_entropy(ref(x[part]), y[part], reduction="none")
        w = rule(losses.detach())
        total = total + (w * losses).mean() / 2
    grads = torch.autograd.grad(total, list(ref.parameters()))
    for p, q, g in zip(model.parameters(), w0, grads):
        torch.testing.assert_close(p.detach(), q - g, rtol=1e-5, atol=1e-6)  # SGD, lr = 1
    # and it differs from normalising over the whole optimizer step (the other possible definition)
    losses = F.cross_entropy(ref(x[:8]), y[:8], reduction="none")
    whole = torch.autograd.grad((rule(losses.detach()) * losses).mean(), list(ref.parameters()))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, whole))


def test_warmup_counts_optimizer_steps_and_tables_update_per_micro_batch(tmp_path):
    x, y = _data()
    cb = LossReweighting("linupper", warmup_steps=1, log_every_n_steps=0)
    spy = Spy(cb)
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=4, shuffle=False)
    trainer = make_trainer([cb, spy], tmp_path, max_steps=2, accumulate_grad_batches=2)
    trainer.fit(Linear(), loader)
    assert trainer.global_step == 2 and len(spy.seen) == 4  # 4 micro-batches, 2 optimizer steps
    # the first optimizer step's two micro-batches are in warm-up (uniform), the second step's are not
    steps = [s for s, _ in spy.seen]
    assert steps == [0, 1, 1, 2]  # global_step after each micro-batch: it advances on the 2nd, 4th
    assert torch.equal(spy.seen[0][1], torch.ones(4)) and torch.equal(spy.seen[1][1], torch.ones(4))
    assert not torch.allclose(spy.seen[2][1], torch.ones(4)) and not torch.allclose(spy.seen[3][1], torch.ones(4))
    assert cb.table["count"].tolist() == [1] * 16  # every micro-batch recorded once, none twice
