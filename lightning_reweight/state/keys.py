"""Stable per-sample keys on streams: map a stream's sample key to a row of a per-sample table.

A streaming data set (an ``IterableDataset``, LitData's ``StreamingDataset``, a Hugging Face iterable data set)
has no dataset index, but it can expose a stable integer key per sample: a ``sample_id`` column, or the global
position of the sample in the stream (``TextWindowDataModule`` exposes its window number). Stateful rules
(per-sample EMA losses, importance tables) key their table by it. ``StreamKeys`` turns such keys into table
rows in one of two ways; the user chooses:

* **known key range** (``StreamKeys(num_keys=N)``): keys must lie in ``[0, N)``; the row is the key itself
  (exact, O(N) memory). A key outside the range raises.
* **hashed slots** (``StreamKeys(slots=S)``): any int64 key goes to ``splitmix64(key) mod S``, the 64 hashed
  bits read as an unsigned integer, for any ``S`` (a power of two or not; fixed O(S) memory, keys of any size). Distinct keys can share a slot; with ``K`` keys spread over ``S`` slots a given
  key shares its slot with at least one other key with probability ``1 - (1 - 1/S)^(K-1)`` (about
  ``1 - exp(-K/S)``): ``K = 10^6`` keys in ``S = 2^20`` slots collide for ~61 % of keys, in ``S = 2^24`` for
  ~5.8 %, in ``S = 2^27`` for ~0.74 %. Keys that share a slot share its statistics (their EMA losses mix).
  ``expected_collision_rate(K, S)`` computes it, ``slots_for(K, rate)`` picks ``S`` for a target rate.

The hash is splitmix64 (a bijective 64-bit mixer) in vectorised int64 torch ops, so consecutive keys
(window positions) spread uniformly over the slots and every rank maps a key to the same slot.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["StreamKeys", "expected_collision_rate", "slots_for", "splitmix64", "unsigned_mod"]

_U64 = 1 << 64
_MAX_SLOTS = 1 << 62


def _signed(c: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits."""
    return c - _U64 if c >= 1 << 63 else c


_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic on signed ints)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(keys: Tensor, seed: int = 0) -> Tensor:
    """The splitmix64 finaliser of ``keys + seed·golden`` (int64 in, int64 bits out; wrapping arithmetic).

    Args:
        keys: integer tensor of any shape.
        seed: salt; different seeds give independent slot assignments.

    Returns:
        int64 tensor of the same shape holding the 64 hashed bits (negative values are bit patterns with the
        top bit set).
    """
    if keys.is_floating_point() or keys.dtype == torch.bool:
        raise TypeError(f"Expected integer keys, but got dtype {keys.dtype}.")
    z = keys.to(torch.int64) + _signed((0x9E3779B97F4A7C15 * (seed + 1)) % _U64)
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def expected_collision_rate(num_keys: int, slots: int) -> float:
    """Expected fraction of ``num_keys`` distinct keys sharing their slot with another key: ``1-(1-1/S)^(K-1)``."""
    if num_keys < 1 or slots < 1:
        raise ValueError(f"Expected num_keys >= 1 and slots >= 1, but got {num_keys} and {slots}.")
    return -math.expm1((num_keys - 1) * math.log1p(-1.0 / slots)) if slots > 1 else float(num_keys > 1)


def slots_for(num_keys: int, rate: float) -> int:
    """The smallest power of two ``S`` whose ``expected_collision_rate(num_keys, S)`` is at most ``rate``."""
    if not 0 < rate < 1:
        raise ValueError(f"Expected argument `rate` in (0, 1), but got {rate!r}.")
    s = 1
    while expected_collision_rate(num_keys, s) > rate:
        s *= 2
    return s


