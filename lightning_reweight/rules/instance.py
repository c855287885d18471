"""Instance-level loss-based weight rules (pure functions, no Lightning).

Every rule maps a 1-D tensor of per-sample losses (the *global* batch under DDP) to non-negative weights.
Weights are detached and, unless stated otherwise, average 1 over the batch, so that
``mean(w * loss)`` is on the same scale as the plain mean loss.

Sources (equations and defaults, see ``../shared/METHODS.md``):

* "Dynamic Loss-Based Sample Reweighting for Improved LLM Pretraining" (Sow et al., ICLR 2025):
  min-max normalisation ``x_i = δ(2ℓ_i − ℓ_max − ℓ_min) / max(ℓ_max − ℓ_min, 1e-6)`` into ``[−δ, δ]``,
  a strategy score ``f(x)`` — **LinUpper** ``min(x + δ, δ)``, **Quadratic** ``1 − x²/δ²``,
  **Extremes** ``|x|`` — and ``w = B · softmax(f(x) / r)`` (closed form of
  ``max_w Σ w_i f_i − r·KL(w‖uniform)``). Defaults: δ = 1, r = 0.4.
* "Doubly Robust Instance-Reweighted Adversarial Training" (Sow et al., ICLR 2024): the KL-regularised DRO
  tilt ``w ∝ exp(ℓ_i / r)`` on raw losses; r = 1.0 by default (the paper gives none; the same group's
  IR-DRO code uses 1). ``normalizer="ema"`` tracks the normaliser ``(1/n) Σ exp(ℓ/r)`` by a running
  average (the paper's compositional-optimisation view); the EMA rate 0.1 is ours.

``direction="down"`` negates the score (``w ∝ exp(−f/r)``): the noisy-label variant that de-prioritises
high-loss samples. For ``kl_dro`` this is the negative tilt ``exp(−ℓ/r)``; for ``linupper`` weights then
fall as the loss rises below the mid-range and stay flat above it; for the symmetric ``quadratic`` and
``extremes`` it swaps their roles (up-weights / down-weights both extremes).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_reweight._numba import LazyKernels

Direction = Literal["up", "down"]
Strategy = Literal["linupper", "quadratic", "extremes"]

__all__ = [
    "check_losses",
    "minmax_normalize",
    "linupper_score",
    "quadratic_score",
    "extremes_score",
    "softmax_weights",
    "loss_based_weights",
    "kl_dro_weights",
    "effective_sample_size",
    "clip_weights",
]


def all_finite(values: Tensor) -> bool:
    """Whether every value of a CPU tensor is finite, read on the host: a finite sum proves it with one reduction;
    only a non-finite sum (a NaN/inf, or finite values whose sum overflows) takes the element-wise check."""
    return math.isfinite(values.sum().item()) or bool(torch.isfinite(values).all())


def check_losses(losses: Tensor) -> Tensor:
    """Validate per-sample losses: 1-D, floating, finite. Returns them detached as float32."""
    if not isinstance(losses, Tensor):
        raise TypeError(f"Expected argument `losses` to be a torch.Tensor, but got {type(losses).__name__}.")
    if losses.ndim != 1:
        raise ValueError(
            f"Expected argument `losses` to be 1-D (one loss per sample), but got shape {tuple(losses.shape)}. "
            "Compute the loss with `reduction='none'` and average any per-pixel/token dimensions per sample."
        )
    if not losses.is_floating_point():
        raise TypeError(f"Expected argument `losses` to be a floating tensor, but got dtype {losses.dtype}.")
    finite = torch.isfinite(losses)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"Expected finite per-sample losses, but got NaN/inf at batch positions {bad}. No weight or state "
            "was updated. Check the model/inputs (e.g. lower the learning rate, clip gradients, or filter bad samples)."
        )
    return losses.detach().float()


def minmax_normalize(losses: Tensor, delta: float = 1.0, eps: float = 1e-6, *, traceable: bool = False) -> Tensor:
    """Map losses into ``[−δ, δ]``: ``δ(2ℓ − ℓ_max − ℓ_min) / max(ℓ_max − ℓ_min, eps)``.

    All-equal losses map to 0 (then every strategy gives uniform weights). ``traceable=True``: the device path's
    tensor operations on any device, without its shared range cache (so ``torch.compile`` can trace it). The range and the scale are
    Python floats (on the CPU; 0-d float64 tensors elsewhere, without a host read) and the result is formed as ``ℓ·(2δ/range) − (ℓ_max + ℓ_min)·δ/range`` (float64 when that
    could overflow), so finite but huge losses (e.g. ``3e38`` in float32) cannot overflow
    ``2ℓ − ℓ_max − ℓ_min``; returned in the losses' dtype (the result lies in ``[−δ, δ]``).
    """
    if traceable:  # the device path's numbers without its shared range (``torch.compile`` traces no cache)
        x = losses.double()
        return _minmax_tensors(losses, x, *x.aminmax(), delta, eps)
    if losses.device.type != "cpu":  # tensor ops only: no host synchronisation on a GPU
        return _minmax_normalize_device(losses, delta, eps)
    lo, hi = (float(v) for v in losses.aminmax())
    scale = delta / max(hi - lo, eps)  # Python floats: no overflow for huge finite losses
    # 2·scale·ℓ stays within ±(2δ + |ℓ_max + ℓ_min|·scale); compute in float64 only if that could overflow
    x = losses if max(abs(hi), abs(lo)) * 2 * scale < 1e30 else losses.double()
    return x.mul(2 * scale).sub_((hi + lo) * scale).to(losses.dtype)


_RANGE: list[Any] = []  # the last device tensor's (tensor, version, float64 copy, min, max): ``double_range``


def double_range(losses: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(losses.double(), min, max)`` of a device tensor (``min``/``max`` float64 0-d, a NaN in both), computed
    once per tensor: the step's finite check (``reduce_loss``) and a rule's min-max normalisation or tilt of the
    same losses share the conversion and the reduction (two kernels, not four). Recomputed when the tensor was
    modified in place since."""
    if _RANGE and _RANGE[0] is losses and _RANGE[1] == losses._version:
        return _RANGE[2], _RANGE[3], _RANGE[4]
    x = losses.double()
    lo, hi = x.aminmax()
    _RANGE[:] = [losses, losses._version, x, lo, hi]
    return x, lo, hi


