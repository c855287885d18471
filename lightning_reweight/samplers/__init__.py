"""What draws samples: the weighted draw core and the samplers built on it (no Lightning: putting a sampler into
the Trainer's train dataloader is the Lightning layer's job, ``lightning_reweight.callbacks.install_sampler``)."""

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
from lightning_reweight.samplers.mixture import StreamMixture, draw_domains, uniform01
from lightning_reweight.samplers.rs2 import RS2Sampler, rs2_cosine_schedule

__all__ = [
    "AliasTable",
    "EpochPlan",
    "ImportanceSampler",
    "TemperatureSampler",
    "RS2Sampler",
    "StreamMixture",
    "WeightedSampler",
    "build_alias_table",
    "draw_domains",
    "draw_alias",
    "draw_weighted",
    "epoch_generator",
    "rs2_cosine_schedule",
    "sequence_fingerprint",
    "uniform01",
    "uniform_indices",
    "validate_weights",
]

_MOVED = {"install_sampler", "ensure_sampler_state"}  # the Lightning layer: ``lightning_reweight.callbacks``


def __getattr__(name: str):
    if name in _MOVED:  # imports nothing from ``callbacks`` (samplers sit below it): say where it lives instead
        raise ImportError(
            f"`{name}` moved to the Lightning layer: use `from lightning_reweight.callbacks import {name}` "
            f"(or `from lightning_reweight import {name}`)."
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
