"""Group and class balancing by temperature (pure functions, no Lightning).

Source: "Upsample or Upweight? Balanced Training on Heavily Imbalanced Datasets" (Li et al., NAACL 2025);
no official code, values from the paper text (see ``../shared/METHODS.md`` §3).

* Temperature sampling: ``p(g; τ) = n_g^{1/τ} / Σ_h n_h^{1/τ}``. τ = 1 is proportional sampling (plain
  shuffling), τ → ∞ is uniform over the non-empty groups (class-balanced sampling; the paper uses τ = 100 as
  "≈ uniform", ``tau=float("inf")`` is exactly uniform). Within a group samples are drawn uniformly, so the
  per-sample probability is ``p(g_i; τ) / n_{g_i}``.
* Scalarization ("upweight", Thm 1): sample proportionally and weight group g by
  ``w_g = p(g; τ) / p(g; 1)``. Both give the same expected gradient; upweighting has the higher variance
  (Thm 2-3). Under proportional sampling the weights average exactly 1: ``Σ_g p(g; 1) w_g = 1``.
* **Cooldown**: τ = 5 for the first half of training, then τ = 1 (``tau_start=5, tau_end=1,
  switch_fraction=0.5, shape="step"``). The paper found this single sparse switch better than a dense gradual
  decay; ``shape="linear"`` / ``"cosine"`` are offered for comparison only and are *worse in the paper*.

Groups with ``n_g = 0`` get probability 0 and weight 0 (they cannot be drawn).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Shape = Literal["step", "linear", "cosine"]
ScheduleName = Literal["constant", "cooldown"]

__all__ = [
    "SCHEDULES",
    "TemperatureSchedule",
    "check_counts",
    "check_groups",
    "check_tau",
    "cooldown_tau",
    "create_schedule",
    "group_counts",
    "sample_probabilities",
    "temperature_distribution",
    "upweight_factors",
]


def check_tau(tau: float, name: str = "tau") -> float:
    """Validate a temperature: a positive number (``inf`` allowed: uniform over groups)."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or math.isnan(tau) or tau <= 0:
        raise ValueError(
            f"Expected argument `{name}` to be a positive number (1 = proportional, float('inf') = uniform over "
            f"groups), but got {tau!r}."
        )
    return float(tau)


