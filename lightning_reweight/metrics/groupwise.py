"""``GroupwiseMetric``: any torchmetrics metric per group, plus worst group, gap and overall."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import ModuleList
from torchmetrics import Metric
from torchmetrics.wrappers.abstract import WrapperMetric

from lightning_reweight.metrics.functional import _check_group_for

__all__ = ["GroupwiseMetric"]


class _GroupCounter(Metric):
    """Samples seen per group, summed across ranks (decides which groups are reported)."""

    full_state_update = False

    def __init__(self, num_groups: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("counts", torch.zeros(num_groups, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, counts: Tensor) -> None:
        self.counts += counts.to(self.counts.device)

    def compute(self) -> Tensor:
        return self.counts.clone()


class GroupwiseMetric(WrapperMetric):
    """Evaluate a metric separately on each group; report every group, the worst group and the gap.

    One clone of ``metric`` per group receives that group's rows of each batch; each clone syncs its own
    states across DDP ranks (clones are computed in the same order on every rank, and only for groups seen on
    some rank). ``compute`` returns a flat dict of scalars, ready for ``self.log_dict`` and
    ``ModelCheckpoint(monitor=...)``::

        {f"{prefix}{name_g}": value_g, ..., f"{prefix}worst": ..., f"{prefix}gap": ..., f"{prefix}overall": ...}

    "Worst" is the min over groups when ``metric.higher_is_better`` is true (or unset), else the max; "gap" is
    max − min. Groups with no sample are left out of both.

    Args:
        metric: a torchmetrics metric returning a scalar (``BinaryAccuracy()``, ``MeanSquaredError()``, ...).
        num_groups: G; group ids must lie in ``[0, G)`` or equal ``ignore_index``.
        group_names: names for the keys (default ``"group_0"`` ...).
        prefix: key prefix, e.g. ``"val/acc_"``.
        ignore_index: group id of "unknown" samples: they count in ``overall`` only.
        include_overall: also evaluate the metric on all samples.

    Example::

        self.val_acc = GroupwiseMetric(BinaryAccuracy(), num_groups=2, group_names=["male", "female"], prefix="val/acc_")
        # validation_step:       self.val_acc.update(probs, y, group)
        # on_validation_epoch_end: self.log_dict(self.val_acc.compute()); self.val_acc.reset()
        ModelCheckpoint(monitor="val/acc_worst", mode="max")
    """

    def __init__(
        self, metric: Metric, num_groups: int, group_names: Sequence[str] | None = None, prefix: str = "",
        ignore_index: int | None = -1, include_overall: bool = True, **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(metric, Metric):
            raise TypeError(f"Expected argument `metric` to be a torchmetrics Metric, but got {type(metric).__name__}.")
        if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
            raise ValueError(f"Expected argument `num_groups` to be a positive int, but got {num_groups!r}.")
        if group_names is not None:
            group_names = [str(n) for n in group_names]
            if len(group_names) != num_groups or len(set(group_names)) != num_groups:
                raise ValueError(
                    f"Expected argument `group_names` to hold {num_groups} distinct names, but got {group_names}."
                )
        self.num_groups, self.prefix, self.ignore_index = num_groups, prefix, ignore_index
        self.group_names = group_names or [f"group_{g}" for g in range(num_groups)]
        reserved = {"worst", "gap", "overall"} & set(self.group_names)
        if reserved:
            raise ValueError(f"Expected group names other than {sorted(reserved)} (reserved keys).")
        self._worst_is_min = metric.higher_is_better is not False
        self.metrics = ModuleList([metric.clone() for _ in range(num_groups)])
        self.overall = metric.clone() if include_overall else None
        self.counter = _GroupCounter(num_groups)

    def _split(self, group: Tensor, n: int) -> tuple[Tensor, Tensor]:
        group = _check_group_for(group, n, self.num_groups, self.ignore_index)
        valid = group[group != self.ignore_index] if self.ignore_index is not None else group
        counts = torch.bincount(valid, minlength=self.num_groups)
        return group, counts

    def update(self, preds: Tensor, target: Tensor, group: Tensor, *args: Any, **kwargs: Any) -> None:
        """Route each group's rows of ``preds``/``target`` (first dim = sample) to that group's metric."""
        group, counts = self._split(group, target.shape[0])
        group = group.to(preds.device)
        self.counter.update(counts)
        for g in counts.nonzero().flatten().tolist():  # loop over groups present in the batch
            mask = group == g
            self.metrics[g].update(preds[mask], target[mask], *args, **kwargs)
        if self.overall is not None:
            self.overall.update(preds, target, *args, **kwargs)

    def forward(self, preds: Tensor, target: Tensor, group: Tensor, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Accumulate the batch and return its own values (groups present in the batch only)."""
        group, counts = self._split(group, target.shape[0])
        group = group.to(preds.device)
        self.counter.update(counts)
        values: dict[str, Tensor] = {}
        for g in counts.nonzero().flatten().tolist():
            mask = group == g
            values[self.group_names[g]] = self.metrics[g](preds[mask], target[mask], *args, **kwargs)
        out = self._summarise(values)
        if self.overall is not None:
            out[f"{self.prefix}overall"] = self.overall(preds, target, *args, **kwargs)
        return out

    def _summarise(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {f"{self.prefix}{k}": v for k, v in values.items()}
        if values:
            stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32).to(self.counter.counts.device).reshape(())
                                   for v in values.values()])
            out[f"{self.prefix}worst"] = stacked.min() if self._worst_is_min else stacked.max()
            out[f"{self.prefix}gap"] = stacked.max() - stacked.min()
        return out

    def compute(self) -> dict[str, Tensor]:
        present = self.counter.compute() > 0  # synced across ranks: the same groups on every rank
        values: dict[str, Tensor] = {}
        with warnings.catch_warnings():
            # a group seen on another rank only: this rank's clone syncs its (empty) state without an update
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            for g in present.nonzero().flatten().tolist():
                values[self.group_names[g]] = self.metrics[g].compute()
            out = self._summarise(values)
            if self.overall is not None:
                out[f"{self.prefix}overall"] = self.overall.compute()
        return out

    def group_counts(self) -> Tensor:
        """Samples seen per group on this process."""
        return self.counter.counts.clone()

    def reset(self) -> None:
        for m in self.metrics:
            m.reset()
        if self.overall is not None:
            self.overall.reset()
        self.counter.reset()
        super().reset()
