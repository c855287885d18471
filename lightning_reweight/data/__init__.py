"""Data: the index-yielding wrapper, collate, DataModule plugins and real-data DataModules.

Real-data modules read from ``root`` (default ``../shared/datasets``): ``AdultDataModule``,
``CIFAR10CDataModule``, ``ISBI2012DataModule``, ``PH2DataModule``; streamed text: ``CharStreamDataModule``; multilingual byte streams mixed by temperature: ``MultilingualDataModule``; LitData chunks (optional extra ``litdata``): ``LitDataTextModule``,
``TextWindowDataset``, ``optimize_text_windows`` (imported on first use, from ``data/litdata_text.py``).
"""

from typing import Any

from lightning_reweight.data.adult import AdultDataModule
from lightning_reweight.data.cifar10 import cifar10_lt_counts, load_cifar10, long_tail_indices
from lightning_reweight.data.corruptions import CIFAR10CDataModule, corrupt
from lightning_reweight.data.digits import DigitsDataModule, long_tail_counts, long_tail_subset
from lightning_reweight.data.indexed import IndexedDataset, indexed_collate, infer_targets
from lightning_reweight.data.multilingual import MultilingualDataModule
from lightning_reweight.data.plugin import SamplingDataModule, register_sampler
from lightning_reweight.data.segmentation import ISBI2012DataModule, PH2DataModule
from lightning_reweight.data.smote import SMOTEDataModule, smote_resample
from lightning_reweight.data.text import CharStreamDataModule, CharWindowStream

__all__ = [
    "AdultDataModule",
    "CIFAR10CDataModule",
    "CharStreamDataModule",
    "CharWindowStream",
    "DigitsDataModule",
    "ISBI2012DataModule",
    "IndexedDataset",
    "LitDataTextModule",
    "MultilingualDataModule",
    "PH2DataModule",
    "SMOTEDataModule",
    "SamplingDataModule",
    "TextWindowDataset",
    "cifar10_lt_counts",
    "corrupt",
    "indexed_collate",
    "infer_targets",
    "load_cifar10",
    "long_tail_counts",
    "long_tail_indices",
    "long_tail_subset",
    "optimize_text_windows",
    "register_sampler",
    "smote_resample",
]

_LITDATA = ("LitDataTextModule", "TextWindowDataset", "optimize_text_windows")


def __getattr__(name: str) -> Any:
    if name in _LITDATA:  # the optional `litdata` dependency is imported only when asked for
        from lightning_reweight.data import litdata_text

        return getattr(litdata_text, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
