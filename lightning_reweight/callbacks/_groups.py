"""Shared plumbing of the group-fairness callbacks (FEBS, GroupDRO): group info and logging."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_reweight.callbacks.base import GlobalBatch, WeightingCallback
from lightning_reweight.rules.fairness import check_groups


def train_dataset_groups(trainer: pl.Trainer | None) -> Tensor | None:
    """Per-sample group ids of the Trainer's training data set (``IndexedDataset(groups=...)``), if any."""
    if trainer is None:
        return None
    loader = getattr(trainer, "train_dataloader", None)
    loaders = loader.values() if isinstance(loader, dict) else loader if isinstance(loader, (list, tuple)) else [loader]
    for dl in loaders:
        dataset = getattr(dl, "dataset", None)
        groups = getattr(dataset, "groups", None)
        if isinstance(groups, Tensor) and groups.ndim == 1:
            return groups.long()
    return None


class GroupCallback(WeightingCallback):
    """A ``WeightingCallback`` that needs group ids: resolves ``num_groups``, validates ids, logs group stats.

    Its per-group state is a few numbers: on the CPU the math runs on numpy views (torch's per-op overhead
    dominates there); on a GPU batch it runs as tensor ops on the batch's device, without host reads.
    """

    device_ready = True

    def __init__(self, num_groups: int | None, ignore_index: int | None, log_every_n_steps: int,
                 log_histogram: bool, name: str | None, *, fresh_table: bool = False,
                 device: str | torch.device = "auto", sync_checks: bool = True):
        super().__init__(track_samples=False, log_every_n_steps=log_every_n_steps, log_histogram=log_histogram,
                         name=name, fresh_table=fresh_table, device=device, sync_checks=sync_checks)
        if num_groups is not None and (not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1):
            raise ValueError(f"Expected argument `num_groups` to be a positive int or None, but got {num_groups!r}.")
        if ignore_index is not None and (not isinstance(ignore_index, int) or isinstance(ignore_index, bool)
                                         or (num_groups is not None and 0 <= ignore_index < num_groups)):
            raise ValueError(
                f"Expected argument `ignore_index` to be an int outside the group ids (negative, e.g. -1, or >= "
                f"num_groups, e.g. 255) or None, but got {ignore_index!r}."
            )
        self.num_groups = num_groups
        self.ignore_index = ignore_index
        self._train_groups: Tensor | None = None
        self._prepared: tuple[GlobalBatch, Tensor, Tensor] | None = None
        self._pending: Any = None

    # ---------------------------------------------------------------- groups
    def resolve_num_groups(self, trainer: pl.Trainer | None) -> int:
        """``num_groups`` as given, else from the training data set's group ids."""
        if self.num_groups is None:
            groups = train_dataset_groups(trainer)
            valid = groups[self._known(groups)] if groups is not None else None
            if valid is None or valid.numel() == 0:
                raise RuntimeError(
                    f"{type(self).__name__} could not infer the number of groups: the train dataloader's data set "
                    "has no `groups`. Pass `num_groups=` or wrap the data set in "
                    "`IndexedDataset(dataset, groups=group_ids)`."
                )
            self.num_groups = int(valid.max()) + 1
        return self.num_groups

    def _known(self, groups: Tensor) -> Tensor:
        known = groups >= 0
        return known & (groups != self.ignore_index) if self.ignore_index is not None else known

    def train_group_counts(self, trainer: pl.Trainer | None) -> Tensor | None:
        """Training-set sample count per group (from the data set's group ids), or ``None``."""
        groups = train_dataset_groups(trainer)
        if groups is None or self.num_groups is None:
            return None
        valid = groups[self._known(groups)]
        if valid.numel() and int(valid.max()) >= self.num_groups:
            raise ValueError(
                f"The training data set holds group id {int(valid.max())}, but {type(self).__name__} has "
                f"num_groups={self.num_groups}. Pass `num_groups={int(valid.max()) + 1}`."
            )
        return torch.bincount(valid, minlength=self.num_groups)

    def setup_groups(self, trainer: pl.Trainer | None) -> None:  # pragma: no cover - subclass hook
        """Allocate the per-group state on first use."""

    def validate_batch(self, batch: GlobalBatch, trainer: pl.Trainer) -> None:
        self._pending = None  # a proposal of an earlier, rejected step is never committed
        super().validate_batch(batch, trainer)
        if batch.group is None:
            raise ValueError(
                f"{type(self).__name__} needs a group id per sample, but `reduce_loss` got none. Pass them: "
                "`reduce_loss(self, losses, index, group=group)` (an `IndexedDataset(ds, groups=...)` adds "
                "`group` to each batch)."
            )
        self.setup_groups(trainer)
        self._prepared = (batch, *self._bucket_and_count(batch.group, batch))

    def _bucket_and_count(self, group: Tensor, batch: GlobalBatch | None = None) -> tuple[Tensor, Tensor]:
        """Validate the batch's ids once and return ``(bucket ids, counts)``: ids with every ``ignore_index``
        sample in the extra bucket ``num_groups``, and the ``num_groups + 1`` bucket counts.

        On a GPU batch only tensor ops run (``_device_buckets``): an invalid id is reported by the step's checks,
        read with the engine's (``sync_checks=True``) or deferred."""
        assert self.num_groups is not None
        num_groups = self.num_groups
        if group.device.type != "cpu" and not group.is_floating_point() and group.dtype != torch.bool \
                and group.ndim == 1:
            return self._device_buckets(group.to(torch.int64), batch)
        if group.dtype == torch.int64 and group.ndim == 1 and group.numel():
            lo, hi = (int(v) for v in group.aminmax())
            if lo >= 0 and hi < num_groups:  # fast path: every id valid, none ignored
                return group, torch.bincount(group, minlength=num_groups + 1)
        group = check_groups(group, num_groups, self.ignore_index, name="group")
        idx = group if self.ignore_index is None else torch.where(group == self.ignore_index, num_groups, group)
        return idx, torch.bincount(idx, minlength=num_groups + 1)

    def _device_buckets(self, group: Tensor, batch: GlobalBatch | None) -> tuple[Tensor, Tensor]:
        """``_bucket_and_count`` with tensor ops only (a device batch): the ids' check joins the step's checks
        (one ``aminmax``), an invalid id lands in a bucket in range until the checks report it."""
        num_groups = self.num_groups
        # with ignore_index samples counted as group 0, the ids are valid exactly when they lie in [0, num_groups)
        ignored = None if self.ignore_index is None else group == self.ignore_index
        ids = group if ignored is None else group.masked_fill(ignored, 0)
        lo, hi = ids.aminmax()
        bad_ids = lambda: check_groups(group.cpu(), num_groups, self.ignore_index, name="group")  # noqa: E731
        if batch is not None:  # with the step's checks (a device step reads none on its own)
            self.check_within(batch, lo, 0, num_groups - 1, bad_ids)
            self.check_within(batch, hi, 0, num_groups - 1, bad_ids)
        elif not (0 <= int(lo) and int(hi) < num_groups):
            bad_ids()  # raises, naming the ids
        # ignore_index samples in the extra bucket; an invalid id (reported by the checks) in a bucket in range
        idx = ids.clamp(0, num_groups)
        idx = idx if ignored is None else idx.masked_fill(ignored, num_groups)
        counts = torch.zeros(num_groups + 1, dtype=torch.int64, device=group.device)
        return idx, counts.index_add_(0, idx, self._ones_like(idx))

    def _ones_like(self, idx: Tensor) -> Tensor:
        """``torch.ones_like(idx)``, kept between steps of one batch size (one kernel fewer per step)."""
        ones = getattr(self, "_ones", None)
        if ones is None or ones.shape != idx.shape or ones.device != idx.device or ones.dtype != idx.dtype:
            ones = self._ones = torch.ones_like(idx)
        return ones

    def prepared(self, batch: GlobalBatch) -> tuple[Tensor, Tensor]:
        """``(bucket ids, bucket counts)`` of ``batch`` from ``validate_batch`` (recomputed if missing)."""
        if self._prepared is not None and self._prepared[0] is batch:
            return self._prepared[1], self._prepared[2]
        return self._bucket_and_count(batch.group, batch)

    # ---------------------------------------------------------------- logging
    def log_extras(self) -> dict[str, float]:
        """Per-group scalars logged next to the weight statistics (``{"q/group_0": ...}``)."""
        return {}
