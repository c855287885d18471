"""Group-fairness kernels: FEBS (FairSeg) and GroupDRO (pure functions, no Lightning).

Sources (equations and defaults, see ``../shared/METHODS.md`` §8-§9):

* "FairSeg: A Large-Scale Medical Image Segmentation Dataset for Fairness Learning Using Segment Anything
  Model with Fair Error-Bound Scaling" (Tian et al., ICLR 2024). Each group g present in the batch gets an
  error bound ``L_g`` (segmentation: ``Σ_c`` soft-Dice loss over the pooled pixels of g's samples) and the
  scale ``w_g = tanh((min_h L_h / L_g)^γ)``, γ = 1: the easiest group gets ``tanh(1) ≈ 0.76``, harder
  groups less. FEBS-Dice multiplies ``w_g`` into each sample's *probabilities* inside the soft Dice loss.
  Ours (documented fixes): the min runs over groups *present* in the batch (the official code takes it over
  a zero-initialised array of all groups, so one absent group zeroes every weight), group ids are
  validated, and ``ignore_index`` (−1, "unknown") samples are left out of the group statistics and left
  unscaled (the official code wraps −1 to the last group).
* "Distributionally Robust Neural Networks for Group Shifts" (Sagawa et al., ICLR 2020): online
  exponentiated-gradient group weights ``q ← q·exp(η·ℓ_g)``, renormalised, η = 0.01, with the optional
  generalisation adjustment ``ℓ_g + C_g/√n_g`` (``n_g`` = training-set counts). The update comes *before*
  the loss of the same step (official order). Ours: the adjustment is applied per group (the official code
  applies it only when every ``C_g > 0``).

All functions are vectorised over samples (``index_add`` / ``bincount``); loops run over groups or classes
only where stated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_reweight.rules.balance import check_groups

__all__ = [
    "check_groups",
    "group_sums",
    "group_means",
    "update_group_errors",
    "febs_group_scales",
    "febs_loss_multipliers",
    "soft_dice_stats",
    "group_dice_errors",
    "scaled_dice_loss",
    "febs_dice_loss",
    "dro_adjustment",
    "group_dro_update",
    "group_dro_sample_weights",
    "sample_scales",
]


# ---------------------------------------------------------------------------------------------- groups
# ``check_groups`` is the one group-id validator (``rules.balance``), re-exported here.


def _xp(x: Any) -> Any:
    """The array module of ``x``: the per-group kernels run on torch tensors or, on the CPU hot path of
    the callbacks (a handful of groups, where torch's per-op overhead dominates), on numpy arrays."""
    return np if isinstance(x, np.ndarray) else torch


def _f64(x: Any) -> Any:
    return x.astype(np.float64, copy=False) if isinstance(x, np.ndarray) else x.detach().to(torch.float64)


def _bucket(group: Tensor, num_groups: int, ignore_index: int | None) -> Tensor:
    """Ids with every ``ignore_index`` sample sent to the extra bucket ``num_groups`` (no masked copies)."""
    if ignore_index is None:
        return group
    return torch.where(group == ignore_index, torch.full_like(group, num_groups), group)


def group_sums(
    values: Tensor, group: Tensor, num_groups: int, ignore_index: int | None = -1
) -> tuple[Tensor, Tensor]:
    """Per-group sums of ``values`` along dim 0 and per-group counts (``ignore_index`` rows excluded).

    Args:
        values: ``(B, ...)`` per-sample values.
        group: ``(B,)`` int64 ids (already validated).

    Returns:
        ``sums`` of shape ``(num_groups, ...)`` and ``counts`` of shape ``(num_groups,)`` (int64).
    """
    idx = _bucket(group, num_groups, ignore_index)
    counts = torch.bincount(idx, minlength=num_groups + 1)[:num_groups]
    if values.ndim == 1:
        sums = torch.bincount(idx, weights=values, minlength=num_groups + 1)[:num_groups].to(values.dtype)
    else:
        sums = values.new_zeros((num_groups + 1, *values.shape[1:])).index_add_(0, idx, values)[:num_groups]
    return sums, counts


def group_means(
    values: Tensor, group: Tensor, num_groups: int, ignore_index: int | None = -1
) -> tuple[Tensor, Tensor]:
    """Per-group means (0 for groups absent from the batch, as the official GroupDRO code) and counts."""
    sums, counts = group_sums(values, group, num_groups, ignore_index)
    denom = counts.clamp_min(1).to(sums.dtype).reshape(-1, *([1] * (sums.ndim - 1)))
    return sums / denom, counts


def update_group_errors(
    errors: Tensor, seen: Tensor, batch_errors: Tensor, present: Tensor, momentum: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Running per-group errors: ``e_g ← (1 − m)·e_g + m·e_g^batch`` for groups present in the batch.

    A group's first observation sets its value; absent groups keep theirs. ``momentum = 1`` keeps only the
    current batch (FairSeg's per-batch rule). Returns new ``(errors, seen)`` (torch tensors or numpy arrays,
    as given).
    """
    xp = _xp(errors)
    batch_errors = batch_errors.astype(errors.dtype) if xp is np else batch_errors.to(errors.dtype)
    if momentum == 1.0:  # the blend is the batch's error itself (0·e + e_batch): four kernels fewer on a GPU
        return xp.where(present, batch_errors, errors), seen | present
    blended = xp.where(seen, (1 - momentum) * errors + momentum * batch_errors, batch_errors)
    return xp.where(present, blended, errors), seen | present


# ------------------------------------------------------------------------------------------------ FEBS
def febs_group_scales(errors: Tensor, present: Tensor, gamma: float = 1.0, eps: float = 1e-12) -> Tensor:
    """FEBS scales ``w_g = tanh((min_{h present} L_h / L_g)^γ)`` for present groups, 1 for absent ones.

    The min runs over the groups present in the batch only (ours; see the module docstring). A group with
    error 0 gets ratio 1 (it is the easiest). ``eps`` guards the division. Float64 torch tensor or numpy
    array, as given.
    """
    xp = _xp(errors)
    errors = _f64(errors)
    if not bool(present.any()):
        return xp.ones_like(errors)
    lo = errors[present].min()
    ratio = xp.where(errors > eps, lo / errors.clip(min=eps), xp.ones_like(errors))
    scales = xp.tanh(ratio.clip(min=0) ** gamma)
    return xp.where(present, scales, xp.ones_like(scales))


def febs_loss_multipliers(
    scales: Tensor, group: Tensor, ignore_index: int | None = -1, min_scale: float = 1e-6,
    counts: Tensor | None = None,
) -> Tensor:
    """Per-sample loss multipliers for classification: ``m_i ∝ 1/w_{g_i}``, mean 1 over grouped samples.

    This is our generalisation of FEBS to losses without a Dice term (scaling a probability inside
    cross-entropy only adds a constant, and ``w_g`` used directly would down-weight the hard groups).
    Samples with ``ignore_index`` keep multiplier 1, so the batch mean stays exactly 1. Scales are floored at
    ``min_scale`` to keep the multipliers finite. ``counts`` (per-group sample counts of this batch) saves
    recounting them.
    """
    num_groups = scales.shape[0]
    idx = _bucket(group, num_groups, ignore_index)
    if counts is None:
        counts = torch.bincount(idx, minlength=num_groups + 1)[:num_groups]
    counts = counts.to(scales.device, torch.float64)
    total = float(counts.sum())
    if total == 0:
        return torch.ones(group.shape[0], dtype=torch.float32, device=group.device)
    inv = 1.0 / scales.double().clamp_min(min_scale)
    mean = (inv * counts).sum() / total
    per_group = torch.cat([inv / mean, inv.new_ones(1)])  # the extra bucket: ignore_index samples keep 1
    return per_group.to(group.device)[idx].float()


def check_class_ids(target: Tensor, num_classes: int) -> Tensor:
    """Validate integer class ids in ``[0, num_classes)``; returns them as long."""
    if target.is_floating_point():
        raise TypeError(
            f"Expected argument `target` to hold integer class ids, but got dtype {target.dtype}; pass labels as "
            "an integer tensor (e.g. `target.long()`), or one-hot targets of the probabilities' shape."
        )
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(
            f"Expected argument `target` to hold class ids in [0, {num_classes}), but got values in "
            f"[{int(target.min())}, {int(target.max())}]; the probabilities need one channel per class (background included)."
        )
    return target.long()


def _one_hot_target(target: Tensor, num_classes: int) -> Tensor:
    """``(B, *)`` integer labels -> ``(B, C, *)`` float one-hot."""
    return F.one_hot(check_class_ids(target, num_classes), num_classes).movedim(-1, 1).float()


def soft_dice_stats(probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample, per-class soft-Dice sums over the spatial dims.

    Args:
        probs: ``(B, C, *spatial)`` class probabilities.
        target: ``(B, *spatial)`` integer labels or ``(B, C, *spatial)`` one-hot.

    Returns:
        ``(I, Z, Y)`` each ``(B, C)``: ``I = Σ p·t``, ``Z = Σ p²``, ``Y = Σ t²`` (squared-denominator Dice).
    """
    if probs.ndim < 2:
        raise ValueError(
            f"Expected argument `probs` to have shape (B, C, ...), but got {tuple(probs.shape)}; pass the softmax "
            "probabilities with the class channel at dim 1."
        )
    if target.shape != probs.shape:
        target = _one_hot_target(target, probs.shape[1])
        if target.shape != probs.shape:
            raise ValueError(
                f"Expected `target` of shape {tuple(probs.shape[:1] + probs.shape[2:])} (labels) or "
                f"{tuple(probs.shape)} (one-hot), but got {tuple(target.shape)}; pass one label map per sample."
            )
    target = target.to(probs.dtype)
    dims = tuple(range(2, probs.ndim))
    return (probs * target).sum(dims), (probs * probs).sum(dims), (target * target).sum(dims)


def _dice_loss_from_stats(inter: Tensor, z: Tensor, y: Tensor, smooth: float) -> Tensor:
    return 1 - (2 * inter + smooth) / (z + y + smooth)


def group_dice_errors(
    inter: Tensor, z: Tensor, y: Tensor, group: Tensor, num_groups: int, smooth: float = 1e-5,
    ignore_index: int | None = -1,
) -> tuple[Tensor, Tensor]:
    """FairSeg's group error bound ``L_g = Σ_c (1 − Dice_c)`` over the pooled pixels of g's samples.

    Args:
        inter, z, y: ``(B, C)`` statistics from :func:`soft_dice_stats` (detached here).
        group: ``(B,)`` validated group ids.

    Returns:
        ``(L, counts)``: ``(num_groups,)`` errors (0 for absent groups) and sample counts.
    """
    stats = torch.stack([inter, z, y], dim=-1).detach()  # (B, C, 3)
    sums, counts = group_sums(stats, group, num_groups, ignore_index)
    errors = _dice_errors_from_group_sums(sums, smooth)
    return torch.where(counts > 0, errors, torch.zeros_like(errors)), counts  # 0, also when smooth = 0 (0/0)


def _dice_errors_from_group_sums(sums: Tensor, smooth: float) -> Tensor:
    """``(G, C, 3)`` pooled ``(I, Z, Y)`` sums -> ``(G,)`` summed per-class Dice losses."""
    return _dice_loss_from_stats(sums[..., 0], sums[..., 1], sums[..., 2], smooth).sum(-1)


def scaled_dice_loss(
    inter: Tensor, z: Tensor, y: Tensor, sample_scale: Tensor | None = None, smooth: float = 1e-5,
    class_weights: Sequence[float] | Tensor | None = None, reduction: str = "batch",
) -> Tensor:
    """Soft Dice loss with each sample's probabilities multiplied by ``sample_scale`` (FEBS-Dice).

    Scaling ``p → s·p`` turns ``I → s·I`` and ``Z → s²·Z``, so the scaled loss is computed from the
    per-sample statistics without touching the pixels again.

    Args:
        reduction: ``"batch"`` pools the pixels of the whole batch per class (FairSeg and TransUNet),
            returning a scalar ``Σ_c k_c (1 − Dice_c) / C``; ``"none"`` returns one such loss per sample
            ``(B,)`` (for the per-sample loss contract).
    """
    if sample_scale is not None:
        s = sample_scale.to(inter.dtype).reshape(-1, 1)
        inter, z = inter * s, z * s * s
    if reduction == "batch":
        inter, z, y = inter.sum(0), z.sum(0), y.sum(0)
    elif reduction != "none":
        raise ValueError(f"Expected argument `reduction` to be 'batch' or 'none', but got {reduction!r}.")
    per_class = _dice_loss_from_stats(inter, z, y, smooth)
    num_classes = per_class.shape[-1]
    if class_weights is not None:
        k = torch.as_tensor(class_weights, dtype=per_class.dtype, device=per_class.device)
        if k.shape != (num_classes,):
            raise ValueError(
                f"Expected argument `class_weights` to have {num_classes} entries, but got shape {tuple(k.shape)}; "
                "give one weight per class (background included)."
            )
        per_class = per_class * k
    return per_class.sum(-1) / num_classes


def febs_dice_loss(
    probs: Tensor, target: Tensor, group: Tensor, num_groups: int, gamma: float = 1.0, smooth: float = 1e-5,
    ignore_index: int | None = -1, class_weights: Sequence[float] | Tensor | None = None,
    reduction: str = "batch",
) -> Tensor:
    """FairSeg's FEBS-Dice loss for one batch (the functional form; no running state, no DDP sync).

    ``L_g`` from the batch (pooled pixels per group), ``w_g = tanh((min L / L_g)^γ)``, each sample's
    probabilities multiplied by ``w_{g_i}`` (``ignore_index`` samples by 1), then soft Dice.

    Args:
        probs: ``(B, C, *spatial)`` softmax probabilities (include the background channel, as the paper).
        target: ``(B, *spatial)`` labels or one-hot ``(B, C, *spatial)``.
        group: ``(B,)`` group ids.
    """
    group = check_groups(group, num_groups, ignore_index)
    if group.shape[0] != probs.shape[0]:
        raise ValueError(
            f"Expected one group id per sample ({probs.shape[0]}), but got {group.shape[0]}; pass the batch's "
            "`group` column unchanged."
        )
    inter, z, y = soft_dice_stats(probs, target)
    errors, counts = group_dice_errors(inter, z, y, group, num_groups, smooth, ignore_index)
    scales = febs_group_scales(errors, counts > 0, gamma)
    sample_scale = sample_scales(scales, group, ignore_index)
    return scaled_dice_loss(inter, z, y, sample_scale, smooth, class_weights, reduction)


def sample_scales(scales: Tensor, group: Tensor, ignore_index: int | None = -1) -> Tensor:
    """Each sample's group scale (1 for ``ignore_index`` samples, negative or ``>= num_groups`` such as 255)."""
    s = scales.to(group.device)
    ext = torch.cat([s, s.new_ones(1)])
    return ext[_bucket(group, s.shape[0], ignore_index)]


# -------------------------------------------------------------------------------------------- GroupDRO
def dro_adjustment(
    adjustment: float | Sequence[float] | Tensor | None, group_counts: Tensor | Sequence[int] | None, num_groups: int
) -> Tensor:
    """The generalisation adjustment ``C_g / √n_g`` per group (0 where ``C_g = 0``).

    Args:
        adjustment: ``C`` (one number for all groups, or one per group); ``None``/0 disables it.
        group_counts: training-set sample count per group (needed when any ``C_g > 0``).

    Raises:
        ValueError: negative ``C``, wrong length, or a group with ``C_g > 0`` and no training samples.
    """
    if adjustment is None:
        return torch.zeros(num_groups, dtype=torch.float64)
    c = torch.as_tensor(adjustment, dtype=torch.float64).flatten()
    if c.numel() == 1:
        c = c.expand(num_groups).clone()
    if c.numel() != num_groups:
        raise ValueError(
            f"Expected argument `adjustment` to be one number or {num_groups} numbers (one per group), but got {c.numel()}."
        )
    if bool((c < 0).any()) or not bool(torch.isfinite(c).all()):
        raise ValueError(
            f"Expected argument `adjustment` to be finite and ≥ 0, but got {c.tolist()}; use 0 (or None) to turn "
            "the adjustment off for a group."
        )
    if not bool((c > 0).any()):
        return torch.zeros(num_groups, dtype=torch.float64)
    if group_counts is None:
        raise ValueError(
            "Expected the training-set group counts `group_counts` with an adjustment C > 0, but got None; pass "
            "`group_counts` (samples per group in the training set), or set `adjustment=None`."
        )
    n = torch.as_tensor(group_counts, dtype=torch.float64).flatten()
    if n.numel() != num_groups:
        raise ValueError(
            f"Expected argument `group_counts` to have {num_groups} entries (one per group), but got {n.numel()}."
        )
    if bool(((c > 0) & (n <= 0)).any()):
        raise ValueError(
            f"Expected every group with adjustment C_g > 0 to have training samples, but got counts {n.tolist()}; "
            "set C_g = 0 for a group without training samples (pass one C per group)."
        )
    return torch.where(c > 0, c / n.clamp_min(1).sqrt(), torch.zeros_like(c))


def group_dro_update(q: Tensor, group_losses: Tensor, step_size: float = 0.01, adjustment: Tensor | None = None) -> Tensor:
    """One exponentiated-gradient step ``q ← q·exp(η·(ℓ_g + adj_g)) / Σ``.

    ``group_losses`` holds 0 for groups absent from the batch (official code), so their ``q`` decays
    relative to the others. Computed in log space (float64) for stability; torch tensors or numpy arrays.
    """
    xp = _xp(q)
    adjusted = _f64(group_losses)
    if adjustment is not None:
        adjusted = adjusted + (adjustment if xp is np else adjustment.to(adjusted))
    logits = xp.log(_f64(q)) + step_size * adjusted
    e = xp.exp(logits - logits.max())
    return e / e.sum()


def group_dro_sample_weights(
    q: Tensor, group: Tensor, num_groups: int, ignore_index: int | None = -1, counts: Tensor | None = None
) -> Tensor:
    """Per-sample weights ``w_i = q_{g_i}·B / n_{g_i}`` (``n_g`` = count of group g in this batch).

    Derivation: with ``ℓ̄_g = (1/n_g) Σ_{i∈g} ℓ_i``,
    ``(1/B) Σ_i w_i ℓ_i = (1/B) Σ_g (q_g B / n_g) Σ_{i∈g} ℓ_i = Σ_g q_g ℓ̄_g`` — the GroupDRO objective
    (absent groups contribute 0, as the official code). ``ignore_index`` samples get weight 0 (they belong
    to no group of the objective). The weights average ``Σ_{g present} q_g ≤ 1``, not 1. ``counts`` (this
    batch's per-group counts) saves recounting them.
    """
    b = group.shape[0]
    idx = _bucket(group, num_groups, ignore_index)
    if counts is None:
        counts = torch.bincount(idx, minlength=num_groups + 1)[:num_groups]
    per_group = q.to(torch.float64) * b / counts.to(q.device).clamp_min(1).to(torch.float64)
    per_group = torch.cat([per_group, per_group.new_zeros(1)])  # the extra bucket: ignore_index -> 0
    return per_group.to(group.device)[idx].float()
