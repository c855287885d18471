"""lightning_reweight: decide how much each training sample counts and how often it is drawn."""

from lightning_reweight.callbacks import GlobalBatch, LossReweighting, WeightingCallback
from lightning_reweight.contract import MissingIndexError, reduce_loss
from lightning_reweight.data import IndexedDataset, indexed_collate
from lightning_reweight.rules import create_rule
from lightning_reweight.state import SampleStateTable

__version__ = "0.1.0.dev0"

__all__ = [
    "GlobalBatch",
    "IndexedDataset",
    "LossReweighting",
    "MissingIndexError",
    "SampleStateTable",
    "WeightingCallback",
    "create_rule",
    "indexed_collate",
    "reduce_loss",
]
