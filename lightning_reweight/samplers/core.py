"""The weighted draw core: exact, vectorised weighted draws and the DDP-native, resumable ``WeightedSampler``.

``draw_weighted(weights, num_draws, generator, replacement=True)``

* With replacement: Walker's alias method. The table is built vectorised in O(N) plus one sorted
  ``searchsorted`` pass (no Python loop over samples), then every draw costs O(1): one uniform bucket
  ``j = floor(u1 · N)``, one uniform coin ``u2`` (both float64), and ``j if u2 < prob[j] else alias[j]``.
  (``torch.randint`` is avoided: below 2^32 it reduces 32 random bits modulo N, over-drawing low indices
  by up to N / 2^32 — 2.3 % at N = 1e8.) Probabilities and cumulative
  sums are float64, so the table is exact to float64 rounding far beyond 2^24 entries (where
  ``torch.multinomial`` refuses) and zero-weight entries are never drawn.
* Without replacement: Efraimidis–Spirakis keys ``E_i / w_i`` with ``E_i ~ Exp(1)`` (float64); the
  ``num_draws`` smallest keys, in increasing order, are an exact successive weighted draw without
  replacement.

Speed (CPU): the table is one 16-byte record per bucket (``prob`` and ``alias`` interleaved), so a draw costs
one random gather. With numba installed (a dependency; ``USE_NUMBA = False`` turns it off) the CPU build is
one compiled sweep (``_kernels.build_alias_table``: the construction below done as a two-cursor walk, no
temporaries) and the draw one compiled loop per generator chunk; without it, the build runs in numpy (its
compaction, gathers and cumulative sums beat torch's on one thread) and merges the two sorted prefix-sum
sequences with ``np.interp`` plus an exact correction, and the draw runs in cache-sized torch blocks. All
paths give bit-identical tables and draws (the compiled ones compute the same float64 quantities in the same
order), equal to the device-agnostic torch construction used for other devices and to the tables and draws
of earlier releases: the random stream did not change. Weights are validated in one fused min/max pass.

Alias-table construction (a prefix-sum form of the sweeping construction): scale ``q_i = N w_i / Σw``;
"light" entries (``q < 1``) keep ``prob = q`` and borrow their deficit ``1 - q`` from a "heavy" entry
(``q >= 1``). Heavies are used in index order: with ``D_a`` the cumulative light deficit before light
``a`` and ``E_k`` the cumulative heavy excess ``Σ_{t<=k} (q_t - 1)``, light ``a`` borrows from the first
heavy with ``E_k > D_a``; heavy ``k`` keeps ``prob = E_k + 1 - L_k`` (``L_k`` = total deficit of the
lights it and earlier heavies served) and borrows the rest of its bucket from heavy ``k + 1``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from lightning_reweight._numba import LazyKernels

__all__ = [
    "AliasTable",
    "WeightedSampler",
    "build_alias_table",
    "draw_alias",
    "draw_weighted",
    "epoch_generator",
    "uniform_indices",
    "validate_weights",
]

# Draws are produced in chunks of this many indices: bounds temporaries (3 x 8 bytes per draw) at 1e8 draws.
# Part of the stream definition: changing it changes the drawn sequence for a given seed.
_CHUNK = 1 << 22
_YIELD_CHUNK = 1 << 16


def validate_weights(weights: Any, name: str = "weights") -> Tensor:
    """Return ``weights`` as a 1-D floating CPU/device tensor after checking it can define a distribution.

    Raises ``TypeError`` / ``ValueError`` naming the fix for: non-tensor-like input, complex/bool dtype,
    not 1-D, empty, NaN/inf, negative entries, all zero.
    """
    if isinstance(weights, np.ndarray):
        weights = torch.from_numpy(weights)
    elif isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
        weights = torch.as_tensor(weights, dtype=torch.float64)
    if not isinstance(weights, Tensor):
        raise TypeError(
            f"Expected argument `{name}` to be a 1-D tensor, numpy array or sequence of non-negative numbers,"
            f" but got {type(weights).__name__}."
        )
    if weights.dtype == torch.bool or weights.is_complex():
        raise TypeError(f"Expected argument `{name}` to be real-valued, but got dtype {weights.dtype}.")
    if not weights.is_floating_point():
        weights = weights.to(torch.float64)
    if weights.dim() != 1:
        raise ValueError(
            f"Expected argument `{name}` to be 1-D (one weight per sample), but got shape {tuple(weights.shape)};"
            " flatten it or pass one weight per dataset item."
        )
    if weights.numel() == 0:
        raise ValueError(f"Expected argument `{name}` to be non-empty, but got 0 weights.")
    # one fused pass (min and max propagate NaN) decides; the detailed counts are computed only on failure
    low, high = (float(v) for v in torch.aminmax(weights))
    if not (math.isfinite(low) and math.isfinite(high)):
        finite = torch.isfinite(weights)
        bad = int((~finite).sum())
        first = int(torch.nonzero(~finite)[0])
        raise ValueError(
            f"Expected argument `{name}` to be finite, but got {bad} NaN/inf entries (first at index {first},"
            f" value {weights[first].item()}); clean or clamp the weights before sampling."
        )
    if low < 0:
        negative = weights < 0
        first = int(torch.nonzero(negative)[0])
        raise ValueError(
            f"Expected argument `{name}` to be non-negative, but got {int(negative.sum())} negative entries"
            f" (first at index {first}, value {weights[first].item()}); use e.g. `weights.clamp_min(0)` or"
            " `exp(scores)` for log-space scores."
        )
    if high <= 0:
        raise ValueError(
            f"Expected argument `{name}` to have at least one positive entry, but all {weights.numel()} are"
            " zero; at least one sample must be drawable."
        )
    return weights


class AliasTable(NamedTuple):
    """Walker alias table: draw bucket ``j`` uniformly, keep ``j`` with probability ``prob[j]``, else take
    ``alias[j]``. ``prob`` is float64, ``alias`` int64, both of length N.

    Tables from ``build_alias_table`` store both columns interleaved in one 16-byte record per bucket
    (``prob`` and ``alias`` are strided views of it), so a draw gathers one cache line instead of two; a table
    constructed by hand from two separate tensors works too (two gathers per draw).
    """

    prob: Tensor
    alias: Tensor


class _PackedAliasTable(AliasTable):
    """An ``AliasTable`` whose columns are views of ``packed``: ``(N,)`` complex128 whose real part is ``prob``
    and whose imaginary part holds the bits of ``alias`` (int64). Only copies and gathers touch those bits."""

    packed: Tensor


def _packed_table(packed: Tensor) -> AliasTable:
    pair = torch.view_as_real(packed)
    table = _PackedAliasTable(pair[:, 0], pair[:, 1].view(torch.int64))
    table.packed = packed
    return table


def build_alias_table(weights: Tensor) -> AliasTable:
    """Vectorised O(N) alias-table construction (see the module docstring). ``weights`` is validated."""
    return _build_alias_table(validate_weights(weights))


# Use the compiled numba kernels (``_kernels``) for CPU tables and draws when numba is importable; False forces
# the vectorised numpy/torch path (same tables and stream, bit for bit).
USE_NUMBA = True
_KERNELS = LazyKernels("lightning_reweight.samplers._kernels")


def _numba_kernels() -> Any:
    """The ``_kernels`` module (imported on first use), or None when numba is missing or ``USE_NUMBA`` is False."""
    return _KERNELS.get() if USE_NUMBA else None


def _build_alias_table(weights: Tensor) -> AliasTable:
    if weights.device.type == "cpu":
        kernels = _numba_kernels()
        if kernels is not None:
            return _build_alias_table_numba(weights, kernels)
        return _build_alias_table_numpy(weights)
    return _build_alias_table_torch(weights)


def _record_views(packed: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 2)`` float64 and int64 numpy views of a packed table: ``[:, 0]`` of the first is ``prob``,
    ``[:, 1]`` of the second is ``alias``."""
    rec_prob = packed.numpy().view(np.float64).reshape(-1, 2)
    return rec_prob, rec_prob.view(np.int64)