def check_counts(counts: Tensor | Sequence[float] | np.ndarray, name: str = "counts") -> Tensor:
    """Validate per-group sample counts: 1-D, finite, ``>= 0``, not all zero. Returns float64."""
    if isinstance(counts, Tensor):
        c = counts.detach().to("cpu", torch.float64)
    else:
        try:
            c = torch.as_tensor(np.asarray(counts, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise TypeError(f"Expected argument `{name}` to be a 1-D sequence of numbers, but got {counts!r}.") from err
    if c.ndim != 1 or c.numel() == 0:
        raise ValueError(
            f"Expected argument `{name}` to be a non-empty 1-D tensor (one count per group), but got shape "
            f"{tuple(c.shape)}."
        )
    if not bool(torch.isfinite(c).all()) or bool((c < 0).any()):
        bad = c[~torch.isfinite(c) | (c < 0)][:5].tolist()
        raise ValueError(f"Expected argument `{name}` to hold finite counts >= 0, but got {bad}.")
    if not bool((c > 0).any()):
        raise ValueError(f"Expected argument `{name}` to have at least one non-empty group, but all counts are 0.")
    return c


def group_counts(groups: Tensor, num_groups: int | None = None) -> Tensor:
    """Counts ``n_g`` of an integer group/class id per sample (ids must be ``>= 0``). Returns float64."""
    groups = check_groups(groups, num_groups)
    return torch.bincount(groups, minlength=num_groups or 0).to(torch.float64)


def check_groups(
    groups: Tensor | Sequence[int] | np.ndarray,
    num_groups: int | None = None,
    ignore_index: int | None = None,
    name: str = "groups",
    *,
    allow_empty: bool = False,
) -> Tensor:
    """The one validator of per-sample group (or class) ids; returns them as int64 on their device.

    Valid ids are ``0 .. num_groups − 1`` (any id ``>= 0`` when ``num_groups`` is ``None``) and
    ``ignore_index`` when it is not ``None`` (negative, e.g. −1, or ``>= num_groups``, e.g. 255).

    Raises:
        TypeError: float, bool or complex ids (``0.9`` must not silently become group 0), or not array-like.
        ValueError: not 1-D, empty (unless ``allow_empty``), ``num_groups`` not a positive int, an
            ``ignore_index`` that is also a valid group id, or an id outside the valid set (the message
            names the bad ids and the fix).
    """
    if not isinstance(groups, Tensor):
        try:
            groups = torch.as_tensor(np.asarray(groups))
        except (TypeError, ValueError) as err:
            raise TypeError(f"Expected argument `{name}` to be a tensor of integer ids, but got {groups!r}.") from err
    if num_groups is not None and (not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1):
        raise ValueError(f"Expected argument `num_groups` to be a positive int, but got {num_groups!r}.")
    if groups.is_floating_point() or groups.is_complex() or groups.dtype == torch.bool:
        raise TypeError(
            f"Expected argument `{name}` to hold integer ids, but got dtype {groups.dtype}. Convert the ids "
            f"explicitly (e.g. `{name}.long()` after checking they are whole numbers); float or bool ids are "
            "refused because a cast would silently truncate them (0.9 -> 0)."
        )
    if groups.ndim != 1 or (groups.numel() == 0 and not allow_empty):
        raise ValueError(
            f"Expected argument `{name}` to be a non-empty 1-D tensor (one id per sample), but got shape "
            f"{tuple(groups.shape)}."
        )
    if ignore_index is not None and num_groups is not None and 0 <= ignore_index < num_groups:
        raise ValueError(
            f"Expected `ignore_index` outside the group ids [0, {num_groups}), but got {ignore_index}. Use a "
            "negative id (e.g. -1) or one >= num_groups (e.g. 255)."
        )
    groups = groups.detach().long()
    if groups.numel() == 0:
        return groups
    if ignore_index is None:
        lo, hi = groups.aminmax()
        lo, hi = int(lo), int(hi)
        if lo < 0:
            raise ValueError(
                f"Expected argument `{name}` to hold ids >= 0, but got {lo}. Drop or relabel samples with an "
                "unknown group (e.g. -1) before balancing, or pass `ignore_index` where it is supported."
            )
        if num_groups is not None and hi >= num_groups:
            raise ValueError(
                f"Expected argument `{name}` to hold ids < num_groups={num_groups}, but got {hi}. Set "
                "`num_groups` to the number of groups in the data set (max id + 1)."
            )
        return groups
    bad = (groups < 0) | (groups >= num_groups) if num_groups is not None else groups < 0
    bad &= groups != ignore_index
    if bool(bad.any()):
        values = torch.unique(groups[bad])[:5].tolist()
        allowed = (f"[0, {num_groups})" if num_groups is not None else ">= 0") + f" or ignore_index={ignore_index}"
        raise ValueError(
            f"Expected argument `{name}` to hold ids in {allowed}, but got {values}. Set `num_groups` to the "
            "number of groups in the data set (max id + 1) and mark unknown groups with the ignore_index."
        )
    return groups


def temperature_distribution(counts: Tensor | Sequence[float], tau: float) -> Tensor:
    """``p(g; τ) = n_g^{1/τ} / Σ_h n_h^{1/τ}`` (float64, sums to 1; empty groups get 0).

    Computed in log space, so large counts with small τ do not overflow.

    Example::

        >>> temperature_distribution([900, 100], tau=2.0)   # sqrt: 30/(30+10), 10/(30+10)
        tensor([0.7500, 0.2500], dtype=torch.float64)
    """
    c = check_counts(counts)
    tau = check_tau(tau)
    logits = torch.full_like(c, -math.inf)
    nonzero = c > 0
    logits[nonzero] = c[nonzero].log() / tau
    return torch.softmax(logits, dim=0)


def upweight_factors(counts: Tensor | Sequence[float], tau: float) -> Tensor:
    """Scalarization weights ``w_g = p(g; τ) / p(g; 1)`` (float64; empty groups get 0).

    Sampling proportionally and weighting the loss of group g by ``w_g`` has the same expected gradient as
    temperature sampling at τ (the paper's Thm 1): ``p(g; τ) = p(g; 1) · w_g``. The weights average 1 under
    proportional sampling.
    """
    c = check_counts(counts)
    p_tau = temperature_distribution(c, tau)
    p_one = c / c.sum()
    return torch.where(c > 0, p_tau / p_one.clamp_min(1e-300), torch.zeros_like(c))


def sample_probabilities(groups: Tensor, tau: float, num_groups: int | None = None) -> Tensor:
    """Per-sample draw probabilities ``p(g_i; τ) / n_{g_i}`` for temperature sampling (float64, sums to 1)."""
    groups = check_groups(groups, num_groups)
    counts = torch.bincount(groups, minlength=num_groups or 0).to(torch.float64)
    p = temperature_distribution(counts, tau)
    per_group = torch.where(counts > 0, p / counts.clamp_min(1), torch.zeros_like(p))
    return per_group[groups]


def cooldown_tau(
    progress: float,
    tau_start: float = 5.0,
    tau_end: float = 1.0,
    switch_fraction: float = 0.5,
    shape: Shape = "step",
) -> float:
    """The Cooldown temperature τ at ``progress = t / T`` in ``[0, 1]``.

    ``shape="step"`` (the paper): ``tau_start`` while ``progress < switch_fraction``, then ``tau_end``.
    ``"linear"`` / ``"cosine"`` (gradual decays, worse in the paper) move from ``tau_start`` to ``tau_end``
    over a window centred on ``switch_fraction`` with half-width ``min(switch_fraction, 1 − switch_fraction)``
    (for the default 0.5: the whole run), so their time-average τ equals the step's. ``inf`` temperatures are
    only allowed with ``shape="step"``.
    """
    check_tau(tau_start, "tau_start")
    check_tau(tau_end, "tau_end")
    _check_switch(switch_fraction)
    if shape not in ("step", "linear", "cosine"):
        raise ValueError(f"Expected argument `shape` to be one of ['cosine', 'linear', 'step'], but got {shape!r}.")
    if not (isinstance(progress, (int, float)) and math.isfinite(progress)):
        raise ValueError(f"Expected argument `progress` to be a finite number in [0, 1], but got {progress!r}.")
    progress = min(max(float(progress), 0.0), 1.0)
    if shape == "step":
        return float(tau_start if progress < switch_fraction else tau_end)
    if math.isinf(tau_start) or math.isinf(tau_end):
        raise ValueError(f"Expected finite `tau_start`/`tau_end` for shape={shape!r}, but got {tau_start}, {tau_end}.")
    half = min(switch_fraction, 1.0 - switch_fraction)
    lo, hi = switch_fraction - half, switch_fraction + half
    frac = 0.0 if progress <= lo else 1.0 if progress >= hi else (progress - lo) / (hi - lo)
    if shape == "cosine":
        frac = 0.5 * (1.0 - math.cos(math.pi * frac))
    return float(tau_start + (tau_end - tau_start) * frac)


def _check_switch(switch_fraction: float) -> None:
    if not (isinstance(switch_fraction, (int, float)) and 0.0 < switch_fraction < 1.0):
        raise ValueError(f"Expected argument `switch_fraction` to be in (0, 1), but got {switch_fraction!r}.")


class TemperatureSchedule:
    """τ as a function of training progress: ``constant`` (``tau``) or ``cooldown`` (``tau_start`` -> ``tau_end``).

    Args:
        schedule: ``"constant"`` or ``"cooldown"``.
        tau: the constant temperature (``schedule="constant"``); ``inf`` = uniform over groups.
        tau_start, tau_end, switch_fraction, shape: Cooldown parameters (paper: 5, 1, 0.5, ``"step"``).

    Example::

        >>> s = TemperatureSchedule("cooldown")
        >>> s(0.0), s(0.49), s(0.5), s(1.0)
        (5.0, 5.0, 1.0, 1.0)
    """

    def __init__(
        self,
        schedule: ScheduleName = "constant",
        tau: float = 1.0,
        tau_start: float = 5.0,
        tau_end: float = 1.0,
        switch_fraction: float = 0.5,
        shape: Shape = "step",
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"Expected argument `schedule` to be one of {sorted(SCHEDULES)}, but got {schedule!r}.")
        self.schedule = schedule
        self.tau = check_tau(tau)
        self.tau_start, self.tau_end = check_tau(tau_start, "tau_start"), check_tau(tau_end, "tau_end")
        _check_switch(switch_fraction)
        self.switch_fraction, self.shape = float(switch_fraction), shape
        cooldown_tau(0.0, self.tau_start, self.tau_end, self.switch_fraction, shape)  # validates the shape

    def __call__(self, progress: float) -> float:
        if self.schedule == "constant":
            return self.tau
        return cooldown_tau(progress, self.tau_start, self.tau_end, self.switch_fraction, self.shape)

    def __repr__(self) -> str:
        if self.schedule == "constant":
            return f"TemperatureSchedule('constant', tau={self.tau})"
        return (
            f"TemperatureSchedule('cooldown', tau_start={self.tau_start}, tau_end={self.tau_end}, "
            f"switch_fraction={self.switch_fraction}, shape={self.shape!r})"
        )


#: names accepted by ``create_schedule`` / ``TemperatureSchedule(schedule=...)``
SCHEDULES: tuple[str, ...] = ("constant", "cooldown")


def create_schedule(name: str, **kwargs: float | str) -> TemperatureSchedule:
    """Build a temperature schedule by name (``"constant"`` or ``"cooldown"``); unknown names list the valid ones."""
    if name not in SCHEDULES:
        raise ValueError(f"Unknown temperature schedule {name!r}. Expected one of {sorted(SCHEDULES)}.")
    return TemperatureSchedule(name, **kwargs)  # type: ignore[arg-type]
