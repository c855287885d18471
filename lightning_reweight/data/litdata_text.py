"""Text in LitData chunks: ``optimize_text_windows`` writes them, ``LitDataTextModule`` streams them.

Needs the optional extra ``pip install "lightning-reweight[litdata]"`` (LitData's ``litdata.optimize``,
``StreamingDataset`` and ``StreamingDataLoader``).

Samples and keys. The text is cut into non-overlapping windows of ``seq_len + 1`` bytes: window ``w`` covers bytes
``[w·L, w·L + L + 1)`` of the training text and is written as one sample ``{"key": w, "tokens": uint8[L + 1]}``.
The stream yields dicts ``x`` (the first ``L`` bytes), ``y`` (the last ``L``) and ``key`` (``w``, int64), so a
weighting callback works index-free (``LossReweighting(track_samples=False)``) or keyed: the keys lie in
``[0, num_windows)``, the data set's ``num_keys`` (a table with one row per window; or hash them with
``StreamKeys(slots=...)``).

Sharding. LitData's ``StreamingDataset`` reads the distributed environment (world size, global rank) when it is
CONSTRUCTED. ``LitDataTextModule`` therefore builds it in ``setup()``, after the Trainer started its processes.
A data set built before ``trainer.fit`` under DDP would give every rank the same samples: every
``WeightingCallback`` (and ``StreamShardCheck``) refuses it on every rank at the start of training
(``callbacks/streams.py``).

Resume. ``StreamingDataLoader`` has ``state_dict``/``load_state_dict``; Lightning's fit loop saves it in every
checkpoint and restores it before the resumed epoch, so a mid-epoch resume on the same number of processes
continues with exactly the windows not yet consumed. ``LitDataTextModule`` records the world size of the
checkpoint and refuses a resume on another number of processes (naming both), where the continuation would
not be the uninterrupted run's.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_reweight.data.text import CharWindows, check_split_args, default_text_path, load_text
from lightning_reweight.state.validate import CheckpointStateError, as_int, require_keys

try:
    import litdata
    from litdata import StreamingDataLoader, StreamingDataset
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "Expected the optional dependency `litdata` for LitData streams, but it is not installed. "
        'Install it with `pip install "lightning-reweight[litdata]"` (or `pip install "litdata>=0.2.50"`).'
    ) from err

__all__ = ["LitDataTextModule", "TextStreamLoader", "TextWindowDataset", "optimize_text_windows"]

_META = "lightning_reweight_windows.json"


def _windows(span: tuple[int, int], path: str, seq_len: int, offset: int) -> Any:
    """LitData ``optimize`` worker: yield windows ``span[0] .. span[1]-1`` of the text at ``path``."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for w in range(*span):
        start = offset + w * seq_len
        yield {"key": w, "tokens": np.array(data[start:start + seq_len + 1])}


def _start_method() -> str:
    # fork starts the writer in milliseconds; after CUDA was initialised only spawn is safe
    if "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


def optimize_text_windows(path: str | Path, output_dir: str | Path, seq_len: int, *,
                          span: tuple[int, int] | None = None, num_workers: int = 1,
                          windows_per_task: int = 4096, chunk_bytes: str | int = "64MB",
                          start_method: str | None = None, overwrite: bool = False) -> int:
    """Write the text file's windows into LitData chunks with ``litdata.optimize``; return the number of windows.

    Window ``w`` (its stable key) holds bytes ``[o + w·L, o + w·L + L + 1)`` of the file, ``o`` the start of
    ``span``. A folder already written with the same settings is reused (nothing is rewritten).

    Args:
        path: a plain text file (read as bytes).
        output_dir: the chunk folder (local path, or any ``output_dir`` LitData accepts).
        seq_len: ``L``, tokens per training sequence (windows hold ``L + 1`` bytes).
        span: ``(start, stop)`` byte range of the file to use (default: all of it).
        num_workers: ``litdata.optimize`` worker processes.
        windows_per_task: windows per ``optimize`` task (the unit handed to a worker).
        chunk_bytes: LitData chunk size.
        start_method: multiprocessing start method of the workers (default ``"fork"`` where available and CUDA
            is not initialised, else ``"spawn"``).
        overwrite: rewrite a folder written with other settings instead of raising.

    Raises:
        ValueError: ``seq_len``/``span`` out of range, or the folder holds windows written with other settings
            (and ``overwrite=False``).

    Example::

        n = optimize_text_windows("input.txt", "chunks/", seq_len=128)
        dataset = TextWindowDataset("chunks/")          # inside setup(): see LitDataTextModule
    """
    path = Path(path)
    size = path.stat().st_size if path.is_file() else 0
    if size == 0:
        load_text(path)  # names the missing file / the empty text
    start, stop = span if span is not None else (0, size)
    if not (isinstance(seq_len, int) and seq_len >= 1):
        raise ValueError(f"Expected argument `seq_len` to be a positive int, but got {seq_len!r}.")
    if not 0 <= start < stop <= size:
        raise ValueError(f"Expected argument `span` within the file's [0, {size}) bytes, but got {span!r}.")
    num_windows = (stop - start - 1) // seq_len
    if num_windows < 1:
        raise ValueError(f"Expected a text longer than seq_len + 1 = {seq_len + 1} bytes, but got {stop - start}. "
                         "Lower `seq_len`.")
    out = Path(output_dir)
    meta = {"source_bytes": size, "span": [start, stop], "seq_len": seq_len, "num_windows": num_windows}
    if (out / "index.json").is_file():
        found = json.loads((out / _META).read_text()) if (out / _META).is_file() else None
        if found == meta:
            return num_windows
        if not overwrite:
            raise ValueError(
                f"Expected {out} to hold the windows of {path} with {meta}, but it holds {found or 'other data'}. "
                "Pass another `output_dir`, or `overwrite=True` to rewrite it.")
        shutil.rmtree(out)
    tasks = [(w, min(w + windows_per_task, num_windows)) for w in range(0, num_windows, windows_per_task)]
    litdata.optimize(
        fn=functools.partial(_windows, path=str(path.resolve()), seq_len=seq_len, offset=start),
        inputs=tasks, output_dir=str(out), chunk_bytes=chunk_bytes, num_workers=max(1, num_workers),
        start_method=start_method or _start_method(), keep_data_ordered=True, verbose=False,
    )
    (out / _META).write_text(json.dumps(meta))
    return num_windows


