"""Importance-sampling rules: per-sample scores -> draw probabilities (pure functions, no Lightning).

Source: "PA&DA: Jointly Sampling PAth and DAta for Consistent NAS" (Lu et al., CVPR 2023), official code
``ShunLu91/PA-DA:nasbench201/train_panda_201.py`` (see ``../shared/METHODS.md`` §5):

* score ``s_i = ‖softmax(z_i) − onehot(y_i)‖₂`` (the per-sample gradient-norm proxy of the last layer), from the
  training forward pass;
* the score table restarts at 0 every epoch; the first visit of an epoch sets ``s_i``, a re-draw averages
  ``s ← (s_old + s_new) / 2`` (sequentially, in draw order); samples not drawn this epoch stay at 0;
* ``p_i = τ_t · s_i / Σ_j s_j + (1 − τ_t) / N`` with ``τ_t = epoch / epochs`` (a linear ramp from uniform);
* the official code trains on the plain mean loss (biased sampling); the unbiasing weights ``1 / (N p_i)``
  (self-normalised) are offered as an option.

Generalisations (ours): any score (e.g. the loss), an EMA of rate ``smoothing`` instead of the pairwise mean
(``smoothing=0.5`` *is* the pairwise mean), optional epoch reset, a power ``p ∝ s^power``, a uniform floor
``ε`` with ``p = (1 − ε)·q + ε/N`` that the ramp never goes below, and ``unseen="mean"`` to give never-scored
samples the mean score instead of 0.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_reweight.state.table import _HOST_DTYPES, Repeats

Unseen = Literal["zero", "mean"]

__all__ = [
    "gradnorm_score",
    "importance_probabilities",
    "mixing_coefficient",
    "scatter_ema_",
    "unbiasing_weights",
]


def gradnorm_score(logits: Tensor, target: Tensor) -> Tensor:
    """PA&DA's per-sample score ``‖softmax(z) − y‖₂`` (y one-hot from class ids, or given probabilities).

    Args:
        logits: ``(B, C)`` raw model outputs.
        target: ``(B,)`` integer class ids or ``(B, C)`` target probabilities.

    Returns:
        ``(B,)`` detached float32 scores in ``[0, √2]``.
    """
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"Expected argument `logits` to be a (B, C) tensor, but got {shape}.")
    logits = logits.detach().float()
    probs = logits.softmax(dim=1)
    if target.ndim == 1 and not target.is_floating_point():
        if target.numel() != logits.shape[0]:
            raise ValueError(f"Expected {logits.shape[0]} targets, but got {target.numel()}.")
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= logits.shape[1]:
            raise ValueError(
                f"Expected class ids in [0, {logits.shape[1]}), but got range [{lo}, {hi}] (ignore_index targets "
                "cannot be scored; drop them from the batch)."
            )
        onehot = F.one_hot(target.long(), logits.shape[1]).to(probs)
    elif target.shape == logits.shape:
        onehot = target.detach().to(probs)
    else:
        raise ValueError(
            f"Expected argument `target` to be (B,) class ids or (B, C) probabilities matching logits "
            f"{tuple(logits.shape)}, but got shape {tuple(target.shape)} and dtype {target.dtype}."
        )
    return torch.linalg.vector_norm(probs - onehot, dim=1)


def scatter_ema_(values: Tensor, seen: Tensor, index: Tensor, new: Tensor, rate: float,
                 repeats: Repeats | None = None, unique: bool = False) -> None:
    """In place, sequential EMA updates ``v ← (1 − rate)·v + rate·x`` of ``values[index]``, in batch order.

    A sample's first observation (``seen`` False) sets ``v = x``. Repeated indices within one call are applied
    one after the other in the order given (vectorised in closed form), exactly as a Python loop over the
    batch would. ``rate=0.5`` is PA&DA's pairwise mean; ``rate=1`` keeps the last value.

    Args:
        values: ``(N,)`` float table column (modified).
        seen: ``(N,)`` bool column, or a numeric column where ``> 0`` means seen (modified: set True / 1 at
            ``index``). Only the rows ``index`` are read and written: O(batch).
        index: ``(B,)`` long dataset indices (may repeat).
        new: ``(B,)`` new observations.
        rate: weight of a new observation, in ``(0, 1]``.
        repeats: on the CPU, where ``index`` repeats, if already known (``SampleStateTable.update`` returns
            it for the same batch): the update then needs no sort. Ignored on a GPU.
        unique: ``index`` is known not to repeat (on a GPU, ``GlobalBatch.index_info.unique``): one EMA step
            per row, no sort (the same values as the closed form).
    """
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"Expected argument `rate` (smoothing) to be in (0, 1], but got {rate!r}.")
    if index.numel() == 0:
        return
    index = index.reshape(-1).to(values.device, torch.long)
    new = new.detach().reshape(-1)
    if index.device.type != "cpu" and unique:  # one step per row, as the closed form of a single occurrence
        old = values[index].double()
        new = new.to(values.device, torch.float64)
        values[index] = torch.where(seen[index] > 0, (1.0 - rate) * old + rate * new, new).to(values.dtype)
        seen.index_fill_(0, index, True)  # not `seen[index] = True`: that copies a host scalar (a sync on CUDA)
        return
    if index.device.type != "cpu":  # fixed shapes: no host sync on a GPU
        idx_s, order = torch.sort(index, stable=True)
        _scatter_ema_fixed(values, seen, idx_s, new.to(values.device, torch.float64)[order], rate)
        return
    if repeats is None or repeats.size != index.numel():
        repeats = Repeats.of(index)
    if values.dtype in _HOST_DTYPES and seen.dtype in _HOST_SEEN:
        x = new.numpy() if new.dtype in _HOST_DTYPES and new.device.type == "cpu" else new.cpu().double().numpy()
        _scatter_ema_host(values.numpy(), seen.numpy(), index.numpy(), x.astype(np.float64, copy=False), rate, repeats)
        return
    new = new.to(values.device, torch.float64)
    keep = 1.0 - rate  # other dtypes: the same float64 steps with torch ops
    old = values.index_select(0, index).double()
    was_seen = seen.index_select(0, index) > 0
    out = torch.where(was_seen, keep * old + rate * new, new)
    if repeats.positions is not None:
        rep = {k: torch.from_numpy(getattr(repeats, k)) for k in ("positions", "group", "count", "later")}
        table = torch.from_numpy(_powers(rate, repeats.size + 1))
        half = table.numel() // 2
        row_seen = was_seen.index_select(0, rep["positions"])
        coef = table.index_select(0, rep["later"].add((rep["later"] == rep["count"] - 1) > row_seen, alpha=half))
        contrib = torch.zeros(rep["positions"].numel(), dtype=torch.float64)
        contrib.index_add_(0, rep["group"], coef * new.index_select(0, rep["positions"]))
        old_term = torch.where(row_seen, table.index_select(0, rep["count"] + half)
                               * old.index_select(0, rep["positions"]), 0.0)
        out.index_copy_(0, rep["positions"], old_term + contrib.index_select(0, rep["group"]))
    values.index_copy_(0, index, out.to(values.dtype))
    seen.index_fill_(0, index, True)


#: ``seen`` dtypes the numpy path reads and writes (``> 0`` is seen; written as True / 1)
_HOST_SEEN = (torch.bool, torch.float32, torch.float64)

_POWERS: dict[float, np.ndarray] = {}


def _powers(rate: float, length: int) -> np.ndarray:
    """``[rate·keep^k, keep^k]`` for ``k < length`` (keep = 1 − rate), flattened, float64: the closed form's
    coefficients as lookups (``torch.pow``'s values). Cached per rate, grown by doubling, so a step computes no
    power."""
    table = _POWERS.get(rate)
    if table is None or table.size < 2 * length:
        length = max(length, 0 if table is None else table.size, 16)
        powers = torch.pow(1.0 - rate, torch.arange(length, dtype=torch.float64))
        table = torch.cat([rate * powers, powers]).numpy()
        if len(_POWERS) > 64:  # a handful of rates per process; never grow without bound
            _POWERS.clear()
        _POWERS[rate] = table
    return table


def _scatter_ema_host(values: np.ndarray, seen: np.ndarray, index: np.ndarray, new: np.ndarray, rate: float,
                      repeats: Repeats) -> None:
    """``scatter_ema_`` on numpy views of CPU tensors (``new`` float64): the same float64 operations in the
    same order as the torch ops, with fewer and cheaper calls.

    A sample seen once in the batch takes one EMA step (or its first value). A sample that occurs m times
    takes the closed form ``v = keep^m·v_old + Σ_k rate·keep^(m−1−k)·x_k`` over its occurrences in batch order
    (the first term ``keep^(m−1)·x_0``, without ``rate``, when it was unseen), summed from 0 in that order."""
    keep = 1.0 - rate
    old = values[index].astype(np.float64)
    was_seen = seen[index] > 0
    out = np.where(was_seen, keep * old + rate * new, new)
    if repeats.positions is not None:
        positions, group, count, later = repeats.positions, repeats.group, repeats.count, repeats.later
        table = _powers(rate, repeats.size + 1)
        half = table.size // 2
        row_seen = was_seen[positions]
        # an unseen row's first occurrence (later == count - 1) reads keep^(m-1) from the table's second half
        coef = table[later + half * ((later == count - 1) > row_seen)]
        contrib = np.bincount(group, weights=coef * new[positions], minlength=positions.size)
        old_term = np.where(row_seen, table[count + half] * old[positions], 0.0)
        out[positions] = old_term + contrib[group]  # every copy of a row: the row's value
    values[index] = out.astype(values.dtype)
    seen[index] = True


_DEVICE_POWERS: dict[tuple[float, torch.device], Tensor] = {}
_POSITIONS: dict[tuple[int, torch.device], Tensor] = {}


def _device_powers(rate: float, length: int, device: torch.device) -> Tensor:
    """``_powers`` (the host path's coefficient table) on ``device``: copied once per rate (and when a longer
    batch needs more), so a step computes no power and both paths read the same coefficients."""
    key = (rate, device)
    table = _DEVICE_POWERS.get(key)
    if table is None or table.numel() < 2 * length:
        if len(_DEVICE_POWERS) > 64:
            _DEVICE_POWERS.clear()
        table = _DEVICE_POWERS[key] = torch.from_numpy(_powers(rate, length)).to(device)
    return table


def _positions(b: int, device: torch.device) -> Tensor:
    """``arange(1, b + 1)`` on ``device``, kept per batch size."""
    key = (b, device)
    found = _POSITIONS.get(key)
    if found is None:
        if len(_POSITIONS) > 64:
            _POSITIONS.clear()
        found = _POSITIONS[key] = torch.arange(1, b + 1, device=device)
    return found


def _scatter_ema_fixed(values: Tensor, seen: Tensor, idx_s: Tensor, new_s: Tensor, rate: float) -> None:
    """``scatter_ema_``'s closed form with fixed shapes: the repeats of a sample are the sorted positions
    between its ``searchsorted`` bounds; every repeat writes the same final value. The coefficients are looked up
    in the host path's table (``_powers``)."""
    b = idx_s.numel()
    table = _device_powers(rate, b + 1, idx_s.device)
    half = table.numel() // 2
    left = torch.searchsorted(idx_s, idx_s)
    right = torch.searchsorted(idx_s, idx_s, right=True)
    m = right - left  # repeats of this position's sample
    later = right - _positions(b, idx_s.device)  # occurrences of this position's sample after it
    was_seen = seen[idx_s] > 0
    # an unseen sample's first occurrence (later == m - 1) takes keep^(m-1), without the rate
    first_unseen = (later == m - 1) > was_seen
    coef = table[later + first_unseen * half]
    contrib = torch.zeros_like(new_s).index_add_(0, left, coef * new_s)[left]  # summed per sample
    old = values[idx_s].to(torch.float64)
    old_term = torch.where(was_seen, table[m + half] * old, 0.0)
    values[idx_s] = (old_term + contrib).to(values.dtype)
    seen.index_fill_(0, idx_s, True)  # not `seen[idx_s] = True`: that copies a host scalar (a sync on CUDA)


def mixing_coefficient(epoch: int, ramp_epochs: int | None, floor: float = 0.0) -> float:
    """Uniform mixing weight ``ε_t = max(floor, 1 − min(1, epoch / ramp_epochs))``.

    PA&DA mixes ``τ_t = epoch / epochs`` of the score distribution with ``1 − τ_t`` of uniform: pass
    ``ramp_epochs = max_epochs`` and ``floor = 0``. ``ramp_epochs=None`` (or 0) disables the ramp: ``ε = floor``.
    """
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"Expected argument `floor` to be in [0, 1], but got {floor!r}.")
    if not ramp_epochs:
        return float(floor)
    return float(max(floor, 1.0 - min(1.0, max(epoch, 0) / ramp_epochs)))


