"""Per-sample state table: one O(N) column per statistic, updated by vectorised scatter ops.

Under DDP every rank updates its table from the same *gathered* global batch in the same order, so tables
stay identical on every rank with O(batch) communication per step (the table itself is never all-reduced).

Duplicate indices in one update (with-replacement sampling draws a sample twice) are merged
deterministically: ``"last"``/``"ema"`` columns take the mean of that sample's values in the batch,
``"sum"`` columns add them all, ``"max"`` takes the maximum, and ``count`` grows by the number of occurrences.
The merge uses only fixed-shape ops (sort, searchsorted, cumsum, scatter), so an update of a table on a GPU
issues no host synchronisation. On the CPU the repeats are found without sorting the batch (from the ``count``
column's increments; only the repeated positions are sorted), and ``update`` returns them (``Repeats``) so
that another per-row write of the same batch (``rules.importance.scatter_ema_``) need not find them again. With
numba (``USE_NUMBA``) a CPU update of float32/float64 value columns and int32/int64 count columns is one compiled
call (``state._kernels.table_update``) with the same results bit for bit; other dtypes take numpy/torch ops.

Checkpoints hold the live columns (no copy) and a restore takes ownership of the loaded tensors after
validating them (``SampleStateTable.validate_state``): see ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from lightning_reweight._numba import LazyKernels
from lightning_reweight.state.validate import CheckpointStateError, as_int, as_tensor, require_keys

Kind = Literal["last", "ema", "sum", "max", "count"]
_KINDS = ("last", "ema", "sum", "max", "count")
_DTYPES = {"float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"}
_CHUNK = 1 << 22  # value scans of restored columns run in chunks: O(chunk) temporaries, not O(N)


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


#: column dtypes whose CPU merges run on numpy views of the columns (fewer, cheaper calls than torch ops on a
#: batch-sized tensor); numpy's float64 -> float32 cast and arithmetic match torch's bit for bit. Other dtypes
#: (e.g. float16, whose casts could round differently) take the torch ops.
_HOST_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class Repeats:
    """Where the indices of one CPU batch repeat: a by-product of ``SampleStateTable.update`` that other
    per-row writes of the same batch reuse instead of sorting it again (``scatter_ema_(..., repeats=)``).

    The entries cover every row that occurs more than once (they may also cover rows that occur once: the
    merges treat those exactly like the no-repeat case). All are ``(D,)`` int64 numpy arrays (CPU only),
    ``None`` when no index repeats.

    Attributes:
        size: B, the length of the index it describes.
        positions: batch positions, grouped by row (rows ascending) and in batch order within a row.
        group: for each entry, the entry at which its row's group starts (a group id in ``[0, D)``).
        count: for each entry, how often its row occurs in the batch.
        later: for each entry, how many occurrences of its row follow it in the batch (``count − 1`` for the
            first, 0 for the last).
    """

    size: int
    positions: np.ndarray | None = None
    group: np.ndarray | None = None
    count: np.ndarray | None = None
    later: np.ndarray | None = None

    @staticmethod
    def from_sorted(size: int, sorted_rows: np.ndarray, positions: np.ndarray,
                    count: np.ndarray | None = None) -> Repeats:
        """The groups of ``positions`` (batch positions ordered by row, batch order within a row), whose rows
        are ``sorted_rows`` (ascending), found by binary search; ``count``: each entry's multiplicity, if
        known."""
        start = sorted_rows.searchsorted(sorted_rows)
        end = sorted_rows.searchsorted(sorted_rows, side="right") if count is None else start + count
        later = end - np.arange(1, positions.size + 1)
        return Repeats(size, positions, start, end - start if count is None else count, later)

    @staticmethod
    def of(index: Tensor | np.ndarray) -> Repeats:
        """The repeats of a 1-D CPU index, found with one stable sort (no table needed)."""
        ix = index.numpy() if isinstance(index, Tensor) else index
        order = ix.argsort(kind="stable")
        sorted_rows = ix[order]
        if not (sorted_rows[1:] == sorted_rows[:-1]).any():
            return Repeats(ix.size)
        return Repeats.from_sorted(ix.size, sorted_rows, order)

    def merge(self, val: np.ndarray) -> np.ndarray:
        """``val`` (a copy) with every repeated sample's entries replaced by the mean of its values (float64
        sum in batch order, then ``val``'s dtype); a sample seen once keeps its value exactly."""
        sums = np.bincount(self.group, weights=val[self.positions].astype(np.float64), minlength=self.positions.size)
        out = val.copy()
        out[self.positions] = (sums[self.group] / self.count).astype(val.dtype)
        return out

    def merge_tensor(self, val: Tensor) -> Tensor:
        """``merge`` with torch ops, for dtypes numpy does not cast like torch (float16, bfloat16)."""
        positions, group = torch.from_numpy(self.positions), torch.from_numpy(self.group)
        sums = torch.zeros(positions.numel(), dtype=torch.float64)
        sums.index_add_(0, group, val.index_select(0, positions).double())
        mean = (sums.index_select(0, group) / torch.from_numpy(self.count)).to(val.dtype)
        return val.index_copy(0, positions, mean)


