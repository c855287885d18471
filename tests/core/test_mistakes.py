"""Mistakes that used to train on in silence: each now stops with an error naming the fix, before any state
changes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_reweight import GroupDRO, LossReweighting, reduce_loss

from .conftest import TinyModule, make_loader, make_trainer


class Bypass(TinyModule):
    """Forgets the contract: reduces the loss itself."""

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        loss = F.cross_entropy(self.net(x), y)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            return None
        return loss


class Detached(TinyModule):
    """Hands ``reduce_loss`` losses without gradient."""

    def __init__(self, how):
        super().__init__()
        self.how = how

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        if self.how == "detach":
            losses = F.cross_entropy(self.net(x), y, reduction="none").detach()
        else:
            with torch.no_grad() if self.how == "no_grad" else torch.inference_mode():
                losses = F.cross_entropy(self.net(x), y, reduction="none")
        return reduce_loss(self, losses, index, group=y.clamp(max=1))


def test_a_training_step_that_bypasses_reduce_loss_is_reported_at_the_first_batch(tmp_path):
    cb = LossReweighting(num_samples=24)
    with pytest.raises(RuntimeError, match=r"(?s)LossReweighting is attached.*returned a loss without calling "
                                           r"`reduce_loss`.*return reduce_loss\(self, losses, batch_index\)"):
        make_trainer([cb], tmp_path, max_epochs=2).fit(Bypass(), make_loader())
    assert int(cb.table["count"].sum()) == 0


def test_manual_optimisation_that_bypasses_reduce_loss_is_reported_at_the_epoch_end(tmp_path):
    cb = LossReweighting(num_samples=24)
    module = Bypass(manual=True)
    with pytest.raises(RuntimeError, match=r"ran 3 batch\(es\) of epoch 0 without calling `reduce_loss`"):
        make_trainer([cb], tmp_path, max_epochs=2).fit(module, make_loader())


def test_a_skipped_batch_is_not_a_mistake(tmp_path):
    class SkipsFirst(TinyModule):
        def training_step(self, batch, batch_idx):
            return None if batch_idx == 0 else super().training_step(batch, batch_idx)

    cb = LossReweighting(num_samples=24)
    make_trainer([cb], tmp_path, max_epochs=1).fit(SkipsFirst(), make_loader())
    assert int(cb.table["count"].sum()) == 16


@pytest.mark.parametrize("how", ["detach", "no_grad", "inference_mode"])
def test_losses_without_gradient_are_refused_before_any_state_advances(tmp_path, how):
    dro = GroupDRO(num_groups=2, step_size=0.5)
    kl = LossReweighting("kl_dro", normalizer="ema", num_samples=24, warmup_steps=0)
    with pytest.raises(ValueError, match=r"(?s)carry gradient.*no_grad.*inference_mode"):
        make_trainer([dro, kl], tmp_path, max_epochs=1).fit(Detached(how), make_loader())
    assert dro.steps == 0 and dro.q is None or torch.equal(dro.q, torch.full((2,), 0.5))
    assert int(kl.table["count"].sum()) == 0
    assert kl.rule.state_dict()["log_z"] is None  # the normaliser never advanced
