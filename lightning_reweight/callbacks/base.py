"""The shared base of every weighting callback, and the ``GlobalBatch`` it sees."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_reweight.callbacks.logging import log_weight_stats
from lightning_reweight.state.table import Column, SampleStateTable


@dataclass
class GlobalBatch:
    """One training step's per-sample values from every DDP rank, identical on every rank.

    Attributes:
        losses: detached float32 per-sample losses of the global batch (after any ``transform_losses``).
        index: int64 dataset indices (or stream keys); all ``-1`` on the index-free streaming path.
        group: int64 group ids or ``None``.
        target: targets or ``None``.
        extras: other per-sample tensors the module handed to ``reduce_loss`` (detached, gathered).
        local: this rank's rows (``losses[local]`` are the local samples).
        sizes: per-rank row counts, by global rank.
        global_step: ``trainer.global_step`` at this step.
    """

    losses: Tensor
    index: Tensor
    group: Tensor | None = None
    target: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    local: slice = field(default_factory=lambda: slice(None))
    sizes: list[int] = field(default_factory=list)
    global_step: int = 0

    @property
    def world_size(self) -> int:
        return max(len(self.sizes), 1)

    def __len__(self) -> int:
        return self.losses.numel()


def infer_num_samples(trainer: pl.Trainer) -> int | None:
    """The train data set's ``num_keys`` (streams with stable keys) or length, when the train dataloader has one."""
    loader = getattr(trainer, "train_dataloader", None)
    loaders = loader.values() if isinstance(loader, dict) else loader if isinstance(loader, (list, tuple)) else [loader]
    for dl in loaders:
        dataset = getattr(dl, "dataset", None)
        if dataset is not None:
            keys = getattr(dataset, "num_keys", None)  # a stream's stable-key range (data/text.py)
            if isinstance(keys, int) and not isinstance(keys, bool):
                return keys
            try:
                return len(dataset)
            except TypeError:
                continue
    return None


