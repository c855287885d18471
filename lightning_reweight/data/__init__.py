"""Data: the index-yielding wrapper, collate, DataModule plugin and data sets."""

from lightning_reweight.data.digits import DigitsDataModule, long_tail_counts, long_tail_subset
from lightning_reweight.data.indexed import IndexedDataset, indexed_collate, infer_targets

__all__ = ["DigitsDataModule", "IndexedDataset", "indexed_collate", "infer_targets", "long_tail_counts",
           "long_tail_subset"]
