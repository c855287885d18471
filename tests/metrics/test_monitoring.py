"""Weight statistics, GroupDRO's q and group metrics reach ``trainer.callback_metrics`` at the callbacks' own
cadence, so ``ModelCheckpoint(monitor=...)`` and ``EarlyStopping`` work on them; the worst-group recipe keeps the
worst-group best checkpoint, not the average best."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_reweight import IndexedDataset, reduce_loss
from lightning_reweight.callbacks import GroupDRO, LossReweighting
from lightning_reweight.metrics.groupwise import GroupwiseMetric
from tests.helpers import make_trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ROOT = Path(__file__).resolve().parents[2]


class SpyLogger(Logger):
    """Records every ``log_metrics`` call (to compare with ``callback_metrics``)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self):
        return "spy"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))


class GroupModule(pl.LightningModule):
    """Linear 3-class classifier over (x, y, index, group) batches; records callback_metrics after each step."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 3)
        self.seen: list[dict[str, float]] = []

    def training_step(self, batch, batch_idx):
        x, y, index, group = batch
        losses = F.cross_entropy(self.net(x), y, reduction="none")
        return reduce_loss(self, losses, index, group=group, target=y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.seen.append({k: float(v) for k, v in self.trainer.callback_metrics.items()})

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def group_loader(n=48, batch_size=8):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    group = torch.arange(n) % 2
    return DataLoader(IndexedDataset(TensorDataset(x, y), groups=group), batch_size=batch_size)


def test_weight_stats_and_q_reach_callback_metrics_at_the_callbacks_cadence(tmp_path):
    spy = SpyLogger()
    rw = LossReweighting("linupper", r=0.4, warmup_steps=0, log_every_n_steps=2, log_histogram=False)
    dro = GroupDRO(step_size=0.1, log_every_n_steps=3, log_histogram=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="reweight/ess", mode="max", save_top_k=1)
    early = EarlyStopping(monitor="group_dro/q/group_0", mode="min", patience=100, check_on_train_epoch_end=True)
    module = GroupModule()
    trainer = make_trainer([rw, dro, ckpt, early], tmp_path, max_epochs=2, logger=spy, enable_checkpointing=True,
                           log_every_n_steps=50, limit_val_batches=0)
    trainer.fit(module, group_loader())  # would raise "could not find the monitored key" before
    assert Path(ckpt.best_model_path).exists()
    # every value in callback_metrics is the one the loggers got at the callback's own step (Trainer: every 50)
    logged = {}
    for step, metrics in spy.calls:
        for k, v in metrics.items():
            logged.setdefault(k, []).append((step, v))
    assert [s for s, _ in logged["reweight/ess"]] == list(range(0, 12, 2))
    assert [s for s, _ in logged["group_dro/q/group_0"]] == list(range(0, 12, 3))
    for step, seen in enumerate(module.seen):  # after step `step`, the last value logged at or before it
        for key in ("reweight/ess", "group_dro/q/group_0"):
            last = max(s for s, _ in logged[key] if s <= step)
            assert seen[key] == pytest.approx(dict(logged[key])[last]), (key, step)
    q = [trainer.callback_metrics[f"group_dro/q/group_{g}"] for g in (0, 1)]
    assert float(sum(q)) == pytest.approx(1.0)
    assert ckpt.best_model_score == pytest.approx(max(v for _, v in logged["reweight/ess"]))


# --------------------------------------------------------------------------- checkpoint selection on worst group
class ScriptedGroups(pl.LightningModule):
    """Validation accuracy per group follows a script, epoch by epoch (the training step is a no-op loss)."""

    #: per epoch, which samples of each group are predicted correctly: (correct in group 0, correct in group 1)
    SCRIPT = [(6, 2), (8, 4), (5, 5), (7, 3)]  # of 8 per group: avg best at epoch 1, worst-group best at epoch 2

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.val_acc = GroupwiseMetric(MulticlassAccuracy(num_classes=2, average="micro"), num_groups=2,
                                       prefix="val/acc_")

    def training_step(self, batch, batch_idx):
        return (self.w ** 2).sum()

    def validation_step(self, batch, batch_idx):
        x, y, group = batch
        correct0, correct1 = self.SCRIPT[self.current_epoch]
        rank = torch.arange(len(y)) // 2  # position of the sample inside its group (groups alternate)
        right = torch.where(group == 0, rank < correct0, rank < correct1)
        preds = torch.where(right, y, 1 - y)
        self.val_acc.update(F.one_hot(preds, 2).float(), y, group)

    def on_validation_epoch_end(self):
        self.log_dict(self.val_acc.compute())
        self.val_acc.reset()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_worst_group_recipe_keeps_the_worst_group_best_not_the_average_best(tmp_path):
    recipe = yaml.safe_load((ROOT / "recipes" / "group_dro_adult.yaml").read_text())
    (spec,) = [c for c in recipe["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    assert spec["init_args"]["monitor"] == "val/acc_worst"
    ckpt = ModelCheckpoint(**{**spec["init_args"], "dirpath": tmp_path / "ckpt", "save_top_k": 1})
    n = 16
    data = TensorDataset(torch.zeros(n, 1), torch.arange(n) % 2, torch.arange(n) % 2)
    module = ScriptedGroups()
    trainer = make_trainer([ckpt], tmp_path, max_epochs=4, enable_checkpointing=True, limit_train_batches=1,
                           num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=n))
    averages = [(a + b) / 16 for a, b in ScriptedGroups.SCRIPT]
    worst = [min(a, b) / 8 for a, b in ScriptedGroups.SCRIPT]
    assert max(range(4), key=averages.__getitem__) != max(range(4), key=worst.__getitem__)  # they differ
    best = torch.load(ckpt.best_model_path, weights_only=False)
    assert best["epoch"] == max(range(4), key=worst.__getitem__) == 2
    assert float(ckpt.best_model_score) == pytest.approx(max(worst))
