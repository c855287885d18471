"""Let a callback put its sampler into the Trainer's train dataloader, whatever the loader's source.

``SamplerInstaller(factory).setup(trainer)`` (call it from the callback's ``setup(stage="fit")``) wraps the fit
loop's train-dataloader source: every time Lightning requests the train dataloader (from a LightningModule or
DataModule hook, or a loader passed to ``fit``), the loader is re-instantiated with the callback's sampler
(Lightning's own ``_update_dataloader``, the function it uses to inject ``DistributedSampler``), unless it
already holds a sampler of the expected type, which is then adopted. It also adds ``SamplerState`` (epoch,
cursor, checkpoint of the sampler) when the Trainer has none, and rejects ``use_distributed_sampler=True``
under DDP, where Lightning would re-shard the already-sharded sampler.

Relies on two Lightning internals (stable across 2.x): ``trainer.fit_loop._data_source`` and
``lightning.pytorch.utilities.data._update_dataloader``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from lightning_reweight.callbacks.sampling import SamplerState, _flatten
from lightning_reweight.data.indexed import IndexedDataset

__all__ = ["SamplerInstaller", "train_dataset", "train_loader_batch_size"]


def train_dataset(loaders: Any) -> Any:
    """The data set of the (first) train dataloader."""
    for loader in _flatten(loaders):
        dataset = getattr(loader, "dataset", None)
        if dataset is not None:
            return dataset
    return None


def train_loader_batch_size(loaders: Any) -> int:
    for loader in _flatten(loaders):
        size = getattr(loader, "batch_size", None) or getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
        if isinstance(size, int) and size > 0:
            return size
    raise ValueError("Expected the train dataloader to have an int `batch_size`, but found none.")


class _SamplerSource:
    """Proxy of Lightning's ``_DataLoaderSource`` that swaps the sampler of the loader it returns."""

    def __init__(self, inner: Any, installer: SamplerInstaller, trainer: pl.Trainer) -> None:
        self._inner, self._installer, self._trainer = inner, installer, trainer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def dataloader(self) -> Any:
        return self._installer.install(self._trainer, self._inner.dataloader())


class SamplerInstaller:
    """Installs ``factory(trainer, loader) -> sampler`` in the train dataloader (see the module docstring).

    Args:
        factory: builds (or returns the existing) sampler for a train dataloader.
        owner: name of the callback, for error messages.
        sampler_type: a sampler of this type already in the loader is adopted (``adopt(sampler)`` is called).
        adopt: called with an adopted sampler.
    """

    def __init__(self, factory: Callable[[pl.Trainer, Any], Any], owner: str, sampler_type: type | None = None,
                 adopt: Callable[[Any], None] | None = None) -> None:
        self.factory, self.owner, self.sampler_type, self.adopt = factory, owner, sampler_type, adopt

    def setup(self, trainer: pl.Trainer) -> None:
        connector = getattr(trainer, "_accelerator_connector", None)
        if trainer.world_size > 1 and getattr(connector, "use_distributed_sampler", False):
            raise RuntimeError(
                f"{self.owner} installs a sampler that already shards by global rank, but the Trainer would wrap it "
                "in `DistributedSamplerWrapper` and re-shard it. Pass `Trainer(use_distributed_sampler=False)`."
            )
        fit_loop = trainer.fit_loop
        source = fit_loop._data_source
        if not isinstance(source, _SamplerSource):
            fit_loop._data_source = _SamplerSource(source, self, trainer)
        if not any(isinstance(cb, SamplerState) for cb in trainer.callbacks):
            rank_zero_info(f"{self.owner}: adding `SamplerState()` to the callbacks (epoch, cursor and checkpoint "
                           "of the sampler).")
            # before the checkpoint callbacks (Lightning runs those last), so saved cursors are up to date
            position = next((i for i, cb in enumerate(trainer.callbacks) if isinstance(cb, Checkpoint)),
                            len(trainer.callbacks))
            trainer.callbacks.insert(position, SamplerState())

    def install(self, trainer: pl.Trainer, loaders: Any) -> Any:
        leaves = _flatten(loaders)
        if len(leaves) != 1 or not isinstance(leaves[0], DataLoader):
            raise ValueError(
                f"{self.owner} needs exactly one `torch.utils.data.DataLoader` as the train dataloader, but got "
                f"{type(loaders).__name__} with {len(leaves)} loader(s)."
            )
        loader = leaves[0]
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


def _replace_leaf(container: Any, old: Any, new: Any) -> Any:
    if container is old:
        return new
    if isinstance(container, dict):
        return {k: _replace_leaf(v, old, new) for k, v in container.items()}
    if isinstance(container, (list, tuple)):
        return type(container)(_replace_leaf(v, old, new) for v in container)
    return container
