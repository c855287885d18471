"""Example LightningModules that follow the per-sample loss contract."""

from lightning_reweight.models.classifier import ImageClassifier, unpack_batch
from lightning_reweight.models.lm import CharTransformerLM
from lightning_reweight.models.segmenter import SegmentationModule
from lightning_reweight.models.tabular import TabularClassifier

__all__ = ["CharTransformerLM", "ImageClassifier", "SegmentationModule", "TabularClassifier", "unpack_batch"]
