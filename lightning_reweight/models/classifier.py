"""A timm image classifier LightningModule that follows the per-sample loss contract."""

from __future__ import annotations

import copy
from typing import Any, Literal

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_reweight.contract import reduce_loss


def unpack_batch(batch: Any) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``(x, y, index, group)`` from an ``IndexedDataset`` batch (tuple ``(x, y[, index[, group]])`` or a dict
    with ``image``/``input``/``x``, ``label``/``target``/``y``, ``index``, ``group``)."""
    if isinstance(batch, dict):
        x = next((batch[k] for k in ("image", "input", "x") if k in batch), None)
        y = next((batch[k] for k in ("label", "target", "y") if k in batch), None)
        if x is None or y is None:
            raise KeyError(f"Expected batch keys image/input/x and label/target/y, but got {sorted(batch)}.")
        return x, y, batch.get("index"), batch.get("group")
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError("Expected a batch (x, y[, index[, group]]) or a dict; got " + type(batch).__name__)
    x, y, *rest = batch
    return x, y, (rest[0] if rest else None), (rest[1] if len(rest) > 1 else None)


class ImageClassifier(pl.LightningModule):
    """Image classification with any timm model (trained from scratch by default).

    The training step computes per-sample cross-entropy and hands it to ``reduce_loss`` with the batch's
    dataset indices, group ids and targets, plus the per-sample gradient-norm proxy
    ``‖softmax(z) − onehot(y)‖₂`` (extra ``grad_norm_proxy``, used by gradient-norm importance sampling).
    Validation/test log accuracy, balanced accuracy (mean per-class recall) and per-class accuracy.

    Args:
        model_name: a timm model name (``timm.list_models()``).
        num_classes: number of classes.
        in_chans: input channels.
        pretrained: load timm weights (needs the model hub; off by default).
        optimizer: ``"sgd"`` (momentum, Nesterov) or ``"adamw"``.
        lr: learning rate.
        weight_decay: weight decay.
        momentum: SGD momentum.
        scheduler: ``"cosine"`` (per step over ``trainer.estimated_stepping_batches``, which counts the real
            steps, e.g. of an RS2 round) or ``"none"``.
        eta_min: final learning rate of the cosine schedule (RS2's paper: 1e-4).
        model_kwargs: extra ``timm.create_model`` arguments.
    """

    def __init__(
        self,
        model_name: str = "resnet10t",
        num_classes: int = 10,
        in_chans: int = 3,
        pretrained: bool = False,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.05,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        scheduler: Literal["cosine", "none"] = "cosine",
        eta_min: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"Expected argument `optimizer` to be 'sgd' or 'adamw', but got {optimizer!r}.")
        if scheduler not in ("cosine", "none"):
            raise ValueError(f"Expected argument `scheduler` to be 'cosine' or 'none', but got {scheduler!r}.")
        if model_name not in timm.list_models():
            raise ValueError(f"Unknown timm model {model_name!r}; see `timm.list_models()` for valid names.")
        self.net = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                                     **(model_kwargs or {}))
        metrics = dict(acc=MulticlassAccuracy(num_classes, average="micro"),
                       balanced_acc=MulticlassAccuracy(num_classes, average="macro"),
                       class_acc=MulticlassAccuracy(num_classes, average="none"))
        # one metric set per evaluation dataloader (grown on first use), so several test streams (e.g. one per
        # corruption) are scored separately: keys get a ``/dataloader_idx_k`` suffix when there are several
        self.val_metrics = torch.nn.ModuleList([torch.nn.ModuleDict({k: m.clone() for k, m in metrics.items()})])
        self.test_metrics = torch.nn.ModuleList([torch.nn.ModuleDict({k: m.clone() for k, m in metrics.items()})])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, index, group = unpack_batch(batch)
        logits = self(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        with torch.no_grad():
            proxy = (logits.softmax(-1) - F.one_hot(y, logits.shape[-1]).to(logits.dtype)).norm(dim=-1)
        loss = reduce_loss(self, losses, index, group=group, target=y, grad_norm_proxy=proxy)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/plain_loss", losses.detach().mean())
        return loss

    def _eval_step(self, batch: Any, metric_sets: torch.nn.ModuleList, stage: str, dataloader_idx: int) -> None:
        x, y, *_ = unpack_batch(batch)
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        while len(metric_sets) <= dataloader_idx:
            fresh = copy.deepcopy(metric_sets[0])
            for m in fresh.values():
                m.reset()
            metric_sets.append(fresh.to(self.device))
        for m in metric_sets[dataloader_idx].values():
            m.update(logits, y)

    def _eval_epoch_end(self, metric_sets: torch.nn.ModuleList, stage: str) -> None:
        active = [i for i, metrics in enumerate(metric_sets) if metrics["acc"].update_count > 0]
        several = any(i > 0 for i in active)
        for i in active:
            metrics = metric_sets[i]
            sfx = f"/dataloader_idx_{i}" if several else ""
            kw = {"add_dataloader_idx": False}
            self.log(f"{stage}/acc{sfx}", metrics["acc"].compute(), prog_bar=True, **kw)
            self.log(f"{stage}/balanced_acc{sfx}", metrics["balanced_acc"].compute(), prog_bar=True, **kw)
            for c, v in enumerate(metrics["class_acc"].compute()):
                self.log(f"{stage}/class_acc/{c}{sfx}", v, **kw)
            for m in metrics.values():
                m.reset()

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.val_metrics, "val", dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end(self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.test_metrics, "test", dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end(self.test_metrics, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        x = unpack_batch(batch)[0] if isinstance(batch, (dict, tuple, list)) else batch
        return self(x).softmax(-1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.momentum > 0,
                                  weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return opt
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=hp.eta_min)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
