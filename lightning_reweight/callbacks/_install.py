"""The Lightning dataloader surgery behind ``install_sampler``: every Lightning internal lightning_reweight relies
on to manage a sampler lives here, so a Lightning upgrade has one module to check.

It belongs to the Lightning layer (``callbacks/``): the samplers themselves (``samplers/``) know nothing of
Lightning. The public entry points are in ``callbacks/sampling.py``:

* ``install_sampler(trainer, factory, owner=...)`` (call it from a callback's ``setup(stage="fit")``) =
  ``wrap_train_source`` here + ``ensure_sampler_state``. ``wrap_train_source`` wraps the fit loop's
  train-dataloader source: every time Lightning requests the train dataloader (from a LightningModule or
  DataModule hook, or a loader passed to ``fit``), the loader is re-instantiated with the callback's sampler
  (Lightning's own ``_update_dataloader``, the function it uses to inject ``DistributedSampler``), unless it
  already holds a sampler of the expected type, which is then adopted. It rejects ``use_distributed_sampler=True``
  under DDP, where Lightning would re-shard the already-sharded sampler. Used by ``GroupBalancing``,
  ``ImportanceSampling`` and (through ``ensure_sampler_state``) the ``SamplingDataModule`` plugin.
* ``find_samplers(loaders)``: the resumable samplers of a train dataloader (``SamplerState``, the cross-rank
  guard).
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
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler

from lightning_reweight.data.indexed import IndexedDataset

__all__ = [
    "find_samplers",
    "is_resumable_sampler",
    "restart_train_iterator",
    "set_epoch_batches_done",
    "train_dataset",
    "train_loader_batch_size",
    "wrap_train_source",
]


def is_resumable_sampler(sampler: Any) -> bool:
    """Duck type of the samplers ``SamplerState`` manages."""
    return hasattr(sampler, "cursor") and all(
        callable(getattr(sampler, name, None)) for name in ("set_epoch", "state_dict", "load_state_dict")
    )


def _flatten(obj: Any) -> list[Any]:
    if obj is None:
        return []
    flattened = getattr(obj, "flattened", None)  # CombinedLoader
    if isinstance(flattened, list):
        return [leaf for item in flattened for leaf in _flatten(item)]
    if isinstance(obj, dict):
        return [leaf for item in obj.values() for leaf in _flatten(item)]
    if isinstance(obj, (list, tuple)):
        return [leaf for item in obj for leaf in _flatten(item)]
    return [obj]


def _wrapped_inner(sampler: Any) -> Any:
    """The sampler inside Lightning's ``DistributedSamplerWrapper``, if ``sampler`` is one."""
    inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)
    return inner if inner is not None and type(sampler).__name__.endswith("SamplerWrapper") else None


def find_samplers(loaders: Any) -> list[tuple[DataLoader, Any]]:
    """``(dataloader, sampler)`` for each resumable sampler in a loader, list/dict of loaders or
    ``CombinedLoader`` (looks at ``loader.sampler`` and ``loader.batch_sampler.sampler``).

    Raises:
        RuntimeError: a resumable sampler was wrapped by Lightning's ``DistributedSamplerWrapper``.
    """
    found: list[tuple[DataLoader, Any]] = []
    for loader in _flatten(loaders):
        candidates = [getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
        seen: set[int] = set()
        for sampler in candidates:
            if sampler is None or id(sampler) in seen:
                continue
            seen.add(id(sampler))
            inner = _wrapped_inner(sampler)
            if inner is not None and is_resumable_sampler(inner):
                raise RuntimeError(
                    f"Lightning wrapped the `{type(inner).__name__}` of the train dataloader in"
                    f" `{type(sampler).__name__}`: every rank would materialise its whole shard and re-shard it,"
                    " losing samples and breaking resume. The sampler already shards by global rank: pass"
                    " `Trainer(use_distributed_sampler=False)`."
                )
            if is_resumable_sampler(sampler):
                found.append((loader, sampler))
    return found


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


def wrap_train_source(
    trainer: pl.Trainer,
    factory: Callable[[pl.Trainer, DataLoader], Any],
    *,
    owner: str,
    sampler_type: type | None = None,
    adopt: Callable[[Any], None] | None = None,
) -> None:
    """The Lightning half of ``install_sampler`` (``callbacks/sampling.py``): wrap the fit loop's train-dataloader
    source so that every loader it returns holds ``factory``'s sampler; refuse ``use_distributed_sampler=True``
    under DDP."""
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
