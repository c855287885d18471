"""Equity-scaled metrics as DDP-correct torchmetrics ``Metric`` subclasses.

``ES-P = P / (1 + α Σ_g |P − P_g|)`` (default) or ``P / (1 + α std_g P_g)`` — see
:mod:`lightning_reweight.metrics.functional` for the definition, its source (FairSeg, ICLR 2024) and the
functional twins. States are sums and counts with ``dist_reduce_fx="sum"`` (per-image metrics) or
concatenated scores (AUROC), so the value after any number of batches and ranks equals the functional on
all the data at once. Every metric returns a scalar, so it can be logged and monitored directly::

    self.val_es_dice = EquityScaledDice(num_groups=3)
    ...
    self.val_es_dice.update(logits, masks, group)
    self.log("val/es_dice", self.val_es_dice)           # ModelCheckpoint(monitor="val/es_dice", mode="max")
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_reweight.metrics.functional import (
    EquityMode,
    _check_auroc_inputs,
    _check_group_for,
    _check_mode,
    _es_compute,
    _es_update,
    equity_scale,
    group_auroc,
    per_image_dice,
    per_image_iou,
    per_sample_correct,
)

__all__ = ["EquityScaledDice", "EquityScaledIoU", "EquityScaledAccuracy", "EquityScaledAUROC"]


def _set_equity_args(metric: Metric, num_groups: int, mode: EquityMode, alpha: float,
                     ignore_index: int | None) -> None:
    """Validate and store the arguments every equity-scaled metric shares."""
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(f"Expected argument `num_groups` to be a positive int, but got {num_groups!r}.")
    _check_mode(mode, alpha)
    metric.num_groups, metric.mode, metric.alpha, metric.ignore_index = num_groups, mode, float(alpha), ignore_index


class _EquityScaledMean(Metric):
    """Shared machinery: per-sample scores -> overall and per-group sums -> equity-scaled mean."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, num_groups: int, mode: EquityMode = "sum_abs", alpha: float = 1.0, ignore_index: int | None = -1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _set_equity_args(self, num_groups, mode, alpha, ignore_index)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("group_total", torch.zeros(num_groups, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("group_count", torch.zeros(num_groups, dtype=torch.long), dist_reduce_fx="sum")

    def _scores(self, preds: Tensor, target: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, preds: Tensor, target: Tensor, group: Tensor) -> None:
        """Add a batch: ``preds``/``target`` as the functional form, ``group`` ``(B,)`` ids (−1 = unknown)."""
        group = _check_group_for(group, target.shape[0], self.num_groups, self.ignore_index).to(self.total.device)
        total, count, group_total, group_count = _es_update(
            self._scores(preds, target).to(self.total.device), group, self.num_groups, self.ignore_index
        )
        self.total += total
        self.count += count
        self.group_total += group_total
        self.group_count += group_count

    def compute(self) -> Tensor:
        return _es_compute(self.total, self.count, self.group_total, self.group_count, self.mode, self.alpha).float()

    def group_values(self) -> tuple[Tensor, Tensor]:
        """``(P_g, present)`` from this process's states (call after ``compute`` for synced values)."""
        return self.group_total / self.group_count.clamp_min(1), self.group_count > 0


class EquityScaledDice(_EquityScaledMean):
    """Equity-scaled Dice over per-image Dice scores (FairSeg, ICLR 2024).

    Args:
        num_groups: number of groups G; ids must lie in ``[0, G)`` or equal ``ignore_index``.
        num_classes: classes including background (2 for binary masks).
        include_background: average class 0 into the per-image score too.
        mode: ``"sum_abs"`` (default, camera-ready) or ``"std"`` (arXiv v1).
        alpha: spread multiplier α (1 in the paper).
        ignore_index: group id of "unknown" samples: counted in ``P`` only.
        zero_division: per-class Dice when prediction and target are both empty.
        threshold: for binary probability/logit maps.

    Example::

        metric = EquityScaledDice(num_groups=3)
        metric.update(logits, masks, group)   # logits (B, 2, H, W) or (B, H, W); masks (B, H, W)
        metric.compute()
    """

    def __init__(
        self, num_groups: int, num_classes: int = 2, include_background: bool = False,
        mode: EquityMode = "sum_abs", alpha: float = 1.0, ignore_index: int | None = -1,
        zero_division: float = 1.0, threshold: float = 0.5, **kwargs: Any,
    ) -> None:
        super().__init__(num_groups, mode, alpha, ignore_index, **kwargs)
        self.num_classes, self.include_background = num_classes, include_background
        self.zero_division, self.threshold = zero_division, threshold

    def _scores(self, preds: Tensor, target: Tensor) -> Tensor:
        return per_image_dice(preds, target, self.num_classes, self.include_background, self.zero_division, self.threshold)


class EquityScaledIoU(EquityScaledDice):
    """Equity-scaled IoU over per-image IoU scores (same arguments as :class:`EquityScaledDice`)."""

    def _scores(self, preds: Tensor, target: Tensor) -> Tensor:
        return per_image_iou(preds, target, self.num_classes, self.include_background, self.zero_division, self.threshold)


class EquityScaledAccuracy(_EquityScaledMean):
    """Equity-scaled accuracy: ``P`` = overall accuracy, ``P_g`` = accuracy within group g.

    ``preds``: ``(B,)`` labels, ``(B,)`` binary probabilities/logits or ``(B, C)`` class scores.

    Example::

        metric = EquityScaledAccuracy(num_groups=2)
        metric.update(logits, y, group)
        self.log("val/es_acc", metric)
    """

    def __init__(
        self, num_groups: int, mode: EquityMode = "sum_abs", alpha: float = 1.0, ignore_index: int | None = -1,
        threshold: float = 0.5, **kwargs: Any,
    ) -> None:
        super().__init__(num_groups, mode, alpha, ignore_index, **kwargs)
        self.threshold = threshold

    def _scores(self, preds: Tensor, target: Tensor) -> Tensor:
        return per_sample_correct(preds, target, self.threshold)


class EquityScaledAUROC(Metric):
    """Equity-scaled AUROC: ``P`` = AUROC of all samples, ``P_g`` = AUROC within group g.

    Keeps the scores (``dist_reduce_fx="cat"``), like torchmetrics' exact AUROC. Binary scores ``(B,)`` or
    multi-class scores ``(B, C)`` (macro one-vs-rest). Groups holding one class only are left out.

    Example::

        metric = EquityScaledAUROC(num_groups=2)
        metric.update(logits.softmax(-1)[:, 1], y, group)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, num_groups: int, mode: EquityMode = "sum_abs", alpha: float = 1.0, ignore_index: int | None = -1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _set_equity_args(self, num_groups, mode, alpha, ignore_index)
        self.add_state("preds", [], dist_reduce_fx="cat")
        self.add_state("target", [], dist_reduce_fx="cat")
        self.add_state("group", [], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor, group: Tensor) -> None:
        _check_auroc_inputs(preds, target)
        group = _check_group_for(group, target.shape[0], self.num_groups, self.ignore_index)
        self.preds.append(preds.detach().float())
        self.target.append(target.detach().long())
        self.group.append(group.to(preds.device))

    def compute(self) -> Tensor:
        preds, target, group = dim_zero_cat(self.preds), dim_zero_cat(self.target), dim_zero_cat(self.group)
        if preds.numel() == 0:
            return torch.tensor(float("nan"))
        overall, values, defined = group_auroc(preds, target.long(), group.long(), self.num_groups, self.ignore_index)
        return equity_scale(overall, values, defined, self.mode, self.alpha).float()
