"""Frozen copies of the CPU merges as they were before ``Repeats`` (``torch.unique`` / sort per call), the
reference the faster paths must match bit for bit: ``SampleStateTable.update`` on the CPU and
``rules.importance.scatter_ema_``."""

from __future__ import annotations

import torch
from torch import Tensor


def table_update(table, index: Tensor, **values: Tensor) -> None:
    """The CPU path of ``SampleStateTable.update`` (unchecked index), before ``Repeats``."""
    index = index.reshape(-1).to(table.device, torch.int64)
    counts = [name for name, spec in table.specs.items() if spec.kind == "count"]
    if not counts:
        ordered = torch.sort(index).values
        unique = not bool((ordered[1:] == ordered[:-1]).any())
    else:
        col = table.columns[counts[0]]
        before = col.index_select(0, index)
        col.index_add_(0, index, torch.ones(index.numel(), dtype=col.dtype))
        unique = torch.equal(col.index_select(0, index), before + 1)
        for name in counts[1:]:
            other = table.columns[name]
            other.index_add_(0, index, torch.ones(index.numel(), dtype=other.dtype))
    if unique:
        _write_unique(table, index, values)
    else:
        rows, inverse, cnt = torch.unique(index, return_inverse=True, return_counts=True)
        _write_unique(table, rows, values, inverse, cnt)


def _write_unique(table, index, values, inverse=None, counts=None):
    for name, val in values.items():
        spec, col = table.specs[name], table.columns[name]
        if spec.kind == "count":
            continue
        val = val.detach().reshape(-1)
        if val.dtype != col.dtype or val.device != col.device:
            val = val.to(col.device, col.dtype if col.is_floating_point() else torch.float32).to(col.dtype)
        if spec.kind == "sum":
            col.index_add_(0, index if inverse is None else index[inverse], val)
            continue
        if spec.kind == "max":
            col.scatter_reduce_(0, index if inverse is None else index[inverse], val, "amax", include_self=True)
            continue
        if inverse is not None:
            sums = torch.zeros(index.numel(), dtype=torch.float64).index_add_(0, inverse, val.double())
            val = (sums / counts).to(val.dtype)
        if spec.kind == "last":
            col.index_copy_(0, index, val)
        else:
            old = col.index_select(0, index)
            col.index_copy_(0, index, torch.where(torch.isnan(old), val, torch.lerp(old, val, 1 - spec.decay)))


def scatter_ema_(values: Tensor, seen: Tensor, index: Tensor, new: Tensor, rate: float) -> None:
    """The CPU path of ``rules.importance.scatter_ema_`` before ``Repeats``."""
    index = index.reshape(-1).to(values.device, torch.long)
    new = new.detach().reshape(-1).to(values.device, torch.float64)
    idx_s, order = torch.sort(index, stable=True)
    if not bool((idx_s[1:] == idx_s[:-1]).any()):
        old = values[index].to(torch.float64)
        values[index] = torch.where(seen[index] > 0, (1.0 - rate) * old + rate * new, new).to(values.dtype)
        seen[index] = True
        return
    new_s = new[order]
    uniq, inverse, counts = torch.unique_consecutive(idx_s, return_inverse=True, return_counts=True)
    starts = counts.cumsum(0) - counts
    pos = torch.arange(idx_s.numel(), device=idx_s.device) - starts[inverse]
    m = counts[inverse]
    keep = 1.0 - rate
    coef = rate * torch.pow(keep, (m - 1 - pos).to(new_s.dtype))
    was_seen = seen[uniq] > 0
    first_unseen = (pos == 0) & ~was_seen[inverse]
    coef = torch.where(first_unseen, torch.pow(keep, (m - 1).to(new_s.dtype)), coef)
    contrib = torch.zeros(uniq.numel(), dtype=torch.float64, device=values.device).index_add_(0, inverse, coef * new_s)
    old = values[uniq].to(torch.float64)
    old_term = torch.where(was_seen, torch.pow(keep, counts.to(old.dtype)) * old, 0.0)
    values[uniq] = (old_term + contrib).to(values.dtype)
    seen[uniq] = True
