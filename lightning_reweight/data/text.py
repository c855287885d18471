"""A streaming character-level text DataModule (Tiny Shakespeare by default) for language-model pretraining.

The training set is an ``IterableDataset`` of fixed-length character windows, the way pretraining data is
streamed: no dataset index, but every sample carries a stable key (its window number ``w``: the window covers
characters ``[w·L, w·L + L + 1)`` of the training text, inputs ``x`` the first ``L``, targets ``y`` the last
``L``).

Order and sharding. Epoch ``e`` visits every window once in the order ``randperm(num_windows)`` drawn from
``(seed, e)``. The order is cut into global steps of ``G = batch_size · world_size`` windows; step ``s`` gives
rank ``r`` the windows ``chunk_s[r::world_size]``; a rank's ``j``-th batch is built by DataLoader worker
``j mod num_workers``, so the DataLoader returns the rank's batches in order, with any number of workers, and
ranks and workers hold disjoint windows whose union is the epoch. If the last step holds fewer windows than
there are ranks, those few windows (a different random set each epoch) are dropped with a warning.

Resume. The number of windows consumed in the epoch is counted in the main process, from the ``end`` position
each training batch carries (not inside the workers, which prefetch), and saved with the epoch by the
DataModule's ``state_dict`` (Lightning puts it in every checkpoint). A resumed run continues with exactly the
windows not yet consumed, also on another number of processes (the position is global). The stream counts
its own epochs (a new one starts when the current one is used up), so a pass cut short by ``max_steps`` is
finished after the resume even though Lightning's epoch counter has moved on; the order of stream epoch ``e``
depends on ``(seed, e)`` only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from lightning_reweight.state.keys import splitmix64
from lightning_reweight.state.validate import CheckpointStateError, as_int, require_keys

__all__ = ["CharStreamDataModule", "CharWindowStream", "CharWindows", "default_text_path", "load_text"]

_REPO = Path(__file__).resolve().parents[2]


def default_text_path() -> Path:
    """``../shared/datasets/tinyshakespeare/input.txt`` relative to the repository."""
    return (_REPO / ".." / "shared" / "datasets" / "tinyshakespeare" / "input.txt").resolve()


def load_text(path: str | Path | None = None) -> Tensor:
    """The text file as a uint8 tensor of bytes (characters for ASCII text such as Tiny Shakespeare)."""
    p = Path(path) if path is not None else default_text_path()
    if not p.is_file():
        raise FileNotFoundError(
            f"Expected the training text at {p} (Tiny Shakespeare: ../shared/datasets/tinyshakespeare/input.txt "
            "next to the repository), but it does not exist. Pass `path=` to a plain text file."
        )
    data = torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
    if data.numel() < 4:
        raise ValueError(f"Expected a text file with some content at {p}, but it holds {data.numel()} bytes.")
    return data


def check_split_args(val_frac: float, num_workers: int) -> None:
    """The arguments every text DataModule shares: a held-out fraction in (0, 1), workers >= 0."""
    if not 0.0 < val_frac < 1.0:
        raise ValueError(f"Expected argument `val_frac` in (0, 1), but got {val_frac!r}.")
    if num_workers < 0:
        raise ValueError(f"Expected argument `num_workers` >= 0, but got {num_workers!r}.")


def _mix_seed(seed: int, epoch: int) -> int:
    return int(splitmix64(torch.tensor([seed * 1_000_003 + epoch])).item()) & ((1 << 62) - 1)


class CharWindowStream(IterableDataset):
    """Fixed-length character windows of ``data``, shuffled per ``(seed, epoch)``, sharded over ranks and workers.

    Yields whole batches (use ``DataLoader(stream, batch_size=None)``): dicts with ``x``, ``y`` (``(b, L)``
    int64), ``key`` (``(b,)`` window numbers, the stable per-sample key), ``noisy`` (``(b,)`` bool) and ``end``
    (the global position in the epoch's order after this step; the main process counts consumption with it).

    Args:
        data: uint8 text.
        seq_len: ``L``, tokens per sequence.
        batch_size: sequences per rank per step.
        seed: shuffle seed.
        noise_frac: fraction of windows whose characters are replaced by uniform random characters of
            ``vocab`` (fixed per window across epochs; a corrupted-data setting).
        noise_seed: seed of the noisy subset and its characters.
        vocab: characters the noise draws from (default: those of ``data``).
    """

    def __init__(self, data: Tensor, seq_len: int, batch_size: int, seed: int = 0, noise_frac: float = 0.0,
                 noise_seed: int = 1234, vocab: Tensor | None = None):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"Expected seq_len >= 1 and batch_size >= 1, but got {seq_len} and {batch_size}.")
        if not 0.0 <= noise_frac <= 1.0:
            raise ValueError(f"Expected argument `noise_frac` in [0, 1], but got {noise_frac!r}.")
        self.data = data.to(torch.uint8)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.noise_frac = noise_frac
        self.noise_seed = noise_seed
        self.num_windows = (self.data.numel() - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"Expected a text longer than seq_len + 1 = {seq_len + 1} characters, but got "
                             f"{self.data.numel()}. Lower `seq_len`.")
        self.vocab = torch.unique(self.data) if vocab is None else vocab.to(torch.uint8)
        self.noisy = torch.zeros(self.num_windows, dtype=torch.bool)
        n_noisy = round(noise_frac * self.num_windows)
        if n_noisy:
            g = torch.Generator().manual_seed(noise_seed)
            self.noisy[torch.randperm(self.num_windows, generator=g)[:n_noisy]] = True
        self.epoch = 0
        self.start = 0  # global position in the epoch's order where the next iteration starts
        self.rank = 0
        self.world_size = 1

    @property
    def num_keys(self) -> int:
        """The stable keys are the window numbers ``[0, num_windows)`` (a callback sizes its table by it)."""
        return self.num_windows

    def order(self, epoch: int) -> Tensor:
        """The epoch's window order (deterministic per ``(seed, epoch)``)."""
        g = torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
        return torch.randperm(self.num_windows, generator=g)

    def num_steps(self, start: int, world_size: int) -> int:
        """Global steps left from ``start`` (a last step with fewer windows than ranks is dropped)."""
        rem = self.num_windows - start
        g = self.batch_size * world_size
        return rem // g + int(rem % g >= world_size)

    def windows(self, keys: Tensor) -> dict[str, Tensor]:
        """The batch of windows ``keys`` (vectorised; noisy windows get their random characters)."""
        L = self.seq_len
        pos = keys[:, None] * L + torch.arange(L + 1)
        seq = self.data[pos].long()
        noisy = self.noisy[keys]
        if bool(noisy.any()):
            h = splitmix64(keys[noisy, None] * (L + 1) + torch.arange(L + 1), seed=self.noise_seed)
            seq[noisy] = self.vocab[torch.remainder(h, self.vocab.numel())].long()
        return {"x": seq[:, :-1].contiguous(), "y": seq[:, 1:].contiguous(), "key": keys, "noisy": noisy}

    def iter_batches(self, rank: int, world_size: int, worker: int = 0, num_workers: int = 1):
        """The batches of ``rank`` built by ``worker`` (of ``num_workers``), in order, from ``self.start``."""
        order = self.order(self.epoch)[self.start:]
        g = self.batch_size * world_size
        for j in range(worker, self.num_steps(self.start, world_size), num_workers):
            chunk = order[j * g:(j + 1) * g]
            batch = self.windows(chunk[rank::world_size])
            batch["end"] = torch.tensor(self.start + j * g + chunk.numel())
            yield batch

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        yield from self.iter_batches(self.rank, self.world_size, worker, num_workers)


class CharWindows(Dataset):
    """Non-overlapping character windows of ``data`` (map-style; validation). Items: dicts ``x``, ``y``, ``key``."""

    def __init__(self, data: Tensor, seq_len: int):
        self.data = data.to(torch.uint8)
        self.seq_len = seq_len
        self.n = (self.data.numel() - 1) // seq_len
        if self.n < 1:
            raise ValueError(f"Expected a validation text longer than {seq_len + 1} characters, but got "
                             f"{self.data.numel()}. Lower `seq_len` or raise `val_frac`.")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        seq = self.data[i * self.seq_len: i * self.seq_len + self.seq_len + 1].long()
        return {"x": seq[:-1], "y": seq[1:], "key": torch.tensor(i)}

    def get_batch(self, indices: Tensor) -> dict[str, Tensor]:
        """Windows ``indices`` at once (vectorised; what ``StreamMixture`` reads): ``x``, ``y`` ``(b, L)``, ``key``."""
        pos = indices[:, None] * self.seq_len + torch.arange(self.seq_len + 1)
        seq = self.data[pos].long()
        return {"x": seq[:, :-1].contiguous(), "y": seq[:, 1:].contiguous(), "key": indices.clone()}


class _StreamLoader(DataLoader):
    """A DataLoader over a ``CharWindowStream`` that tells the stream its epoch and start in the main process."""

    def __init__(self, dataset: CharWindowStream, begin: Callable[[CharWindowStream], None], **kwargs: Any):
        super().__init__(dataset, batch_size=None, **kwargs)
        self._begin = begin

    def __iter__(self):
        self._begin(self.dataset)  # before the workers get their copy of the stream
        return super().__iter__()


class CharStreamDataModule(pl.LightningDataModule):
    """Streaming character-level text (Tiny Shakespeare by default): 90/10 split, windows of ``seq_len`` + 1.

    Args:
        path: the text file (default ``../shared/datasets/tinyshakespeare/input.txt`` next to the repository).
        seq_len: characters per training sequence.
        batch_size: sequences per rank per step.
        val_batch_size: validation batch size (default ``batch_size``).
        num_workers: DataLoader workers of the training stream (not persistent: each pass starts them afresh
            with the stream's current epoch and start position).
        seed: shuffle seed (epoch ``e`` uses ``(seed, e)``).
        noise_frac: fraction of training windows replaced by random characters (benchmarks; 0 = clean).
        noise_seed: seed of the noisy subset.
        val_frac: fraction of the text, at its end, held out for validation.
        max_val_windows: cap on the validation windows (the first ones), ``None`` for all.

    Batches are dicts: ``x``, ``y`` (``(B, L)`` int64 byte ids), ``key`` (stable window number; pass it to
    ``StreamKeys`` for stateful rules), and in training ``noisy`` and ``end``.
    """

    def __init__(self, path: str | None = None, seq_len: int = 128, batch_size: int = 32,
                 val_batch_size: int | None = None, num_workers: int = 0, seed: int = 0, noise_frac: float = 0.0,
                 noise_seed: int = 1234, val_frac: float = 0.1, max_val_windows: int | None = None):
        super().__init__()
        check_split_args(val_frac, num_workers)
        self.path = path
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.noise_frac = noise_frac
        self.noise_seed = noise_seed
        self.val_frac = val_frac
        self.max_val_windows = max_val_windows
        self.train_stream: CharWindowStream | None = None
        self.val_set: CharWindows | None = None
        self._epoch = 0  # epoch of the consumption count below
        self._position = 0  # windows of the epoch's order consumed by completed training steps (all ranks)
        self._warned_drop = False

    # ---------------------------------------------------------------- data
    def setup(self, stage: str | None = None) -> None:
        if self.train_stream is not None:
            return
        data = load_text(self.path)
        n_train = int(round(data.numel() * (1.0 - self.val_frac)))
        train, val = data[:n_train], data[n_train:]
        self.train_stream = CharWindowStream(train, self.seq_len, self.batch_size, self.seed, self.noise_frac,
                                             self.noise_seed, vocab=torch.unique(train))
        self.val_set = CharWindows(val, self.seq_len)

    @property
    def num_keys(self) -> int:
        """Number of distinct training keys (windows): the key range for ``StreamKeys(num_keys=...)``."""
        self.setup()
        assert self.train_stream is not None
        return self.train_stream.num_windows

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _begin(self, stream: CharWindowStream) -> None:
        """Main process, at the start of each pass over the training stream: set its epoch and start."""
        stream.rank, stream.world_size = self._world()
        # the stream keeps its own epoch count: a pass that stopped early (max_steps, a crash, a checkpoint
        # written after `fit` returned, when Lightning's epoch counter has already moved on) is finished first,
        # and a new epoch starts only once every window of the current one was consumed
        if stream.num_steps(self._position, stream.world_size) == 0:
            self._epoch, self._position = self._epoch + int(self._position > 0), 0
        stream.epoch, stream.start = self._epoch, self._position
        rem = stream.num_windows - stream.start
        dropped = rem % (stream.batch_size * stream.world_size)
        if 0 < dropped < stream.world_size and not self._warned_drop:
            self._warned_drop = True
            warnings.warn(
                f"The last {dropped} window(s) of each epoch's order do not fill one per rank "
                f"({stream.world_size} ranks) and are dropped (a different random set each epoch). Choose "
                "batch_size/devices so that this is zero if every window must be seen every epoch.", stacklevel=2)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        assert self.train_stream is not None
        return _StreamLoader(self.train_stream, self._begin, num_workers=self.num_workers,
                             persistent_workers=False)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        assert self.val_set is not None
        ds: Dataset = self.val_set
        if self.max_val_windows is not None and self.max_val_windows < len(self.val_set):
            ds = torch.utils.data.Subset(self.val_set, range(self.max_val_windows))
        return DataLoader(ds, batch_size=self.val_batch_size, shuffle=False)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training and isinstance(batch, dict) and "end" in batch:
            self._position = int(batch["end"])  # counted in the main process, batch by batch
        return batch

    # ---------------------------------------------------------------- checkpointing
    def _identity(self) -> dict[str, int]:
        self.setup()
        assert self.train_stream is not None
        s = self.train_stream
        return {"num_windows": s.num_windows, "seq_len": s.seq_len, "seed": s.seed,
                "noise_seed": s.noise_seed, "num_noisy": int(s.noisy.sum())}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "position": self._position, **self._identity()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        where = f"datamodule[{type(self).__name__}]"
        state = require_keys(state_dict, ["epoch", "position", "num_windows", "seq_len", "seed"], where)
        epoch = as_int(state, "epoch", where, minimum=0)
        num_windows = as_int(state, "num_windows", where, minimum=1)
        position = as_int(state, "position", where, minimum=0, maximum=num_windows)
        values = {"epoch": epoch, "position": position, "num_windows": num_windows,
                  "seq_len": as_int(state, "seq_len", where, minimum=1), "seed": as_int(state, "seed", where)}
        for key in ("noise_seed", "num_noisy"):
            if key in state:
                values[key] = as_int(state, key, where)
        self.setup()  # reads the text (idempotent), so the checkpoint is checked against it right away
        self._apply_state(values)

    def _apply_state(self, values: dict[str, int]) -> None:
        where = f"datamodule[{type(self).__name__}]"
        mine = self._identity()
        for key, value in mine.items():
            if key in values and values[key] != value:
                raise CheckpointStateError(
                    where, key, f"the checkpoint's stream has {key}={values[key]}, but this DataModule has "
                    f"{key}={value}: resuming would skip or replay windows.",
                    "Resume with the same text, seq_len, seed and noise settings, or start the stream fresh.")
        self._epoch, self._position = values["epoch"], values["position"]

    @staticmethod
    def bits_per_char(loss_nats: float | Tensor) -> float:
        """Cross-entropy in nats per character -> bits per character."""
        return float(loss_nats) / math.log(2.0)
