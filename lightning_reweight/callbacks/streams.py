"""Checks for streamed training data (LitData ``StreamingDataset`` and friends) that need no stream library.

``check_stream_sharding(trainer)``: LitData's ``StreamingDataset`` reads the distributed environment (world size,
global rank) when it is constructed. A data set built before ``trainer.fit(strategy="ddp")`` starts the processes
believes it is alone (or, on a re-launched rank, that it is rank 0), so every rank streams the same samples and
DDP averages identical gradients: nothing fails, training just sees 1/W of the data. The check compares every
train data set's recorded environment with the Trainer's and, under DDP, decides for all ranks together (one
boolean all-reduce), so every rank raises the same error before the first step.

``is_stream_loader(loader)``: whether a train loader streams (an ``IterableDataset``, e.g. a
``StreamingDataLoader``), i.e. has no sampler that could be replaced or checkpointed by a sampler position.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch.utils.data import IterableDataset
from typing_extensions import override

from lightning_reweight.distributed import any_rank

__all__ = ["StreamShardCheck", "StreamShardingError", "check_stream_sharding", "is_stream_loader", "stream_datasets"]


class StreamShardingError(RuntimeError):
    """A streamed training data set shards for another world size / rank than the Trainer runs."""


def _leaves(obj: Any) -> list[Any]:
    from lightning_reweight.callbacks._install import _flatten

    return _flatten(obj)


def stream_datasets(obj: Any) -> list[Any]:
    """The data sets (of the loaders, or the data set itself) that record a distributed environment
    (``distributed_env`` with ``world_size``/``global_rank``), including the parts of LitData's
    ``CombinedStreamingDataset`` / ``ParallelStreamingDataset``."""
    found: list[Any] = []
    todo = [getattr(leaf, "dataset", leaf) for leaf in _leaves(obj)]
    while todo:
        ds = todo.pop(0)
        if ds is None:
            continue
        env = getattr(ds, "distributed_env", None)
        if env is not None and hasattr(env, "world_size") and hasattr(env, "global_rank"):
            found.append(ds)
        parts = getattr(ds, "_datasets", None)
        if isinstance(parts, (list, tuple)):
            todo.extend(parts)
        elif isinstance(parts, dict):
            todo.extend(parts.values())
    return found


def is_stream_loader(loader: Any) -> bool:
    """A loader over an ``IterableDataset`` (a stream: no sampler, no random access)."""
    return isinstance(getattr(loader, "dataset", None), IterableDataset)


def check_stream_sharding(trainer: pl.Trainer, loaders: Any = None, *, collective: bool = True) -> None:
    """Raise on every rank if a train data set's recorded world size / rank is not the Trainer's.

    Args:
        trainer: the running Trainer.
        loaders: what to check (default: ``trainer.train_dataloader``); loaders, containers or data sets.
        collective: under DDP, decide together (every rank calls this at the same point: ``on_train_start``);
            ``False`` checks this rank only (a hook not every rank reaches at the same time).

    Raises:
        StreamShardingError: a data set was built before the Trainer's processes existed.
    """
    if loaders is None:
        loaders = getattr(trainer, "train_dataloader", None)
    world, rank = trainer.world_size, trainer.global_rank
    bad = [ds for ds in stream_datasets(loaders)
           if (int(ds.distributed_env.world_size), int(ds.distributed_env.global_rank)) != (world, rank)]
    mine = bad[0].distributed_env if bad else None
    if collective and world > 1:
        strategy = getattr(trainer, "strategy", None)  # None outside the Trainer (a door's context)
        any_bad = strategy.reduce_boolean_decision(bool(bad), all=False) if strategy is not None \
            else any_rank(bool(bad))
    else:
        any_bad = bool(bad)
    if not any_bad:
        return
    seen = (f"this rank's `{type(bad[0]).__name__}` sees world_size={mine.world_size}, "  # type: ignore[union-attr]
            f"global_rank={mine.global_rank}" if bad else "another rank's streaming data set disagrees")
    raise StreamShardingError(
        f"Expected the streaming training data set to shard for the Trainer's world_size={world}, "
        f"global_rank={rank}, but {seen}: it was constructed before `trainer.fit` started the distributed "
        "processes (LitData reads the environment when the data set is built), so ranks would train on the same "
        "samples. Build the `StreamingDataset` inside the DataModule's `setup()` or `train_dataloader()` (or the "
        "LightningModule's `train_dataloader()`), or use `lightning_reweight.data.LitDataTextModule`."
    )


class StreamShardCheck(Callback):
    """Refuse, on every rank and before the first step, a streaming data set that shards for another world.

    Every ``WeightingCallback`` runs the same check; add this callback when training without one.

    Example::

        Trainer(strategy="ddp", devices=2, callbacks=[StreamShardCheck()])
    """

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_stream_sharding(trainer)
