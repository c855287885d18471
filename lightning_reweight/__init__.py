"""lightning_reweight: decide how much each training sample counts and how often it is drawn."""

from lightning_reweight._compile import CompileFallbackWarning
from lightning_reweight.callbacks import (
    EATA,
    AdaWAC,
    FairErrorBoundScaling,
    GlobalBatch,
    GroupBalancing,
    GroupDRO,
    ImportanceSampling,
    LossReweighting,
    SamplerState,
    StreamMixing,
    Tent,
    WeightingCallback,
    install_sampler,
)
from lightning_reweight.contract import MissingIndexError, StepInputError, reduce_loss
from lightning_reweight.data import IndexedDataset, SamplingDataModule, indexed_collate
from lightning_reweight.doors import Reweighter
from lightning_reweight.rules import create_rule
from lightning_reweight.samplers import RS2Sampler, StreamMixture, WeightedSampler
from lightning_reweight.sequence import sequence_losses
from lightning_reweight.state import SampleStateTable, StreamKeys

__version__ = "0.1.0"

__all__ = [
    "AdaWAC",
    "CompileFallbackWarning",
    "EATA",
    "FairErrorBoundScaling",
    "GroupBalancing",
    "GroupDRO",
    "ImportanceSampling",
    "RS2Sampler",
    "Reweighter",
    "StepInputError",
    "SamplerState",
    "SamplingDataModule",
    "StreamMixing",
    "StreamMixture",
    "Tent",
    "WeightedSampler",
    "GlobalBatch",
    "IndexedDataset",
    "LossReweighting",
    "MissingIndexError",
    "SampleStateTable",
    "StreamKeys",
    "WeightingCallback",
    "create_rule",
    "indexed_collate",
    "install_sampler",
    "reduce_loss",
    "sequence_losses",
]
