"""What plugs into Lightning: the weighting callbacks, samplers' callbacks, TTA, and their shared base."""

from lightning_reweight.callbacks.adawac import AdaWAC
from lightning_reweight.callbacks.balancing import GroupBalancing
from lightning_reweight.callbacks.base import GlobalBatch, WeightingCallback, weighting_callbacks
from lightning_reweight.callbacks.febs import FairErrorBoundScaling
from lightning_reweight.callbacks.group_dro import GroupDRO
from lightning_reweight.callbacks.importance import ImportanceSampling
from lightning_reweight.callbacks.logging import log_histogram, log_scalars, log_weight_stats, weight_summary
from lightning_reweight.callbacks.loss_reweighting import LossReweighting
from lightning_reweight.callbacks.mixing import StreamMixing
from lightning_reweight.callbacks.report import MetricsReport
from lightning_reweight.callbacks.sampling import SamplerState, ensure_sampler_state, install_sampler
from lightning_reweight.callbacks.streams import StreamShardCheck, StreamShardingError, check_stream_sharding
from lightning_reweight.callbacks.tta import EATA, EntropyAdaptation, Tent

__all__ = [
    "AdaWAC",
    "EATA",
    "EntropyAdaptation",
    "FairErrorBoundScaling",
    "GlobalBatch",
    "GroupBalancing",
    "GroupDRO",
    "ImportanceSampling",
    "LossReweighting",
    "MetricsReport",
    "SamplerState",
    "StreamMixing",
    "StreamShardCheck",
    "StreamShardingError",
    "Tent",
    "WeightingCallback",
    "check_stream_sharding",
    "ensure_sampler_state",
    "install_sampler",
    "log_histogram",
    "log_scalars",
    "log_weight_stats",
    "weight_summary",
    "weighting_callbacks",
]
