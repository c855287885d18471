"""Compiled (numba) CPU kernel for ``SampleStateTable.update``: the whole update of a batch in one call.

Imported lazily by ``state.table`` the first time a CPU table is updated, so ``import lightning_reweight`` never
pays numba's import; the table falls back to its numpy/torch path when numba is missing (or ``USE_NUMBA`` is
False). The kernel reproduces that path bit for bit: each row's multiplicity in the batch is read back from the
first count column's increments (as the numpy path does; an O(batch) hash of the rows where the table has no
integer count column), so there is no O(N) scratch and no sort of the batch (only the repeated positions are
sorted, for ``Repeats``); repeated ``last``/``ema`` values are averaged in float64 in batch order, ``sum`` columns
add in batch order in the column dtype (as ``index_add_``), ``max`` columns follow ``scatter_reduce_``'s
``amax`` (a NaN wins), and the EMA is ``torch.lerp``'s formula in the column dtype, fused (one rounding, as
torch's vectorised CPU kernel) or not (``table._probe_lerp`` finds which one this torch build computes).

The columns are passed as addresses (``Tensor.data_ptr()``) with a dtype code each, packed in one int64 array,
so one compiled signature serves every column layout: the caller keeps the tensors alive and contiguous.

Compiled and cached on disk by ``lightning_reweight._numba.jit``.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba.core import types
from numba.extending import intrinsic

from lightning_reweight._numba import jit as _jit

#: kind codes of value columns
LAST, EMA, SUM, MAX = 0, 1, 2, 3
#: dtype codes: value columns float32 / float64, count columns int32 / int64
F32, F64, I32, I64 = 0, 1, 2, 3


@intrinsic
def _fma(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    """``a·b + c`` with one rounding (LLVM's ``fma``), in the operands' float type."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.fma(*args)

    return a(a, b, c), codegen


@intrinsic
def _address(typingctx: Any, addr: Any) -> Any:
    """An integer address as a ``void*`` (for ``numba.carray``)."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], context.get_value_type(types.voidptr))

    return types.voidptr(addr), codegen


@_jit
def _lerp(s: Any, e: Any, w: Any, one: Any, fused: bool) -> Any:
    """``torch.lerp(s, e, w)`` for one element, in ``s``'s float type: ``w < 0.5 ? s + w·(e − s) : e − (e − s)·(1 − w)``,
    fused as torch's vectorised kernel (``fma(w, e − s, s)`` / ``fma(w − 1, e − s, e)``) when ``fused``."""
    d = e - s
    if abs(w) < 0.5:
        return _fma(w, d, s) if fused else s + w * d
    return _fma(w - one, d, e) if fused else e - d * (one - w)


@_jit
def lerp_array(old: np.ndarray, new: np.ndarray, w: Any, one: Any, fused: bool, out: np.ndarray) -> None:
    """``_lerp`` over arrays (for the probe of torch's formula)."""
    for i in range(old.shape[0]):
        out[i] = _lerp(old[i], new[i], w, one, fused)


@_jit
def _count(col: np.ndarray, index: np.ndarray) -> None:
    """Advance a count column by one per occurrence (integer adds: any order gives the same)."""
    for i in range(index.shape[0]):
        col[index[i]] += 1


@_jit
def _store(col: np.ndarray, k: int, m: Any, kind: int, w: Any, one: Any, fused: bool) -> None:
    """``last``: ``col[k] = m``; ``ema``: the lerp towards ``m`` (``m`` itself where ``col[k]`` is NaN)."""
    if kind == LAST:
        col[k] = m
    else:
        old = col[k]
        col[k] = m if old != old else _lerp(old, m, w, one, fused)


@_jit
def _write(col: np.ndarray, val: np.ndarray, kind: int, w: Any, one: Any, fused: bool, index: np.ndarray,
           single: np.ndarray, rep: np.ndarray) -> None:
    """Write one value column (``val`` in the column's dtype) at the rows ``index``; ``rep``: the repeats
    (``table_update``'s), ``single[i]``: whether position ``i``'s row occurs once (unused without repeats)."""
    b = index.shape[0]
    d = rep.shape[1]
    if kind == SUM:  # in batch order, in the column dtype (as ``index_add_``)
        for i in range(b):
            k = index[i]
            col[k] = col[k] + val[i]
        return
    if kind == MAX:  # ``scatter_reduce_(..., "amax", include_self=True)``: a NaN wins, else std::max
        for i in range(b):
            k = index[i]
            v = val[i]
            if v != v or col[k] < v:
                col[k] = v
        return
    if d == 0:
        for i in range(b):
            _store(col, index[i], val[i], kind, w, one, fused)
        return
    for i in range(b):
        if single[i]:
            _store(col, index[i], val[i], kind, w, one, fused)
    tmp = np.empty(1, dtype=val.dtype)
    p = 0
    while p < d:  # each repeated row: the float64 sum of its values in batch order, over its count
        c = rep[2, p]
        total = 0.0
        for j in range(p, p + c):
            total += np.float64(val[rep[0, j]])
        tmp[0] = total / np.float64(c)  # the store rounds to the column dtype (as numpy's astype)
        _store(col, index[rep[0, p]], tmp[0], kind, w, one, fused)
        p += c


@_jit
def _advance(col: np.ndarray, index: np.ndarray, mult: np.ndarray, wrap32: bool) -> None:
    """Advance a count column by one per occurrence and read each position's multiplicity back from its row's
    increment (an int32 column's increment modulo 2³², as its own wrapping arithmetic)."""
    b = index.shape[0]
    for i in range(b):
        mult[i] = col[index[i]]
    for i in range(b):
        col[index[i]] += 1
    for i in range(b):
        m = np.int64(col[index[i]]) - mult[i]
        mult[i] = m + (1 << 32) if wrap32 and m <= 0 else m


@_jit
def hash_slots(index: np.ndarray) -> tuple:
    """Each batch position's slot in an O(batch) open-addressing hash of its row (no O(N) scratch, no sort):
    ``(slot_of, keys)``, ``keys[slot]`` being the row there (-1: free); positions of one row share a slot."""
    b = index.shape[0]
    size = 4
    while size < 2 * b:
        size *= 2
    bits = 0
    while (1 << bits) < size:
        bits += 1
    mask = size - 1
    keys = np.full(size, -1, dtype=np.int64)
    slot_of = np.empty(b, dtype=np.int64)
    for i in range(b):
        k = index[i]
        # Fibonacci hashing: strided index patterns do not pile into one run of slots
        h = np.int64((np.uint64(k) * np.uint64(11400714819323198485)) >> np.uint64(64 - bits)) & mask
        while keys[h] != -1 and keys[h] != k:
            h = (h + 1) & mask
        keys[h] = k
        slot_of[i] = h
    return slot_of, keys


@_jit
def _hash_multiplicity(index: np.ndarray, mult: np.ndarray) -> None:
    """Each position's multiplicity without a count column (``hash_slots``)."""
    slot_of, keys = hash_slots(index)
    cnt = np.zeros(keys.shape[0], dtype=np.int64)
    for i in range(index.shape[0]):
        cnt[slot_of[i]] += 1
    for i in range(index.shape[0]):
        mult[i] = cnt[slot_of[i]]


@_jit
def table_update(index: np.ndarray, n: int, meta: np.ndarray, weight: np.ndarray, fused: bool) -> tuple:
    """Update a table's columns at the rows ``index`` (``(B,)`` int64) in one pass.

    ``meta`` (int64) describes the columns: ``[n_count, (address, dtype code) per count column, (column
    address, values address, kind code, dtype code) per value column]``. Count columns advance by each row's
    multiplicity; value column ``c`` (length ``n``) takes its ``B`` values (in its dtype) merged as its kind,
    ``weight[c]`` being an EMA's ``1 − decay``.

    Returns ``(status, rep)``: status -1 when an index lies outside ``[0, n)`` (nothing written), else the
    number D of batch positions whose row repeats, and ``rep`` the ``(4, D)`` int64 ``Repeats`` arrays
    (positions grouped by row ascending, in batch order within a row; group start; count; later).
    """
    b = index.shape[0]
    rep = np.empty((4, 0), dtype=np.int64)
    for i in range(b):
        k = index[i]
        if k < 0 or k >= n:
            return -1, rep
    n_count = meta[0]
    mult = np.empty(b, dtype=np.int64)  # how often each position's row occurs in the batch
    if n_count:  # from the first count column's increments: no hash, no scratch beyond O(B)
        if meta[2] == I64:
            _advance(numba.carray(_address(meta[1]), n, np.int64), index, mult, False)
        else:
            _advance(numba.carray(_address(meta[1]), n, np.int32), index, mult, True)
        for c in range(1, n_count):
            if meta[2 + 2 * c] == I64:
                _count(numba.carray(_address(meta[1 + 2 * c]), n, np.int64), index)
            else:
                _count(numba.carray(_address(meta[1 + 2 * c]), n, np.int32), index)
    else:
        _hash_multiplicity(index, mult)
    d = 0
    for i in range(b):
        d += mult[i] > 1
    single = np.empty(b if d else 0, dtype=np.bool_)
    if d:  # Repeats: the repeated positions sorted by row (stable: batch order within a row)
        positions = np.empty(d, dtype=np.int64)
        j = 0
        for i in range(b):
            single[i] = mult[i] == 1
            if mult[i] > 1:
                positions[j] = i
                j += 1
        order = np.argsort(index[positions], kind="mergesort")
        rep = np.empty((4, d), dtype=np.int64)
        start = 0
        for j in range(d):
            i = positions[order[j]]
            if j and index[i] != index[rep[0, j - 1]]:
                start = j
            rep[0, j] = i
            rep[1, j] = start
            rep[2, j] = mult[i]
            rep[3, j] = mult[i] - 1 - (j - start)
    for c in range(weight.shape[0]):
        at = 1 + 2 * n_count + 4 * c
        col, val, kind = _address(meta[at]), _address(meta[at + 1]), meta[at + 2]
        if meta[at + 3] == F32:
            _write(numba.carray(col, n, np.float32), numba.carray(val, b, np.float32), kind, np.float32(weight[c]),
                   np.float32(1.0), fused, index, single, rep)
        else:
            _write(numba.carray(col, n, np.float64), numba.carray(val, b, np.float64), kind, np.float64(weight[c]),
                   np.float64(1.0), fused, index, single, rep)
    return d, rep
