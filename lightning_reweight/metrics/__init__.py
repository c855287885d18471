"""Metrics: equity-scaled (FairSeg) and group-wise torchmetrics metrics, each with a functional twin.

Class metrics hold their statistics in ``add_state(..., dist_reduce_fx=...)`` states, so they are correct
under DDP and usable with ``self.log`` / ``ModelCheckpoint(monitor=...)``.
"""

from lightning_reweight.metrics.equity import (
    EquityScaledAccuracy,
    EquityScaledAUROC,
    EquityScaledDice,
    EquityScaledIoU,
)
from lightning_reweight.metrics.functional import (
    equity_scale,
    equity_scaled_accuracy,
    equity_scaled_auroc,
    equity_scaled_dice,
    equity_scaled_iou,
    group_auroc,
    per_image_dice,
    per_image_iou,
    per_sample_correct,
)
from lightning_reweight.metrics.groupwise import GroupwiseMetric

__all__ = [
    "EquityScaledAccuracy",
    "EquityScaledAUROC",
    "EquityScaledDice",
    "EquityScaledIoU",
    "GroupwiseMetric",
    "equity_scale",
    "equity_scaled_accuracy",
    "equity_scaled_auroc",
    "equity_scaled_dice",
    "equity_scaled_iou",
    "group_auroc",
    "per_image_dice",
    "per_image_iou",
    "per_sample_correct",
]
