"""Compiled (numba) CPU kernels for the alias method: a one-pass table build and a fused draw.

Imported lazily by ``core`` the first time a CPU table is built or drawn from, so ``import lightning_reweight``
never pays numba's import. Both kernels reproduce the vectorised numpy/torch construction and draw of ``core``
bit for bit (same float64 operations in the same order); ``core`` falls back to those when numba is missing.

Compiled and cached on disk by ``lightning_reweight._numba.jit``.
"""

from __future__ import annotations

import numpy as np

from lightning_reweight._numba import jit as _jit

# Entries are classified in blocks of this many: each block's lights (or heavies) are compacted without
# branches into a small buffer that stays in cache, so the sweep's branches follow the merge, not the data.
_BLOCK = 2048


@_jit
def _fill(weights: np.ndarray, scale: float, pos: int, light: bool, idx: np.ndarray, q: np.ndarray) -> tuple:
    """Compact the lights (``light``) or heavies among the entries from ``pos`` into ``idx``/``q``, scanning
    whole blocks until at least one is found or the weights end. Returns ``(count, next_pos)``."""
    n = weights.shape[0]
    count = 0
    while count == 0 and pos < n:
        stop = min(pos + _BLOCK, n)
        for i in range(pos, stop):
            value = weights[i] * scale
            idx[count] = i
            q[count] = value
            count += (value < 1.0) == light
        pos = stop
    return count, pos


@_jit
def _pass_heavy(weights: np.ndarray, scale: float, rec_prob: np.ndarray, rec_alias: np.ndarray, h: int,
                excess: float, deficit_end: float, next_heavy: int, n_heavy_buf: int, heavy_pos: int,
                heavy_idx: np.ndarray, heavy_q: np.ndarray) -> tuple:
    """Move the heavy cursor past heavy ``h``, which has served every light so far: it keeps
    ``E_k + 1 - D_end`` of its bucket and borrows the rest from the next heavy (the last heavy keeps all of
    it). Returns the updated ``(h, excess, next_heavy, n_heavy_buf, heavy_pos)``; ``h = n`` once past the last."""
    if next_heavy == n_heavy_buf:
        n_heavy_buf, heavy_pos = _fill(weights, scale, heavy_pos, False, heavy_idx, heavy_q)
        next_heavy = 0
    if n_heavy_buf == 0:  # h is the last heavy
        rec_prob[h, 0] = 1.0
        rec_alias[h, 1] = h
        return weights.shape[0], excess, next_heavy, n_heavy_buf, heavy_pos
    nxt = heavy_idx[next_heavy]
    keep = (excess + 1.0) - deficit_end
    rec_prob[h, 0] = min(max(keep, 0.0), 1.0)
    rec_alias[h, 1] = nxt
    return nxt, excess + (heavy_q[next_heavy] - 1.0), next_heavy + 1, n_heavy_buf, heavy_pos


@_jit
def build_alias_table(weights: np.ndarray, scale: float, rec_prob: np.ndarray, rec_alias: np.ndarray) -> bool:
    """Fill the alias table for ``q = weights · scale`` (``scale = N / Σw``) in one sweep.

    ``rec_prob`` (float64) and ``rec_alias`` (int64) are ``(N, 2)`` views of the packed records: column 0 of
    ``rec_prob`` is ``prob``, column 1 of ``rec_alias`` is ``alias``. Two cursors walk the entries in index
    order: the light cursor visits lights (``q < 1``), the heavy cursor the current donor heavy, which light
    ``a`` keeps while ``E_k > D_a`` (``core``'s merge of the sorted prefix sums, done as a walk). A heavy
    passed over has served every light so far, so it keeps ``E_k + 1 - D_end`` of its bucket and borrows the
    rest from the next heavy. Every prefix sum is accumulated left to right, as numpy's ``cumsum`` does, so
    the table is bit-identical to ``core``'s vectorised construction.

    Returns False (leaving a partly written table) in the one case the walk does not cover: a light's
    ``D_a = D_end_a - d_a`` below the previous light's, possible only from float64 rounding; the caller then
    builds with the vectorised construction.
    """
    n = weights.shape[0]
    light_idx = np.empty(_BLOCK, dtype=np.int64)
    light_q = np.empty(_BLOCK, dtype=np.float64)
    heavy_idx = np.empty(_BLOCK, dtype=np.int64)
    heavy_q = np.empty(_BLOCK, dtype=np.float64)
    n_heavy_buf, heavy_pos = _fill(weights, scale, 0, False, heavy_idx, heavy_q)
    if n_heavy_buf == 0:  # all q just below 1 from rounding: (numerically) uniform
        for i in range(n):
            rec_prob[i, 0] = 1.0
            rec_alias[i, 1] = i
        return True
    h = heavy_idx[0]  # the current heavy (n once the cursor has passed the last one)
    excess = heavy_q[0] - 1.0  # its E_k
    next_heavy = 1  # position of the next heavy in the heavy buffer
    last = -1  # the last heavy, once the heavy cursor has passed it
    deficit_end = 0.0  # D_end before the current light: the deficit of the lights served so far
    previous_start = -np.inf
    light_pos = 0
    while True:
        n_light_buf, light_pos = _fill(weights, scale, light_pos, True, light_idx, light_q)
        if n_light_buf == 0:
            break
        for a in range(n_light_buf):
            q = light_q[a]
            deficit = 1.0 - q
            end = deficit_end + deficit
            start = end - deficit  # D_a
            if start < previous_start:
                return False
            previous_start = start
            while h < n and excess <= start:  # light a borrows from the first heavy with E_k > D_a
                last = h  # the heavy being passed (read only once the cursor is past the last one)
                h, excess, next_heavy, n_heavy_buf, heavy_pos = _pass_heavy(
                    weights, scale, rec_prob, rec_alias, h, excess, deficit_end, next_heavy, n_heavy_buf,
                    heavy_pos, heavy_idx, heavy_q)
            i = light_idx[a]
            rec_prob[i, 0] = q
            rec_alias[i, 1] = h if h < n else last
            deficit_end = end
    while h < n:  # heavies past the last light's donor: they served every light
        h, excess, next_heavy, n_heavy_buf, heavy_pos = _pass_heavy(
            weights, scale, rec_prob, rec_alias, h, excess, deficit_end, next_heavy, n_heavy_buf, heavy_pos,
            heavy_idx, heavy_q)
    return True


@_jit
def draw_alias(
    rec_prob: np.ndarray, rec_alias: np.ndarray, u: np.ndarray, coin: np.ndarray, out: np.ndarray
) -> None:
    """``out[i] = j if coin[i] < prob[j] else alias[j]`` with ``j = floor(u[i] · N)``: one gather per draw
    from the packed records (views as in ``build_alias_table``), no temporaries."""
    n = rec_prob.shape[0]
    scale = float(n)
    for i in range(u.shape[0]):
        j = np.int64(u[i] * scale)
        p = rec_prob[j, 0]
        a = rec_alias[j, 1]
        out[i] = j if coin[i] < p else a