def _build_alias_table_numba(weights: Tensor, kernels: Any) -> AliasTable:
    """CPU construction in one compiled sweep (``_kernels.build_alias_table``): reads the weights twice and
    writes each record once, with no temporaries. Bit-identical to ``_build_alias_table_numpy``; the rare
    input whose rounding the sweep does not cover is handed to it.

    The records are allocated by numpy, which asks for transparent huge pages (fewer page faults here and
    TLB misses in every later draw's random gather). ``Σw`` is the same float64 ``torch.sum`` as the other
    constructions; for float32 weights it sums a float64 copy written into the records' memory (about 5x
    faster than torch's casting sum of the float32 tensor, and the same bits)."""
    n = weights.numel()
    w = weights.detach()
    if w.dtype not in (torch.float32, torch.float64):
        w = w.to(torch.float64)
    w = w.contiguous()
    packed = torch.from_numpy(np.empty(n, dtype=np.complex128))
    if w.dtype == torch.float64:
        total = _checked_total(w)
    else:
        scratch = torch.view_as_real(packed).view(-1)[:n]  # overwritten by the build below
        total = _checked_total(scratch.copy_(w))
    rec_prob, rec_alias = _record_views(packed)
    if not kernels.build_alias_table(w.numpy(), n * (1.0 / total), rec_prob, rec_alias):
        return _build_alias_table_numpy(weights)
    return _packed_table(packed)


def _checked_total(weights: Tensor) -> float:
    """``Σw`` accumulated in float64, refused if it overflows. (Callers scale by ``n * (1 / Σw)``: the rounding
    of the former ``n / q.sum()``, which torch evaluates as a reciprocal times ``n``.)"""
    total = float(weights.sum(dtype=torch.float64))
    if not math.isfinite(total):
        raise ValueError(
            f"Expected the weights to have a finite sum, but got {total} (entries up to {float(weights.max()):.3g});"
            " rescale them, e.g. `weights / weights.max()`."
        )
    return total


