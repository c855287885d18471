"""SegmentationModule: Dice losses and per-image Dice vs hand computation, the training loss (ERM and
AdaWAC) and its gradients vs a hand computation, hooks, metrics and bad input. Tiny synthetic data."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_reweight import IndexedDataset
from lightning_reweight.callbacks.adawac import AdaWAC
from lightning_reweight.models.segmenter import (
    PerImageDice,
    SegmentationModule,
    SoftDiceLoss,
    per_image_dice,
    soft_dice_loss,
)

TINY = dict(encoder_name="tu-mobilenetv3_small_050", encoder_depth=3, decoder_channels=[16, 8, 8], in_channels=1)


class Paired(Dataset):
    """Bright squares on noise; ``image2`` is the image flipped (mask flipped too); every 3rd is all-background."""

    def __init__(self, n=8, size=16, paired=True):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, size, size, generator=g)
        self.m = torch.zeros(n, size, size, dtype=torch.int64)
        for i in range(n):
            if i % 3:
                self.m[i, 2:2 + i, 3:3 + i] = 1
        self.x = self.x + 2 * self.m.unsqueeze(1)
        self.paired = paired

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        out = {"image": self.x[i], "mask": self.m[i], "sparse": bool(self.m[i].sum() == 0)}
        if self.paired:
            out["image2"], out["mask2"] = self.x[i].flip(-1), self.m[i].flip(-1)
        return out


def test_soft_dice_loss_by_hand():
    logits = torch.tensor([[[[2.0, -1.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    p = logits.softmax(1)[0, :, 0]  # (2 classes, 2 pixels)
    expected = 0
    for c in range(2):
        y = (target[0, 0] == c).float()
        expected += 1 - (2 * (p[c] * y).sum() + 1e-5) / ((p[c] ** 2).sum() + (y ** 2).sum() + 1e-5)
    torch.testing.assert_close(soft_dice_loss(logits, target), expected / 2)
    torch.testing.assert_close(SoftDiceLoss()(logits, target, None), expected / 2)
    with pytest.raises(ValueError, match="target"):
        soft_dice_loss(logits, target[:, 0])


def test_per_image_dice_conventions():
    t = torch.zeros(4, 2, 2, dtype=torch.long)
    p = torch.zeros(4, 2, 2, dtype=torch.long)
    t[0, 0, 0] = p[0, 0, 0] = 1                    # image 0 perfect: 1
    t[1, 0] = 1                                    # image 1: |P∩G| = 1, |P| = 2, |G| = 2: 0.5
    p[1, 0, 0] = p[1, 1, 1] = 1
    p[2, 1, 1] = 1                                 # image 2: empty truth, something predicted: 0
    #                                                image 3: both empty: 1
    assert per_image_dice(p, t).tolist() == [1.0, 0.5, 0.0, 1.0]
    m = PerImageDice(num_groups=2)
    m.update(p, t, sparse=torch.tensor([False, False, True, True]), group=torch.tensor([0, 1, 1, -1]))
    out = m.compute()
    assert out["dice"] == pytest.approx(0.625) and out["dice_dense"] == pytest.approx(0.75)
    assert out["dice_sparse"] == pytest.approx(0.5)
    assert out["dice_group_0"] == pytest.approx(1.0) and out["dice_group_1"] == pytest.approx(0.25)


def fit(model, ds, callbacks=(), steps=1, **kw):
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                         limit_val_batches=0, **kw)
    trainer.fit(model, DataLoader(IndexedDataset(ds), batch_size=4))
    return trainer


class Recording(SegmentationModule):
    """Keeps the batch, parameters before the step, the returned loss and the gradients."""

    def training_step(self, batch, batch_idx):
        self.rec = dict(batch=batch, state={k: v.clone() for k, v in self.state_dict().items()})
        loss = super().training_step(batch, batch_idx)
        self.rec["loss"] = loss.detach()
        return loss

    def on_after_backward(self):
        self.rec["grads"] = {n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}


def hand_loss(model_state, batch, eta=None, lam=2.0):
    """0.5·Dice + 0.5·mean(β_sup ℓ_sup + β_cons ℓ_cons) recomputed from scratch (β from (½,½) after one step)."""
    ref = SegmentationModule(**TINY, consistency_weight=lam)
    ref.load_state_dict(model_state)
    ref.train()
    x1, y1 = batch["image"], batch["mask"]
    f1 = ref.net.encoder(x1)
    l1 = ref.net.segmentation_head(ref.net.decoder(f1))
    ce = F.cross_entropy(l1, y1, reduction="none").mean((1, 2))
    dice = soft_dice_loss(l1, y1)
    if eta is None:
        return 0.5 * dice + 0.5 * ce.mean(), ref
    f2 = ref.net.encoder(batch["image2"])
    l2 = ref.net.segmentation_head(ref.net.decoder(f2))
    ce = 0.5 * (ce + F.cross_entropy(l2, batch["mask2"], reduction="none").mean((1, 2)))
    dice = 0.5 * (dice + soft_dice_loss(l2, batch["mask2"]))
    cons = lam * ((f1[-1] - f2[-1]) ** 2).mean((1, 2, 3))
    b_sup = torch.sigmoid(eta * (ce - cons)).detach()  # (½,½) -> one exponentiated-gradient step
    return 0.5 * dice + 0.5 * (b_sup * ce + (1 - b_sup) * cons).mean(), ref


@pytest.mark.parametrize("method", ["erm", "adawac"])
def test_training_loss_and_gradients_equal_hand_computation(method):
    torch.manual_seed(0)
    model = Recording(**TINY)
    ds = Paired(paired=method == "adawac")
    callbacks = [AdaWAC(eta=8.0, log_every_n_steps=0)] if method == "adawac" else []
    fit(model, ds, callbacks)
    hand, ref = hand_loss(model.rec["state"], model.rec["batch"], eta=8.0 if method == "adawac" else None)
    torch.testing.assert_close(model.rec["loss"], hand.detach(), rtol=1e-4, atol=1e-5)
    hand.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert set(ref_grads) == set(model.rec["grads"])
    for name, g in ref_grads.items():
        torch.testing.assert_close(model.rec["grads"][name], g, rtol=1e-3, atol=1e-5)


def test_paired_without_adawac_warns_and_eval_metrics():
    torch.manual_seed(0)
    model = SegmentationModule(**TINY, num_groups=0, optimizer="adam", lr=1e-2)
    with pytest.warns(UserWarning, match="no callback consumes the consistency"):
        trainer = fit(model, Paired(), steps=2)
    res = trainer.test(model, DataLoader(IndexedDataset(Paired(paired=False)), batch_size=4), verbose=False)[0]
    assert {"test/dice", "test/dice_dense", "test/dice_sparse", "test/dice_global", "test/iou", "test/loss"} <= set(res)
    preds = trainer.predict(model, DataLoader(IndexedDataset(Paired(paired=False)), batch_size=4))
    assert set(preds[0]) == {"pred", "dice", "index", "sparse"} and preds[0]["pred"].shape == (4, 16, 16)


def test_dice_loss_hook_receives_groups():
    seen = []

    class GroupDice(torch.nn.Module):
        def forward(self, logits, mask, group):
            seen.append(group.clone())
            return soft_dice_loss(logits, mask)

    model = SegmentationModule(**TINY, dice_loss=GroupDice())
    groups = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, DataLoader(IndexedDataset(Paired(paired=False), groups=groups), batch_size=4))
    assert seen and seen[0].tolist() == [0, 1, 2, 0]


def test_bad_input():
    with pytest.raises(ValueError, match="dice_weight"):
        SegmentationModule(**TINY, dice_weight=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationModule(**TINY, num_classes=1)
    model = SegmentationModule(**TINY)
    with pytest.raises(KeyError, match="'image' and 'mask'"):
        model.training_step({"x": torch.zeros(1)}, 0)
    with pytest.raises(ValueError, match="same shape"):
        model.consistency_losses(torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 1, 2))
    with pytest.raises(ValueError, match="target"):
        model.supervised_losses(torch.zeros(2, 2, 8, 8), torch.zeros(2, 4, 4, dtype=torch.long))
