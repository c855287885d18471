"""Compiled (numba) CPU kernels for the per-step rules whose batch-sized work is a few float64 passes.

At the batch sizes of a training step, torch's (and numpy's) per-call overhead, not the arithmetic, is the cost
of these steps: one compiled call replaces a dozen tensor ops. Imported lazily (``instance.host_kernels``), so
``import lightning_reweight`` never pays numba's import; every caller falls back to its vectorised path when
numba is missing. Each kernel does the vectorised path's float64 operations in the same order, with libm's
``exp``/``log`` instead of torch's vectorised ones (both within an ulp of the exact value), so results agree
with it to float64 rounding and, once stored as float32, nearly always bit for bit (see the tests).

Compiled and cached on disk by ``lightning_reweight._numba.jit``.
"""

from __future__ import annotations

import math

import numpy as np

from lightning_reweight._numba import jit as _jit
from lightning_reweight.state._kernels import hash_slots

_LOG2 = math.log(2.0)
# log of the smallest positive normal float32 (``rules.adawac._LOG_TINY``)
_TINY = float(np.finfo(np.float32).tiny)
_LOG_TINY = math.log(_TINY)


@_jit
def _logaddexp(x: float, y: float) -> float:
    """numpy's ``logaddexp`` for two floats (the same branches)."""
    if x == y:
        return x + _LOG2
    tmp = x - y
    if tmp > 0:
        return x + math.log1p(math.exp(-tmp))
    if tmp <= 0:
        return y + math.log1p(math.exp(tmp))
    return tmp  # NaN


@_jit
def kl_dro_ema_step(losses: np.ndarray, divisor: float, prev: float, has_prev: bool, limit: float, clamp: bool,
                    shift_prev: bool, a: float, out: np.ndarray) -> float:
    """One step of ``KLDRORule``'s EMA normaliser; writes the weights into ``out`` and returns the new ``log Z``.

    ``z = ℓ / divisor`` (``divisor = ±r``), capped at ``limit`` when ``clamp``; ``e = exp(z − c)`` with the
    shift ``c = prev`` (``shift_prev``) or ``max z``; ``log Z_batch = c + log Σe − log n`` (Σ compensated);
    ``log Z = logaddexp(log(1 − a) + prev, log a + log Z_batch)`` (or ``log Z_batch`` without ``prev`` or
    with ``a = 1``); ``out = e · exp(c − log Z)``.
    """
    n = losses.shape[0]
    z = np.empty(n)
    for i in range(n):
        v = np.float64(losses[i]) / divisor
        if clamp and v > limit:
            v = limit
        z[i] = v
    if shift_prev:
        shift = prev
    else:
        shift = z[0]
        for i in range(1, n):
            if z[i] > shift:
                shift = z[i]
    total = 0.0
    comp = 0.0
    for i in range(n):
        e = math.exp(z[i] - shift)
        z[i] = e
        t = total + e  # Neumaier's compensated sum: the total to float64 resolution
        if abs(total) >= abs(e):
            comp += (total - t) + e
        else:
            comp += (e - t) + total
        total = t
    total += comp
    batch_log_z = shift + math.log(total) - math.log(n) if total > 0 else -np.inf
    if not has_prev or a == 1.0:
        log_z = batch_log_z
    else:
        log_z = _logaddexp(math.log1p(-a) + prev, math.log(a) + batch_log_z)
    factor = math.exp(shift - log_z)
    for i in range(n):
        out[i] = z[i] * factor
    return log_z


@_jit
def weight_mass(weights: np.ndarray) -> tuple[float, float]:
    """``(Σw, Σw²)`` of a weight vector, accumulated in float64."""
    total = 0.0
    square = 0.0
    for i in range(weights.shape[0]):
        w = np.float64(weights[i])
        total += w
        square += w * w
    return total, square


@_jit
def _log_beta(beta: float) -> float:
    """``log(max(β, 0))`` floored at the log of the smallest normal float32 (as ``rules.adawac``)."""
    if not beta > 0:  # 0, -0.0 (and NaN, which a validated table never holds)
        return _LOG_TINY if beta == beta else beta
    return max(math.log(beta), _LOG_TINY)


@_jit
def adawac_step(beta_sup: np.ndarray, beta_cons: np.ndarray, index: np.ndarray, loss_sup: np.ndarray,
                loss_cons: np.ndarray, eta: float, out_sup: np.ndarray, out_cons: np.ndarray) -> int:
    """AdaWAC's mirror step for a batch, per batch position: ``out_*[i]`` is the new β of sample ``index[i]``.

    The step of a sample is ``η·Σ(ℓ_sup − ℓ_cons)`` over its occurrences in the batch, summed in batch order
    from 0 (as ``index_add_``); repeats are found with an O(batch) hash table (no O(N) scratch, no sort), and
    every position of a repeated sample gets the same new β. The columns are only read. Returns the number of
    distinct samples.

    Two transcendental calls per sample instead of four: ``log(β_sup/β_cons)`` for ``log β_sup − log β_cons``
    (unless a β is below the float32 floor) and ``σ(−z) = t/(1 + t)`` from the ``t = e^{−z}`` of ``σ(z)``; both
    are equal up to float64 rounding, far below the float32 the β are stored in.
    """
    b = index.shape[0]
    slot_of, keys = hash_slots(index)
    step = np.zeros(keys.shape[0])
    for i in range(b):
        step[slot_of[i]] += eta * (np.float64(loss_sup[i]) - np.float64(loss_cons[i]))
    distinct = 0
    for h in range(keys.shape[0]):
        if keys[h] != -1:
            distinct += 1
    for i in range(b):
        k = index[i]
        s, c = np.float64(beta_sup[k]), np.float64(beta_cons[k])
        if s >= _TINY and c >= _TINY:  # both logs above the floor: one log of the ratio
            z = math.log(s / c) + step[slot_of[i]]
        else:
            z = _log_beta(s) - _log_beta(c) + step[slot_of[i]]
        # σ(z) = 1/(1 + t) and σ(−z) = t/(1 + t) with one exp, t = e^{−z}
        t = math.exp(-z)
        if t == np.inf:
            out_sup[i] = 0.0
            out_cons[i] = 1.0
        else:
            out_sup[i] = 1.0 / (1.0 + t)
            out_cons[i] = t / (1.0 + t)
    return distinct
