"""Per-sample state: the ``SampleStateTable`` and its column specs."""

from lightning_reweight.state.table import DEFAULT_COLUMNS, Column, SampleStateTable
from lightning_reweight.state.validate import CheckpointStateError, TrainingSetChangedError

__all__ = ["CheckpointStateError", "Column", "DEFAULT_COLUMNS", "SampleStateTable", "TrainingSetChangedError"]
