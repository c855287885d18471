"""A segmentation-models-pytorch LightningModule that follows the per-sample loss contract.

Training loss (AdaWAC's form, "Adaptively Weighted Data Augmentation Consistency Regularization for Robust
Optimization under Concept Shift", Dong, Xie, Ward, ICML 2023; official code ``gail-yxie/adawac``)::

    loss = dice_weight · Dice  +  (1 − dice_weight) · reduce_loss(self, ℓ_sup, index, consistency=ℓ_cons)

* ``ℓ_sup,i``: pixel-mean cross-entropy of sample i (averaged over both views when the batch is paired);
* ``Dice``: batch soft Dice (``SoftDiceLoss``; both views averaged) with a fixed weight — it is *not*
  handed to ``reduce_loss`` and so never reweighted;
* ``ℓ_cons,i = λ_AC · mean_{c,h,w}(φ(x¹_i) − φ(x²_i))²`` with ``φ`` the deepest encoder feature map, the
  two augmented views compared as they are (the geometric transforms are not undone), passed as the
  ``consistency`` extra. ``AdaWAC`` combines it with ``ℓ_sup`` per sample; with no callback attached the
  batch loss is ``dice_weight·Dice + (1 − dice_weight)·mean(ℓ_sup)`` (ERM).

Paper/code defaults: ``dice_weight = 0.5``, ``λ_AC = 2.0`` (the code's default is 1.0), SGD lr 0.01,
momentum 0.9, weight decay 1e-4, constant LR; UNet with a ResNet-34 encoder.

Hooks for other losses: ``supervised_losses`` (per-sample loss handed to ``reduce_loss``) and the
``dice_loss`` argument, an ``nn.Module`` called as ``dice_loss(logits, mask, group)`` (e.g.
``lightning_reweight.losses.FEBSDiceLoss(num_groups=3)`` for FairSeg's FEBS-Dice on PH2). Every batch's
``group`` ids (``IndexedDataset`` groups) reach ``dice_loss``, ``reduce_loss`` and the per-group metrics.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import lightning.pytorch as pl
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.segmentation import DiceScore

from lightning_reweight.callbacks.base import weighting_callbacks
from lightning_reweight.contract import reduce_loss

__all__ = ["PerImageDice", "SegmentationModule", "SoftDiceLoss", "per_image_dice", "soft_dice_loss"]

_SMP_DEFAULT_DECODER = (256, 128, 64, 32, 16)


# ---------------------------------------------------------------------------------------------- losses
def _check_logits_target(logits: Tensor, target: Tensor) -> None:
    if logits.ndim != 4:
        raise ValueError(f"Expected argument `logits` of shape (B, C, H, W), but got {tuple(logits.shape)}.")
    if target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"Expected argument `target` of shape {(logits.shape[0], *logits.shape[2:])} (class index per pixel) "
            f"to match logits {tuple(logits.shape)}, but got {tuple(target.shape)}."
        )


def soft_dice_loss(logits: Tensor, target: Tensor, smooth: float = 1e-5) -> Tensor:
    """Batch soft Dice loss as AdaWAC's/TransUNet's code computes it.

    ``1 − (2 Σ p_c y_c + s) / (Σ p_c² + Σ y_c² + s)`` per class ``c`` over all pixels of the batch (squared
    denominators), averaged over all ``C`` classes including background; ``p = softmax(logits)``.

    Args:
        logits: ``(B, C, H, W)``.
        target: ``(B, H, W)`` class indices.
        smooth: ``s``.

    Returns:
        A scalar.
    """
    _check_logits_target(logits, target)
    probs = logits.softmax(1)
    onehot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
    return (1 - (2 * inter + smooth) / (denom + smooth)).mean()


class SoftDiceLoss(nn.Module):
    """``soft_dice_loss`` as a module with the ``(logits, mask, group)`` signature ``SegmentationModule``
    calls (``group`` is ignored)."""

    def __init__(self, smooth: float = 1e-5):
        super().__init__()
        if smooth < 0:
            raise ValueError(f"Expected argument `smooth` to be >= 0, but got {smooth!r}.")
        self.smooth = smooth

    def forward(self, logits: Tensor, target: Tensor, group: Tensor | None = None) -> Tensor:
        return soft_dice_loss(logits, target, self.smooth)


# ---------------------------------------------------------------------------------------------- metrics
def per_image_dice(preds: Tensor, target: Tensor, num_classes: int = 2, empty_score: float = 1.0) -> Tensor:
    """Dice of each image, averaged over the foreground classes ``1..C−1``.

    ``Dice_c = 2|P_c ∩ G_c| / (|P_c| + |G_c|)``; a class absent from both prediction and ground truth scores
    ``empty_score`` (1, AdaWAC's evaluation convention), absent from one only scores 0 — so a label-sparse
    (all-background) image scores 1 only if nothing is predicted.

    Args:
        preds: ``(B, H, W)`` predicted class indices.
        target: ``(B, H, W)`` true class indices.
        num_classes: ``C``.
        empty_score: score when both are empty.

    Returns:
        ``(B,)`` float32.
    """
    if preds.shape != target.shape or preds.ndim < 2:
        raise ValueError(f"Expected `preds` and `target` of the same shape (B, H, W), but got {tuple(preds.shape)} "
                         f"and {tuple(target.shape)}.")
    p = F.one_hot(preds.long(), num_classes)[..., 1:].flatten(1, -2).float()  # (B, HW, C-1)
    t = F.one_hot(target.long(), num_classes)[..., 1:].flatten(1, -2).float()
    inter = (p * t).sum(1)
    denom = p.sum(1) + t.sum(1)
    dice = torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.full_like(denom, empty_score))
    return dice.mean(1)


class PerImageDice(Metric):
    """Mean per-image Dice (``per_image_dice``) overall, on label-dense and label-sparse images and per group.

    ``compute()`` returns ``{"dice", "dice_dense", "dice_sparse", "dice_group_{g}"}`` (NaN where no image
    was seen). Sums and counts are reduced across DDP ranks by torchmetrics.

    Args:
        num_classes: ``C``.
        num_groups: number of groups ``G`` (ids outside ``[0, G)`` count only in the overall means).
    """

    full_state_update = False

    def __init__(self, num_classes: int = 2, num_groups: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.num_classes, self.num_groups = num_classes, num_groups
        self.add_state("sums", default=torch.zeros(3 + num_groups, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", default=torch.zeros(3 + num_groups, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, sparse: Tensor | None = None,
               group: Tensor | None = None) -> Tensor:  # type: ignore[override]
        dice = per_image_dice(preds, target, self.num_classes).double()
        n = dice.numel()
        slot = [torch.zeros(n, dtype=torch.int64, device=dice.device)]
        if sparse is not None:
            slot.append(1 + sparse.reshape(-1).to(dice.device, torch.int64))
        if group is not None and self.num_groups > 0:
            g = group.reshape(-1).to(dice.device, torch.int64)
            ok = (g >= 0) & (g < self.num_groups)
            slot.append(torch.where(ok, 3 + g, torch.full_like(g, -1)))
        idx = torch.cat(slot)
        vals = dice.repeat(len(slot))
        keep = idx >= 0
        self.sums.index_add_(0, idx[keep], vals[keep])
        self.counts.index_add_(0, idx[keep], torch.ones_like(vals[keep]))
        return dice

    def compute(self) -> dict[str, Tensor]:
        mean = torch.where(self.counts > 0, self.sums / self.counts.clamp_min(1), torch.full_like(self.sums, float("nan")))
        out = {"dice": mean[0], "dice_dense": mean[1], "dice_sparse": mean[2]}
        out.update({f"dice_group_{g}": mean[3 + g] for g in range(self.num_groups)})
        return {k: v.float() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- module
def unpack_segmentation_batch(batch: Any) -> dict[str, Any]:
    """Validate a segmentation batch dict (``image``, ``mask`` and optional ``image2``/``mask2``, ``index``,
    ``group``, ``sparse``) and return it."""
    if not isinstance(batch, dict) or "image" not in batch or "mask" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise KeyError(f"Expected a batch dict with keys 'image' and 'mask' (as the segmentation DataModules "
                       f"yield), but got {keys}.")
    if ("image2" in batch) != ("mask2" in batch):
        raise KeyError("Expected both 'image2' and 'mask2' for a paired batch, but got only one of them.")
    return batch


class SegmentationModule(pl.LightningModule):
    """Semantic segmentation with any segmentation-models-pytorch architecture (trained from scratch).

    Paired batches (``image2``/``mask2``, e.g. ``PH2DataModule(paired=True)``) give the per-sample
    consistency loss on the deepest encoder features to ``reduce_loss`` for ``AdaWAC``; single-view
    batches train plain ERM (``Dice + CE``). Validation/test log ``{stage}/dice`` (mean per-image Dice),
    ``dice_dense``, ``dice_sparse``, ``dice_group_{g}``, ``dice_global`` (torchmetrics ``DiceScore``,
    pixels pooled) and ``iou`` (torchmetrics Jaccard, foreground classes).

    Args:
        arch: smp architecture name (``smp.create_model``), e.g. ``"Unet"``.
        encoder_name: smp encoder (``"resnet34"`` as the paper's UNet; ``"tu-<timm name>"`` for timm ones).
        encoder_depth: number of encoder stages used (input sides must be multiples of 2^depth).
        decoder_channels: UNet decoder widths (one per stage; default smp's, truncated to the depth).
        in_channels: image channels.
        num_classes: classes including background.
        dice_weight: fixed weight of the (not reweighted) Dice term (paper 0.5).
        consistency_weight: λ_AC, multiplies the feature consistency loss (paper 2.0).
        dice_loss: module called as ``dice_loss(logits, mask, group)`` → scalar (default ``SoftDiceLoss()``).
        optimizer: ``"sgd"`` (momentum, as the paper) or ``"adam"``.
        lr: learning rate, constant (paper: 0.01).
        momentum: SGD momentum (paper: 0.9).
        weight_decay: weight decay (paper: 1e-4).
        num_groups: number of groups for the per-group Dice metrics (PH2: 3).
        model_kwargs: extra ``smp.create_model`` arguments.

    Example::

        model = SegmentationModule(encoder_name="resnet18", in_channels=3, num_groups=3)
        trainer = Trainer(callbacks=[AdaWAC(eta=8.0)])
        trainer.fit(model, datamodule=PH2DataModule(paired=True))
    """

    def __init__(
        self,
        arch: str = "Unet",
        encoder_name: str = "resnet34",
        encoder_depth: int = 5,
        decoder_channels: list[int] | None = None,
        in_channels: int = 1,
        num_classes: int = 2,
        dice_weight: float = 0.5,
        consistency_weight: float = 2.0,
        dice_loss: nn.Module | None = None,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        num_groups: int = 0,
        model_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        if not 0 <= dice_weight <= 1:
            raise ValueError(f"Expected argument `dice_weight` to be in [0, 1], but got {dice_weight!r}.")
        if not consistency_weight >= 0:
            raise ValueError(f"Expected argument `consistency_weight` to be >= 0, but got {consistency_weight!r}.")
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"Expected argument `optimizer` to be 'sgd' or 'adam', but got {optimizer!r}.")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"Expected argument `num_classes` to be an int >= 2 (background included), but got "
                             f"{num_classes!r}.")
        if not isinstance(num_groups, int) or num_groups < 0:
            raise ValueError(f"Expected argument `num_groups` to be an int >= 0, but got {num_groups!r}.")
        self.save_hyperparameters(ignore=["dice_loss"])
        kwargs = dict(model_kwargs or {})
        if arch.lower() in ("unet", "unetplusplus"):
            if decoder_channels is None:
                decoder_channels = list(_SMP_DEFAULT_DECODER[5 - encoder_depth:]) if encoder_depth <= 5 else None
            if decoder_channels is not None:
                kwargs.setdefault("decoder_channels", list(decoder_channels))
        self.net = smp.create_model(arch, encoder_name=encoder_name, encoder_weights=None, in_channels=in_channels,
                                    classes=num_classes, encoder_depth=encoder_depth, **kwargs)
        self.dice_loss = dice_loss if dice_loss is not None else SoftDiceLoss()
        self._warned_unused = False

        def metrics() -> nn.ModuleDict:
            with warnings.catch_warnings():  # torchmetrics warns about a future default even when set explicitly
                warnings.filterwarnings("ignore", message=".*DiceScore metric currently defaults.*")
                return nn.ModuleDict({
                    "per_image": PerImageDice(num_classes, num_groups),
                    "dice_global": DiceScore(num_classes, include_background=False, average="micro",
                                             input_format="index", aggregation_level="global"),
                    "iou": MulticlassJaccardIndex(num_classes, average="none"),
                })

        self.val_metrics, self.test_metrics = metrics(), metrics()

    # forward -----------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, φ(x))`` with ``φ`` the deepest encoder feature map, in one pass."""
        self.net.check_input_shape(x)
        features = self.net.encoder(x)
        logits = self.net.segmentation_head(self.net.decoder(features))
        return logits, features[-1]

    # loss hooks ----------------------------------------------------------------------------------------
    def supervised_losses(self, logits: Tensor, mask: Tensor) -> Tensor:
        """Per-sample supervised loss ``(B,)``: pixel-mean cross-entropy (override to swap the loss)."""
        _check_logits_target(logits, mask)
        return F.cross_entropy(logits, mask.long(), reduction="none").flatten(1).mean(1)

    def consistency_losses(self, feat1: Tensor, feat2: Tensor) -> Tensor:
        """Per-sample ``λ_AC · mean_{c,h,w}(φ(x¹) − φ(x²))²`` ``(B,)``."""
        if feat1.shape != feat2.shape:
            raise ValueError(f"Expected the two views' features to have the same shape, but got "
                             f"{tuple(feat1.shape)} and {tuple(feat2.shape)}; give both views the same size.")
        return self.hparams.consistency_weight * (feat1 - feat2).pow(2).flatten(1).mean(1)

    def _warn_unused_consistency(self) -> None:
        if self._warned_unused or self._trainer is None:
            return
        if not any(getattr(cb, "consistency_key", None) for cb in weighting_callbacks(self.trainer)):
            rank_zero_warn("The batch is paired (image2/mask2), but no callback consumes the consistency loss, so "
                           "it is computed and dropped. Attach `AdaWAC` (eta=0 keeps fixed ½/½ weights), or set "
                           "`paired=False` on the DataModule for ERM.")
        self._warned_unused = True

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch = unpack_segmentation_batch(batch)
        x, mask = batch["image"], batch["mask"]
        group, sparse = batch.get("group"), batch.get("sparse")
        logits, feat = self.forward_features(x)
        sup = self.supervised_losses(logits, mask)
        extras: dict[str, Tensor] = {}
        if "image2" in batch:
            logits2, feat2 = self.forward_features(batch["image2"])
            sup = 0.5 * (sup + self.supervised_losses(logits2, batch["mask2"]))
            if getattr(self.dice_loss, "supports_views", False):  # stateful (FEBS): one update per sample
                dice = self.dice_loss(logits, mask, group, logits2=logits2, target2=batch["mask2"])
            else:
                dice = 0.5 * (self.dice_loss(logits, mask, group) + self.dice_loss(logits2, batch["mask2"], group))
            extras["consistency"] = self.consistency_losses(feat, feat2)
            self._warn_unused_consistency()
        else:
            dice = self.dice_loss(logits, mask, group)
        if sparse is not None:
            extras["sparse"] = sparse
        reduced = reduce_loss(self, sup, batch.get("index"), group=group, **extras)
        w = self.hparams.dice_weight
        loss = w * dice + (1 - w) * reduced
        bs = x.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/sup_loss", sup.detach().mean(), batch_size=bs)
        self.log("train/dice_loss", dice.detach(), batch_size=bs)
        if "consistency" in extras:
            self.log("train/consistency", extras["consistency"].detach().mean(), batch_size=bs)
        return loss

    # evaluation ------------------------------------------------------------------------------------------
    def _eval_step(self, batch: Any, metrics: nn.ModuleDict, stage: str) -> Tensor:
        batch = unpack_segmentation_batch(batch)
        x, mask = batch["image"], batch["mask"]
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, mask.long()), sync_dist=True, batch_size=x.shape[0])
        preds = logits.argmax(1)
        dice = metrics["per_image"].update(preds, mask, batch.get("sparse"), batch.get("group"))
        metrics["dice_global"].update(preds, mask)
        metrics["iou"].update(preds, mask)
        return dice

    def _eval_epoch_end(self, metrics: nn.ModuleDict, stage: str) -> None:
        values = metrics["per_image"].compute()
        values["dice_global"] = metrics["dice_global"].compute()
        values["iou"] = metrics["iou"].compute()[1:].mean()
        self.log(f"{stage}/dice", values.pop("dice"), prog_bar=True)
        self.log_dict({f"{stage}/{k}": v for k, v in values.items() if not torch.isnan(v)})
        for m in metrics.values():
            m.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end(self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end(self.test_metrics, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Per image: ``pred`` (class map), ``dice`` (when a mask is given), ``index``, ``group``, ``sparse``."""
        x = batch["image"] if isinstance(batch, dict) else batch
        preds = self(x).argmax(1)
        out = {"pred": preds}
        if isinstance(batch, dict):
            if "mask" in batch:
                out["dice"] = per_image_dice(preds, batch["mask"], self.hparams.num_classes)
            out.update({k: batch[k] for k in ("index", "group", "sparse") if k in batch})
        return out

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        return torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
