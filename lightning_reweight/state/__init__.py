"""Per-sample state: the ``SampleStateTable`` and its column specs."""

from lightning_reweight.state.table import DEFAULT_COLUMNS, Column, SampleStateTable

__all__ = ["Column", "DEFAULT_COLUMNS", "SampleStateTable"]
