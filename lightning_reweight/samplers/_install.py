"""One way in: ``install_sampler`` puts a callback's sampler into the Trainer's train dataloader.

Every place of lightning_reweight that touches Lightning internals to manage a sampler lives here, so a
Lightning upgrade has one module to check:

* ``install_sampler(trainer, factory, owner=...)`` (call it from a callback's ``setup(stage="fit")``) wraps the
  fit loop's train-dataloader source: every time Lightning requests the train dataloader (from a
  LightningModule or DataModule hook, or a loader passed to ``fit``), the loader is re-instantiated with the
  callback's sampler (Lightning's own ``_update_dataloader``, the function it uses to inject
  ``DistributedSampler``), unless it already holds a sampler of the expected type, which is then adopted. It
  also adds ``SamplerState`` (epoch, global position, checkpoint of the sampler) when the Trainer has none and
  rejects ``use_distributed_sampler=True`` under DDP, where Lightning would re-shard the already-sharded
  sampler. Used by ``GroupBalancing``, ``ImportanceSampling`` and (through ``ensure_sampler_state``) the
  ``SamplingDataModule`` plugin.
* ``ensure_sampler_state(trainer, owner)``: add ``SamplerState`` before the checkpoint callbacks if missing.
* ``restart_train_iterator(trainer)`` and ``set_epoch_batches_done(trainer, n)``: used by ``SamplerState``
  after restoring sampler state (re-create the loader iterator that the fit loop built before the restore;
  align the fit loop's batch counter of the resumed epoch with the sampler after a resume on another world
  size).

Lightning internals relied on (stable across 2.x): ``trainer.fit_loop._data_source``,
``lightning.pytorch.utilities.data._update_dataloader``, ``trainer.fit_loop._data_fetcher`` and
``trainer.fit_loop.epoch_loop.batch_progress`` / ``restarted_on_train_batch_end``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler

from lightning_reweight.data.indexed import IndexedDataset

__all__ = [
    "ensure_sampler_state",
    "install_sampler",
    "restart_train_iterator",
    "set_epoch_batches_done",
    "train_dataset",
    "train_loader_batch_size",
]


def _flatten(obj: Any) -> list[Any]:
    from lightning_reweight.callbacks.sampling import _flatten as flatten

    return flatten(obj)


def train_dataset(loaders: Any) -> Any:
    """The data set of the (first) train dataloader."""
    for loader in _flatten(loaders):
        dataset = getattr(loader, "dataset", None)
        if dataset is not None:
            return dataset
    return None


def train_loader_batch_size(loaders: Any) -> int:
    """The ``batch_size`` of the (first) train dataloader (or of its batch sampler)."""
    for loader in _flatten(loaders):
        size = getattr(loader, "batch_size", None) or getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
        if isinstance(size, int) and size > 0:
            return size
    raise ValueError("Expected the train dataloader to have an int `batch_size`, but found none; use "
                     "`DataLoader(dataset, batch_size=...)`.")


def ensure_sampler_state(trainer: pl.Trainer, owner: str) -> Any:
    """Return the Trainer's ``SamplerState``, adding one before the checkpoint callbacks if it has none (so the
    sampler's saved position is up to date when a checkpoint is written)."""
    from lightning_reweight.callbacks.sampling import SamplerState

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


class _SamplerSource:
    """Proxy of Lightning's ``_DataLoaderSource`` that swaps the sampler of the loader it returns."""

    def __init__(self, inner: Any, installer: _Installer, trainer: pl.Trainer) -> None:
        self._inner, self._installer, self._trainer = inner, installer, trainer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def dataloader(self) -> Any:
        return self._installer.install(self._trainer, self._inner.dataloader())