def _minmax_normalize_device(losses: Tensor, delta: float, eps: float) -> Tensor:
    """``minmax_normalize`` with tensor ops only (float64, no host read): the path of losses on a GPU. Device
    agnostic, so the tests run it on CPU tensors."""
    return _minmax_tensors(losses, *double_range(losses), delta, eps)


def _minmax_tensors(losses: Tensor, x: Tensor, lo_t: Tensor, hi_t: Tensor, delta: float, eps: float) -> Tensor:
    """``minmax_normalize`` with 0-d tensors for the range (no host read): ``x`` is ``losses`` in float64 and
    ``lo_t``/``hi_t`` its min and max. ``δ/range`` is the reciprocal times δ, as ``delta / t`` computes it; times
    2 is exact, so ``2δ/range`` takes one op from the same reciprocal (and ``δ = 1`` none)."""
    inverse = (hi_t - lo_t).clamp_min(eps).reciprocal()
    scale_t = inverse if delta == 1.0 else inverse * delta
    return (x * (inverse * (2.0 * delta)) - (hi_t + lo_t) * scale_t).to(losses.dtype)


def linupper_score(x: Tensor, delta: float = 1.0) -> Tensor:
    """LinUpper: ``min(x + δ, δ)`` — linear below the mid-range, capped above (de-prioritises easy samples)."""
    return torch.clamp(x + delta, max=delta)


def quadratic_score(x: Tensor, delta: float = 1.0) -> Tensor:
    """Quadratic: ``1 − x²/δ²`` — down-weights both the lowest and the highest losses."""
    return 1 - x.square() / delta**2


def extremes_score(x: Tensor, delta: float = 1.0) -> Tensor:
    """Extremes: ``|x|`` — up-weights both extremes."""
    return x.abs()


_SCORES = {"linupper": linupper_score, "quadratic": quadratic_score, "extremes": extremes_score}


def softmax_weights(scores: Tensor, temperature: float) -> Tensor:
    """``B · softmax(scores / temperature)``: non-negative, mean 1, max-subtracted for stability.

    Computed in the scores' dtype (``torch.softmax`` subtracts the max; pass float64 scores when
    ``scores / temperature`` could overflow, as the KL-DRO tilt does).
    """
    z = scores / temperature
    return torch.softmax(z, dim=0).mul_(scores.numel()).to(scores.dtype)  # softmax subtracts the max itself


