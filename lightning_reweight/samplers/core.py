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
one random gather; the draw reuses cache-sized buffers instead of allocating per chunk. The CPU build runs
in numpy (its compaction, gathers and cumulative sums beat torch's on one thread) and merges the two sorted
prefix-sum sequences with ``np.interp`` (which walks sorted queries in O(1) each) plus an exact correction,
instead of a binary search per entry. It is bit-identical to the device-agnostic torch construction used for
other devices, and to the tables and draws of earlier releases (compared on random, skewed, tied, integer and
zero-containing weights): the random stream did not change. Weights are validated in one fused min/max pass.

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


def _build_alias_table(weights: Tensor) -> AliasTable:
    if weights.device.type == "cpu":
        return _build_alias_table_numpy(weights)
    return _build_alias_table_torch(weights)


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
    if m < 2 or values.size < 1024:
        return np.searchsorted(sorted_seq, values, side="right")
    work = np.arange(-1, m, dtype=np.float64)  # work[1:] = 0, 1, ..., m - 1: the positions to interpolate
    pos = np.interp(values, sorted_seq, work[1:], left=-1.0, right=float(m - 1))
    count = pos.astype(np.int64)  # pos is -1 or >= 0: truncation is floor
    count += 1
    np.clip(count, 0, m, out=count)  # defensive: the bounds above already hold
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
    np.minimum(donor, n_heavy - 1, out=donor)  # rounding at the very end -> last heavy
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
    u_buf = torch.empty(size, dtype=torch.float64, device=device)
    coin_buf = torch.empty(size, dtype=torch.float64, device=device)
    out_buf = torch.empty(size, dtype=torch.int64, device=device) if out is None else None
    block = min(_BLOCK if device.type == "cpu" else size, size)
    rec_buf = torch.empty(block, dtype=torch.complex128, device=device) if packed is not None else None
    keep_buf = torch.empty(block, dtype=torch.bool, device=device)
    bucket_buf = torch.empty(block, dtype=torch.int64, device=device)
    for start in range(0, num_draws, _CHUNK):
        m = min(_CHUNK, num_draws - start)
        u = u_buf[:m].uniform_(generator=generator)  # == torch.rand(m, dtype=float64, generator=generator)
        coin = coin_buf[:m].uniform_(generator=generator)
        dest = out_buf[:m] if out_buf is not None else out[start : start + m]
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


class WeightedSampler(Sampler[int]):
    """Weighted sampler that is distributed, reproducible and resumable mid-epoch.

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
        num_replicas, rank: default to the ``torch.distributed`` world size and GLOBAL rank when initialised,
            else 1 and 0.
        drop_last: drop the tail of the global draw instead of padding it.

    Resume: ``state_dict()`` holds the seed, epoch, weights (the epoch's own weights too if they differ) and
    ``cursor`` — the samples of this rank already consumed in the epoch (set by ``SamplerState`` under
    Lightning; in a plain loop set ``sampler.cursor`` before saving). After ``load_state_dict`` the next
    ``iter()`` continues the saved epoch at the cursor (unless ``set_epoch`` moves to another epoch).

    Subclasses override ``epoch_weights(epoch)`` to compute per-epoch weights (default: current weights).
    """

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
        self._resume: dict[str, Any] | None = None
        self._epoch_weights_used: Tensor | None = None
        self._table_key: tuple[int, int] | None = None
        self._table: AliasTable | None = None
        self._table_source: Tensor | None = None
        self.last_iter_signature: tuple[int, int] | None = None

    # ----------------------------------------------------------------------------------------------- sizes
    @property
    def num_weights(self) -> int:
        """N, the number of items (the dataset length)."""
        return self._weights.numel()

    @property
    def weights(self) -> Tensor:
        """The current base weights (a subclass may draw from ``epoch_weights(epoch)`` instead)."""
        return self._weights

    def _per_rank(self, num_replicas: int) -> int:
        if self.drop_last:
            return self.num_samples // num_replicas
        return math.ceil(self.num_samples / num_replicas)

    def __len__(self) -> int:
        """Indices per rank per epoch (full epoch, also while resuming mid-epoch)."""
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
        if epoch != self.epoch:
            self.cursor = 0
        if self._resume is not None and self._resume["epoch"] != epoch:
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
    def _draw(self, weights: Tensor, epoch: int) -> Tensor:
        generator = epoch_generator(self.seed, epoch)
        if not self.replacement:
            return draw_weighted(weights, self.num_samples, generator, replacement=False)
        key = (id(weights), weights._version)
        if self._table is None or self._table_key != key:
            self._table = _build_alias_table(weights)
            self._table_key = key
            self._table_source = weights  # keep alive so id() stays unique
        return draw_alias(self._table, self.num_samples, generator)

    @staticmethod
    def _pad(global_draw: Tensor, total_size: int) -> Tensor:
        n = global_draw.numel()
        if total_size <= n:
            return global_draw[:total_size]
        reps = math.ceil((total_size - n) / n)
        return torch.cat([global_draw, global_draw.repeat(reps)[: total_size - n]])

    def global_indices(self, epoch: int | None = None) -> Tensor:
        """The epoch's global draw after padding/dropping (``total_size`` indices); rank r iterates
        ``global_indices()[r::num_replicas]``. For tests and diagnostics."""
        epoch = self.epoch if epoch is None else int(epoch)
        weights = validate_weights(self.epoch_weights(epoch), "epoch_weights(epoch)")
        return self._pad(self._draw(weights, epoch), self.total_size)

    def __iter__(self) -> Iterator[int]:
        # a generator: nothing is drawn until the first index is requested
        epoch = self.epoch
        resume, self._resume = self._resume, None
        if resume is not None and resume["epoch"] == epoch:
            weights = resume["epoch_weights"]
            if weights is None:
                weights = self._weights
            global_start = int(resume["global_cursor"])
            saved_total = int(resume["total_size"])
        else:
            weights = validate_weights(self.epoch_weights(epoch), "epoch_weights(epoch)")
            global_start, saved_total = 0, self.total_size
        self._epoch_weights_used = weights
        self.last_iter_signature = (epoch, global_start)
        draw = self._pad(self._draw(weights, epoch), saved_total)[global_start:]
        if saved_total != self.total_size:  # resumed under another world size: re-pad the remainder
            draw = self._pad(draw, self._per_rank_len(draw.numel()) * self.num_replicas)
        shard = draw[self.rank :: self.num_replicas]
        del draw
        for start in range(0, shard.numel(), _YIELD_CHUNK):
            yield from shard[start : start + _YIELD_CHUNK].tolist()

    def _per_rank_len(self, remaining: int) -> int:
        if self.drop_last:
            return remaining // self.num_replicas
        return math.ceil(remaining / self.num_replicas)

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """What an exact resume needs. ``cursor`` counts this rank's consumed samples in ``epoch``; it is
        stored as a global position (``cursor * num_replicas``), valid for every rank."""
        used = self._epoch_weights_used
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "cursor": int(self.cursor),
            "global_cursor": int(self.cursor) * self.num_replicas,
            "num_replicas": self.num_replicas,
            "total_size": self.total_size,
            "num_samples": self.num_samples,
            "replacement": self.replacement,
            "weights": self._weights,
            "epoch_weights": None if used is None or used is self._weights else used,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore; the next ``iter()`` continues epoch ``state_dict['epoch']`` at its cursor."""
        weights = state_dict.get("weights")
        if weights is not None:
            weights = validate_weights(weights)
            if weights.numel() != self.num_weights:
                raise ValueError(
                    f"Expected the checkpointed sampler weights to have one entry per item ({self.num_weights}),"
                    f" but got {weights.numel()}; was the checkpoint made with another dataset?"
                )
            self._weights = weights
        self.seed = int(state_dict.get("seed", self.seed))
        self.num_samples = int(state_dict.get("num_samples", self.num_samples))
        self.replacement = bool(state_dict.get("replacement", self.replacement))
        self.epoch = int(state_dict.get("epoch", 0))
        self.cursor = int(state_dict.get("cursor", 0))
        saved_replicas = int(state_dict.get("num_replicas", self.num_replicas))
        global_cursor = int(state_dict.get("global_cursor", self.cursor * saved_replicas))
        saved_total = int(state_dict.get("total_size", self._per_rank(saved_replicas) * saved_replicas))
        if saved_replicas != self.num_replicas:
            self.cursor = 0  # the per-rank cursor of another world size means nothing here
        self._resume = {
            "epoch": self.epoch,
            "global_cursor": min(global_cursor, saved_total),
            "total_size": saved_total,
            "epoch_weights": state_dict.get("epoch_weights"),
        }
