"""Example LightningModules that follow the per-sample loss contract.

The modules load on first use (PEP 562), so ``from lightning_reweight.models import ImageClassifier`` does not
import segmentation-models-pytorch, and ``lightning_reweight.models.SegmentationModule`` (what a LightningCLI
``class_path`` names) still resolves.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "CharTransformerLM": "lm",
    "ImageClassifier": "classifier",
    "SegmentationModule": "segmenter",
    "TabularClassifier": "tabular",
    "unpack_batch": "classifier",
}

__all__ = ["CharTransformerLM", "ImageClassifier", "SegmentationModule", "TabularClassifier", "unpack_batch"]

if TYPE_CHECKING:
    from lightning_reweight.models.classifier import ImageClassifier, unpack_batch
    from lightning_reweight.models.lm import CharTransformerLM
    from lightning_reweight.models.segmenter import SegmentationModule
    from lightning_reweight.models.tabular import TabularClassifier


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