def unsigned_mod(bits: Tensor, modulus: int) -> Tensor:
    """``bits mod modulus`` with the int64 ``bits`` read as UNSIGNED 64-bit integers (vectorised, exact).

    ``torch.remainder`` reads a negative int64 (top bit set) as ``u - 2^64``; adding ``2^64 mod modulus`` back
    (without overflow: the sum stays below ``modulus``) gives ``u mod modulus``. For a power of two ``2^64 mod
    modulus`` is 0 and this is the plain remainder.
    """
    rem = torch.remainder(bits, modulus)
    wrap = _U64 % modulus
    if wrap == 0:
        return rem
    shifted = rem - (modulus - wrap)  # rem + wrap - modulus, in (-modulus, modulus): no overflow
    fixed = torch.where(shifted < 0, shifted + modulus, shifted)
    return torch.where(bits < 0, fixed, rem)


class StreamKeys:
    """Map stable per-sample stream keys to rows of a per-sample table.

    Args:
        num_keys: the keys are known to lie in ``[0, num_keys)``; rows are the keys (exact).
        slots: hash any int64 key into this many slots, ``splitmix64(key) mod slots`` (unsigned; fixed memory;
            see the module docstring for the collision rate). At most ``2**62``. Give exactly one of ``num_keys`` and ``slots``.
        seed: hash salt (``slots`` only).

    Example::

        keys = StreamKeys(slots=2**20)
        callback = LossReweighting("linupper", num_samples=keys.num_samples)   # table of 2**20 rows
        # training_step:
        return reduce_loss(self, losses, keys(batch["key"]))
    """

    def __init__(self, num_keys: int | None = None, slots: int | None = None, seed: int = 0):
        if (num_keys is None) == (slots is None):
            raise ValueError(
                f"Expected exactly one of `num_keys` (known key range) and `slots` (hashed), but got "
                f"num_keys={num_keys!r}, slots={slots!r}."
            )
        for name, v in (("num_keys", num_keys), ("slots", slots)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"Expected argument `{name}` to be a positive int, but got {v!r}.")
        if slots is not None and slots > _MAX_SLOTS:
            raise ValueError(f"Expected argument `slots` to be at most 2**62, but got {slots!r}. Pick a table size "
                             "that fits in memory, e.g. `slots_for(num_keys, rate)`.")
        self.num_keys = num_keys
        self.slots = slots
        self.seed = int(seed)

    @property
    def hashed(self) -> bool:
        return self.slots is not None

    @property
    def num_samples(self) -> int:
        """Rows of the per-sample table these keys address (pass it as a callback's ``num_samples``)."""
        return int(self.slots if self.slots is not None else self.num_keys)  # type: ignore[arg-type]

    def collision_rate(self, num_keys: int) -> float:
        """Expected fraction of ``num_keys`` distinct keys that share a row (0 for a known key range)."""
        return expected_collision_rate(num_keys, self.slots) if self.slots is not None else 0.0

    def __call__(self, keys: Tensor) -> Tensor:
        """The table rows (int64, same shape) of ``keys``."""
        if not isinstance(keys, Tensor):
            keys = torch.as_tensor(keys)
        if keys.is_floating_point() or keys.dtype == torch.bool:
            raise TypeError(f"Expected integer stream keys, but got dtype {keys.dtype}.")
        keys = keys.to(torch.int64)
        if self.slots is not None:
            return unsigned_mod(splitmix64(keys, self.seed), self.slots)
        if keys.numel() and (int(keys.min()) < 0 or int(keys.max()) >= self.num_keys):  # type: ignore[operator]
            bad = int(keys.min()) if int(keys.min()) < 0 else int(keys.max())
            raise IndexError(
                f"Expected stream keys in [0, {self.num_keys}), but got {bad}. Pass the true key range as "
                "`num_keys=`, or hash keys of unknown range into a fixed table with `StreamKeys(slots=...)`."
            )
        return keys

    def __repr__(self) -> str:
        arg = f"slots={self.slots}, seed={self.seed}" if self.slots is not None else f"num_keys={self.num_keys}"
        return f"StreamKeys({arg})"