def _count_at_most(sorted_seq: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``#{k : sorted_seq[k] <= v}`` for each of the NON-DECREASING ``values``: exactly
    ``np.searchsorted(sorted_seq, values, side="right")``, about twice as fast.

    ``np.interp`` finds each value's interval starting from the previous one's (O(1) for sorted values, where
    ``searchsorted`` restarts a binary search): for ``seq[j] <= v < seq[j + 1]`` (compared exactly) it returns
    ``j + slope · (v − seq[j])`` with both factors >= 0, so the floored position plus one is never below the
    count and exceeds it by one only when the fraction rounds up to 1. One comparison with the previous entry
    finds those and corrects them.
    """
    m = sorted_seq.size
    if m < 2 or values.size < 1024:  # a speed threshold: both paths count alike (pragma: no mutate)
        return np.searchsorted(sorted_seq, values, side="right")
    work = np.arange(-1, m, dtype=np.float64)  # work[1:] = 0, 1, ..., m - 1: the positions to interpolate
    pos = np.interp(values, sorted_seq, work[1:], left=-1.0, right=float(m - 1))
    count = pos.astype(np.int64)  # pos is -1 or >= 0: truncation is floor
    count += 1
    np.clip(count, 0, m, out=count)  # defensive: the bounds above already hold (pragma: no mutate)
    padded = work  # reused: padded[c] = seq[c - 1], padded[0] = -inf
    padded[0] = -np.inf
    padded[1:] = sorted_seq
    previous = np.take(padded, count, out=pos)
    over = np.flatnonzero(np.greater(previous, values))
    if over.size:
        count[over] -= 1
    return count


@contextlib.contextmanager
def _without_numpy_huge_pages() -> Iterator[None]:
    """numpy asks the kernel for transparent huge pages for every array >= 4 MiB; for the build's short-lived
    temporaries the page zeroing and compaction that costs (measured here at N = 1e8: 14 s of system time
    instead of 4 s) outweighs any TLB gain, so the build turns it off meanwhile (numpy's own switch; no-op
    where a numpy version lacks it)."""
    module = getattr(np, "_core", None) or getattr(np, "core", None)
    setter = getattr(getattr(module, "multiarray", None), "_set_madvise_hugepage", None)
    if setter is None:
        yield
        return
    previous = setter(False)
    try:
        yield
    finally:
        setter(previous)


def _build_alias_table_numpy(weights: Tensor) -> AliasTable:
    """CPU construction with numpy (its compaction, gathers and sorted search are 2-6x faster than torch's on
    one thread), writing straight into the packed records. Same operations, in the same order, as
    ``_build_alias_table_torch``: the two give bit-identical tables."""
    with _without_numpy_huge_pages():
        return _build_alias_table_numpy_body(weights)


def _build_alias_table_numpy_body(weights: Tensor) -> AliasTable:
    n = weights.numel()
    # q = N w / Σw in a contiguous float64 copy (never modifies the caller's tensor): the gathers from it
    # below are 2-3x faster than from the table's strided prob column
    q_t = weights.to(torch.float64, copy=True)
    q_t.mul_(n * (1.0 / _checked_total(q_t)))
    q = q_t.numpy()
    packed = torch.empty(n, dtype=torch.complex128)
    pair = packed.numpy().view(np.float64).reshape(n, 2)
    prob, alias = pair[:, 0], pair[:, 1].view(np.int64)
    light = q < 1.0
    light_idx = np.flatnonzero(light)
    n_light = light_idx.size
    if n_light == n:  # all q just below 1 from rounding: (numerically) uniform
        prob[:] = 1.0
        alias[:] = np.arange(n)
        return _packed_table(packed)
    np.logical_not(light, out=light)
    heavy_idx = np.flatnonzero(light)
    del light
    n_heavy = heavy_idx.size
    deficit = np.take(q, light_idx)
    np.subtract(1.0, deficit, out=deficit)
    cum_deficit_end = np.empty(n_light + 1)  # [0, D_1, ..., D_L]: indexed by `served` below
    cum_deficit_end[0] = 0.0
    np.cumsum(deficit, out=cum_deficit_end[1:])
    cum_deficit_start = np.subtract(cum_deficit_end[1:], deficit, out=deficit)  # D_a
    cum_excess = np.take(q, heavy_idx)
    np.subtract(cum_excess, 1.0, out=cum_excess)
    np.cumsum(cum_excess, out=cum_excess)  # E_k
    np.minimum(q, 1.0, out=prob)  # lights: prob = q (< 1); heavies are overwritten below
    del q, q_t  # before the merge: lowers the build's peak memory by 8 bytes per entry
    # the merge: donor_a = #{k : E_k <= D_a}; served_k = #{a : donor_a <= k} (see the torch twin)
    # (fresh memory costs its page faults — ~7 ms per 1e6 int64 entries here — so results reuse spent buffers)
    donor = _count_at_most(cum_excess, cum_deficit_start)
    served = np.bincount(donor, minlength=n_heavy + 1)[:-1]
    np.cumsum(served, out=served)
    np.minimum(donor, n_heavy - 1, out=donor)  # rounding at the very end -> last heavy (pragma: no mutate)
    alias[light_idx] = np.take(heavy_idx, donor, out=donor, mode="clip")  # in place: donor is spent
    del donor, light_idx
    # heavy k keeps E_k + 1 - L_k of its bucket, L_k = deficit of the lights served by heavies <= k
    keep = np.add(cum_excess, 1.0, out=cum_excess)
    spent = deficit[:n_heavy] if n_heavy <= n_light else None  # D_a is spent too
    del cum_deficit_start, deficit
    np.subtract(keep, np.take(cum_deficit_end, served, out=spent, mode="clip"), out=keep)
    np.clip(keep, 0.0, 1.0, out=keep)
    keep[-1] = 1.0
    prob[heavy_idx] = keep
    # heavy k borrows the rest of its bucket from heavy k + 1; the last heavy from itself
    alias[heavy_idx[:-1]] = heavy_idx[1:]
    alias[heavy_idx[-1]] = heavy_idx[-1]
    return _packed_table(packed)


def _build_alias_table_torch(weights: Tensor) -> AliasTable:
    """Device-agnostic construction (used for non-CPU weights; the CPU path is the numpy twin above)."""
    n = weights.numel()
    q = weights.to(torch.float64, copy=True)  # never modifies the caller's tensor
    q.mul_(n * (1.0 / _checked_total(weights)))
    packed = torch.empty(n, dtype=torch.complex128, device=q.device)
    pair = torch.view_as_real(packed)
    prob, alias = pair[:, 0], pair[:, 1].view(torch.int64)
    light = q < 1.0
    heavy_idx = torch.nonzero(~light).squeeze(1)
    n_heavy = heavy_idx.numel()
    if n_heavy == 0:  # all q just below 1 from rounding: (numerically) uniform
        prob.fill_(1.0)
        alias.copy_(torch.arange(n, device=q.device))
        return _packed_table(packed)
    light_idx = torch.nonzero(light).squeeze(1)
    del light
    deficit = 1.0 - q.index_select(0, light_idx)
    cum_deficit_end = torch.cumsum(deficit, 0)
    cum_deficit_start = cum_deficit_end - deficit  # D_a: deficit served before light a (non-decreasing)
    del deficit
    cum_excess = torch.cumsum(q.index_select(0, heavy_idx).sub_(1.0), 0)  # E_k
    # served_k = #{a : D_a < E_k} (lights served by heavies <= k) and donor_a = #{k : E_k <= D_a} (light a
    # borrows from the first heavy with E_k > D_a) determine each other (donor_a <= k  <=>  D_a < E_k), so
    # one sorted search of the shorter array into the longer one gives both.
    n_light = light_idx.numel()
    if n_heavy <= n_light:
        served = torch.searchsorted(cum_deficit_start, cum_excess)
        donor = torch.cumsum(torch.bincount(served, minlength=n_light + 1)[:-1], 0)
    else:
        donor = torch.searchsorted(cum_excess, cum_deficit_start, right=True)
        served = torch.cumsum(torch.bincount(donor, minlength=n_heavy + 1)[:-1], 0)
    del cum_deficit_start
    donor.clamp_(max=n_heavy - 1)  # rounding at the very end -> last heavy
    alias.index_copy_(0, light_idx, heavy_idx.index_select(0, donor))
    del donor
    # heavy k keeps E_k + 1 - L_k of its bucket, L_k = deficit of the lights served by heavies <= k
    cum_deficit_end = torch.cat([cum_deficit_end.new_zeros(1), cum_deficit_end])
    keep = cum_excess.add_(1.0).sub_(cum_deficit_end.index_select(0, served)).clamp_(0.0, 1.0)
    keep[-1] = 1.0
    del served, cum_deficit_end
    prob.copy_(q.clamp_(0.0, 1.0))  # lights: prob = q (< 1)
    prob.index_copy_(0, heavy_idx, keep)
    alias.index_copy_(0, heavy_idx[:-1], heavy_idx[1:])
    alias[heavy_idx[-1]] = heavy_idx[-1]
    return _packed_table(packed)


def uniform_indices(n: int, size: int, generator: torch.Generator, device: str | torch.device = "cpu") -> Tensor:
    """``size`` uniform integers in ``[0, n)``: ``floor(u · n)`` with a 53-bit float64 ``u``.

    Not ``torch.randint(n)``: for ``n < 2^32`` it reduces a 32-bit random number modulo ``n``, so the first
    ``2^32 mod n`` values are over-drawn by up to ``n / 2^32`` (2.3 % at n = 1e8). Here the relative
    non-uniformity is at most ``n / 2^53`` (1e-8 at n = 1e8).
    """
    u = torch.rand(size, dtype=torch.float64, generator=generator, device=device)
    return u.mul_(n).floor_().to(torch.int64).clamp_(max=n - 1)


# The draw kernel works through each generator chunk in blocks of this many draws, reusing its buffers: the
# gathered records and masks stay in cache and no fresh memory is page-faulted per chunk. It does not change
# the stream (the generator calls are per `_CHUNK`).
_BLOCK = 1 << 16


def _alias_chunks(
    table: AliasTable, num_draws: int, generator: torch.Generator, out: Tensor | None = None
) -> Iterator[Tensor]:
    """Yield the draws in chunks of ``_CHUNK``. Per chunk the generator makes two calls — ``m`` bucket uniforms,
    then ``m`` coins — so the stream depends on ``_CHUNK`` only. With ``out`` (``(num_draws,)`` int64) the
    chunks are written into it and yielded as its views; without, the yielded tensor is a buffer reused by the
    next chunk (copy it to keep it)."""
    n = table.prob.numel()
    device = table.prob.device
    size = min(_CHUNK, num_draws)
    packed = getattr(table, "packed", None)
    kernels = _numba_kernels() if packed is not None and device.type == "cpu" else None
    # with the compiled kernel the bucket uniforms are drawn into the output chunk itself (read, then
    # overwritten by the draw at the same position): one buffer fewer to fault in and keep in cache
    u_buf = torch.empty(size, dtype=torch.float64, device=device) if kernels is None else None
    coin_buf = torch.empty(size, dtype=torch.float64, device=device)
    out_buf = torch.empty(size, dtype=torch.int64, device=device) if out is None else None
    if kernels is not None:
        rec_prob, rec_alias = _record_views(packed)
    else:
        block = min(_BLOCK if device.type == "cpu" else size, size)
        rec_buf = torch.empty(block, dtype=torch.complex128, device=device) if packed is not None else None
        keep_buf = torch.empty(block, dtype=torch.bool, device=device)
        bucket_buf = torch.empty(block, dtype=torch.int64, device=device)
    for start in range(0, num_draws, _CHUNK):
        m = min(_CHUNK, num_draws - start)
        dest = out_buf[:m] if out_buf is not None else out[start : start + m]
        u = (u_buf[:m] if u_buf is not None else dest.view(torch.float64)).uniform_(generator=generator)
        coin = coin_buf[:m].uniform_(generator=generator)  # both == torch.rand(m, dtype=float64, generator=...)
        if kernels is not None:  # the same per-draw operations, fused in compiled code
            kernels.draw_alias(rec_prob, rec_alias, u.numpy(), coin.numpy(), dest.numpy())
            yield dest
            continue
        for lo in range(0, m, block):
            hi = min(lo + block, m)
            # uniform_indices(n, m, generator): floor(u * n); the int64 cast truncates, = floor as u * n >= 0;
            # no clamp needed: u <= 1 - 2^-53 and n < 2^53 round u * n below n
            b = bucket_buf[: hi - lo]
            b.copy_(u[lo:hi].mul_(n))
            keep = keep_buf[: hi - lo]
            if rec_buf is not None:
                rec = torch.view_as_real(torch.index_select(packed, 0, b, out=rec_buf[: hi - lo]))
                prob_b, alias_b = rec[:, 0], rec[:, 1].view(torch.int64)
            else:
                prob_b, alias_b = table.prob.index_select(0, b), table.alias.index_select(0, b)
            torch.lt(coin[lo:hi], prob_b, out=keep)
            torch.where(keep, b, alias_b, out=dest[lo:hi])
        yield dest


def draw_alias(table: AliasTable, num_draws: int, generator: torch.Generator) -> Tensor:
    """Draw ``num_draws`` indices with replacement from a prebuilt ``AliasTable`` (O(1) per draw)."""
    _check_num_draws(num_draws)
    out = torch.empty(num_draws, dtype=torch.int64, device=table.prob.device)
    for _ in _alias_chunks(table, num_draws, generator, out=out):
        pass
    return out


def _check_num_draws(num_draws: Any) -> None:
    if isinstance(num_draws, bool) or not isinstance(num_draws, (int, np.integer)) or num_draws < 0:
        raise ValueError(f"Expected argument `num_draws` to be a non-negative int, but got {num_draws!r}.")


def _draw_without_replacement(weights: Tensor, num_draws: int, generator: torch.Generator) -> Tensor:
    positive = int((weights > 0).sum())
    if num_draws > positive:
        raise ValueError(
            f"Expected argument `num_draws` to be at most the number of positive weights ({positive}) when"
            f" `replacement=False`, but got {num_draws}; draw with replacement or lower `num_draws`."
        )
    keys = torch.empty(weights.numel(), dtype=torch.float64, device=weights.device)
    keys.exponential_(generator=generator)
    keys.div_(weights.to(torch.float64))  # zero weight -> inf key: never among the first `positive`
    if num_draws * 8 < weights.numel():
        return torch.topk(keys, num_draws, largest=False, sorted=True).indices
    return torch.sort(keys).indices[:num_draws]  # ties have probability ~0 in float64


def draw_weighted(
    weights: Tensor, num_draws: int, generator: torch.Generator, replacement: bool = True
) -> Tensor:
    """Draw ``num_draws`` indices in ``[0, N)`` with probability proportional to ``weights``.

    Args:
        weights: ``(N,)`` non-negative, finite, not all zero (any float/int dtype; computed in float64).
        num_draws: how many indices to draw.
        generator: the ``torch.Generator`` that defines the stream (same seed -> same indices).
        replacement: alias method (O(N) set-up, O(1) per draw) if True; exact successive sampling without
            replacement (Efraimidis–Spirakis exponential keys + sort, O(N log N)) if False.

    Returns:
        ``(num_draws,)`` int64 tensor on ``weights.device``.
    """
    weights = validate_weights(weights)
    _check_num_draws(num_draws)
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"Expected argument `generator` to be a torch.Generator, but got {type(generator).__name__};"
            " create one with `torch.Generator().manual_seed(seed)`."
        )
    if generator.device.type != weights.device.type:
        raise ValueError(
            f"Expected argument `generator` to live on the weights' device ({weights.device}), but got"
            f" {generator.device}; move the weights with `.to(generator.device)` or create the generator there."
        )
    if not replacement:
        return _draw_without_replacement(weights, int(num_draws), generator)
    return draw_alias(_build_alias_table(weights), int(num_draws), generator)


def epoch_generator(seed: int, epoch: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh generator for ``(seed, epoch)``: a splitmix64 mix, so (seed, epoch + 1) and (seed + 1, epoch)
    give unrelated streams (``seed + epoch`` would not)."""
    mask = (1 << 64) - 1
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) + 0x632BE59BD9B4E019) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return torch.Generator(device=device).manual_seed(z & ((1 << 63) - 1))