def _to_xy(item: dict[str, Any]) -> dict[str, torch.Tensor]:
    tokens = torch.as_tensor(np.asarray(item["tokens"]), dtype=torch.long)
    return {"x": tokens[:-1], "y": tokens[1:], "key": torch.as_tensor(int(item["key"]), dtype=torch.long)}


class TextWindowDataset(StreamingDataset):
    """A ``StreamingDataset`` over ``optimize_text_windows`` chunks yielding ``{"x", "y", "key"}``.

    Build it where the distributed environment exists (a DataModule's ``setup`` or ``train_dataloader``).
    ``num_keys`` (the number of windows: keys lie in ``[0, num_keys)``) sizes the per-sample tables of keyed
    callbacks.

    Args:
        input_dir: the chunk folder.
        shuffle: shuffle chunks and samples per epoch (seeded by ``seed`` and LitData's epoch).
        seed: shuffle seed.
        drop_last: drop the last samples that do not fill a batch on every rank (LitData turns it on under DDP).
        **kwargs: passed to ``StreamingDataset``.
    """

    def __init__(self, input_dir: str, shuffle: bool = True, seed: int = 0, drop_last: bool | None = None,
                 **kwargs: Any):
        super().__init__(str(input_dir), shuffle=shuffle, seed=seed, drop_last=drop_last, transform=_to_xy, **kwargs)
        meta = Path(input_dir) / _META
        self.num_keys: int | None = json.loads(meta.read_text())["num_windows"] if meta.is_file() else None