def importance_probabilities(
    scores: Tensor,
    mixing: float = 0.0,
    power: float = 1.0,
    seen: Tensor | None = None,
    unseen: Unseen = "zero",
) -> Tensor:
    """``p = (1 − ε)·s^a / Σ s^a + ε / N`` over all N samples (float64, sums to 1).

    Args:
        scores: ``(N,)`` non-negative per-sample scores (NaN = never scored, treated as unseen).
        mixing: ε in ``[0, 1]``, the uniform share (the floor: every sample keeps ``p_i >= ε/N``).
        power: exponent a > 0 (1 = proportional to the score; < 1 flattens, > 1 sharpens).
        seen: optional ``(N,)`` bool mask of scored samples.
        unseen: ``"zero"`` (PA&DA: unscored samples get only the floor) or ``"mean"`` (they get the mean score
            of the scored ones).

    If every score is 0 the result is uniform.
    """
    if not isinstance(scores, Tensor) or scores.ndim != 1 or scores.numel() == 0:
        raise ValueError("Expected argument `scores` to be a non-empty 1-D tensor (one score per sample).")
    if not 0.0 <= mixing <= 1.0:
        raise ValueError(f"Expected argument `mixing` to be in [0, 1], but got {mixing!r}.")
    if not (math.isfinite(power) and power > 0):
        raise ValueError(f"Expected argument `power` to be a positive number, but got {power!r}.")
    if unseen not in ("zero", "mean"):
        raise ValueError(f"Expected argument `unseen` to be 'zero' or 'mean', but got {unseen!r}.")
    s = scores.detach().to(torch.float64)
    known = ~torch.isnan(s) if seen is None else (seen.to(torch.bool) & ~torch.isnan(s))
    if bool((s[known] < 0).any()) or bool(torch.isinf(s[known]).any()):
        raise ValueError("Expected non-negative finite scores; got negative or infinite values.")
    s = torch.where(known, s, torch.zeros_like(s)).pow(power)
    if unseen == "mean" and bool(known.any()) and not bool(known.all()):
        s = torch.where(known, s, s[known].mean())
    n = s.numel()
    total = s.sum()
    q = s / total if float(total) > 0 else torch.full_like(s, 1.0 / n)
    return (1.0 - mixing) * q + mixing / n


def unbiasing_weights(p: Tensor, num_samples: int) -> Tensor:
    """Self-normalised importance weights ``w_i ∝ 1 / (N p_i)`` for drawn samples, averaging 1 over the batch.

    ``E_{i~p}[w_i ℓ_i] = mean_j ℓ_j`` for the unnormalised weights; self-normalising trades a small bias for
    lower variance.
    """
    if bool((p <= 0).any()):
        raise ValueError("Expected strictly positive draw probabilities for drawn samples (use a floor > 0).")
    w = 1.0 / (num_samples * p.to(torch.float64))
    return (w / w.mean()).to(torch.float32)
