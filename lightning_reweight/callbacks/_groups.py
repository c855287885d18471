"""Shared plumbing of the group-fairness callbacks (FEBS, GroupDRO): group info and logging."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_reweight.callbacks.base import GlobalBatch, WeightingCallback
from lightning_reweight.rules.fairness import check_groups
from lightning_reweight.state.validate import CheckpointStateError, TrainingSetChangedError


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
        self._num_groups_given = num_groups  # ``num_groups`` as passed (``None``: inferred from the data)
        self._restored_state = False  # the per-group state came from a checkpoint (set by ``assign_extra_state``)
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

    # ---------------------------------------------------------------- restored per-group state
    def restored_groups(self) -> int | None:  # pragma: no cover - subclass hook
        """How many groups the per-group state holds (``None``: none yet)."""
        return None

    def _group_count_fix(self, restored: int) -> str:
        return (f"Resume on data with the checkpoint's {restored} groups (pass `num_groups={restored}` when its "
                f"highest group ids are merely absent from this data), or start {type(self).__name__}'s per-group "
                f"state fresh by deleting `checkpoint['callbacks'][{self.state_key!r}]['extra']`.")

    def check_group_count(self, state: Any, key: str, restored: int) -> None:
        """At load: a checkpointed per-group tensor of ``restored`` entries must fit ``num_groups`` when known."""
        if self.num_groups is not None and restored != self.num_groups:
            raise CheckpointStateError(
                self.checkpoint_where, key, f"expected {self.num_groups} groups (num_groups={self.num_groups}), but "
                f"the checkpoint's {key!r} has {restored}: it was written for data with other groups.",
                fix=self._group_count_fix(restored))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._check_restored_groups(trainer)

    def _check_restored_groups(self, trainer: pl.Trainer | None) -> None:
        """Before the first step: restored per-group state of G entries with ``num_groups`` inferred must fit
        the training data's group ids (else the first step would fail on a group id, or train on a wrong G)."""
        restored = self.restored_groups()
        if restored is None or self._num_groups_given is not None:
            return
        groups = train_dataset_groups(trainer)
        valid = groups[self._known(groups)] if groups is not None else None
        if valid is None or valid.numel() == 0:
            return  # no group ids known before the first step: that step checks them
        data = int(valid.max()) + 1
        if data != restored:
            raise TrainingSetChangedError(
                f"Expected the training data of {type(self).__name__} to have the checkpoint's {restored} groups, "
                f"but its group ids give {data} groups: the data changed since the checkpoint was written. No step "
                f"was taken. {self._group_count_fix(restored)}"
            )

    def _refuse_ids_beyond_restored_groups(self, group: Tensor, err: ValueError) -> None:
        """Where the data's group ids were unknown before the first step (no ``groups`` on the data set): a group
        id beyond the restored state's G names the checkpoint as the cause, not just the id."""
        restored = self.restored_groups()
        if not self._restored_state or self._num_groups_given is not None or restored is None:
            return
        group = group.detach().cpu()
        known = group[self._known(group)] if not group.is_floating_point() and group.ndim == 1 else group[:0]
        if known.numel() and int(known.max()) >= restored:
            raise TrainingSetChangedError(
                f"Expected group ids below the checkpoint's {restored} groups ({type(self).__name__} restored "
                f"{restored}-group state and takes num_groups from it), but this batch holds group id "
                f"{int(known.max())}: the data changed since the checkpoint was written. No state was updated. "
                f"{self._group_count_fix(restored)}"
            ) from err

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
        try:
            self._prepared = (batch, *self._bucket_and_count(batch.group, batch))
        except ValueError as err:
            self._refuse_ids_beyond_restored_groups(batch.group, err)
            raise

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