class _Installer:
    def __init__(self, factory: Callable[[pl.Trainer, Any], Any], owner: str, sampler_type: type | None,
                 adopt: Callable[[Any], None] | None) -> None:
        self.factory, self.owner, self.sampler_type, self.adopt = factory, owner, sampler_type, adopt

    def install(self, trainer: pl.Trainer, loaders: Any) -> Any:
        leaves = _flatten(loaders)
        if len(leaves) != 1 or not isinstance(leaves[0], DataLoader):
            raise ValueError(
                f"{self.owner} needs exactly one `torch.utils.data.DataLoader` as the train dataloader, but got "
                f"{type(loaders).__name__} with {len(leaves)} loader(s)."
            )
        loader = leaves[0]
        if isinstance(loader.dataset, IterableDataset):
            raise TypeError(
                f"{self.owner} draws samples by index, but the train dataloader streams "
                f"(`{type(loader).__name__}` over the iterable `{type(loader.dataset).__name__}`): a stream has no "
                "random access, so it cannot be resampled (wrapping it in `IndexedDataset` does not help). On a "
                "stream, reweight the loss instead of resampling: `GroupBalancing(mode=\"upweight\")` (the stream's data "
                "set exposes `groups`, one per stable key, and the module passes the keys as the index) or "
                "`GroupDRO` (group ids from the batch) for groups and classes, `LossReweighting(...)` for per-sample "
                "losses; or train from a map-style data set."
            )
        if self.sampler_type is not None and isinstance(loader.sampler, self.sampler_type):
            if self.adopt is not None:
                self.adopt(loader.sampler)
            return loaders
        if not isinstance(loader.dataset, IndexedDataset):
            raise TypeError(
                f"{self.owner} needs the train data set wrapped in `lightning_reweight.data.IndexedDataset` (so the "
                f"module can pass sample indices to `reduce_loss`), but got {type(loader.dataset).__name__}."
            )
        if getattr(loader, "batch_sampler", None) is not None and not hasattr(loader.batch_sampler, "sampler"):
            raise ValueError(f"{self.owner} cannot replace a custom `batch_sampler`; use `batch_size=` instead.")
        from lightning.pytorch.utilities.data import _update_dataloader

        if not isinstance(loader.sampler, (RandomSampler, SequentialSampler)):
            rank_zero_warn(f"{self.owner} replaces the train dataloader's `{type(loader.sampler).__name__}` with its "
                           "own sampler.")
        sampler = self.factory(trainer, loader)
        new = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
        return new if loaders is loader else _replace_leaf(loaders, loader, new)


def install_sampler(
    trainer: pl.Trainer,
    factory: Callable[[pl.Trainer, DataLoader], Any],
    *,
    owner: str,
    sampler_type: type | None = None,
    adopt: Callable[[Any], None] | None = None,
) -> None:
    """Install ``factory(trainer, loader)``'s sampler in the train dataloader, whatever the loader's source.

    Call it from a callback's ``setup(trainer, pl_module, stage)`` when ``stage == "fit"``. Every time the fit
    loop requests the train dataloader, the loader is rebuilt around the new sampler (keeping its other
    settings); a loader that already holds a ``sampler_type`` sampler is kept and ``adopt(sampler)`` is called.
    ``SamplerState`` is added when missing.

    Args:
        trainer: the Trainer being set up.
        factory: builds the sampler for a train ``DataLoader`` (return an existing one to keep its state).
        owner: name used in messages (the callback's class name).
        sampler_type: adopt a sampler of this type that the user already put in the loader.
        adopt: called with such an adopted sampler.

    Raises:
        RuntimeError: DDP with ``Trainer(use_distributed_sampler=True)`` (Lightning would re-shard the sampler).

    Example::

        class MySampling(Callback):
            def setup(self, trainer, pl_module, stage):
                if stage == "fit":
                    install_sampler(trainer, lambda t, loader: WeightedSampler(my_weights), owner="MySampling")
    """
    if not callable(factory):
        raise TypeError(f"Expected argument `factory` to be callable, but got {type(factory).__name__}.")
    connector = getattr(trainer, "_accelerator_connector", None)
    if trainer.world_size > 1 and getattr(connector, "use_distributed_sampler", False):
        raise RuntimeError(
            f"{owner} installs a sampler that already shards by global rank, but the Trainer would wrap it in "
            "`DistributedSamplerWrapper` and re-shard it. Pass `Trainer(use_distributed_sampler=False)`."
        )
    fit_loop = trainer.fit_loop
    installer = _Installer(factory, owner, sampler_type, adopt)
    source = fit_loop._data_source
    if isinstance(source, _SamplerSource):  # a second setup (e.g. another fit): replace the installer
        source._installer = installer
    else:
        fit_loop._data_source = _SamplerSource(source, installer, trainer)
    ensure_sampler_state(trainer, owner)


def restart_train_iterator(trainer: pl.Trainer) -> None:
    """Re-create the fit loop's train dataloader iterator (built, and with workers already pulling indices,
    before checkpointed sampler state was restored)."""
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    if fetcher is None:
        raise RuntimeError("Cannot restart the train dataloader iterator after restoring sampler state.")
    iter(fetcher)


def set_epoch_batches_done(trainer: pl.Trainer, batches: int) -> None:
    """Make the fit loop treat ``batches`` batches of the current epoch as done (before the epoch loop resets on
    a restart: a checkpoint saved at a batch end gets its last batch counted as completed there)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    current = epoch_loop.batch_progress.current
    completed = batches - 1 if epoch_loop.restarted_on_train_batch_end else batches
    current.ready = current.started = current.processed = batches
    current.completed = completed


def _replace_leaf(container: Any, old: Any, new: Any) -> Any:
    if container is old:
        return new
    if isinstance(container, dict):
        return {k: _replace_leaf(v, old, new) for k, v in container.items()}
    if isinstance(container, (list, tuple)):
        return type(container)(_replace_leaf(v, old, new) for v in container)
    return container