#: device batches up to this many rows find repeated indices with one ``(B, B)`` comparison and merge them with one
#: float64 matrix product (8 MB at 1024 rows); larger batches sort
PAIR_MERGE_ROWS = 1024


def _stacked64(parts: list[Tensor], ones: Tensor) -> Tensor:
    """``[parts | ones]`` as a ``(B, k + 1)`` float64 matrix: one stack and one conversion when every part (and
    ``ones``) has one dtype."""
    if all(p.dtype == ones.dtype for p in parts):
        return torch.stack([*parts, ones], 1).double()
    return torch.stack([p.double() for p in parts] + [ones.double()], 1)


def _repeat_means(index: Tensor, stacked: Tensor, pairs64: Tensor | None = None,
                  order: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Each row's mean over the rows of its index, with fixed-shape ops: ``(rows, means (B, k), perm)``.

    ``stacked`` is ``[values | 1]`` (``_stacked64``). Up to ``PAIR_MERGE_ROWS`` rows: the ``(B, B)`` 0/1 pair
    matrix (``pairs64``, made here if not given) times ``stacked`` gives each sample's sums and occurrences in one
    product (a sample seen once sums its own value and zeros, exactly); ``rows`` is ``index``, ``perm`` ``None``.
    Larger batches sort once (``order``: ``torch.sort(index, stable=True)``, made here if not given) and take
    prefix sums: ``rows`` is the sorted index, ``perm`` the sort's permutation, a sample seen once keeps its
    value exactly."""
    k = stacked.shape[1] - 1
    if index.numel() <= PAIR_MERGE_ROWS:
        pairs = pairs64 if pairs64 is not None else (index[:, None] == index[None, :]).double()
        sums = pairs @ stacked
        return index, sums[:, :k] / sums[:, k:], None
    rows, perm = order if order is not None else torch.sort(index, stable=True)
    left = torch.searchsorted(rows, rows)
    right = torch.searchsorted(rows, rows, right=True)
    occurrences = (right - left).unsqueeze(1)  # per sorted position: how often its sample occurs
    vs = stacked[perm][:, :k]
    csum = torch.nn.functional.pad(torch.cumsum(vs, 0), (0, 0, 1, 0))
    return rows, torch.where(occurrences == 1, vs, (csum[right] - csum[left]) / occurrences), perm


def merged_values(index: Tensor, values: tuple[Tensor, ...], olds: tuple[Tensor | None, ...],
                  layout: tuple[tuple[torch.dtype, torch.dtype, float | None], ...], unique: bool
                  ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The new values of a device-style update's ``last``/``ema`` columns and the rows to write them at, computed
    as ``SampleStateTable._update_fixed_shape`` does, as a pure function (tensor operations only, no state): what
    ``SampleStateTable.compile`` runs through ``torch.compile``.

    Args:
        index: ``(B,)`` int64 rows of the update.
        values: each column's ``(B,)`` values.
        olds: each ``ema`` column's current values at ``index`` (``None`` for a ``last`` column).
        layout: per column ``(value dtype, column dtype, ema decay or None)``.
        unique: no index repeats (known from the step's checks): the values are written as they are.

    Returns:
        ``(rows, new values per column)``: a repeated sample's entries replaced by their mean (float64 sums),
        ``ema`` columns stepped with ``torch.lerp`` (a never-seen ``NaN`` entry takes the value).
    """
    parts = [v.detach().reshape(-1).to(value_dtype) for v, (value_dtype, _, _) in zip(values, layout)]
    rows = index
    if unique:
        means = [p.to(col_dtype) for p, (_, col_dtype, _) in zip(parts, layout)]
    else:
        ones = torch.ones(index.numel(), dtype=parts[0].dtype, device=index.device)
        rows, mean, perm = _repeat_means(index, _stacked64(parts, ones))
        if perm is not None:  # the old values were read at ``index``: in the sorted rows' order
            olds = tuple(None if old is None else old[perm] for old in olds)
        means = [mean[:, j].to(value_dtype).to(col_dtype) for j, (value_dtype, col_dtype, _) in enumerate(layout)]
    out = []
    for new, old, (_, _, decay) in zip(means, olds, layout):
        out.append(new if decay is None else torch.where(torch.isnan(old), new, torch.lerp(old, new, 1 - decay)))
    return rows, tuple(out)


class BatchIndex:
    """What one step knows about its index, shared by the table updates of the step (a device table's merge).

    ``unique`` is ``True`` when the step read back (with its checks, ``sync_checks=True``) that no index repeats:
    the update then writes the values directly. Otherwise repeats are merged with fixed-shape ops: the pair
    matrix ``index[:, None] == index[None, :]`` (batches up to ``PAIR_MERGE_ROWS``) or a stable sort, made once
    per step for every table.

    Args:
        index: the ``(B,)`` int64 index this describes (an update of another index ignores the hints).
    """

    def __init__(self, index: Tensor | None = None) -> None:
        self.index = index
        self.unique: bool | None = None
        self._pairs: Tensor | None = None
        self._pairs64: Tensor | None = None
        self._sorted: tuple[Tensor, Tensor] | None = None

    def release(self) -> None:
        """Drop the pair matrix and the sort (the step is committed; ``unique`` stays)."""
        self._pairs = self._pairs64 = self._sorted = None

    def describes(self, index: Tensor) -> bool:
        return self.index is index

    def pairs(self, index: Tensor) -> Tensor:
        """``(B, B)`` bool: ``index[i] == index[j]``."""
        if self._pairs is None or not self.describes(index):
            pairs = index[:, None] == index[None, :]
            if not self.describes(index):
                return pairs
            self._pairs = pairs
        return self._pairs

    def pairs64(self, index: Tensor) -> Tensor:
        """``pairs(index)`` as float64 0/1 (the merges' matrix products: group sums and counts, exact for a
        sample seen once)."""
        if self.describes(index) and self._pairs64 is not None:
            return self._pairs64
        pairs = self.pairs(index).double()
        if self.describes(index):
            self._pairs64 = pairs
        return pairs

    def sorted(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """``torch.sort(index, stable=True)``."""
        if self._sorted is None or not self.describes(index):
            found = torch.sort(index, stable=True)
            if not self.describes(index):
                return found
            self._sorted = found
        return self._sorted

    def is_unique(self, index: Tensor) -> Tensor:
        """0-d bool on the index's device: no index repeats (three kernels; the pair matrix or the sort is kept
        for the merge)."""
        if index.numel() <= PAIR_MERGE_ROWS:
            return self.pairs(index).sum() == index.numel()
        keys = self.sorted(index)[0]
        return (keys[1:] != keys[:-1]).all()


# Use the compiled numba kernel (``state._kernels.table_update``) for CPU updates when numba is importable; False
# forces the numpy/torch path (the same tables and ``Repeats``, bit for bit).
USE_NUMBA = True
#: whether this torch build's CPU ``lerp`` rounds once (fused multiply-add, as its vectorised kernel does), probed
#: on the kernels' first import; None when neither formula matches it (EMA columns then take the torch path)
_LERP_FUSED: bool | None = None
_KIND_CODES = {"last": 0, "ema": 1, "sum": 2, "max": 3}  # ``_kernels.LAST`` ...
_VALUE_CODES = {torch.float32: 0, torch.float64: 1}  # ``_kernels.F32``, ``F64``
_COUNT_CODES = {torch.int32: 2, torch.int64: 3}  # ``_kernels.I32``, ``I64``


def _numba_kernels() -> Any:
    """The ``state._kernels`` module (imported on first use, when ``torch.lerp``'s rounding is probed), or None
    when numba is missing or ``USE_NUMBA`` is False."""
    return _KERNELS.get() if USE_NUMBA else None


def _set_lerp_fused(kernels: Any) -> None:
    global _LERP_FUSED
    _LERP_FUSED = _probe_lerp(kernels)


def _probe_lerp(kernels: Any) -> bool | None:
    """Which ``lerp`` formula torch's CPU kernel computes here, fused (one rounding) or not: compared with the
    kernel's on random values of both float types and both branches (the two differ in ~10% of them), over a
    length with a vectorised body and a scalar tail. None when neither matches every element."""
    g = np.random.default_rng(0)
    match = {True: True, False: True}
    for dtype in (np.float32, np.float64):
        old, new = (g.random(67) * 3).astype(dtype), (g.random(67) * 3).astype(dtype)
        for w in (0.1, 0.3, 0.7):
            expected = torch.lerp(torch.from_numpy(old), torch.from_numpy(new), w).numpy()
            for fused in (True, False):
                out = np.empty_like(old)
                kernels.lerp_array(old, new, dtype(w), dtype(1), fused, out)
                match[fused] = match[fused] and np.array_equal(out, expected)
    return True if match[True] else False if match[False] else None


_KERNELS = LazyKernels("lightning_reweight.state._kernels", on_import=_set_lerp_fused)


def _value_dtype(col: Tensor) -> torch.dtype:
    """The dtype a column's values are merged in: its own when floating, float32 for an integer column."""
    return col.dtype if col.is_floating_point() else torch.float32


def _as_column(val: Tensor, col: Tensor, device: torch.device) -> Tensor:
    """``val`` as a flat, detached tensor in ``_value_dtype(col)`` on ``device``."""
    return val.detach().reshape(-1).to(device, _value_dtype(col))


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

#: value ranges checked on restore, by column name (other columns: no inf/NaN unless ``init`` is one)
_MINIMUM = {"weight": 0.0}


def _spec_to_dict(spec: Column) -> dict[str, Any]:
    return {"kind": spec.kind, "init": spec.init, "decay": spec.decay, "dtype": str(spec.dtype).replace("torch.", "")}


def _spec_from_dict(raw: Any, where: str, name: str) -> Column:
    """A ``Column`` from its checkpointed form, checked (kind, init, decay, dtype)."""
    at = f"{where}[{name!r}]"
    require_keys(raw, ["kind"], at)
    kind = raw["kind"]
    if kind not in _KINDS:
        raise CheckpointStateError(at, "kind", f"expected one of {_KINDS}, but got {kind!r}.")
    init = raw.get("init", 0.0)
    if isinstance(init, bool) or not isinstance(init, (int, float)):
        raise CheckpointStateError(at, "init", f"expected a number, but got {init!r}.")
    decay = raw.get("decay", 0.9)
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise CheckpointStateError(at, "decay", f"expected a number in [0, 1), but got {decay!r}.")
    dtype = raw.get("dtype", "float32")
    if dtype not in _DTYPES:
        raise CheckpointStateError(at, "dtype", f"expected one of {sorted(_DTYPES)}, but got {dtype!r}.")
    return Column(kind, init, decay, getattr(torch, dtype))


def _check_values(values: Tensor, spec: Column, name: str, where: str) -> None:
    """Range checks of a restored column: one or two reductions per chunk (a sum is finite only when no entry
    is inf or NaN; ``nansum`` skips the NaN "never seen" marks), chunked so temporaries stay small at N = 1e8.
    The exact element checks run only to word the error."""
    init = float(spec.init)
    allow_nan, allow_inf = init != init, abs(init) == float("inf")
    minimum = 0 if spec.kind == "count" else _MINIMUM.get(name)
    flat = values.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start:start + _CHUNK]
        if chunk.is_floating_point() and not allow_inf:
            total = chunk.nansum() if allow_nan else chunk.sum()  # overflow falls through to the exact check
            if not bool(torch.isfinite(total)):
                nan, inf = int(torch.isnan(flat).sum()), int(torch.isinf(flat).sum())
                if inf or not allow_nan and nan:
                    what = f"{inf} inf entries" if inf else f"{nan} NaN entries"
                    raise CheckpointStateError(where, name, f"expected finite values, but got {what} (NaN only means "
                                               "'never seen' in columns initialised to NaN).")
        elif chunk.is_floating_point() and not allow_nan and bool(torch.isnan(chunk).any()):
            raise CheckpointStateError(where, name, f"expected no NaN, but got {int(torch.isnan(flat).sum())} NaN "
                                       "entries.")
        if minimum is not None and chunk.numel():
            low = chunk.amin() if not allow_nan else torch.nan_to_num(chunk, nan=minimum).amin()
            if bool(low < minimum):
                raise CheckpointStateError(where, name, f"expected values >= {minimum}, but the minimum is "
                                           f"{low.item()}.")


class SampleStateTable:
    """A table of per-sample statistics keyed by dataset index.

    Args:
        num_samples: N, the data set size (indices must lie in ``[0, N)``).
        columns: column specs by name (default: ``loss``, ``ema_loss``, ``count``, ``weight``).
        ema_decay: convenience override of the ``ema_loss`` decay.
        device: where the columns live (default CPU). A table on the losses' GPU is updated without any
            host synchronisation.

    Example::

        table = SampleStateTable(1000)
        table.update(torch.tensor([3, 7]), loss=torch.tensor([0.5, 1.2]))
        table["ema_loss"][3]
    """

    def __init__(self, num_samples: int, columns: dict[str, Column] | None = None, ema_decay: float | None = None,
                 device: torch.device | str | None = None, *, _allocate: bool = True):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"Expected argument `num_samples` to be a positive int, but got {num_samples!r}.")
        self.num_samples = num_samples
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.specs: dict[str, Column] = dict(DEFAULT_COLUMNS if columns is None else columns)
        if ema_decay is not None and "ema_loss" in self.specs:
            self.specs["ema_loss"] = Column("ema", float("nan"), decay=ema_decay)
        self.columns: dict[str, Tensor] = {}
        self._fixed_shape_only = False  # tests: take the device (sync-free) merge on the CPU too
        self._plans: dict[tuple[str, ...], tuple] = {}  # the compiled update's column layouts (``_plan``)
        if _allocate:
            for name, spec in self.specs.items():
                self._allocate(name, spec)

    # ------------------------------------------------------------------ columns
    def _allocate(self, name: str, spec: Column) -> None:
        if spec.kind not in _KINDS:
            raise ValueError(f"Expected column kind to be one of {_KINDS}, but got {spec.kind!r} for {name!r}.")
        if spec.kind == "ema" and not 0 <= spec.decay < 1:
            raise ValueError(f"Expected EMA decay in [0, 1), but got {spec.decay!r} for column {name!r}.")
        self.columns[name] = torch.full((self.num_samples,), spec.init, dtype=spec.dtype, device=self.device)

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

    def to(self, device: torch.device | str) -> SampleStateTable:
        """Move every column to ``device`` (in place; returns ``self``)."""
        self.device = torch.device(device)
        self.columns = {k: v.to(self.device) for k, v in self.columns.items()}
        return self

    # ------------------------------------------------------------------ updates
    def check_index(self, index: Tensor) -> Tensor:
        """Validate dataset indices (integer, 1-D, in ``[0, N)``) and return them as int64 on the table's
        device (one host synchronisation for the range check when the indices are on a GPU)."""
        if not isinstance(index, Tensor):
            index = torch.as_tensor(index)
        if index.is_floating_point() or index.dtype == torch.bool:
            raise TypeError(f"Expected sample indices to be an integer tensor, but got dtype {index.dtype}.")
        index = index.reshape(-1).to(self.device, torch.int64)
        if index.numel():
            lo, hi = torch.stack([index.min(), index.max()]).tolist()
            if lo < 0 or hi >= self.num_samples:
                raise IndexError(
                    f"Expected sample indices in [0, {self.num_samples}), but got range [{lo}, {hi}]. Is "
                    "`num_samples` the size of the training set, and does the batch carry dataset indices (wrap "
                    "it in `IndexedDataset`)?"
                )
        return index

    def update(self, index: Tensor, check: bool = True, index_info: BatchIndex | None = None,
               **values: Tensor) -> Repeats | None:
        """Vectorised update of the rows ``index`` (``count`` always advances; other columns as given).

        Args:
            index: ``(B,)`` dataset indices (duplicates allowed).
            check: validate the index range first (``reduce_loss`` checks it once per step and passes
                ``False``; an unchecked out-of-range index raises inside the scatter or, on a GPU, asserts).
            index_info: what the step knows about ``index`` (``GlobalBatch.index_info``): a device table skips
                the duplicate merge when it is known that no index repeats, and shares the merge's pair matrix
                or sort with the step's other updates. Ignored unless it describes this very ``index`` tensor.
            **values: ``(B,)`` values per column.

        Returns:
            On the CPU, where the batch's indices repeat (``Repeats``, for another per-row write of the same
            batch); ``None`` for a table on a GPU (the fixed-shape merge) or an empty batch.
        """
        info = index_info if index_info is not None and index_info.describes(index) else None
        if check:
            index = self.check_index(index)
        elif info is not None and index.dim() == 1 and index.dtype == torch.int64 and index.device == self.device:
            pass  # the step's own index: the hints' pair matrix / sort refer to this tensor
        else:
            index = index.reshape(-1).to(self.device, torch.int64)
        b = index.numel()
        if b == 0:
            return None
        for name, val in values.items():
            if name not in self.columns:
                raise KeyError(f"Unknown column {name!r}; declare it with `add_column`. Columns: {sorted(self.columns)}.")
            if val.numel() != b:
                raise ValueError(
                    f"Expected {b} values for column {name!r} (one per index), but got {val.numel()}."
                )
        if self.compiled is not None:
            self._update_graph(index, values, info)
            return None
        if self.device.type == "cpu" and not self._fixed_shape_only:
            ix = index.numpy()
            repeats = self._update_compiled(ix, values)
            if repeats is not None:
                return repeats
            repeats = self._count_repeats(index, ix)
            self._write_cpu(index, ix, values, repeats)
            return repeats
        self._update_fixed_shape(index, values, info if info is not None and info.describes(index) else None)
        return None

    def _ones(self, b: int, dtype: torch.dtype) -> Tensor:
        """A cached ``ones(b)`` on the table's device (a count's increments, the merge's occurrence column)."""
        cache = self.__dict__.setdefault("_ones_cache", {})
        ones = cache.get((b, dtype))
        if ones is None or ones.device != self.device:
            ones = cache[(b, dtype)] = torch.ones(b, dtype=dtype, device=self.device)
        return ones

    def _update_fixed_shape(self, index: Tensor, values: dict[str, Tensor], info: BatchIndex | None) -> None:
        """The device update: fixed-shape ops only (no host synchronisation), a fixed number of kernel launches.

        Repeated indices of ``last``/``ema`` columns take the mean of their values (float64 sums); a sample seen
        once keeps its value exactly. When the step read back that no index repeats (``info.unique``) the values
        are written directly; otherwise the means come from one float64 product with the ``(B, B)`` pair matrix
        (``PAIR_MERGE_ROWS``) or from a stable sort and prefix sums, for every such column at once. EMA columns
        step with ``torch.lerp`` (as the CPU path). Values fed to several columns of one dtype convert once."""
        converted: dict[tuple[int, torch.dtype], Tensor] = {}

        def as_column(name: str) -> Tensor:
            val, col = values[name], self.columns[name]
            key = (id(val), col.dtype)
            found = converted.get(key)
            if found is None:
                found = converted[key] = _as_column(val, col, self.device).to(col.dtype)
            return found

        merged = [name for name in values if self.specs[name].kind in ("last", "ema")]
        self._accumulate(index, values, as_column)
        targets, rows = {}, index
        if merged and info is not None and info.unique:
            targets = {name: as_column(name) for name in merged}
        elif merged:
            targets, rows = self._merge_repeats(index, merged, values, info)
        for name in merged:
            spec, col, mean = self.specs[name], self.columns[name], targets[name]
            if spec.kind == "last":
                col.index_put_((rows,), mean)
            else:  # ema; NaN (never seen) entries take the first value
                old = col[rows]
                col.index_put_((rows,), torch.where(torch.isnan(old), mean, torch.lerp(old, mean, 1 - spec.decay)))
        self._count(index)

    def _accumulate(self, index: Tensor, values: dict[str, Tensor], as_column: Any) -> None:
        """The ``sum`` and ``max`` columns of an update, in place (``as_column(name)``: the values to add)."""
        for name in values:
            spec, col = self.specs[name], self.columns[name]
            if spec.kind == "sum":
                col.index_add_(0, index, as_column(name))
            elif spec.kind == "max":
                col.scatter_reduce_(0, index, as_column(name), "amax", include_self=True)

    def _count(self, index: Tensor) -> None:
        """Every ``count`` column advances by the occurrences of each index."""
        for name, spec in self.specs.items():
            if spec.kind == "count":
                col = self.columns[name]
                col.index_add_(0, index, self._ones(index.numel(), col.dtype))

    # ------------------------------------------------------------------ the compiled update
    def compile(self, mode: str = "default") -> SampleStateTable:
        """Merge the ``last``/``ema`` columns of later device-style updates in one ``torch.compile``d pure function
        (``merged_values``; on the CPU too, instead of the numba kernel), then write them with one ``index_put_``
        per column. Falls back to the eager function with a ``CompileFallbackWarning`` when compilation fails.
        Returns ``self``."""
        from lightning_reweight._compile import CompiledFunction

        self._graph = CompiledFunction(merged_values, mode, "the per-sample table's update")
        return self

    @property
    def compiled(self) -> Any:
        """The compiled merge (``compile``), or ``None``."""
        return self.__dict__.get("_graph")

    def _update_graph(self, index: Tensor, values: dict[str, Tensor], info: BatchIndex | None) -> None:
        """``update`` through the compiled merge: ``sum``/``max`` and ``count`` columns as in ``_update_fixed_shape``;
        the ``last``/``ema`` columns' new values at their rows from ``merged_values`` (which reads their old values
        at the batch's rows, gathered here: O(batch) inputs), written in place."""
        values = {k: v.detach().reshape(-1).to(self.device) for k, v in values.items()}
        self._accumulate(index, values, lambda name: values[name].to(_value_dtype(self.columns[name])))
        merged = [name for name in values if self.specs[name].kind in ("last", "ema")]
        if merged:
            layout = tuple((_value_dtype(self.columns[n]), self.columns[n].dtype,
                            self.specs[n].decay if self.specs[n].kind == "ema" else None) for n in merged)
            olds = tuple(self.columns[n][index] if self.specs[n].kind == "ema" else None for n in merged)
            unique = bool(info is not None and info.unique)
            rows, news = self.compiled(index, tuple(values[n] for n in merged), olds, layout, unique)
            for name, new in zip(merged, news):
                self.columns[name].index_put_((rows,), new)
        self._count(index)

    def _merge_repeats(self, index: Tensor, merged: list[str], values: dict[str, Tensor],
                       info: BatchIndex | None) -> tuple[dict[str, Tensor], Tensor]:
        """The values of the ``merged`` columns with every repeated sample's entries replaced by their mean, and
        the rows to write them at. Each column's values are rounded to its dtype first, then summed in float64 (a
        tensor given for several columns of one dtype is converted once)."""
        b = index.numel()
        info = info if info is not None else BatchIndex(index)
        sources: dict[tuple[int, torch.dtype], int] = {}
        parts: list[Tensor] = []
        for name in merged:
            val, col = values[name], self.columns[name]
            key = (id(val), col.dtype)
            if key not in sources:
                sources[key] = len(parts)
                parts.append(_as_column(val, col, self.device))
        same_dtype = len({p.dtype for p in parts}) == 1
        pair = b <= PAIR_MERGE_ROWS  # the step's pair matrix or sort, shared by its tables
        stacked = _stacked64(parts, self._ones(b, parts[0].dtype if same_dtype else torch.float64))
        rows, means, _ = _repeat_means(index, stacked, info.pairs64(index) if pair else None,
                                       None if pair else info.sorted(index))
        out: dict[str, Tensor] = {}
        rounded: dict[torch.dtype, Tensor] = {}
        for name in merged:
            col = self.columns[name]
            j = sources[(id(values[name]), col.dtype)]
            if same_dtype:  # one conversion of every merged column
                whole = rounded.get(col.dtype)
                if whole is None:
                    whole = rounded[col.dtype] = means.to(_value_dtype(col)).to(col.dtype)
                out[name] = whole[:, j]
            else:
                out[name] = means[:, j].to(_value_dtype(col)).to(col.dtype)
        return out, rows

    def _update_compiled(self, ix: np.ndarray, values: dict[str, Tensor]) -> Repeats | None:
        """CPU path in one compiled call (``state._kernels.table_update``): the merges of ``_count_repeats`` and
        ``_write_cpu`` and the same ``Repeats``, bit for bit, O(batch) work. ``None`` (nothing written) when
        numba is missing or off (``USE_NUMBA``), or a column is not a contiguous float32/float64 value column or
        int32/int64 count column: the caller then takes the numpy/torch path."""
        kernels = _numba_kernels()
        if kernels is None:
            return None
        names = tuple(values)
        plan = self.__dict__.setdefault("_plans", {}).get(names)
        if plan is None or len(plan[0]) != len(self.columns) or any(
                self.columns[name] is not col for name, col in plan[0].items()):
            plan = self._plan(names)
            if plan is None:
                return None
        columns, meta, weight, count_names, value_names = plan
        meta = list(meta)
        at = 1 + 2 * meta[0]
        alive = []  # converted copies of values, alive until the call returns
        for c, name in enumerate(value_names):
            col = columns[name]
            meta[at + 4 * c] = col.data_ptr()
            val = values[name]
            if val.dtype != col.dtype or not val.is_cpu or val.dim() != 1 or not val.is_contiguous():
                val = val.detach().reshape(-1).to("cpu", col.dtype).contiguous()
                alive.append(val)
            meta[at + 4 * c + 1] = val.data_ptr()  # (only read: no need to detach)
        for c, name in enumerate(count_names):
            meta[1 + 2 * c] = columns[name].data_ptr()
        ix = np.ascontiguousarray(ix)
        status, rep = kernels.table_update(ix, self.num_samples, np.array(meta, dtype=np.int64), weight,
                                           bool(_LERP_FUSED))
        if status < 0:
            raise IndexError(f"Expected sample indices in [0, {self.num_samples}), but got range "
                             f"[{ix.min()}, {ix.max()}].")
        if status == 0:
            return Repeats(ix.size)
        return Repeats(ix.size, rep[0], rep[1], rep[2], rep[3])

    def _plan(self, names: tuple[str, ...]) -> tuple | None:
        """The compiled update's column layout for value columns ``names`` (cached per table, rebuilt when a
        column tensor is replaced or added), or None when a column does not qualify."""
        columns, meta, weight, count_names, value_names = {}, [0], [], [], []
        for name, spec in self.specs.items():
            if spec.kind == "count":
                col = self.columns[name]
                code = _COUNT_CODES.get(col.dtype)
                if code is None or not col.is_contiguous():
                    return None
                columns[name] = col
                count_names.append(name)
                meta[0] += 1
                meta += [col.data_ptr(), code]
        for name in names:
            spec, col = self.specs[name], self.columns[name]
            if spec.kind == "count":
                continue
            code = _VALUE_CODES.get(col.dtype)
            if code is None or not col.is_contiguous() or (spec.kind == "ema" and _LERP_FUSED is None):
                return None
            columns[name] = col
            value_names.append(name)
            meta += [col.data_ptr(), 0, _KIND_CODES[spec.kind], code]
            weight.append(1 - spec.decay)
        for name, col in self.columns.items():  # every column, so that a replaced one invalidates the plan
            columns.setdefault(name, col)
        plan = (columns, meta, np.array(weight, dtype=np.float64), count_names, value_names)
        self._plans[names] = plan
        return plan

    def _count_repeats(self, index: Tensor, ix: np.ndarray) -> Repeats:
        """CPU path, step 1: advance the ``count`` columns and find where the batch's indices repeat.

        No sort of the whole batch: the first (integer) ``count`` column advances and each row's increment
        (its multiplicity in the batch) is read back; only the positions of repeated rows (few, for draws
        with replacement from a large data set) are sorted. Without an integer count column the batch is
        sorted once. An index outside ``[0, N)`` raises ``IndexError`` before anything is written (the first
        read is torch's bounds-checked ``index_select``: numpy would wrap a negative index).
        """
        counts = [self.columns[name] for name, spec in self.specs.items() if spec.kind == "count"]
        first = counts[0] if counts else None
        if first is None or first.is_floating_point() or first.dtype == torch.bool:
            if ix.size and (ix.min() < 0 or ix.max() >= self.num_samples):
                raise IndexError(f"Expected sample indices in [0, {self.num_samples}), but got range "
                                 f"[{ix.min()}, {ix.max()}].")
            for col in counts:  # a float count may stop counting exactly: find the repeats by sorting
                col.index_add_(0, index, torch.ones(ix.size, dtype=col.dtype))
            return Repeats.of(ix)
        before = first.index_select(0, index).numpy()
        count = first.numpy()
        np.add.at(count, ix, 1)
        for col in counts[1:]:
            col.index_add_(0, index, torch.ones(ix.size, dtype=col.dtype))
        multiplicity = count[ix] - before
        positions = (multiplicity > 1).nonzero()[0]  # a repeated row advanced by more than one
        if positions.size == 0:  # no index repeats (always so when drawing without replacement)
            return Repeats(ix.size)
        rows = ix[positions]
        order = rows.argsort(kind="stable")
        positions = positions[order]
        return Repeats.from_sorted(ix.size, rows[order], positions, multiplicity[positions].astype(np.int64, copy=False))

    def _write_cpu(self, index: Tensor, ix: np.ndarray, values: dict[str, Tensor], repeats: Repeats) -> None:
        """CPU path, step 2: write every column at the rows ``index``. Repeated samples first take the mean of
        their values (every copy of a row then writes the same value), and ``sum`` / ``max`` columns
        accumulate over the repeats. A sample seen once keeps its value exactly either way; columns given the
        same tensor share one merge. Float32/float64 columns are written through numpy views."""
        merged: dict[tuple[int, torch.dtype], Any] = {}
        for name, source in values.items():
            spec, col = self.specs[name], self.columns[name]
            kind = spec.kind
            if kind == "count":
                continue
            key = (id(source), col.dtype)
            val = merged.get(key) if kind in ("last", "ema") else None
            if val is None:
                val = source.detach().reshape(-1)
                if val.dtype != col.dtype or val.device != col.device:
                    val = val.to(col.device, col.dtype if col.is_floating_point() else torch.float32).to(col.dtype)
                if kind == "sum":
                    col.index_add_(0, index, val)
                    continue
                if kind == "max":
                    col.scatter_reduce_(0, index, val, "amax", include_self=True)
                    continue
                if col.dtype in _HOST_DTYPES:
                    val = val.numpy() if repeats.positions is None else repeats.merge(val.numpy())
                elif repeats.positions is not None:
                    val = repeats.merge_tensor(val)
                merged[key] = val
            if isinstance(val, np.ndarray):
                target = col.numpy()
                if kind == "last":
                    target[ix] = val
                else:  # ema; NaN (never seen) entries take the first value. torch's lerp, bit for bit
                    old = target[ix]
                    step = torch.lerp(torch.from_numpy(old), torch.from_numpy(val), 1 - spec.decay).numpy()
                    target[ix] = np.where(np.isnan(old), val, step)
            elif kind == "last":
                col.index_copy_(0, index, val)
            else:
                old = col.index_select(0, index)
                col.index_copy_(0, index, torch.where(torch.isnan(old), val, torch.lerp(old, val, 1 - spec.decay)))

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The table's checkpoint entry, holding the **live** columns (no copy).

        The dict aliases the table: it is valid until the next ``update`` (the next training step) changes the
        columns in place. Lightning serialises it right away (``AsyncCheckpointIO`` clones it first), and every
        DDP rank holds the same table, so no rank pays an O(N) copy. Clone it if you keep it around.
        """
        return {
            "num_samples": self.num_samples,
            "columns": dict(self.columns),
            "specs": {k: _spec_to_dict(v) for k, v in self.specs.items()},
        }

    @staticmethod
    def validate_state(state: Any, where: str = "table", num_samples: int | None = None,
                       expected: Mapping[str, Column] | None = None) -> tuple[int, dict[str, Column], dict[str, Tensor]]:
        """Check a table's checkpoint entry without assigning anything.

        Checks the keys, ``num_samples``, every column spec (kind, init, decay, dtype), and every column:
        a 1-D tensor of length N whose dtype kind matches its spec (integer counts, floating values), ranges
        (counts integer and >= 0, ``weight`` finite and >= 0, no inf; NaN only in columns initialised to NaN,
        where it means "never seen"). Errors are ``CheckpointStateError`` naming the key, e.g.
        ``table['columns']['weight']``.

        Args:
            state: the entry (``SampleStateTable.state_dict()`` form).
            where: the entry's name in the checkpoint, for messages.
            num_samples: the expected N, when known.
            expected: column specs the caller will declare; each must be present in the checkpoint.

        Returns:
            ``(num_samples, specs, columns)``, the columns being the state's own tensors (not copied).
        """
        require_keys(state, ["num_samples", "columns"], where)
        n = as_int(state, "num_samples", where, minimum=1)
        if num_samples is not None and n != num_samples:
            raise CheckpointStateError(where, "num_samples", f"expected {num_samples} rows, but got {n}.")
        cols = state["columns"]
        col_where = f"{where}['columns']"
        if not isinstance(cols, Mapping):
            raise CheckpointStateError(where, "columns", f"expected a dict of tensors, but got {type(cols).__name__}.")
        raw_specs = state.get("specs", {})
        if not isinstance(raw_specs, Mapping):
            raise CheckpointStateError(where, "specs", f"expected a dict, but got {type(raw_specs).__name__}.")
        spec_where = f"{where}['specs']"
        specs = {name: _spec_from_dict(raw, spec_where, name) for name, raw in raw_specs.items()}
        for name in cols:
            if name not in specs:
                if name not in DEFAULT_COLUMNS:
                    raise CheckpointStateError(spec_where, name, "missing: the column has no spec.")
                specs[name] = DEFAULT_COLUMNS[name]
        missing = [k for k in specs if k not in cols] + [k for k in (expected or {}) if k not in cols]
        if missing:
            raise CheckpointStateError(col_where, missing[0], f"missing column(s) {sorted(set(missing))}; present: "
                                       f"{sorted(cols)}.")
        for name, spec in specs.items():
            kind = "int" if spec.kind == "count" or not spec.dtype.is_floating_point else "float"
            values = as_tensor(cols, name, col_where, kind=kind, ndim=1, length=n, finite=False)
            _check_values(values, spec, name, col_where)
        return n, specs, dict(cols)

    def load_state_dict(self, state: dict[str, Any], where: str = "table") -> None:
        """Restore from ``state`` after validating all of it; takes ownership of its tensors (no copy unless
        the dtype or device differs). Nothing is assigned when the state is invalid."""
        n, specs, cols = self.validate_state(state, where, expected=self.specs)
        if n != self.num_samples:
            raise ValueError(
                f"Checkpointed table has {n} samples but this one has {self.num_samples}: the training set changed "
                "size since the checkpoint was written. Resume with the same data set."
            )
        self._adopt(specs, cols)

    def _adopt(self, specs: dict[str, Column], cols: Mapping[str, Tensor]) -> None:
        for name, spec in specs.items():
            target = self.specs.get(name, spec)  # a column declared here keeps its dtype (converted if needed)
            self.specs[name] = target
            self.columns[name] = cols[name].to(self.device, target.dtype)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], where: str = "table", num_samples: int | None = None,
                        device: torch.device | str | None = None) -> SampleStateTable:
        """A table holding ``state``'s (validated) tensors, without allocating fresh columns first."""
        n, specs, cols = cls.validate_state(state, where, num_samples=num_samples)
        table = cls(n, columns=specs, device=device, _allocate=False)
        table._adopt(specs, cols)
        return table