def loss_based_weights(
    losses: Tensor,
    strategy: Strategy = "linupper",
    delta: float = 1.0,
    r: float = 0.4,
    direction: Direction = "up",
    *,
    traceable: bool = False,
) -> Tensor:
    """Sow et al. (ICLR 2025) weights: ``B · softmax(±f(minmax(ℓ)) / r)``. Mean 1, non-negative.

    ``traceable=True``: tensor operations only on any device (the GPU path's numbers), no host read and no shared
    cache, so ``torch.compile`` can trace it."""
    if strategy not in _SCORES:
        raise ValueError(f"Expected argument `strategy` to be one of {sorted(_SCORES)}, but got {strategy!r}.")
    score = _SCORES[strategy](minmax_normalize(losses, delta, traceable=traceable), delta)
    return softmax_weights(score if direction == "up" else -score, r)


def kl_dro_weights(
    losses: Tensor,
    r: float = 1.0,
    direction: Direction = "up",
    log_normalizer: Tensor | float | None = None,
    *,
    traceable: bool = False,
) -> Tensor:
    """KL-DRO tilt ``w_i = exp(±ℓ_i / r) / Z``.

    With ``log_normalizer=None`` ``Z`` is the batch mean (weights average exactly 1); otherwise ``Z =
    exp(log_normalizer)`` (e.g. a running estimate of ``mean_i exp(±ℓ_i/r)`` over the data set).
    ``traceable=True``: no shared cache, so ``torch.compile`` can trace it.
    """
    z = _tilt(losses, r, direction, traceable)
    if log_normalizer is None:
        return softmax_weights(z, 1.0).to(losses.dtype)
    if not isinstance(log_normalizer, Tensor):
        log_normalizer = float(log_normalizer)
    return torch.exp(z - log_normalizer).to(losses.dtype)


def _tilt(losses: Tensor, r: float, direction: Direction, traceable: bool = False) -> Tensor:
    """``±ℓ/r`` in float64 (no overflow for huge finite losses); on a device from the step's shared float64 copy,
    unless ``traceable`` (``torch.compile`` traces no cache)."""
    z = (losses.double() if traceable or losses.device.type == "cpu" else double_range(losses)[0]) / r
    return z if direction == "up" else -z


def log_mean_exp(z: Tensor) -> Tensor:
    """``log(mean(exp(z)))`` computed stably."""
    return torch.logsumexp(z, dim=0) - math.log(z.numel())


def clip_weights(weights: Tensor, max_weight: float | None, renormalize: bool = True) -> Tensor:
    """Clip weights at ``max_weight`` (in mean-1 units), then (``renormalize=True``) renormalise to mean 1 once.

    ``renormalize=False`` only clips: for weights whose scale is part of the method (KL-DRO with the EMA
    normaliser), where renormalising would cancel the normaliser.
    """
    if max_weight is None:
        return weights
    clipped = torch.clamp(weights, max=max_weight)
    if not renormalize:
        return clipped
    return clipped * (weights.numel() / clipped.sum().clamp_min(1e-12))


def effective_sample_size(weights: Tensor, unit_mass: bool = False) -> Tensor:
    """Kish's effective sample size ``(Σw)² / Σw²`` (equals B for uniform weights).

    With ``unit_mass=True`` (weights whose scale matters, e.g. KL-DRO with the EMA normaliser) it is
    ``min((Σw)² / Σw², Σw)``: also the number of unit-weight samples the batch's total weight is worth,
    so uniformly tiny weights (every sample counts ~0) show up as a collapse too.
    """
    w = weights.detach().double()
    total = w.sum()
    ess = total.square() / w.dot(w).clamp_min(1e-300)
    if unit_mass:
        ess = torch.minimum(ess, total)
    return ess.float()


# Use the compiled numba kernels (``_kernels``) for the CPU steps of the KL-DRO EMA normaliser, AdaWAC and the
# ESS of a CPU batch when numba is importable; False forces the vectorised numpy/torch paths.
USE_NUMBA = True
_KERNELS = LazyKernels("lightning_reweight.rules._kernels")


def host_kernels() -> Any:
    """The ``rules._kernels`` module (imported on first use), or None when numba is missing or ``USE_NUMBA`` is
    False."""
    return _KERNELS.get() if USE_NUMBA else None
