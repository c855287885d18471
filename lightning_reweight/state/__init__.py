"""Per-sample state: the ``SampleStateTable`` and its column specs."""

from lightning_reweight.state.keys import StreamKeys, expected_collision_rate, slots_for, splitmix64
from lightning_reweight.state.table import DEFAULT_COLUMNS, Column, SampleStateTable
from lightning_reweight.state.validate import CheckpointStateError, TrainingSetChangedError

__all__ = [
    "CheckpointStateError",
    "Column",
    "DEFAULT_COLUMNS",
    "SampleStateTable",
    "StreamKeys",
    "TrainingSetChangedError",
    "expected_collision_rate",
    "slots_for",
    "splitmix64",
]
