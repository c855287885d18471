"""Example LightningModules that follow the per-sample loss contract."""

from lightning_reweight.models.classifier import ImageClassifier, unpack_batch

__all__ = ["ImageClassifier", "unpack_batch"]
