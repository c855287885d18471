"""``SamplerState``: keeps lightning_reweight samplers in step with the Trainer (epoch, position, checkpoint).

How Lightning 2.x resumes mid-epoch (read from ``loops/fit_loop.py`` and ``loops/training_epoch_loop.py``):
the fit loop restores its progress counters (epoch, batches done in the epoch), then builds a FRESH train
dataloader iterator; it neither skips batches nor fast-forwards the sampler (only loaders implementing
``state_dict``/``load_state_dict`` are restored). The epoch then ends when the restored batch counter reaches
``len(dataloader)``, so a plain sampler replays the first batches of the epoch and never reaches its last
ones. Worse, the iterator is created (and, with ``num_workers > 0``, already pulls indices) in
``FitLoop.setup_data`` BEFORE ``set_epoch`` is called for the resumed epoch, and the restored batch counter
is per rank: on another number of processes it no longer says how much of the epoch is done.

``SamplerState`` fixes this for every sampler that has ``set_epoch``, ``state_dict``, ``load_state_dict`` and a
``cursor`` attribute (``WeightedSampler``, ``RS2Sampler`` and their subclasses):

* cursor = (batches whose training step finished in the epoch) × batch_size, and from it the sampler's GLOBAL
  ``position`` (samples of the epoch's global sequence consumed by all ranks together); read from the fit
  loop's batch progress when the state is saved, so the callback order relative to ``ModelCheckpoint`` does
  not matter (also set in ``on_train_batch_end``).
* ``state_dict``: every sampler's ``state_dict()``; ``load_state_dict`` keeps them until training starts.
* ``on_train_start``: validates every sampler's checkpointed state first (``CheckpointStateError`` names the
  key; nothing is half restored), loads them, sets the epoch, and if the loader iterator already pulled
  indices under another (epoch, position), re-creates it, so the resumed run yields exactly the remaining
  indices of the interrupted epoch. On another world size it checks that every rank still gets the same
  number of batches for the rest of the epoch (else it refuses, naming both world sizes) and sets the fit
  loop's batch counter of the epoch so that the epoch ends exactly when the remainder is used up.
* ``on_load_checkpoint`` (before any callback's state is assigned): refuses a mid-epoch checkpoint that holds no
  sampler state (``CheckpointStateError``; ``restart_epoch=True`` restarts that epoch instead, running all its
  batches). A run without a managed sampler saves ``{"samplers": []}``, so its checkpoints are not refused.
* checks DDP wiring: raises if Lightning wrapped a sampler in ``DistributedSamplerWrapper``
  (``use_distributed_sampler=True``) or if a sampler's ``num_replicas``/``rank`` disagree with the Trainer.
* cross-rank guard (``check_ranks=True``): after the first batch of every epoch, one small all-gather
  compares a fingerprint of each rank's planned global sequence and of every ``WeightingCallback`` table
  (``lightning_reweight.callbacks.consistency``); a mismatch raises on every rank, naming the ranks.
* logs draw statistics once per epoch through ``log_weight_stats`` (``{prefix}/ess_frac`` etc. of the
  sampling weights normalised to mean 1; per class/group mass when the sampler or dataset knows them).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_reweight.callbacks._install import (
    _flatten,
    find_samplers,
    is_resumable_sampler,
    restart_train_iterator,
    set_epoch_batches_done,
    wrap_train_source,
)
from lightning_reweight.callbacks._restore import checkpoint_entry
from lightning_reweight.callbacks.consistency import check_rank_consistency
from lightning_reweight.callbacks.logging import log_histogram, log_weight_stats
from lightning_reweight.state.validate import CheckpointStateError

__all__ = ["SamplerState", "ensure_sampler_state", "find_samplers", "install_sampler", "is_resumable_sampler"]

_MAX_HISTOGRAM = 1_000_000
_NOT_RESUMABLE_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"


def _batch_size(loader: Any) -> int:
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    if not isinstance(size, int) or size < 1:
        raise ValueError(
            f"Expected the train dataloader to have an int `batch_size` (or a batch sampler with one) so"
            f" `SamplerState` can count consumed samples, but got {size!r}; use `DataLoader(batch_size=...)`."
        )
    return size


def _set_cursor(sampler: Any, consumed: int) -> None:
    setter = getattr(sampler, "set_cursor", None)
    if setter is not None:
        setter(consumed)
    else:
        sampler.cursor = min(consumed, len(sampler))


class SamplerState(Callback):
    """Set the epoch, track the cursor and checkpoint the state of lightning_reweight samplers.

    Add it whenever a train dataloader uses a ``WeightedSampler`` / ``RS2Sampler`` (or subclass); the
    ``DataModule`` plugin (``lightning_reweight.data.plugin``) needs it too. Resuming with
    ``trainer.fit(ckpt_path=...)`` from a mid-epoch checkpoint then yields exactly the remaining indices.

    Args:
        log_stats: log draw statistics of each epoch (``{prefix}/ess``, ``ess_frac``, ``max``, per-group mass).
        log_histogram: also write a histogram of the (mean-1) sampling weights (subsampled beyond 1e6 items).
        prefix: log prefix; with several samplers the i-th (i > 0) logs under ``{prefix}_{i}``.
        check_ranks: under DDP, compare a fingerprint of every rank's planned sequence and of every
            ``WeightingCallback`` table once per epoch (one all-gather of a few int64; O(N) hashing of each
            table once per epoch) and fail on a mismatch. ``False`` turns the guard off.
        restart_epoch: what to do with a mid-epoch checkpoint (Lightning's loop state says batches of the
            current epoch were processed) that holds no sampler state (written without ``SamplerState``, or
            its entry removed). ``False`` (default): refuse with ``CheckpointStateError`` before anything is
            restored, since the sampler would restart the epoch while Lightning skips the batches already done
            (samples repeated and dropped). ``True``: start that epoch afresh, knowingly: all of its batches
            run (the ones trained before the checkpoint are trained again), and no sample is dropped.

    Raises:
        CheckpointStateError: at load, a malformed entry, or a mid-epoch checkpoint without sampler state
            (unless ``restart_epoch=True``).
    """

    def __init__(self, log_stats: bool = True, log_histogram: bool = True, prefix: str = "sampler",
                 check_ranks: bool = True, restart_epoch: bool = False) -> None:
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"Expected argument `prefix` to be a non-empty string, but got {prefix!r}.")
        self.restart_epoch = bool(restart_epoch)
        self._restart_pending = False
        self.check_ranks = bool(check_ranks)
        self._checked_epoch: int | None = None
        self.log_stats = bool(log_stats)
        self.log_histogram = bool(log_histogram)
        self.prefix = prefix
        self._bound: list[tuple[DataLoader, Any]] = []
        self._pending: list[dict[str, Any]] | None = None
        self._logged_epoch: int | None = None
        self._trainer: pl.Trainer | None = None

    @property
    def samplers(self) -> list[Any]:
        """The managed samplers, in train-dataloader order (filled at ``on_train_start``)."""
        return [sampler for _, sampler in self._bound]

    # --------------------------------------------------------------------------------------------- binding
    def _bind(self, trainer: pl.Trainer) -> None:
        self._bound = find_samplers(trainer.train_dataloader)
        for loader, sampler in self._bound:
            _batch_size(loader)
            replicas, rank = getattr(sampler, "num_replicas", None), getattr(sampler, "rank", None)
            if replicas is not None and (replicas != trainer.world_size or rank != trainer.global_rank):
                raise RuntimeError(
                    f"`{type(sampler).__name__}` has num_replicas={replicas}, rank={rank} but the Trainer runs"
                    f" world_size={trainer.world_size}, global_rank={trainer.global_rank}: create the sampler"
                    " inside `train_dataloader()` (after the process group exists) or pass them explicitly."
                )

    def _refuse_stream(self, trainer: pl.Trainer) -> None:
        """A stream has no sampler to track: SamplerState would do nothing, silently."""
        from lightning_reweight.callbacks.streams import is_stream_loader

        streams = [loader for loader in _flatten(trainer.train_dataloader) if is_stream_loader(loader)]
        if streams and not self._bound:
            raise RuntimeError(
                f"Expected a train dataloader with a lightning_reweight sampler for `SamplerState`, but got a stream "
                f"(`{type(streams[0]).__name__}` over the iterable `{type(streams[0].dataset).__name__}`): it has no "
                "sampler, so SamplerState would track and checkpoint nothing. A stream checkpoints its own position "
                "(`CharStreamDataModule`'s state, LitData's `StreamingDataLoader` through Lightning's fit loop); "
                "SamplerState is for map-style data sets drawn by a sampler. Remove `SamplerState` from the callbacks."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        self._bind(trainer)
        self._refuse_stream(trainer)
        pending, self._pending = self._pending, None
        restart, self._restart_pending = self._restart_pending, False
        if restart and pending is None:  # ``restart_epoch=True`` on a mid-epoch checkpoint without sampler state
            set_epoch_batches_done(trainer, 0)
            warnings.filterwarnings("ignore", message=_NOT_RESUMABLE_WARNING)  # the epoch restarts on purpose
        if pending is not None:
            if len(pending) != len(self._bound):
                raise RuntimeError(
                    f"The checkpoint holds the state of {len(pending)} sampler(s) but the train dataloader has"
                    f" {len(self._bound)}; resume with the same data configuration."
                )
            for (_, sampler), state in zip(self._bound, pending):  # validate everything before assigning
                check = getattr(sampler, "check_state_dict", None)
                if check is not None:
                    check(state)
            for (_, sampler), state in zip(self._bound, pending):
                sampler.load_state_dict(state)
        if pending is not None and len(self._bound) == len(_flatten(trainer.train_dataloader)):
            # every train loader resumes exactly: Lightning's "dataloader is not resumable" warning is false
            warnings.filterwarnings("ignore", message=_NOT_RESUMABLE_WARNING)
        for _, sampler in self._bound:
            sampler.set_epoch(trainer.current_epoch)
        if pending is not None:
            saved_worlds = {int(state.get("num_replicas", trainer.world_size)) for state in pending
                            if isinstance(state, dict)}
            if saved_worlds - {trainer.world_size}:
                self._continue_on_new_world(trainer, max(saved_worlds))
        stale = False
        for _, sampler in self._bound:
            started = getattr(sampler, "last_iter_signature", None)
            resume = getattr(sampler, "_resume", None)
            expected = (trainer.current_epoch, 0 if resume is None else int(getattr(resume, "start", 0)))
            stale |= started is not None and (pending is not None or tuple(started) != expected)
        if stale:
            # the fit loop created the iterator (and workers pulled indices) before the state was restored
            restart_train_iterator(trainer)

    def _continue_on_new_world(self, trainer: pl.Trainer, saved_world: int) -> None:
        """After a resume on another world size: check every rank gets the same number of batches for the rest
        of the epoch and set the fit loop's batch counter so the epoch ends exactly there."""
        world = trainer.world_size
        done: set[int] = set()
        for loader, sampler in self._bound:
            remaining = getattr(sampler, "remaining_per_rank", None)
            if remaining is None:
                raise RuntimeError(
                    f"`{type(sampler).__name__}` cannot continue an epoch on another number of processes (checkpoint:"
                    f" {saved_world}, now: {world}); resume with {saved_world} process(es)."
                )
            size = _batch_size(loader)
            left = remaining()
            drop = bool(getattr(loader, "drop_last", False))
            batches = [n // size if drop else -(-n // size) for n in left]
            if len(set(batches)) > 1 or (drop and any(n % size for n in left)):
                raise RuntimeError(
                    f"Cannot continue epoch {trainer.current_epoch} exactly on {world} processes: the checkpoint was"
                    f" written by {saved_world} process(es) and the {sum(left)} remaining samples of the epoch give"
                    f" the ranks {left} samples, i.e. {sorted(set(batches))} batches of {size}"
                    f"{' (drop_last)' if drop else ''}, so some rank would skip or replay samples. Resume this"
                    f" checkpoint with {saved_world} process(es), or from an end-of-epoch checkpoint."
                )
            total = trainer.num_training_batches
            if total == float("inf") or batches[0] > total:
                raise RuntimeError(
                    f"Cannot continue epoch {trainer.current_epoch} on {world} processes (checkpoint: {saved_world}):"
                    f" its remaining {batches[0]} batches exceed the epoch's {total} batches"
                    " (`limit_train_batches`?). Resume with the same number of processes."
                )
            done.add(int(total) - batches[0])
            if getattr(sampler, "resumed_world_size", None) is not None:
                sampler.rebase_cursor((int(total) - batches[0]) * size)
        if len(done) > 1:
            raise RuntimeError(
                f"The train dataloaders disagree on how much of epoch {trainer.current_epoch} is left after moving"
                f" from {saved_world} to {world} processes ({sorted(done)} batches done); resume with"
                f" {saved_world} process(es)."
            )
        if done:
            set_epoch_batches_done(trainer, done.pop())

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.reload_dataloaders_every_n_epochs:
            self._bind(trainer)
        for _, sampler in self._bound:
            sampler.set_epoch(trainer.current_epoch)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = None

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        for loader, sampler in self._bound:
            _set_cursor(sampler, (batch_idx + 1) * _batch_size(loader))
        if self.check_ranks and trainer.world_size > 1 and self._checked_epoch != trainer.current_epoch:
            self._checked_epoch = trainer.current_epoch
            check_rank_consistency(trainer, self.samplers)
        if self.log_stats and self._logged_epoch != trainer.current_epoch:
            self._logged_epoch = trainer.current_epoch
            self._log(trainer, pl_module)

    # --------------------------------------------------------------------------------------------- logging
    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for i, (loader, sampler) in enumerate(self._bound):
            weights = getattr(sampler, "_epoch_weights_used", None)
            if weights is None:
                weights = getattr(sampler, "weights", None)
            if weights is None:
                continue
            weights = weights.detach().double()
            weights = (weights * (weights.numel() / weights.sum())).float()
            groups = getattr(sampler, "groups", None)
            dataset = getattr(loader, "dataset", None)
            for attr in ("groups", "targets"):
                if groups is None:
                    groups = getattr(dataset, attr, None)
            groups = torch.as_tensor(groups) if groups is not None else None
            if groups is not None and (groups.numel() != weights.numel() or groups.is_floating_point()):
                groups = None
            prefix = self.prefix if i == 0 else f"{self.prefix}_{i}"
            log_weight_stats(trainer, pl_module, prefix, weights, groups=groups, histogram=False)
            if self.log_histogram:
                step = max(1, weights.numel() // _MAX_HISTOGRAM)
                log_histogram(trainer, f"{prefix}/weights", weights[::step])

    # ----------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._bound:
            if self._trainer is not None:
                # batches whose training step finished in this epoch: independent of callback order
                done = self._trainer.fit_loop.epoch_loop.batch_progress.current.processed
                for loader, sampler in self._bound:
                    _set_cursor(sampler, done * _batch_size(loader))
            return {"samplers": [sampler.state_dict() for _, sampler in self._bound]}
        if self._pending is not None:
            return {"samplers": self._pending}
        # training without a managed sampler: say so, so that a mid-epoch resume is not refused for lack of state
        return {"samplers": []} if self._trainer is not None else {}

    def check_state_dict(self, state_dict: Any) -> list[dict[str, Any]] | None:
        """Validate the entry's form (a list of sampler state dicts, or none) and return the list; assigns
        nothing. Each sampler's own state is validated against the samplers at ``on_train_start``, all of them
        before any is restored (the samplers do not exist before the train dataloader is built)."""
        samplers = state_dict.get("samplers") if isinstance(state_dict, dict) else None
        if samplers is not None and (not isinstance(samplers, list)
                                     or not all(isinstance(s, dict) for s in samplers)):
            raise CheckpointStateError("SamplerState.state_dict", "samplers",
                                       f"expected a list of sampler state dicts, but got {type(samplers).__name__}.")
        return samplers

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = self.check_state_dict(state_dict)  # restored at on_train_start, after validation

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Before any callback's state is assigned: check this entry, and refuse a mid-epoch checkpoint that
        holds no sampler state (unless ``restart_epoch=True``)."""
        entry = checkpoint_entry(self, checkpoint)
        samplers = self.check_state_dict(entry) if entry is not None else None
        if samplers is not None or getattr(getattr(trainer, "state", None), "fn", None) != TrainerFn.FITTING:
            return
        done, epoch = _batches_done_mid_epoch(checkpoint)
        if not done:
            return
        if not self.restart_epoch:
            raise CheckpointStateError(
                f"callbacks[{self.state_key!r}]", "samplers",
                f"expected the state of the sampler(s) for the interrupted epoch {epoch} ({done} batches done), but "
                "the checkpoint holds none (it was written without `SamplerState`, or the entry was removed). Resuming "
                f"would restart the epoch's sampler while Lightning skips {done} batches: samples of epoch {epoch} "
                "would be trained twice and others not at all.",
                fix="Resume from a checkpoint written with `SamplerState` attached or from an end-of-epoch checkpoint, "
                    f"or pass `SamplerState(restart_epoch=True)` to start epoch {epoch} afresh on purpose (its "
                    f"first {done} batches are trained again).")
        self._restart_pending = True


def _batches_done_mid_epoch(checkpoint: Any) -> tuple[int, int]:
    """``(batches processed in the current epoch, epoch)`` from Lightning's loop state when the checkpoint was
    written inside an epoch (``(0, epoch)`` at an epoch's end or start, or without loop state)."""
    epoch = checkpoint.get("epoch", 0) if isinstance(checkpoint, dict) else 0
    try:
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        done = int(progress["current"]["processed"])
        last = bool(progress.get("is_last_batch", False))
    except (KeyError, TypeError, ValueError):
        return 0, epoch
    return (0 if last else done), epoch


def ensure_sampler_state(trainer: pl.Trainer, owner: str) -> Any:
    """Return the Trainer's ``SamplerState``, adding one before the checkpoint callbacks if it has none (so the
    sampler's saved position is up to date when a checkpoint is written)."""
    for cb in trainer.callbacks:
        if isinstance(cb, SamplerState):
            return cb
    rank_zero_info(f"{owner}: adding `SamplerState()` to the callbacks (epoch, position and checkpoint of the "
                   "sampler).")
    position = next((i for i, cb in enumerate(trainer.callbacks) if isinstance(cb, Checkpoint)),
                    len(trainer.callbacks))
    state = SamplerState()
    trainer.callbacks.insert(position, state)
    return state


def install_sampler(
    trainer: pl.Trainer,
    factory: Callable[[pl.Trainer, DataLoader], Any],
    *,
    owner: str,
    sampler_type: type | None = None,
    adopt: Callable[[Any], None] | None = None,
) -> None:
    """Install ``factory(trainer, loader)``'s sampler in the train dataloader, whatever the loader's source.

    The public way in for callbacks that own a sampler (the Lightning internals it relies on live in
    ``callbacks/_install.py``). Call it from a callback's ``setup(trainer, pl_module, stage)`` when
    ``stage == "fit"``. Every time the fit loop requests the train dataloader, the loader is rebuilt around the
    new sampler (keeping its other settings); a loader that already holds a ``sampler_type`` sampler is kept and ``adopt(sampler)`` is called.
    ``SamplerState`` is added when missing.

    Args:
        trainer: the Trainer being set up.
        factory: builds the sampler for a train ``DataLoader`` (return an existing one to keep its state).
        owner: name used in messages (the callback's class name).
        sampler_type: adopt a sampler of this type that the user already put in the loader.
        adopt: called with such an adopted sampler.

    Raises:
        TypeError: ``factory`` is not callable.
        RuntimeError: DDP with ``Trainer(use_distributed_sampler=True)`` (Lightning would re-shard the sampler).

    Example::

        class MySampling(Callback):
            def setup(self, trainer, pl_module, stage):
                if stage == "fit":
                    install_sampler(trainer, lambda t, loader: WeightedSampler(my_weights), owner="MySampling")
    """
    wrap_train_source(trainer, factory, owner=owner, sampler_type=sampler_type, adopt=adopt)
    ensure_sampler_state(trainer, owner)
