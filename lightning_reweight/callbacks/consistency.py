"""Cross-rank guard: fail loudly when DDP ranks drift apart.

Every rank of a lightning_reweight run must plan the same global sample sequence (each trains its shard
``global[rank::world_size]``) and hold identical per-sample tables (every rank applies the same updates to the
gathered batch). A seed, a data order or a table that differs on one rank silently trains on the wrong rows or
with the wrong weights. ``check_rank_consistency`` compares, once per epoch:

* each sampler's ``plan_fingerprint`` (length and three int64 sums over a strided sample of at most ~8192
  entries of the planned global sequence: indices, index × position, index²; computed when the epoch is drawn);
* every column of every ``WeightingCallback`` table (``tensor_fingerprint``: position-weighted int64 sums of
  the column's raw bits, one O(N) pass per column, once per epoch: ~30 ms per 10^6 rows on one CPU thread),

with ONE ``all_gather`` of a fixed 64-entry int64 vector (O(1) communication, independent of N and of the
batch size). A mismatch raises ``RankConsistencyError`` on every rank, naming what differs and on which ranks.
``SamplerState(check_ranks=True)`` (the default) runs it after the first batch of every epoch;
``RankConsistencyGuard`` does the same for runs without a lightning_reweight sampler.

Example::

    trainer = Trainer(callbacks=[LossReweighting(rule="focal"), RankConsistencyGuard()], strategy="ddp")
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_reweight.callbacks._install import find_samplers

__all__ = ["RankConsistencyError", "RankConsistencyGuard", "check_rank_consistency", "rank_fingerprint",
           "tensor_fingerprint"]

_SLOTS = 64  # gathered int64 entries per rank: [number of components, one folded fingerprint per component]
_MASK = (1 << 63) - 1
_BLOCK = 1024


class RankConsistencyError(RuntimeError):
    """Ranks disagree on a planned sequence or a table (raised on every rank)."""


def _fold(values: Any) -> int:
    """Fold a sequence of Python ints into one non-negative 63-bit int (polynomial hash)."""
    h = 0x2545F4914F6CDD1D
    for v in values:
        h = (h * 0x100000001B3 + (int(v) & _MASK)) & _MASK
    return h


def tensor_fingerprint(t: Tensor) -> int:
    """Fingerprint of a tensor's exact contents (its raw bits), position-sensitive, in two O(numel) reductions.

    The raw bits, laid out as a ``(rows, 1024)`` block, are summed along both axes (int64 accumulation, no
    int64 copy of the data); the row sums and the column sums are then weighted by their row / column number,
    so a changed value or two swapped values change the result.
    """
    flat = t.detach().reshape(-1).contiguous()
    if flat.is_floating_point():
        flat = flat.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
    elif flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    n = flat.numel()
    pad = (-n) % _BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    block = flat.view(-1, _BLOCK)
    rows = block.sum(dim=1, dtype=torch.int64)
    cols = block.sum(dim=0, dtype=torch.int64)
    row_pos = torch.arange(1, rows.numel() + 1, dtype=torch.int64, device=rows.device)
    col_pos = torch.arange(1, _BLOCK + 1, dtype=torch.int64, device=cols.device)
    return _fold((n, int(rows.sum()), int((rows * row_pos).sum()), int((cols * col_pos).sum())))


def rank_fingerprint(trainer: pl.Trainer | None, samplers: list[Any] = ()) -> tuple[list[str], list[int]]:
    """``(names, fingerprints)`` of this rank's planned sequences and ``WeightingCallback`` table columns."""
    from lightning_reweight.callbacks.base import weighting_callbacks

    names, values = [], []
    for i, sampler in enumerate(samplers):
        fp = getattr(sampler, "plan_fingerprint", None)
        if fp is not None:
            names.append(f"planned global sequence of sampler {i} ({type(sampler).__name__})")
            values.append(_fold(fp))
    for cb in weighting_callbacks(trainer):
        table = getattr(cb, "table", None)
        if table is None:
            continue
        for column, tensor in sorted(table.columns.items()):
            names.append(f"table column {column!r} of {cb.state_key}")
            values.append(tensor_fingerprint(tensor))
    return names, values


def check_rank_consistency(trainer: pl.Trainer, samplers: list[Any] = ()) -> None:
    """Compare this rank's fingerprints with every other rank's (one all-gather); raise on a mismatch.

    Raises:
        RankConsistencyError: the ranks disagree; the message names the component and the ranks.
    """
    if trainer.world_size < 2:
        return
    names, values = rank_fingerprint(trainer, samplers)
    vector = torch.zeros(_SLOTS, dtype=torch.int64)
    vector[0] = len(values)
    head = values[: _SLOTS - 2]
    vector[1 : 1 + len(head)] = torch.tensor(head, dtype=torch.int64)
    if len(values) > _SLOTS - 2:  # fold the rest into the last slot
        vector[_SLOTS - 1] = _fold(values[_SLOTS - 2 :])
        names = [*names[: _SLOTS - 2], f"{len(values) - _SLOTS + 2} further components"]
    gathered = trainer.strategy.all_gather(vector.to(trainer.strategy.root_device)).cpu().reshape(-1, _SLOTS)
    mismatch = (gathered != gathered[0]).any(dim=0)
    if not bool(mismatch.any()):
        return
    problems = []
    if bool(mismatch[0]):
        counts = gathered[:, 0].tolist()
        problems.append(f"number of checked components per rank {counts} (different callbacks or samplers)")
    else:
        slots = [k for k in range(1, _SLOTS) if bool(mismatch[k])]
        for k in slots:
            what = names[k - 1] if k - 1 < len(names) else f"component {k - 1}"
            column = gathered[:, k]
            ranks = [r for r in range(column.numel()) if int(column[r]) != int(column[0])]
            problems.append(f"{what}: rank(s) {ranks} differ from rank 0")
    raise RankConsistencyError(
        f"Cross-rank guard (epoch {trainer.current_epoch}, rank {trainer.global_rank} of {trainer.world_size}): the"
        f" DDP ranks diverged — {'; '.join(problems)}. Every rank must use the same sampler seed/weights, data"
        " set order and callback configuration (build samplers inside `train_dataloader()` with the same seed,"
        " pass per-sample data identically on every rank). Turn the check off with"
        " `SamplerState(check_ranks=False)` only if the difference is intended."
    )


class RankConsistencyGuard(Callback):
    """Run ``check_rank_consistency`` after the first training batch of every epoch (DDP only).

    Args:
        every_n_epochs: check every this many epochs (``0`` turns the guard off).
    """

    def __init__(self, every_n_epochs: int = 1) -> None:
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 0:
            raise ValueError(f"Expected argument `every_n_epochs` to be an int >= 0, but got {every_n_epochs!r}.")
        self.every_n_epochs = every_n_epochs
        self._checked_epoch: int | None = None

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        epoch = trainer.current_epoch
        if (trainer.world_size < 2 or self.every_n_epochs == 0 or epoch % self.every_n_epochs
                or self._checked_epoch == epoch):
            return
        self._checked_epoch = epoch
        check_rank_consistency(trainer, [s for _, s in find_samplers(trainer.train_dataloader)])