def _dist_default(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0  # global rank
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"Expected argument `num_replicas` to be a positive int, but got {num_replicas!r}.")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
        raise ValueError(
            f"Expected argument `rank` to be an int in [0, num_replicas={num_replicas}), but got {rank!r}."
        )
    return num_replicas, rank


class EpochPlan(NamedTuple):
    """What defines one epoch's global sequence and where this process's iteration of it starts.

    ``epoch``, ``num_samples`` (global draws), ``replacement``, ``weights`` and ``world`` (the world size the
    sequence was planned for: padding/dropping to a multiple of it) fix the sequence of ``total`` indices;
    ``start`` is the global position (samples of that sequence consumed by all ranks together) where this
    iteration begins, and ``cursor_base`` the value of ``cursor`` at ``start``. ``extra`` holds
    subclass parameters of the draw (e.g. the temperature schedule's step count).
    """

    epoch: int
    num_samples: int
    replacement: bool
    weights: Tensor
    world: int
    total: int
    start: int
    cursor_base: int
    extra: dict


class WeightedSampler(Sampler[int]):
    """Weighted sampler that is distributed, reproducible and resumable mid-epoch, also on another world size.

    Every epoch, every rank makes the same global draw of ``num_samples`` indices (``draw_weighted`` with a
    ``torch.Generator`` seeded from ``(seed, epoch)``) and takes the disjoint shard ``global[rank::num_replicas]``.
    As in ``torch.utils.data.DistributedSampler``, the global draw is padded with its own head to a multiple
    of ``num_replicas`` (``drop_last=False``) or its tail is dropped (``drop_last=True``), so every rank has
    ``len(sampler)`` indices. No rank materialises a Python list of the whole epoch.

    Under Lightning with DDP, pass ``Trainer(use_distributed_sampler=False)``: this sampler already shards
    (Lightning would otherwise wrap it in ``DistributedSamplerWrapper``; ``SamplerState`` raises if it finds that).

    Args:
        weights: ``(N,)`` non-negative sampling weights, one per dataset item (need not sum to 1).
        num_samples: global draws per epoch (default ``N``).
        replacement: draw with replacement (alias method) or without (exact weighted permutation prefix).
        seed: base seed, shared by all ranks.
        num_replicas: the world size (default: ``torch.distributed``'s when initialised, else 1).
        rank: the GLOBAL rank (default: ``torch.distributed``'s when initialised, else 0).
        drop_last: drop the tail of the global draw instead of padding it.

    Resume: ``state_dict()`` holds the seed, the epoch, the weights (the epoch's own weights too if they
    differ), the definition of the running epoch's global sequence (``epoch_num_samples``, ``epoch_world``,
    ``epoch_total``) and ``position`` — the samples of that GLOBAL sequence consumed by all ranks together.
    ``cursor`` is this rank's consumed count (set by ``SamplerState`` under Lightning; in a plain loop set
    ``sampler.cursor`` before saving). After ``load_state_dict`` the next ``iter()`` yields this rank's share
    ``remainder[rank::num_replicas]`` of the remaining sequence, on any number of processes: with the same
    world size that is exactly the rest of this rank's shard; with another one the ranks' shares may differ
    by one sample (no padding: nothing is replayed or skipped; ``SamplerState`` checks that every rank
    still gets the same number of batches and refuses otherwise). Later epochs are planned for the current
    world size, exactly as in an uninterrupted run on it.

    Subclasses override ``epoch_weights(epoch)`` to compute per-epoch weights (default: current weights).
    """

    #: whether ``state_dict`` stores the weights (``RS2Sampler``: uniform, nothing to store)
    _stores_weights = True

    def __init__(
        self,
        weights: Any,
        num_samples: int | None = None,
        replacement: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        self._weights = validate_weights(weights)
        n = self._weights.numel()
        if num_samples is None:
            num_samples = n
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise ValueError(f"Expected argument `num_samples` to be a positive int, but got {num_samples!r}.")
        if not isinstance(replacement, bool):
            raise ValueError(f"Expected argument `replacement` to be a bool, but got {replacement!r}.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"Expected argument `seed` to be an int, but got {seed!r}.")
        self.num_samples = int(num_samples)
        self.replacement = replacement
        if not replacement:
            self._check_without_replacement(self._weights)
        self.seed = int(seed)
        self.num_replicas, self.rank = _dist_default(num_replicas, rank)
        self.drop_last = bool(drop_last)
        if self.drop_last and self.num_samples < self.num_replicas:
            raise ValueError(
                f"Expected argument `num_samples` ({self.num_samples}) to be at least `num_replicas`"
                f" ({self.num_replicas}) with `drop_last=True`, otherwise every rank gets 0 samples."
            )
        self.epoch = 0
        self.cursor = 0
        self._resume: EpochPlan | None = None  # a restored epoch, continued by the next iter()
        self._plan: EpochPlan | None = None  # the epoch being iterated
        self._table_key: tuple[int, int] | None = None
        self._table: AliasTable | None = None
        self._table_source: Tensor | None = None
        self.last_iter_signature: tuple[int, int] | None = None
        #: cheap fingerprint of the last planned global sequence (int64 sums), for the cross-rank guard
        self.plan_fingerprint: tuple[int, ...] | None = None

    # ----------------------------------------------------------------------------------------------- sizes
    @property
    def num_weights(self) -> int:
        """N, the number of items (the dataset length)."""
        return self._weights.numel()

    @property
    def weights(self) -> Tensor:
        """The current base weights (a subclass may draw from ``epoch_weights(epoch)`` instead)."""
        return self._weights

    @property
    def _epoch_weights_used(self) -> Tensor | None:
        """Weights of the epoch being iterated (or about to be resumed)."""
        plan = self._plan if self._plan is not None and self._plan.epoch == self.epoch else self._resume
        return None if plan is None else plan.weights

    def _per_rank_for(self, num_samples: int, num_replicas: int) -> int:
        if self.drop_last:
            return num_samples // num_replicas
        return math.ceil(num_samples / num_replicas)

    def _per_rank(self, num_replicas: int) -> int:
        return self._per_rank_for(self.num_samples, num_replicas)

    def __len__(self) -> int:
        """Indices per rank of a full epoch planned for this world size (also while resuming mid-epoch:
        the fit loop's batch count refers to it)."""
        return self._per_rank(self.num_replicas)

    @property
    def total_size(self) -> int:
        """Global indices per epoch after padding / dropping: ``len(self) * num_replicas``."""
        return len(self) * self.num_replicas

    # ------------------------------------------------------------------------------------------ controls
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next ``iter()`` (called by Lightning every epoch). Moving to a new epoch
        resets the cursor and discards a pending mid-epoch resume of another epoch."""
        epoch = int(epoch)
        if self._resume is not None and self._resume.start > 0 and epoch < self._resume.epoch:
            raise RuntimeError(
                f"set_epoch({epoch}) would discard the restored position in epoch {self._resume.epoch} (sample "
                f"{self._resume.start} of {self._resume.total}) and replay earlier epochs. Set the restored epoch "
                f"(`sampler.set_epoch({self._resume.epoch})`) before iterating. Under Lightning Fabric, "
                "`fabric.setup_dataloaders` sets the epoch to its own count of iter() calls, which restarts at 0 in "
                "a resumed process: iterate the plain DataLoader and call `set_epoch` yourself."
            )
        if epoch != self.epoch:
            self.cursor = 0
        if self._resume is not None and self._resume.epoch != epoch:
            self._resume = None
        self.epoch = epoch

    def set_weights(self, weights: Any) -> None:
        """Replace the sampling weights; takes effect at the next ``iter()`` (the running epoch keeps its draw)."""
        weights = validate_weights(weights)
        if weights.numel() != self.num_weights:
            raise ValueError(
                f"Expected argument `weights` to have one entry per item ({self.num_weights}), but got"
                f" {weights.numel()}; the dataset length cannot change between epochs."
            )
        if not self.replacement:
            self._check_without_replacement(weights)
        self._weights = weights

    def epoch_weights(self, epoch: int) -> Tensor:
        """Weights used for ``epoch``'s draw. Override to compute per-epoch weights; default: ``self.weights``."""
        return self._weights

    def _check_without_replacement(self, weights: Tensor) -> None:
        positive = int((weights > 0).sum())
        if self.num_samples > positive:
            raise ValueError(
                f"Expected argument `num_samples` ({self.num_samples}) to be at most the number of positive"
                f" weights ({positive}) with `replacement=False`; use `replacement=True` or fewer samples."
            )

    # ------------------------------------------------------------------------------------------- drawing
    def _plan_extra(self) -> dict:
        """Subclass parameters that define an epoch's draw besides the plan's fields (checkpointed)."""
        return {}

    def _fresh_plan(self, epoch: int) -> EpochPlan:
        weights = validate_weights(self.epoch_weights(epoch), "epoch_weights(epoch)")
        return EpochPlan(epoch, self.num_samples, self.replacement, weights, self.num_replicas, self.total_size,
                         0, 0, self._plan_extra())

    def _draw(self, plan: EpochPlan) -> Tensor:
        """The epoch's unpadded global draw of ``plan.num_samples`` indices."""
        generator = epoch_generator(self.seed, plan.epoch)
        weights = plan.weights
        if not plan.replacement:
            return draw_weighted(weights, plan.num_samples, generator, replacement=False)
        key = (id(weights), weights._version)
        if self._table is None or self._table_key != key:
            self._table = _build_alias_table(weights)
            self._table_key = key
            self._table_source = weights  # keep alive so id() stays unique
        return draw_alias(self._table, plan.num_samples, generator)

    @staticmethod
    def _pad(global_draw: Tensor, total_size: int) -> Tensor:
        n = global_draw.numel()
        if total_size <= n:
            return global_draw[:total_size]
        reps = math.ceil((total_size - n) / n)  # extra repeats are cut off below (pragma: no mutate)
        return torch.cat([global_draw, global_draw.repeat(reps)[: total_size - n]])

    def _sequence(self, plan: EpochPlan) -> Tensor:
        return self._pad(self._draw(plan), plan.total)

    def global_indices(self, epoch: int | None = None) -> Tensor:
        """The epoch's global sequence after padding/dropping (``total_size`` indices) for this world size;
        rank r iterates ``global_indices()[r::num_replicas]``. For tests and diagnostics."""
        epoch = self.epoch if epoch is None else int(epoch)
        return self._sequence(self._fresh_plan(epoch))

    def _current_plan(self) -> EpochPlan:
        if self._resume is not None and self._resume.epoch == self.epoch:
            return self._resume
        if self._plan is not None and self._plan.epoch == self.epoch:
            return self._plan
        return self._fresh_plan(self.epoch)

    def remaining_per_rank(self) -> list[int]:
        """Samples each rank still yields in the current epoch (after a resume: of the restored epoch)."""
        plan = self._current_plan()
        left = plan.total - plan.start
        return [max(0, math.ceil((left - r) / self.num_replicas)) for r in range(self.num_replicas)]

    @property
    def resumed_world_size(self) -> int | None:
        """World size that planned the restored epoch about to be continued, ``None`` if there is none."""
        return None if self._resume is None or self._resume.epoch != self.epoch else self._resume.world

    def rebase_cursor(self, cursor: int) -> None:
        """Declare that this rank's ``cursor`` is ``cursor`` at the restored position (``SamplerState`` aligns
        it with Lightning's batch counter after a resume on another world size)."""
        if self._resume is None:
            raise RuntimeError("rebase_cursor() needs a restored epoch (call load_state_dict first).")
        self._resume = self._resume._replace(cursor_base=int(cursor))
        self.cursor = int(cursor)

    def set_cursor(self, consumed: int) -> None:
        """Record that this rank consumed ``consumed`` samples of the epoch (``SamplerState`` passes batches done
        × batch size, counted like Lightning's batch counter); capped at the end of this rank's share."""
        plan = self._plan if self._plan is not None and self._plan.epoch == self.epoch else self._resume
        if plan is None or plan.epoch != self.epoch:
            cap = len(self)
        else:
            cap = plan.cursor_base + max(0, math.ceil((plan.total - plan.start) / self.num_replicas))
        self.cursor = max(0, min(int(consumed), cap))

    def __iter__(self) -> Iterator[int]:
        # a generator: nothing is drawn until the first index is requested
        epoch = self.epoch
        resume, self._resume = self._resume, None
        plan = resume if resume is not None and resume.epoch == epoch else self._fresh_plan(epoch)
        self._plan = plan
        self.last_iter_signature = (epoch, plan.start)
        sequence = self._sequence(plan)
        self.plan_fingerprint = sequence_fingerprint(sequence, plan.epoch, plan.total)
        shard = sequence[plan.start + self.rank :: self.num_replicas]
        del sequence
        for start in range(0, shard.numel(), _YIELD_CHUNK):
            yield from shard[start : start + _YIELD_CHUNK].tolist()

    # ------------------------------------------------------------------------------------------- state
    @property
    def position(self) -> int:
        """Samples of the current epoch's global sequence consumed by all ranks together."""
        plan = self._plan if self._plan is not None and self._plan.epoch == self.epoch else self._resume
        if plan is None or plan.epoch != self.epoch:
            return min(self.total_size, max(0, self.cursor) * self.num_replicas)
        return min(plan.total, plan.start + max(0, self.cursor - plan.cursor_base) * self.num_replicas)

    def state_dict(self) -> dict[str, Any]:
        """What an exact resume needs (see the class docstring); ``position`` is global, valid for every
        rank and every world size."""
        plan = self._plan if self._plan is not None and self._plan.epoch == self.epoch else self._resume
        if plan is None or plan.epoch != self.epoch:
            plan = EpochPlan(self.epoch, self.num_samples, self.replacement, self._weights, self.num_replicas,
                             self.total_size, 0, 0, self._plan_extra())
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "cursor": int(self.cursor),
            "position": int(self.position),
            "num_replicas": self.num_replicas,
            "num_samples": self.num_samples,
            "replacement": self.replacement,
            "drop_last": self.drop_last,
            "epoch_num_samples": plan.num_samples,
            "epoch_replacement": plan.replacement,
            "epoch_world": plan.world,
            "epoch_total": plan.total,
            "epoch_extra": dict(plan.extra),
            "weights": self._weights if self._stores_weights else None,
            "epoch_weights": None if plan.weights is self._weights or not self._stores_weights else plan.weights,
        }

    def check_state_dict(self, state_dict: Any) -> dict[str, Any]:
        """Validate a checkpointed ``state_dict`` against this sampler; return the parsed values.

        Raises:
            CheckpointStateError: a key is missing, malformed or out of range (names the key); nothing is assigned.
        """
        from lightning_reweight.state.validate import CheckpointStateError, as_int, as_tensor, require_keys

        where = f"{type(self).__name__}.state_dict"
        state = require_keys(state_dict, ["seed", "epoch", "cursor", "num_samples", "replacement", "weights"], where)
        out: dict[str, Any] = {
            "seed": as_int(state, "seed", where),
            "epoch": as_int(state, "epoch", where, minimum=0),
            "cursor": as_int(state, "cursor", where, minimum=0),
            "num_samples": as_int(state, "num_samples", where, minimum=1),
        }
        for key in ("replacement", "drop_last", "epoch_replacement"):
            if key in state and not isinstance(state[key], bool):
                raise CheckpointStateError(where, key, f"expected a bool, but got {state[key]!r}.")
        legacy = "position" not in state  # written before positions were global: derive them
        replicas = as_int(state, "num_replicas", where, minimum=1) if "num_replicas" in state else 1
        drop_last = bool(state.get("drop_last", self.drop_last))
        out["epoch_num_samples"] = (as_int(state, "epoch_num_samples", where, minimum=1)
                                    if "epoch_num_samples" in state else out["num_samples"])
        out["epoch_world"] = as_int(state, "epoch_world", where, minimum=1) if "epoch_world" in state else replicas
        n_ep, w_ep = out["epoch_num_samples"], out["epoch_world"]
        total = (n_ep // w_ep if drop_last else math.ceil(n_ep / w_ep)) * w_ep
        if "epoch_total" in state or "total_size" in state:
            key = "epoch_total" if "epoch_total" in state else "total_size"
            saved_total = as_int(state, key, where, minimum=0)
            if saved_total != total:
                raise CheckpointStateError(
                    where, key, f"expected {total} (= {n_ep} draws planned for {w_ep} process(es)), but got"
                    f" {saved_total}."
                )
        out["epoch_total"] = total
        if legacy:
            key = "global_cursor" if "global_cursor" in state else "cursor"
            position = as_int(state, key, where, minimum=0)
            position = position if key == "global_cursor" else position * replicas
        else:
            key = "position"
            position = as_int(state, key, where, minimum=0)
        if position > total:
            raise CheckpointStateError(
                where, key, f"expected a position within the epoch's {total} samples, but got {position}."
            )
        if replicas == out["epoch_world"] and out["cursor"] > total // replicas:
            raise CheckpointStateError(
                where, "cursor", f"expected a cursor within this rank's {total // replicas} samples of the epoch, but got"
                f" {out['cursor']}."
            )
        out["position"], out["num_replicas"] = position, replicas
        out["replacement"] = bool(state["replacement"])
        out["epoch_replacement"] = bool(state.get("epoch_replacement", out["replacement"]))
        for key in ("weights", "epoch_weights"):
            if state.get(key) is None:
                out[key] = None
                continue
            w = as_tensor(state, key, where, length=self.num_weights, minimum=0.0)
            if not bool((w > 0).any()):
                raise CheckpointStateError(where, key, "expected at least one positive weight, but all are zero.")
            out[key] = w
        if self._stores_weights and out["weights"] is None:
            raise CheckpointStateError(where, "weights", "expected a weight tensor, but got None.")
        extra = state.get("epoch_extra", {})
        if not isinstance(extra, dict):
            raise CheckpointStateError(where, "epoch_extra", f"expected a dict, but got {type(extra).__name__}.")
        out["epoch_extra"] = dict(extra)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Validate everything (``check_state_dict``), then restore; the next ``iter()`` continues epoch
        ``state_dict['epoch']`` at its global position (on any world size)."""
        s = self.check_state_dict(state_dict)
        weights = s["weights"] if s["weights"] is not None else self._weights
        epoch_weights = s["epoch_weights"] if s["epoch_weights"] is not None else weights
        self._weights = weights
        self.seed = s["seed"]
        self.epoch = s["epoch"]
        # the saved cursor counts like the saving run's batch counter, which the fit loop restores on the same
        # world size (also inside an epoch planned by yet another one)
        self.cursor = s["cursor"] if s["num_replicas"] == self.num_replicas else 0
        extra = {**self._plan_extra(), **s["epoch_extra"]}
        self._plan = None
        if s["position"] == 0:
            # nothing of the epoch was consumed: the next iter() plans it afresh (from `epoch_weights(epoch)`, for
            # this world size), exactly as an uninterrupted run would
            self._resume, self.cursor = None, 0
            return
        self._resume = EpochPlan(s["epoch"], s["epoch_num_samples"], s["epoch_replacement"], epoch_weights,
                                 s["epoch_world"], s["epoch_total"], s["position"], self.cursor, extra)


def sequence_fingerprint(sequence: Tensor, *parts: int) -> tuple[int, ...]:
    """A cheap fingerprint of an index sequence: its length and the int64 sums of a strided sample of at most
    ~8192 indices, of those indices times their positions and of their squares, plus ``parts``. Enough to tell
    two planned sequences apart (another seed, weights, epoch or size changes almost every entry) at O(1) cost."""
    n = sequence.numel()
    step = max(1, n // 8192)
    sample = sequence[::step].to(torch.int64)
    pos = torch.arange(1, sample.numel() + 1, dtype=torch.int64, device=sample.device)
    return (n, int(sample.sum()), int((sample * pos).sum()), int((sample * sample).sum()), *map(int, parts))