class TextStreamLoader(StreamingDataLoader):
    """``StreamingDataLoader`` whose resumed run continues exactly like the uninterrupted one, across epochs.

    Two passes of Lightning's fit loop would otherwise drift from the uninterrupted run:

    * after a mid-epoch resume, LitData keeps replaying the checkpointed position until a pass runs to
      exhaustion, but the fit loop stops taking batches after ``len(loader)`` of them (under DDP it never
      exhausts the pass): the next epoch would replay the resumed epoch's rest. A pass that starts after the
      resumed pass therefore starts a fresh epoch;
    * after a resume from a checkpoint written at the very end of an epoch, the fit loop iterates the loader once
      for the finished epoch (taking no batch) before the next one; LitData would count that pass as an epoch
      (another shuffle than the uninterrupted run's). That one empty pass is skipped.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._skip_pass = False
        self._resumed_pass_started = False

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        super().load_state_dict(obj)
        self._skip_pass = not self.restore and int(obj.get("num_samples_yielded", 0) or 0) > 0
        self._resumed_pass_started = False

    def __iter__(self) -> Any:
        if self._skip_pass:
            self._skip_pass = False
            return iter(())
        if self._resumed_pass_started:
            self.restore = False  # the resumed pass ran already: this one is a new epoch
        self._resumed_pass_started = self.restore
        return super().__iter__()


class LitDataTextModule(pl.LightningDataModule):
    """Character-level text streamed from LitData chunks: 90/10 split, windows of ``seq_len`` + 1.

    ``prepare_data`` writes the training part of the text into ``data_dir`` with ``litdata.optimize`` (once per
    node; an up-to-date folder is reused), ``setup`` builds the ``TextWindowDataset`` (so it shards by the
    Trainer's world size and rank), ``train_dataloader`` returns a ``StreamingDataLoader`` (its position is in
    every checkpoint: an exact mid-epoch resume on the same number of processes). Validation uses the
    held-out end of the text (map-style windows).

    Args:
        path: the text file (default ``../shared/datasets/tinyshakespeare/input.txt`` next to the repository).
        data_dir: the chunk folder (default ``runs/litdata/<text file stem>-L<seq_len>`` in the working directory;
            an up-to-date folder is reused, one written from another text or span is refused).
        seq_len: characters per training sequence.
        batch_size: sequences per rank per step.
        val_batch_size: validation batch size (default ``batch_size``).
        num_workers: ``StreamingDataLoader`` workers.
        shuffle: shuffle the stream each epoch.
        seed: shuffle seed.
        val_frac: fraction of the text, at its end, held out for validation.
        max_val_windows: cap on the validation windows (the first ones), ``None`` for all.

    Batches are dicts: ``x``, ``y`` (``(B, L)`` int64 byte ids), ``key`` (window number in ``[0, num_keys)``).

    Example::

        dm = LitDataTextModule("input.txt", data_dir="chunks/", seq_len=64, batch_size=16)
        model = CharTransformerLM(max_len=64, sample_keys="exact")
        Trainer(strategy="ddp", devices=2, callbacks=[LossReweighting("linupper")]).fit(model, datamodule=dm)
    """

    def __init__(self, path: str | None = None, data_dir: str | None = None, seq_len: int = 128,
                 batch_size: int = 32, val_batch_size: int | None = None, num_workers: int = 0,
                 shuffle: bool = True, seed: int = 0, val_frac: float = 0.1, max_val_windows: int | None = None):
        super().__init__()
        check_split_args(val_frac, num_workers)
        self.path = path
        self.data_dir = data_dir
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.seed = seed
        self.val_frac = val_frac
        self.max_val_windows = max_val_windows
        self.train_set: TextWindowDataset | None = None
        self.val_set: CharWindows | None = None
        self._loader: TextStreamLoader | None = None

    # ---------------------------------------------------------------- data
    def _text(self) -> Path:
        return Path(self.path) if self.path is not None else default_text_path()

    def _chunks(self) -> Path:
        if self.data_dir is not None:
            return Path(self.data_dir)
        return Path("runs") / "litdata" / f"{self._text().stem}-L{self.seq_len}"

    def _split(self) -> int:
        return int(round(self._text().stat().st_size * (1.0 - self.val_frac))) if self._text().is_file() else 0

    def prepare_data(self) -> None:
        load_text(self._text())  # a missing/empty text names the path
        optimize_text_windows(self._text(), self._chunks(), self.seq_len, span=(0, self._split()),
                              num_workers=1)

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is None:
            data = load_text(self._text())
            self.val_set = CharWindows(data[self._split():], self.seq_len)
        if stage in (None, "fit") and self.train_set is None:
            if not (self._chunks() / "index.json").is_file():
                self.prepare_data()  # used outside a Trainer (a Trainer calls prepare_data first)
            # built here, after the Trainer started its processes: LitData reads the world size and rank now
            self.train_set = TextWindowDataset(str(self._chunks()), shuffle=self.shuffle, seed=self.seed)

    @property
    def num_keys(self) -> int:
        """Number of training windows: the key range for ``StreamKeys(num_keys=...)`` or ``num_samples=``."""
        self.setup("fit")
        assert self.train_set is not None and self.train_set.num_keys is not None
        return self.train_set.num_keys

    def train_dataloader(self) -> TextStreamLoader:
        self.setup("fit")
        assert self.train_set is not None
        self._loader = TextStreamLoader(self.train_set, batch_size=self.batch_size, num_workers=self.num_workers)
        return self._loader

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        assert self.val_set is not None
        ds: Dataset = self.val_set
        if self.max_val_windows is not None and self.max_val_windows < len(self.val_set):
            ds = torch.utils.data.Subset(self.val_set, range(self.max_val_windows))
        return DataLoader(ds, batch_size=self.val_batch_size, shuffle=False)

    # ---------------------------------------------------------------- checkpointing
    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def state_dict(self) -> dict[str, Any]:
        # the stream's position is the StreamingDataLoader's state, which Lightning's fit loop checkpoints itself
        return {"world_size": self._world_size(), "batch_size": self.batch_size, "num_workers": self.num_workers,
                "seq_len": self.seq_len}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        where = f"datamodule[{type(self).__name__}]"
        state = require_keys(state_dict, ["world_size"], where)
        saved = {"world_size": as_int(state, "world_size", where, minimum=1)}
        for key in ("batch_size", "num_workers", "seq_len"):
            if key in state:
                saved[key] = as_int(state, key, where, minimum=0)
        now = {"world_size": self._world_size(), "batch_size": self.batch_size, "num_workers": self.num_workers,
               "seq_len": self.seq_len}
        for key, value in saved.items():
            if now[key] != value:
                raise CheckpointStateError(
                    where, key,
                    f"the checkpoint was written with {key}={value}, but this run has {key}={now[key]}: the LitData "
                    "stream would not continue with exactly the windows the interrupted run had left.",
                    f"Resume with {key}={value} (for world_size: the same number of processes), or keep only the "
                    "weights: `Model.load_from_checkpoint(path)` and `fit` without `ckpt_path` (the stream starts anew).")
