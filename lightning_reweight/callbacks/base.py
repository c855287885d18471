"""The shared base of every weighting callback, and the ``GlobalBatch`` it sees."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_reweight._compile import resolve_compile
from lightning_reweight.callbacks._restore import checkpoint_entry, warn_unmatched
from lightning_reweight.callbacks.logging import log_weight_stats
from lightning_reweight.engine import TWO_LINES, DeferredChecks, GlobalBatch
from lightning_reweight.state.table import DEFAULT_COLUMNS, Column, SampleStateTable, _spec_to_dict
from lightning_reweight.state.validate import (
    CheckpointStateError,
    TrainingSetChangedError,
    as_int,
    require_keys,
)

#: deferred checks (``sync_checks=False``) kept per callback before they are folded into one count on the device
DEFERRED_FOLD = 256


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
            if getattr(dataset, "distributed_env", None) is not None:
                continue  # a LitData stream's length is this rank's share, not the key range
            try:
                return len(dataset)
            except TypeError:
                continue
    return None


def module_device(module: Any) -> torch.device | None:
    """The device of a LightningModule (``.device``) or a plain ``nn.Module`` (its first parameter); ``None``
    when it has neither."""
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    params = getattr(module, "parameters", None)
    if callable(params):
        first = next(iter(params()), None)
        if first is not None:
            return first.device
    return None


class WeightingCallback(Callback):
    """Base class of the callbacks that ``reduce_loss`` consults.

    Subclasses implement ``compute_weights`` (global per-sample weights) and/or ``transform_losses``
    (rewrite the local per-sample loss, e.g. combine a supervised and a consistency term). The base class
    keeps an optional per-sample ``SampleStateTable`` (``loss``, ``ema_loss``, ``count``, ``weight`` plus
    ``extra_columns()``), checkpoints it with ``extra_state()``, and logs weight histograms and scalars.

    **Atomic steps.** ``reduce_loss`` runs a step in three phases: *propose* (``validate_batch``,
    ``transform_losses``, ``compute_weights`` on every callback), *validate* (each proposal and the combined
    weights: right length, finite, non-negative, not all zero) and *commit* (``on_weights_computed`` on every
    callback). The propose hooks must not change any state (tables, counters, ``q``, EMAs, RNGs): every state
    change goes in ``on_weights_computed``, which runs only once the whole step was accepted. A step that is
    rejected in the propose or validate phase therefore leaves every callback as it was. ``on_weights_computed``
    must not raise on a validated batch (do any check that could fail in ``validate_batch``).

    **Restoring state.** Validation and assignment are separate: ``check_state_dict`` validates the whole entry
    (``check_extra_state``, which reads every extra entry through the helpers of
    ``lightning_reweight.state.validate`` with ``where=self.checkpoint_where``, then the table with
    ``SampleStateTable.validate_state`` against ``declared_columns()``) and assigns nothing;
    ``load_state_dict`` runs it and then assigns (``assign_extra_state``, the table last). Under a Trainer,
    ``on_load_checkpoint`` runs ``check_state_dict`` on this callback's entry, and Lightning calls it on every
    callback before it calls any ``load_state_dict``: a bad entry of any lightning_reweight callback stops the
    resume before any callback was assigned. A bad entry raises ``CheckpointStateError`` naming the key.

    **Another configuration.** An ``ema`` column whose checkpointed decay differs from this callback's
    (``ema_decay=0.5`` resumed with ``ema_decay=0.9``) continues with the constructor's decay, with a warning
    naming both (its values so far are kept); a column of another kind is refused. A checkpointed table that
    ``track_samples=False`` drops is warned about, and so is a checkpoint that holds this class's state only
    under another ``state_key`` (another rule or ``name``), or none at all.

    **Training set size.** A table restored from a checkpoint must have as many rows as the training set
    (``num_samples``, or the train dataloader's data set length): otherwise ``TrainingSetChangedError`` is
    raised at the start of training. ``fresh_table=True`` ignores the checkpointed table (every per-sample
    statistic starts anew; the rest of the callback's state is restored). The same size bounds the dataset
    indices of every batch, for callbacks with and without a table.

    Args:
        num_samples: training set size N for the table; inferred from the train dataloader if ``None``.
        track_samples: keep the per-sample table (O(N) memory per column).
        ema_decay: decay of the ``ema_loss`` column.
        log_every_n_steps: how often weight scalars/histograms are logged (0 disables).
        log_histogram: also write histograms (TensorBoard).
        name: distinguishes two instances of the same class (checkpoint key and log prefix).
        fresh_table: do not restore the per-sample table from a checkpoint (e.g. after the training set
            changed); the rest of the state is restored. Also settable as an attribute before ``fit``
            (``callback.fresh_table = True``) for subclasses that do not forward it. It applies to every
            restore while set: remove it once the run has a checkpoint of the new training set.
        device: where the table lives: ``"auto"`` (the module's device when this callback is
            ``device_ready``, else CPU), ``"cpu"``, or a device.
        sync_checks: let ``reduce_loss`` read its validation results back to the host each step (two small
            reads; on a GPU these are the step's only host synchronisations). ``False`` defers the checks to
            the end of the epoch / the next checkpoint: no host sync per step, but a bad step is reported late
            and its state changes are kept.
        compile: run the step's pure parts (a subclass's rule, the table's merge) through ``torch.compile``:
            ``True`` (mode ``"default"``) or a mode name (``"reduce-overhead"``: CUDA graphs). Falls back to the
            eager code with a ``CompileFallbackWarning`` where compilation is unavailable (docs/gpu.md).
    """

    #: whether ``compute_weights`` returns weights with mean 1 over the global batch
    normalized: bool = True
    #: log prefix (``name`` overrides it)
    log_prefix: str = "reweight"
    #: the propose/commit hooks work on a ``GlobalBatch`` on any device without host synchronisation; when
    #: every attached callback says so, ``reduce_loss`` keeps the batch on the losses' device
    device_ready: bool = False

    #: whether ``compute_weights`` reads per-sample state keyed by ``batch.index``; rules that need only the
    #: global batch (LossReweighting, GroupDRO) set it to ``False`` and then run without an index when
    #: ``track_samples=False`` (the streaming mode, see docs/lm.md)
    needs_sample_state: bool = True

    def __init__(self, num_samples: int | None = None, track_samples: bool = True, ema_decay: float = 0.9,
                 log_every_n_steps: int = 50, log_histogram: bool = True, name: str | None = None, *,
                 fresh_table: bool = False, device: str | torch.device = "auto", sync_checks: bool = True,
                 compile: bool | str = False):
        if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                        or num_samples <= 0):
            raise ValueError(f"Expected argument `num_samples` to be a positive int or None, but got {num_samples!r}.")
        if not 0 <= ema_decay < 1:
            raise ValueError(f"Expected argument `ema_decay` to be in [0, 1), but got {ema_decay!r}.")
        if log_every_n_steps < 0:
            raise ValueError(f"Expected argument `log_every_n_steps` to be >= 0, but got {log_every_n_steps!r}.")
        if not (device == "auto" or isinstance(device, torch.device) or isinstance(device, str)):
            raise ValueError(f"Expected argument `device` to be 'auto', 'cpu' or a torch.device, but got {device!r}.")
        self.num_samples = num_samples
        self.track_samples = track_samples
        self.ema_decay = ema_decay
        self.log_every_n_steps = log_every_n_steps
        self.log_histogram = log_histogram
        self.name = name
        self.fresh_table = bool(fresh_table)
        self.device = device if device == "auto" else torch.device(device)
        self.sync_checks = bool(sync_checks)
        self.compile_mode = resolve_compile(compile)
        self.table: SampleStateTable | None = None
        self._pending_table_state: tuple[int, dict[str, Column], dict[str, Tensor]] | None = None
        self._train_size: int | None = None
        self._last: tuple[GlobalBatch, Tensor] | None = None
        self._deferred: list[Tensor | DeferredChecks] = []  # checks not read yet (``defer_check``)
        self._deferred_bad: Tensor | None = None  # how many of the folded ones failed (0-d, on their device)
        #: the weights this callback's ``compute_weights`` returned at the last step (``None``: no opinion)
        self.last_weights: Tensor | None = None
        #: optimizer steps counted by this callback itself outside the Trainer (Fabric's optimizer hook or a
        #: ``Reweighter``): the step count warm-ups and schedules read there; checkpointed
        self.optimizer_steps = 0
        self._reduce_calls = 0  # reduce_loss steps that reached this callback (the "never called" check)
        self._calls_at_batch_start = 0
        self._calls_at_epoch_start = 0
        self._batches_this_epoch = 0

    # ------------------------------------------------------------------ identity
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    @property
    def prefix(self) -> str:
        return self.name or self.log_prefix

    @property
    def checkpoint_where(self) -> str:
        """The name of this callback's ``extra`` entry in a checkpoint, for ``CheckpointStateError`` messages."""
        return f"callbacks[{self.state_key!r}]['extra']"

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
        """Propose a new local per-sample loss (with gradient), or ``None`` to leave it unchanged.

        Must not change state: the step may still be rejected.
        """
        return None

    def compute_weights(self, batch: GlobalBatch, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor | None:
        """Propose global per-sample weights ``(len(batch),)``, non-negative; ``None`` for no opinion.

        Must not change state (counters, EMAs, ``q``, the table): the step may still be rejected by a later
        callback. Compute what ``on_weights_computed`` will need from the batch again, or keep it in a
        local proposal that the commit applies.
        """
        return None

    def on_weights_computed(self, batch: GlobalBatch, weights: Tensor, trainer: pl.Trainer,
                            pl_module: pl.LightningModule) -> None:
        """Commit the step: called with the final combined weights (the ones training used) once every
        callback's proposal and the combination were accepted. The only place where state changes; must not
        raise. The default records the batch in the table and keeps this callback's own weights
        (``last_weights``) for logging. ``self._repeats`` keeps where the batch's indices repeat (the table
        update's by-product on the CPU, else ``None``) for a subclass's own per-row writes of the same batch."""
        self._repeats = None if self.table is None else self.record_in_table(batch, weights)
        self._last = None if self.last_weights is None else (batch, self.last_weights)

    def record_in_table(self, batch: GlobalBatch, weights: Tensor) -> Any:
        """Write the accepted step into the per-sample table (``loss``, ``ema_loss``, ``count``, ``weight``);
        returns the table update's repeats (see ``on_weights_computed``)."""
        return self.table.update(batch.index, check=False, index_info=batch.index_info, loss=batch.losses,
                                 ema_loss=batch.losses, weight=weights)

    def log_extras(self) -> dict[str, float]:
        """Method-specific scalars logged next to the weight statistics (e.g. ``{"q/group_0": 0.4}``)."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Anything besides the table that a resume needs."""
        return {}

    def check_extra_state(self, state: dict[str, Any]) -> Any:
        """Validate ``extra_state()``'s checkpointed form and return what ``assign_extra_state`` takes; assigns
        nothing. Read every entry through ``lightning_reweight.state.validate``
        (``as_tensor(state, "q", self.checkpoint_where, ...)``): a bad entry raises ``CheckpointStateError``."""
        return state

    def assign_extra_state(self, checked: Any) -> None:
        """Assign what ``check_extra_state`` returned (must not raise)."""
        return None

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore ``extra_state()``: ``check_extra_state``, then ``assign_extra_state``.

        Subclasses implement the two halves; a subclass that overrides only this method (validating, then
        assigning) still works, but its extra state is then validated at assignment, not in the dry run."""
        self.assign_extra_state(self.check_extra_state(state))

    def _legacy_extra(self) -> bool:
        """Whether a subclass overrides ``load_extra_state`` instead of the check/assign halves."""
        cls = type(self)
        return (cls.load_extra_state is not WeightingCallback.load_extra_state
                and cls.check_extra_state is WeightingCallback.check_extra_state)

    # ------------------------------------------------------------------ table
    def declared_columns(self) -> dict[str, Column]:
        """Every column this callback's table has: the defaults (with ``ema_decay``) plus ``extra_columns()``."""
        cols = dict(DEFAULT_COLUMNS)
        cols["ema_loss"] = Column("ema", float("nan"), decay=self.ema_decay)
        cols.update(self.extra_columns())
        return cols

    def training_set_size(self, trainer: pl.Trainer | None) -> int | None:
        """N: ``num_samples``, else the train dataloader's data set length (cached per epoch), else ``None``."""
        if self.num_samples is not None:
            return self.num_samples
        if self._train_size is None and trainer is not None:
            self._train_size = infer_num_samples(trainer)
        return self._train_size

    def _table_device(self, pl_module: Any) -> torch.device:
        if self.device != "auto":
            return self.device
        device = module_device(pl_module)
        if self.device_ready and device is not None and device.type != "cpu":
            return device
        return torch.device("cpu")

    def ensure_table(self, trainer: pl.Trainer | None,
                     pl_module: pl.LightningModule | None = None) -> SampleStateTable | None:
        """Create the table on first use: from the restored checkpoint state (whose size must match the
        training set) or fresh (size from ``num_samples`` or the train dataloader)."""
        if not self.track_samples or self.table is not None:
            return self.table
        if pl_module is None and trainer is not None:
            pl_module = getattr(trainer, "lightning_module", None)
        n = self.training_set_size(trainer)
        device = self._table_device(pl_module)
        pending, self._pending_table_state = self._pending_table_state, None
        if pending is not None and not self.fresh_table:
            rows = pending[0]
            if n is not None and rows != n:
                self._pending_table_state = pending  # keep it: the error must not consume the state
                source = "num_samples" if self.num_samples is not None else "the train dataloader's data set"
                raise TrainingSetChangedError(
                    f"Expected the checkpointed per-sample table of {type(self).__name__} to have one row per "
                    f"training sample, but it has {rows} rows and the training set has {n} samples ({source}): "
                    "the training set changed since the checkpoint was written. Resume with the same training set, "
                    "or start this callback's per-sample table fresh (the rest of its state is restored): set "
                    "`fresh_table=True` on it (`callback.fresh_table = True` before `fit`), or delete "
                    f"`checkpoint['callbacks'][{self.state_key!r}]['table']`."
                )
            table = SampleStateTable(rows, columns=pending[1], device=device, _allocate=False)
            table._adopt(pending[1], pending[2])
        else:
            if n is None:
                raise RuntimeError(
                    f"{type(self).__name__} could not infer the training set size from the Trainer's train "
                    "dataloader. Pass `num_samples=len(train_dataset)`; on a stream of unknown size, pass "
                    "`num_samples=keys.num_samples` with `lightning_reweight.state.StreamKeys`, or "
                    "`track_samples=False` for rules that need only the batch."
                )
            table = SampleStateTable(n, ema_decay=self.ema_decay, device=device)
        for name, spec in self.extra_columns().items():
            table.add_column(name, spec)
        if self.compile_mode is not None:
            table.compile(self.compile_mode)
        self.table = table
        return self.table

    def validate_batch(self, batch: GlobalBatch, trainer: pl.Trainer) -> None:
        """Check the batch against this callback's configuration before anything is updated (propose phase:
        may raise, must not change state). ``reduce_loss`` has already checked the index range against the
        training set size once for every callback."""
        self.ensure_table(trainer)

    # ------------------------------------------------------------------ lifecycle
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_size = None
        from lightning_reweight.callbacks.streams import check_stream_sharding

        check_stream_sharding(trainer)  # a stream built before the DDP processes existed: every rank refuses
        # a restored table that does not fit fails here, before step 0; a stream of unknown size builds nothing
        # yet (the first step names the fix: an index/stream key, or `track_samples=False`)
        if self.track_samples and (self._pending_table_state is not None or self.training_set_size(trainer) is not None):
            self.ensure_table(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_size = None  # the train dataloader may have been reloaded
        self._calls_at_epoch_start, self._batches_this_epoch = self._reduce_calls, 0

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._calls_at_batch_start = self._reduce_calls
        self._batches_this_epoch += 1

    @property
    def requires_reduce_loss(self) -> bool:
        """Whether this callback acts only through ``reduce_loss`` (a training step that bypasses it is a mistake
        the callback reports)."""
        return True

    def _never_called(self, where: str) -> RuntimeError:
        return RuntimeError(
            f"{type(self).__name__} is attached, but `training_step` {where} without calling `reduce_loss`, so "
            "the callback never weighed a sample. Return `reduce_loss(self, losses, index)` from `training_step` "
            "(per-sample losses with `reduction=\"none\"`):" + TWO_LINES + "or remove the callback."
        )

    def _check_reduce_called(self, outputs: Any) -> None:
        """A training step that returned a loss without passing through ``reduce_loss`` (a step that returns
        ``None`` skips its batch: that is allowed)."""
        returned = isinstance(outputs, Tensor) or (isinstance(outputs, Mapping) and outputs.get("loss") is not None)
        if self.requires_reduce_loss and self._reduce_calls == self._calls_at_batch_start and returned:
            raise self._never_called("returned a loss")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # manual optimisation returns nothing: a whole epoch of batches without one reduce_loss call says it
        done = self._batches_this_epoch
        if self.requires_reduce_loss and done and self._reduce_calls == self._calls_at_epoch_start:
            raise self._never_called(f"ran {done} batch(es) of epoch {trainer.current_epoch}")

    # ------------------------------------------------------------------ outside the Trainer
    def on_after_optimizer_step(self, strategy: Any = None, optimizer: Any = None) -> None:
        """Lightning Fabric calls this after every ``optimizer.step()`` of a Fabric optimizer: the callback counts
        the optimizer steps itself (``optimizer_steps``), which its warm-up and schedules read outside the
        Trainer. (The Trainer never calls it; ``trainer.global_step`` counts there.)"""
        self.optimizer_steps += 1

    def start_outside_trainer(self, ctx: Any, module: Any) -> None:
        """What the Trainer's ``on_train_start`` does, for a door without the Trainer (Fabric, a ``Reweighter``):
        called once before the callback's first step there."""
        self.on_train_start(ctx, module)

    def outside_trainer_refusal(self) -> str | None:
        """Why this callback cannot run outside the Trainer's loops (``None``: it can), with what to use there."""
        return None

    def log_step(self, ctx: Any, module: Any) -> None:
        """Log the last committed step's weights at this callback's cadence (the Trainer does it in
        ``on_train_batch_end``; the other doors right after the step)."""
        if self._last is None:
            return
        gbatch, weights = self._last
        self._last = None
        if self.log_every_n_steps > 0 and gbatch.global_step % self.log_every_n_steps == 0:
            log_weight_stats(ctx, module, self.prefix, weights, gbatch.group, histogram=self.log_histogram,
                             extra=self.log_extras(), step=gbatch.global_step)

    def host_checks(self, batch: GlobalBatch) -> bool:
        """Whether this step may read a check's result back to the host now: on the CPU (a cheap read) or
        with ``sync_checks=True``. Otherwise (a batch on a GPU with ``sync_checks=False``) a callback hands
        its check to ``defer_check`` and it is read at the end of the epoch / the next checkpoint."""
        return self.sync_checks or batch.losses.device.type == "cpu"

    def check_step(self, batch: GlobalBatch, ok: Tensor, fail: Any) -> None:
        """A check of this step's batch (in ``validate_batch`` / ``compute_weights``): ``fail()`` raises unless
        the 0-d bool ``ok`` holds. It joins the step's own checks (``GlobalBatch.checks``): read at once on the
        CPU, with the engine's next read on a device (one transfer for all of a phase's checks), or deferred with
        them (``sync_checks=False``). The propose phase must not change state, so a late failure still leaves
        every callback as it was."""
        checks = batch.checks
        if checks is not None:
            checks.require(ok, fail)
        elif self.host_checks(batch):  # a batch built outside ``run_step``
            if not bool(ok):
                fail()
        else:
            self.defer_check(ok)

    def check_within(self, batch: GlobalBatch, value: Tensor, low: float, high: float, fail: Any) -> None:
        """``check_step`` of ``low <= value <= high`` for a 0-d ``value`` (a NaN fails): on a device with
        ``sync_checks`` the value itself joins the step's one read (no comparison kernels)."""
        checks = batch.checks
        if checks is not None:
            checks.within(value, low, high, fail)
        else:
            self.check_step(batch, (value >= low) & (value <= high), fail)

    def check_finite(self, batch: GlobalBatch, values: Tensor, fail: Any, minimum: float = -math.inf) -> None:
        """``check_step`` of "every value is finite (and at least ``minimum``)" for a floating tensor: on a device
        one ``aminmax`` whose two values join the step's checks (a NaN shows in both, -inf in the min, +inf in
        the max)."""
        if batch.checks is None or batch.checks.host or not values.numel():
            ok = torch.isfinite(values).all()
            self.check_step(batch, ok if minimum == -math.inf else ok & (values >= minimum).all(), fail)
            return
        big = float(torch.finfo(values.dtype).max)
        lo, hi = values.aminmax()
        self.check_within(batch, lo, max(-big, minimum), math.inf, fail)
        self.check_within(batch, hi, -math.inf, big, fail)

    def defer_check(self, ok: Tensor | DeferredChecks) -> None:
        """Keep a 0-d bool check of this step (or a step's raw ``DeferredChecks``) for ``check_deferred`` (no
        host synchronisation now).

        Every ``DEFERRED_FOLD`` checks are folded on their device into one count of failures (a few kernel
        launches), so a long epoch without a validation or checkpoint keeps O(1) tensors, not one per step."""
        if isinstance(ok, Tensor):
            ok = ok.reshape(())
        if self._deferred and self._deferred[0].device != ok.device:
            self._fold_deferred()  # the module moved: fold the old device's checks first
        self._deferred.append(ok)
        if len(self._deferred) >= DEFERRED_FOLD:
            self._fold_deferred()

    def _fold_deferred(self) -> None:
        if not self._deferred:
            return
        checks = [ok for ok in self._deferred if isinstance(ok, Tensor)]
        steps = [ok for ok in self._deferred if not isinstance(ok, Tensor)]
        bad = (~torch.stack(checks)).sum() if checks else DeferredChecks.count_bad(steps)
        if checks and steps:
            bad = bad + DeferredChecks.count_bad(steps)
        self._deferred = []
        if self._deferred_bad is not None:  # (a copy only if the module moved to another device since)
            bad = bad + self._deferred_bad.to(bad.device)
        self._deferred_bad = bad

    def check_deferred(self) -> None:
        """Read back the checks ``reduce_loss`` deferred (``sync_checks=False``) and raise if a step failed."""
        self._fold_deferred()
        if self._deferred_bad is None:
            return
        bad, self._deferred_bad = int(self._deferred_bad), None  # one host read for all the deferred checks
        if bad:
            raise ValueError(
                f"{bad} training step(s) since the last check had invalid per-sample "
                "weights or losses (checked late because `sync_checks=False`; their state changes were kept). "
                "Rerun with `sync_checks=True` to stop at the first bad step."
            )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_deferred()

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_deferred()

    # ------------------------------------------------------------------ logging
    def should_log(self, trainer: pl.Trainer) -> bool:
        return self.log_every_n_steps > 0 and trainer.global_step % self.log_every_n_steps == 0

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if getattr(pl_module, "automatic_optimization", True):  # manual optimisation: checked at the epoch end
            self._check_reduce_called(outputs)
        # global_step already advanced for this batch; log on the step that produced the weights
        self.log_step(trainer, pl_module)

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        """``{"table": ..., "extra": ...}``. The table entry holds the live columns (no O(N) copy; see
        ``SampleStateTable.state_dict``): valid until the next training step."""
        self.check_deferred()
        if self.table is not None:
            table = self.table.state_dict()
        elif self._pending_table_state is not None:
            n, specs, cols = self._pending_table_state
            table = {"num_samples": n, "columns": dict(cols), "specs": {k: _spec_to_dict(v) for k, v in specs.items()}}
        else:
            table = None
        return {"table": table, "extra": self.extra_state(), "optimizer_steps": self.optimizer_steps}

    def check_state_dict(self, state_dict: Any) -> CheckedState:
        """Validate a checkpoint entry (``state_dict()`` form) without assigning anything; ``load_state_dict``
        assigns the result. Raises ``CheckpointStateError`` (naming the key) or ``TrainingSetChangedError``."""
        where = f"callbacks[{self.state_key!r}]"
        require_keys(state_dict, [], where)  # a dict; both entries are optional (a callback without state)
        table_state, extra = state_dict.get("table"), state_dict.get("extra", {})
        if not isinstance(extra, Mapping):
            raise CheckpointStateError(where, "extra", f"expected a dict, but got {type(extra).__name__}.")
        extra = dict(extra)
        steps = as_int(state_dict, "optimizer_steps", where, minimum=0) if "optimizer_steps" in state_dict else 0
        checked_extra = extra if self._legacy_extra() else self.check_extra_state(extra)
        validated, notes = None, []
        if table_state is not None and not self.fresh_table and not self.track_samples:
            rows = table_state.get("num_samples") if isinstance(table_state, Mapping) else None
            notes.append(
                f"{type(self).__name__} ({self.state_key!r}) has `track_samples=False`, but the checkpoint holds its "
                f"per-sample table ({rows} rows): the table is dropped. To keep it, resume with `track_samples=True`."
            )
        elif table_state is not None and not self.fresh_table:
            n, specs, cols = SampleStateTable.validate_state(table_state, f"{where}['table']",
                                                             expected=self.declared_columns())
            if self.table is not None and n != self.table.num_samples:
                raise TrainingSetChangedError(
                    f"Expected the checkpointed per-sample table of {type(self).__name__} to have "
                    f"{self.table.num_samples} rows (the training set), but it has {n}. Resume with the "
                    "same training set, or set `fresh_table=True` on the callback to start its table fresh."
                )
            specs, notes = self._reconcile_specs(specs, f"{where}['table']['specs']")
            validated = (n, specs, cols)
        return CheckedState(validated, checked_extra, notes, steps)

    def _reconcile_specs(self, specs: dict[str, Column], where: str) -> tuple[dict[str, Column], list[str]]:
        """The specs the restored table continues with: this callback's declared ones (the constructor wins),
        with a note for each EMA decay that changed; a declared column of another kind is refused."""
        specs, notes = dict(specs), []
        for name, declared in self.declared_columns().items():
            old = specs[name]  # ``validate_state(expected=...)`` checked it is there
            if old.kind != declared.kind:
                raise CheckpointStateError(
                    where, name, f"expected a {declared.kind!r} column (this callback's), but the checkpoint's is "
                    f"{old.kind!r}: it was written by another configuration.",
                    fix="Resume with the configuration that wrote it, or start the per-sample table fresh with "
                        "`fresh_table=True` (the rest of the state is restored).")
            if declared.kind == "ema" and old.decay != declared.decay:
                arg = "`ema_decay`" if name == "ema_loss" else "the constructor"
                notes.append(
                    f"{type(self).__name__} ({self.state_key!r}): the checkpointed per-sample column {name!r} was "
                    f"written with EMA decay {old.decay}; this callback's {arg} sets {declared.decay}, which applies "
                    f"from now on (the values so far are kept). To keep {old.decay}, resume with "
                    f"{'ema_decay=' if name == 'ema_loss' else 'decay '}{old.decay}."
                )
            specs[name] = declared
        return specs, notes

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Validate the whole entry (``check_state_dict``), then assign; nothing is half restored."""
        self._assign_state(self.check_state_dict(state_dict))

    def _assign_state(self, checked: CheckedState) -> None:
        if self._legacy_extra():
            self.load_extra_state(checked.extra)  # validates, then assigns (before the table)
        else:
            self.assign_extra_state(checked.extra)
        self.optimizer_steps = checked.optimizer_steps
        for note in checked.notes:
            rank_zero_warn(note)
        if checked.table is not None:
            if self.table is not None:
                for name, spec in checked.table[1].items():
                    self.table.specs[name] = spec
                self.table._adopt(checked.table[1], checked.table[2])
            else:
                self._pending_table_state = checked.table

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Dry run: validate this callback's entry before Lightning assigns any callback's state (it calls this
        hook on every callback first); name the state another configuration wrote (``warn_unmatched``)."""
        entry = checkpoint_entry(self, checkpoint)
        if entry is not None:
            self.check_state_dict(entry)
        else:
            warn_unmatched(self, checkpoint, "its per-sample table and method state")


@dataclass
class CheckedState:
    """A validated checkpoint entry of a ``WeightingCallback``, ready to assign (``check_state_dict``).

    Attributes:
        table: ``(num_samples, specs, columns)`` of the table to restore, or ``None``.
        extra: what ``check_extra_state`` returned.
        notes: warnings to emit when the state is assigned (a changed EMA decay, a dropped table).
        optimizer_steps: the optimizer steps the callback counted outside the Trainer (Fabric, ``Reweighter``).
    """

    table: tuple[int, dict[str, Column], dict[str, Tensor]] | None
    extra: Any
    notes: list[str] = field(default_factory=list)
    optimizer_steps: int = 0


def weighting_callbacks(trainer: pl.Trainer | None) -> list[WeightingCallback]:
    """The Trainer's ``WeightingCallback`` instances, in ``trainer.callbacks`` order."""
    if trainer is None:
        return []
    return [cb for cb in trainer.callbacks if isinstance(cb, WeightingCallback)]
