"""Per-sample state table: one O(N) column per statistic, updated by vectorised scatter ops.

Under DDP every rank updates its table from the same *gathered* global batch in the same order, so tables
stay identical on every rank with O(batch) communication per step (the table itself is never all-reduced).

Duplicate indices in one update (with-replacement sampling draws a sample twice) are merged
deterministically: ``"last"``/``"ema"`` columns take the mean of that sample's values in the batch,
``"sum"`` columns add them all, ``"max"`` takes the maximum, and ``count`` grows by the number of occurrences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

Kind = Literal["last", "ema", "sum", "max", "count"]
_KINDS = ("last", "ema", "sum", "max", "count")


@dataclass(frozen=True)
class Column:
    """How a column is initialised and updated.

    Args:
        kind: ``"last"`` (overwrite), ``"ema"`` (``v ← decay·v + (1 − decay)·x``; first visit sets ``x``),
            ``"sum"``, ``"max"`` or ``"count"`` (occurrences; values ignored).
        init: initial value of every entry.
        decay: EMA decay for ``"ema"`` columns.
        dtype: storage dtype (float32 by default; int64 for counts).
    """

    kind: Kind = "last"
    init: float = 0.0
    decay: float = 0.9
    dtype: torch.dtype = torch.float32


def _same_spec(a: Column, b: Column) -> bool:
    """Spec equality that treats two NaN ``init`` values as equal."""
    same_init = a.init == b.init or (a.init != a.init and b.init != b.init)
    return same_init and (a.kind, a.decay, a.dtype) == (b.kind, b.decay, b.dtype)


DEFAULT_COLUMNS: dict[str, Column] = {
    "loss": Column("last", float("nan")),
    "ema_loss": Column("ema", float("nan"), decay=0.9),
    "count": Column("count", 0, dtype=torch.int64),
    "weight": Column("last", 1.0),
}


class SampleStateTable:
    """A table of per-sample statistics keyed by dataset index.

    Args:
        num_samples: N, the data set size (indices must lie in ``[0, N)``).
        columns: column specs by name (default: ``loss``, ``ema_loss``, ``count``, ``weight``).
        ema_decay: convenience override of the ``ema_loss`` decay.

    Example::

        table = SampleStateTable(1000)
        table.update(torch.tensor([3, 7]), loss=torch.tensor([0.5, 1.2]))
        table["ema_loss"][3]
    """

    def __init__(self, num_samples: int, columns: dict[str, Column] | None = None, ema_decay: float | None = None):
        if not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"Expected argument `num_samples` to be a positive int, but got {num_samples!r}.")
        self.num_samples = num_samples
        self.specs: dict[str, Column] = dict(DEFAULT_COLUMNS if columns is None else columns)
        if ema_decay is not None and "ema_loss" in self.specs:
            self.specs["ema_loss"] = Column("ema", float("nan"), decay=ema_decay)
        self.columns: dict[str, Tensor] = {}
        for name, spec in self.specs.items():
            self._allocate(name, spec)

    # ------------------------------------------------------------------ columns
    def _allocate(self, name: str, spec: Column) -> None:
        if spec.kind not in _KINDS:
            raise ValueError(f"Expected column kind to be one of {_KINDS}, but got {spec.kind!r} for {name!r}.")
        if spec.kind == "ema" and not 0 <= spec.decay < 1:
            raise ValueError(f"Expected EMA decay in [0, 1), but got {spec.decay!r} for column {name!r}.")
        self.columns[name] = torch.full((self.num_samples,), spec.init, dtype=spec.dtype)

    def add_column(self, name: str, spec: Column) -> None:
        """Declare a method-specific column (no-op if it already exists with the same spec)."""
        if name in self.specs:
            if not _same_spec(self.specs[name], spec):
                raise ValueError(f"Column {name!r} already exists with a different spec: {self.specs[name]}.")
            return
        self.specs[name] = spec
        self._allocate(name, spec)

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.columns:
            raise KeyError(f"Unknown column {name!r}; the table has {sorted(self.columns)}.")
        return self.columns[name]

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.columns.values())

    # ------------------------------------------------------------------ updates
    def check_index(self, index: Tensor) -> Tensor:
        """Validate dataset indices (integer, 1-D, in ``[0, N)``) and return them as int64 on CPU."""
        if not isinstance(index, Tensor):
            index = torch.as_tensor(index)
        if index.is_floating_point() or index.dtype == torch.bool:
            raise TypeError(f"Expected sample indices to be an integer tensor, but got dtype {index.dtype}.")
        index = index.reshape(-1).to("cpu", torch.int64)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_samples):
            raise IndexError(
                f"Expected sample indices in [0, {self.num_samples}), but got range "
                f"[{int(index.min())}, {int(index.max())}]. Is `num_samples` the size of the training set, and does "
                "the batch carry dataset indices (wrap it in `IndexedDataset`)?"
            )
        return index

    def update(self, index: Tensor, **values: Tensor) -> None:
        """Vectorised update of the rows ``index`` (``count`` always advances; other columns as given)."""
        index = self.check_index(index)
        if index.numel() == 0:
            return
        for name, val in values.items():
            if name not in self.columns:
                raise KeyError(f"Unknown column {name!r}; declare it with `add_column`. Columns: {sorted(self.columns)}.")
            if val.reshape(-1).numel() != index.numel():
                raise ValueError(
                    f"Expected {index.numel()} values for column {name!r} (one per index), but got {val.numel()}."
                )
        uniq, inverse = torch.unique(index, return_inverse=True)
        occurrences = torch.bincount(inverse, minlength=uniq.numel())
        for name, val in values.items():
            spec, col = self.specs[name], self.columns[name]
            val = val.detach().reshape(-1).to("cpu", col.dtype if col.is_floating_point() else torch.float32)
            if spec.kind == "count":
                continue
            if spec.kind == "sum":
                col.index_add_(0, index, val.to(col.dtype))
                continue
            if spec.kind == "max":
                red = torch.full((uniq.numel(),), -torch.inf, dtype=val.dtype).scatter_reduce(
                    0, inverse, val, "amax", include_self=True)
                col[uniq] = torch.maximum(col[uniq], red.to(col.dtype))
                continue
            mean = torch.zeros(uniq.numel(), dtype=val.dtype).index_add_(0, inverse, val) / occurrences.to(val.dtype)
            if spec.kind == "last":
                col[uniq] = mean.to(col.dtype)
            else:  # ema; NaN (never seen) entries take the first value
                old = col[uniq]
                new = spec.decay * old + (1 - spec.decay) * mean
                col[uniq] = torch.where(torch.isnan(old), mean, new).to(col.dtype)
        for name, spec in self.specs.items():
            if spec.kind == "count":
                self.columns[name].index_add_(0, uniq, occurrences.to(self.columns[name].dtype))

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "columns": {k: v.clone() for k, v in self.columns.items()},
            "specs": {k: vars(v) | {"dtype": str(v.dtype).replace("torch.", "")} for k, v in self.specs.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = int(state["num_samples"])
        if n != self.num_samples:
            raise ValueError(
                f"Checkpointed table has {n} samples but this one has {self.num_samples}: the training set changed "
                "size since the checkpoint was written. Resume with the same data set."
            )
        for name, values in state["columns"].items():
            if name not in self.specs:
                raw = state.get("specs", {}).get(name, {})
                spec = Column(raw.get("kind", "last"), raw.get("init", 0.0), raw.get("decay", 0.9),
                              getattr(torch, raw.get("dtype", "float32")))
                self.add_column(name, spec)
            self.columns[name] = values.clone().to(self.columns[name].dtype)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> SampleStateTable:
        specs = {
            k: Column(v.get("kind", "last"), v.get("init", 0.0), v.get("decay", 0.9), getattr(torch, v.get("dtype", "float32")))
            for k, v in state.get("specs", {}).items()
        }
        table = cls(int(state["num_samples"]), columns=specs or None)
        table.load_state_dict(state)
        return table
