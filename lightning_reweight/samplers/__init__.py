"""What draws samples: the weighted draw core and the samplers built on it."""

from lightning_reweight.samplers._install import ensure_sampler_state, install_sampler
from lightning_reweight.samplers.balanced import TemperatureSampler
from lightning_reweight.samplers.core import (
    AliasTable,
    EpochPlan,
    WeightedSampler,
    build_alias_table,
    draw_alias,
    draw_weighted,
    epoch_generator,
    sequence_fingerprint,
    uniform_indices,
    validate_weights,
)
from lightning_reweight.samplers.importance import ImportanceSampler
from lightning_reweight.samplers.rs2 import RS2Sampler, rs2_cosine_schedule

__all__ = [
    "AliasTable",
    "EpochPlan",
    "ImportanceSampler",
    "TemperatureSampler",
    "RS2Sampler",
    "WeightedSampler",
    "build_alias_table",
    "draw_alias",
    "draw_weighted",
    "ensure_sampler_state",
    "epoch_generator",
    "install_sampler",
    "rs2_cosine_schedule",
    "sequence_fingerprint",
    "uniform_indices",
    "validate_weights",
]
