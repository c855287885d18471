"""What plugs into Lightning: the weighting callbacks and their shared base."""

from lightning_reweight.callbacks.base import GlobalBatch, WeightingCallback, weighting_callbacks
from lightning_reweight.callbacks.logging import log_histogram, log_scalars, log_weight_stats, weight_summary
from lightning_reweight.callbacks.loss_reweighting import LossReweighting
from lightning_reweight.callbacks.report import MetricsReport

__all__ = [
    "GlobalBatch",
    "LossReweighting",
    "MetricsReport",
    "WeightingCallback",
    "log_histogram",
    "log_scalars",
    "log_weight_stats",
    "weight_summary",
    "weighting_callbacks",
]
