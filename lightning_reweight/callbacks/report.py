"""``MetricsReport``: print the final logged metrics as a table when fitting ends."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override


class MetricsReport(Callback):
    """Print the last value of every logged metric whose name starts with one of ``prefixes``.

    Example::

        Trainer(callbacks=[MetricsReport(prefixes=("val/",))])
    """

    def __init__(self, prefixes: tuple[str, ...] | list[str] = ("val/",)):
        self.prefixes = tuple(prefixes)
        self.last: dict[str, float] = {}

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(self.prefixes)}
        if not self.last:
            return
        width = max(len(k) for k in self.last)
        lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  ------"]
        lines += [f"{k.ljust(width)}  {v:.4f}" for k, v in sorted(self.last.items())]
        rank_zero_info("\nFinal metrics\n" + "\n".join(lines))
