"""2-process CPU DDP run: GroupDRO + FairErrorBoundScaling while training, equity-scaled and group-wise
metrics while validating. Each rank saves its callback state, step records and metric values.

Usage: python group_fairness_ddp.py OUT_DIR
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import BinaryAccuracy

from lightning_reweight import IndexedDataset, reduce_loss
from lightning_reweight.callbacks.febs import FairErrorBoundScaling
from lightning_reweight.callbacks.group_dro import GroupDRO
from lightning_reweight.metrics import (
    EquityScaledAccuracy,
    EquityScaledAUROC,
    EquityScaledDice,
    EquityScaledIoU,
    GroupwiseMetric,
)

N_TRAIN, N_VAL, G_VAL = 30, 64, 4


def make_train_dataset():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N_TRAIN, 4, generator=g), torch.randint(0, 3, (N_TRAIN,), generator=g)
    groups = torch.arange(N_TRAIN) % 3
    groups[::7] = -1  # a few unknown-group samples
    return IndexedDataset(TensorDataset(x, y), groups=groups)


def make_val_data():
    g = torch.Generator().manual_seed(1)
    seg_target = torch.randint(0, 2, (N_VAL, 8, 8), generator=g)
    seg_logits = torch.randn(N_VAL, 2, 8, 8, generator=g) + 1.5 * torch.stack([1 - seg_target, seg_target], 1)
    cls_target = torch.randint(0, 2, (N_VAL,), generator=g)
    cls_scores = (cls_target.float() + torch.randn(N_VAL, generator=g)).sigmoid()
    group = torch.randint(-1, 3, (N_VAL,), generator=g)
    group[::8] = 3  # indices 0, 8, 16, ...: with an unshuffled DistributedSampler only rank 0 sees group 3
    return seg_logits, seg_target, cls_scores, cls_target, group


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 3)
        self.records = []
        self.es_dice = EquityScaledDice(G_VAL)
        self.es_iou = EquityScaledIoU(G_VAL, mode="std")
        self.es_acc = EquityScaledAccuracy(G_VAL)
        self.es_auc = EquityScaledAUROC(G_VAL)
        self.gw = GroupwiseMetric(BinaryAccuracy(), G_VAL, prefix="acc_")
        self.result = {}

    def training_step(self, batch, batch_idx):
        x, y, index, group = batch
        losses = F.cross_entropy(self.net(x), y, reduction="none")
        self.records.append((index.clone(), group.clone(), losses.detach().clone()))
        return reduce_loss(self, losses, index, group=group)

    def validation_step(self, batch, batch_idx):
        seg_logits, seg_target, cls_scores, cls_target, group = batch
        self.es_dice.update(seg_logits, seg_target, group)
        self.es_iou.update(seg_logits, seg_target, group)
        self.es_acc.update(cls_scores, cls_target, group)
        self.es_auc.update(cls_scores, cls_target, group)
        self.gw.update(cls_scores, cls_target, group)

    def on_validation_epoch_end(self):
        self.log("es_dice", self.es_dice)  # logged as a Metric object: Lightning computes and resets it
        self.result = {"es_iou": self.es_iou.compute(), "es_acc": self.es_acc.compute(),
                       "es_auc": self.es_auc.compute(), **self.gw.compute()}
        self.result["local_count"] = self.gw.group_counts().sum()
        self.log_dict({k: v for k, v in self.result.items() if k != "local_count"})
        for m in (self.es_iou, self.es_acc, self.es_auc, self.gw):
            m.reset()

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.2)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    pl.seed_everything(0)
    dro, febs = GroupDRO(step_size=0.5), FairErrorBoundScaling(momentum=0.5)
    model = Tiny()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, callbacks=[dro, febs],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    # 15 train samples per rank in batches of 4: the last batch of each epoch is uneven (3 per rank)
    trainer.fit(model, DataLoader(make_train_dataset(), batch_size=4, shuffle=True),
                DataLoader(TensorDataset(*make_val_data()), batch_size=5, shuffle=False))
    metrics = {k: float(v) for k, v in model.result.items()}
    metrics["es_dice"] = float(trainer.callback_metrics["es_dice"])
    torch.save({"rank": trainer.global_rank, "q": dro.q, "errors": febs.errors, "seen": febs.seen,
                "steps": (dro.steps, febs.steps), "records": model.records, "metrics": metrics},
               out / f"rank{trainer.global_rank}.pt")