class WeightingCallback(Callback):
    """Base class of the callbacks that ``reduce_loss`` consults.

    Subclasses implement ``compute_weights`` (global per-sample weights) and/or ``transform_losses``
    (rewrite the local per-sample loss, e.g. combine a supervised and a consistency term). The base class
    keeps an optional per-sample ``SampleStateTable`` (``loss``, ``ema_loss``, ``count``, ``weight`` plus
    ``extra_columns()``), checkpoints it with ``extra_state()``, and logs weight histograms and scalars.

    Args:
        num_samples: training set size N for the table; inferred from the train dataloader if ``None``.
        track_samples: keep the per-sample table (O(N) memory per column).
        ema_decay: decay of the ``ema_loss`` column.
        log_every_n_steps: how often weight scalars/histograms are logged (0 disables).
        log_histogram: also write histograms (TensorBoard).
        name: distinguishes two instances of the same class (checkpoint key and log prefix).
    """

    #: whether ``compute_weights`` returns weights with mean 1 over the global batch
    normalized: bool = True
    #: log prefix (``name`` overrides it)
    log_prefix: str = "reweight"
    #: whether ``compute_weights`` reads per-sample state keyed by ``batch.index``; rules that need only the
    #: global batch (LossReweighting, GroupDRO) set it to ``False`` and then run without an index when
    #: ``track_samples=False`` (the streaming mode, see docs/lm.md)
    needs_sample_state: bool = True

    def __init__(self, num_samples: int | None = None, track_samples: bool = True, ema_decay: float = 0.9,
                 log_every_n_steps: int = 50, log_histogram: bool = True, name: str | None = None):
        if num_samples is not None and (not isinstance(num_samples, int) or num_samples <= 0):
            raise ValueError(f"Expected argument `num_samples` to be a positive int or None, but got {num_samples!r}.")
        if not 0 <= ema_decay < 1:
            raise ValueError(f"Expected argument `ema_decay` to be in [0, 1), but got {ema_decay!r}.")
        if log_every_n_steps < 0:
            raise ValueError(f"Expected argument `log_every_n_steps` to be >= 0, but got {log_every_n_steps!r}.")
        self.num_samples = num_samples
        self.track_samples = track_samples
        self.ema_decay = ema_decay
        self.log_every_n_steps = log_every_n_steps
        self.log_histogram = log_histogram
        self.name = name
        self.table: SampleStateTable | None = None
        self._pending_table_state: dict[str, Any] | None = None
        self._last: tuple[GlobalBatch, Tensor] | None = None
        #: the weights this callback's ``compute_weights`` returned at the last step (``None``: no opinion)
        self.last_weights: Tensor | None = None

    # ------------------------------------------------------------------ identity
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    @property
    def prefix(self) -> str:
        return self.name or self.log_prefix

    @property
    def needs_index(self) -> bool:
        """Whether this callback needs a per-sample index (or stable stream key) from ``reduce_loss``."""
        return self.needs_sample_state or self.track_samples

    # ------------------------------------------------------------------ subclass API
    def extra_columns(self) -> dict[str, Column]:
        """Method-specific table columns (name -> spec)."""
        return {}

    def transform_losses(self, losses: Tensor, extras: dict[str, Tensor], batch: GlobalBatch,
                         trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor | None:
        """Return a new local per-sample loss (with gradient), or ``None`` to leave it unchanged."""
        return None

    def compute_weights(self, batch: GlobalBatch, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor | None:
        """Global per-sample weights ``(len(batch),)``, non-negative; ``None`` for no opinion."""
        return None

    def on_weights_computed(self, batch: GlobalBatch, weights: Tensor, trainer: pl.Trainer,
                            pl_module: pl.LightningModule) -> None:
        """Called with the final combined weights (the ones training used); the default records them in the
        table and keeps this callback's own weights (``last_weights``) for logging."""
        if self.table is not None:
            self.table.update(batch.index, loss=batch.losses, ema_loss=batch.losses, weight=weights)
        self._last = None if self.last_weights is None else (batch, self.last_weights)

    def log_extras(self) -> dict[str, float]:
        """Method-specific scalars logged next to the weight statistics (e.g. ``{"q/group_0": 0.4}``)."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Anything besides the table that a resume needs."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        return None

    # ------------------------------------------------------------------ table
    def ensure_table(self, trainer: pl.Trainer | None) -> SampleStateTable | None:
        """Create the table on first use (size from ``num_samples`` or the train dataloader)."""
        if not self.track_samples or self.table is not None:
            return self.table
        if self._pending_table_state is not None:
            self.table = SampleStateTable.from_state_dict(self._pending_table_state)
            self._pending_table_state = None
        else:
            n = self.num_samples or (infer_num_samples(trainer) if trainer is not None else None)
            if n is None:
                raise RuntimeError(
                    f"{type(self).__name__} could not infer the training set size from the Trainer's train "
                    "dataloader. Pass `num_samples=len(train_dataset)`."
                )
            self.table = SampleStateTable(n, ema_decay=self.ema_decay)
        if self.num_samples is not None and self.table.num_samples != self.num_samples:
            raise ValueError(f"Checkpointed table has {self.table.num_samples} rows but num_samples={self.num_samples}.")
        for name, spec in self.extra_columns().items():
            self.table.add_column(name, spec)
        return self.table

    def validate_batch(self, batch: GlobalBatch, trainer: pl.Trainer) -> None:
        """Check the batch against this callback's state before anything is updated."""
        table = self.ensure_table(trainer)
        if table is not None:
            table.check_index(batch.index)

    # ------------------------------------------------------------------ logging
    def should_log(self, trainer: pl.Trainer) -> bool:
        return self.log_every_n_steps > 0 and trainer.global_step % self.log_every_n_steps == 0

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._last is None:
            return
        gbatch, weights = self._last
        self._last = None
        # global_step already advanced for this batch; log on the step that produced the weights
        if self.log_every_n_steps > 0 and gbatch.global_step % self.log_every_n_steps == 0:
            log_weight_stats(trainer, pl_module, self.prefix, weights, gbatch.group, histogram=self.log_histogram,
                             extra=self.log_extras(), step=gbatch.global_step)

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        table = self.table.state_dict() if self.table is not None else self._pending_table_state
        return {"table": table, "extra": self.extra_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        table_state = state_dict.get("table")
        if table_state is not None:
            if self.table is not None:
                self.table.load_state_dict(table_state)
            else:
                self._pending_table_state = table_state
        self.load_extra_state(state_dict.get("extra", {}))


def weighting_callbacks(trainer: pl.Trainer | None) -> list[WeightingCallback]:
    """The Trainer's ``WeightingCallback`` instances, in ``trainer.callbacks`` order."""
    if trainer is None:
        return []
    return [cb for cb in trainer.callbacks if isinstance(cb, WeightingCallback)]
