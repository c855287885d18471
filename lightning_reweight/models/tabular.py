"""A small MLP LightningModule for group-annotated tabular classification (e.g. UCI Adult)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_reweight.contract import reduce_loss
from lightning_reweight.metrics import EquityScaledAccuracy, EquityScaledAUROC, GroupwiseMetric

__all__ = ["TabularClassifier"]


def _unpack(batch: Any) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    if isinstance(batch, dict):
        return batch["x"], batch["y"], batch.get("index"), batch.get("group")
    x, y, *rest = batch
    return x, y, (rest[0] if rest else None), (rest[1] if len(rest) > 1 else None)


class TabularClassifier(pl.LightningModule):
    """MLP classifier following the per-sample loss contract, with group-fairness metrics.

    Training: per-sample cross-entropy handed to ``reduce_loss`` with the batch's indices, group ids and
    targets, so ``GroupDRO`` / ``FairErrorBoundScaling`` (or any weighting callback) can reweight it.
    Validation / test log (``{stage}`` = ``val`` or ``test``): ``{stage}/acc``, ``{stage}/es_acc``
    (equity-scaled accuracy), ``{stage}/es_auc``, ``{stage}/acc_<group>``, ``{stage}/acc_worst`` and
    ``{stage}/acc_gap`` — monitor ``val/acc_worst`` or ``val/es_acc`` with ``ModelCheckpoint``.

    Batches are ``(x, y, index, group)`` (an ``IndexedDataset`` with groups) or dicts with those keys.

    Args:
        in_features: input width; read from ``trainer.datamodule.num_features`` when ``None``.
        num_classes: number of classes.
        hidden_sizes: widths of the hidden layers.
        dropout: dropout after each hidden layer.
        num_groups: groups for the metrics; read from ``trainer.datamodule.num_groups`` when ``None``.
        group_names: metric key names per group; from ``trainer.datamodule.group_names`` when ``None``.
        optimizer: ``"adamw"`` or ``"sgd"``.
        lr: learning rate.
        weight_decay: weight decay.
    """

    def __init__(
        self,
        in_features: int | None = None,
        num_classes: int = 2,
        hidden_sizes: Sequence[int] = (64, 64),
        dropout: float = 0.1,
        num_groups: int | None = None,
        group_names: Sequence[str] | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
    ):
        super().__init__()
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"Expected argument `optimizer` to be 'adamw' or 'sgd', but got {optimizer!r}.")
        if num_classes < 2:
            raise ValueError(f"Expected argument `num_classes` to be >= 2, but got {num_classes!r}.")
        if not 0 <= dropout < 1:
            raise ValueError(f"Expected argument `dropout` in [0, 1), but got {dropout!r}.")
        self.save_hyperparameters()
        self.net: nn.Module | None = None
        self.metrics: nn.ModuleDict | None = None
        if in_features is not None:
            self._build_net(in_features)
        if num_groups is not None:
            self._build_metrics(num_groups, group_names)

    # ------------------------------------------------------------------ construction
    def _build_net(self, in_features: int) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for h in self.hparams.hidden_sizes:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(self.hparams.dropout)]
            width = h
        layers.append(nn.Linear(width, self.hparams.num_classes))
        self.net = nn.Sequential(*layers)
        self.hparams["in_features"] = in_features  # saved with checkpoints, so load_from_checkpoint rebuilds it

    def _build_metrics(self, num_groups: int, group_names: Sequence[str] | None) -> None:
        c = self.hparams.num_classes

        def stage_metrics(stage: str) -> nn.ModuleDict:
            return nn.ModuleDict({
                "acc": MulticlassAccuracy(c, average="micro"),
                "es_acc": EquityScaledAccuracy(num_groups),
                "es_auc": EquityScaledAUROC(num_groups),
                "group_acc": GroupwiseMetric(MulticlassAccuracy(c, average="micro"), num_groups,
                                             group_names=group_names, prefix=f"{stage}/acc_"),
            })

        self.metrics = nn.ModuleDict({"val": stage_metrics("val"), "test": stage_metrics("test")})
        self.hparams["num_groups"] = num_groups
        self.hparams["group_names"] = list(group_names) if group_names is not None else None

    def configure_model(self) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.net is None:
            n = getattr(dm, "num_features", None)
            if n is None:
                raise ValueError(
                    "TabularClassifier needs `in_features`: pass it, or use a DataModule with `num_features` "
                    "(e.g. AdultDataModule)."
                )
            self._build_net(int(n))
        if self.metrics is None:
            g = getattr(dm, "num_groups", None)
            if g is None:
                raise ValueError("TabularClassifier needs `num_groups`: pass it, or use a DataModule with `num_groups`.")
            self._build_metrics(int(g), self.hparams.group_names or getattr(dm, "group_names", None))

    # ------------------------------------------------------------------ steps
    def forward(self, x: Tensor) -> Tensor:
        if self.net is None:
            raise RuntimeError("The network is not built yet: pass `in_features` or fit with a DataModule.")
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, index, group = _unpack(batch)
        losses = F.cross_entropy(self(x), y, reduction="none")
        loss = reduce_loss(self, losses, index, group=group, target=y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/plain_loss", losses.detach().mean())
        return loss

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, y, _, group = _unpack(batch)
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        m = self.metrics[stage]
        m["acc"].update(logits, y)
        if group is None:
            raise ValueError("Expected evaluation batches with group ids (x, y, index, group) for the group metrics.")
        m["es_acc"].update(logits, y, group)
        probs = logits.softmax(-1)
        m["es_auc"].update(probs[:, 1] if probs.shape[1] == 2 else probs, y, group)
        m["group_acc"].update(logits, y, group)

    def _eval_epoch_end(self, stage: str) -> None:
        m = self.metrics[stage]
        self.log(f"{stage}/acc", m["acc"].compute(), prog_bar=True)
        self.log(f"{stage}/es_acc", m["es_acc"].compute(), prog_bar=True)
        self.log(f"{stage}/es_auc", m["es_auc"].compute())
        self.log_dict(m["group_acc"].compute())
        for metric in m.values():
            metric.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = _unpack(batch)[0] if isinstance(batch, (dict, tuple, list)) else batch
        return self(x).softmax(-1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
