"""Equity-scaled metrics, functional forms (one batch / whole set in one call).

Equity scaling ("FairSeg: A Large-Scale Medical Image Segmentation Dataset for Fairness Learning Using Segment
Anything Model with Fair Error-Bound Scaling", Tian et al., ICLR 2024)::

    ES-P = P / (1 + α · Σ_g |P − P_g|)          mode="sum_abs" (camera-ready definition; default)
    ES-P = P / (1 + α · std_g(P_g))             mode="std"     (arXiv v1 form; sample std, ddof = 1)

``P`` is the mean per-sample (per-image) metric over *all* samples, ``P_g`` the mean over group g's samples.
Samples whose group is ``ignore_index`` (−1, "unknown") count in ``P`` only. Groups with no sample are left
out of the sum / std (ours: the official code would average an empty list). α = 1.

Each metric is split into ``_update`` (batch -> sufficient statistics) and ``_compute`` (statistics ->
value); the torchmetrics classes in :mod:`lightning_reweight.metrics.equity` call the same pieces, so the
class accumulated over batches (and over DDP ranks) equals the functional on the concatenated data.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_reweight.rules.fairness import check_class_ids, check_groups

EquityMode = Literal["sum_abs", "std"]

__all__ = [
    "equity_scale",
    "per_image_dice",
    "per_image_iou",
    "per_sample_correct",
    "equity_scaled_dice",
    "equity_scaled_iou",
    "equity_scaled_accuracy",
    "equity_scaled_auroc",
    "group_auroc",
]


# ----------------------------------------------------------------------------------------- validation
def _check_mode(mode: str, alpha: float) -> None:
    if mode not in ("sum_abs", "std"):
        raise ValueError(f"Expected argument `mode` to be 'sum_abs' or 'std', but got {mode!r}.")
    if not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ValueError(f"Expected argument `alpha` to be a number ≥ 0, but got {alpha!r}.")


def _check_group_for(group: Tensor, n: int, num_groups: int, ignore_index: int | None) -> Tensor:
    group = check_groups(torch.as_tensor(group), num_groups, ignore_index)
    if group.shape[0] != n:
        raise ValueError(f"Expected argument `group` to have one id per sample ({n}), but got {group.shape[0]}.")
    return group


def _maybe_sigmoid(x: Tensor) -> Tensor:
    # torchmetrics convention: float inputs outside [0, 1] are logits.
    if bool(((x < 0) | (x > 1)).any()):
        return x.sigmoid()
    return x


def _to_labels(preds: Tensor, target: Tensor, threshold: float, num_classes: int) -> Tensor:
    """Predicted class ids with ``target``'s shape from labels, ``(B, C, ...)`` scores or binary scores."""
    if not preds.is_floating_point():
        if preds.shape != target.shape:
            raise ValueError(
                f"Expected integer `preds` to have the shape of `target` {tuple(target.shape)}, but got {tuple(preds.shape)}."
            )
        return preds.long()
    if preds.shape == target.shape:
        if num_classes != 2:
            raise ValueError(
                "Expected float `preds` of shape (B, C, ...) for multi-class inputs, but got the target's shape; "
                "pass class scores or argmax labels."
            )
        return (_maybe_sigmoid(preds) > threshold).long()
    if preds.ndim == target.ndim + 1 and preds.shape[:1] + preds.shape[2:] == target.shape:
        if preds.shape[1] == 1:
            return (_maybe_sigmoid(preds[:, 0]) > threshold).long()
        return preds.argmax(dim=1)
    raise ValueError(
        f"Expected `preds` of shape {tuple(target.shape)} (labels or binary scores) or (B, C, ...) scores matching "
        f"target {tuple(target.shape)}, but got {tuple(preds.shape)}."
    )


def _check_target(target: Tensor, num_classes: int) -> Tensor:
    return check_class_ids(target, num_classes)


# ------------------------------------------------------------------------------------ per-sample scores
def _overlap_stats(preds: Tensor, target: Tensor, num_classes: int, include_background: bool, threshold: float):
    target = _check_target(target, num_classes)
    if target.ndim < 2:
        raise ValueError(f"Expected `target` of shape (B, H, W, ...), but got {tuple(target.shape)}.")
    labels = _to_labels(preds, target, threshold, num_classes)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"Expected predicted class ids in [0, {num_classes}), but got values up to {int(labels.max())}.")
    b = target.shape[0]
    p = F.one_hot(labels.reshape(b, -1), num_classes).to(torch.float64)  # (B, S, C)
    t = F.one_hot(target.reshape(b, -1), num_classes).to(torch.float64)
    inter, p_sum, t_sum = (p * t).sum(1), p.sum(1), t.sum(1)  # (B, C)
    if not include_background:
        if num_classes < 2:
            raise ValueError("`include_background=False` needs at least 2 classes.")
        inter, p_sum, t_sum = inter[:, 1:], p_sum[:, 1:], t_sum[:, 1:]
    return inter, p_sum, t_sum


def per_image_dice(
    preds: Tensor, target: Tensor, num_classes: int = 2, include_background: bool = False,
    zero_division: float = 1.0, threshold: float = 0.5,
) -> Tensor:
    """Per-image hard Dice ``2|P∩T| / (|P| + |T|)``, averaged over classes -> ``(B,)`` float64.

    Args:
        preds: ``(B, ...)`` labels, ``(B, ...)`` binary probabilities/logits (thresholded at ``threshold``
            after a sigmoid when values leave [0, 1]), or ``(B, C, ...)`` class scores (argmax).
        target: ``(B, ...)`` integer labels.
        num_classes: number of classes including background (2 for binary masks).
        include_background: average class 0 too (default: foreground classes only).
        zero_division: value for a class absent from both prediction and target (default 1: nothing to find,
            nothing found).
    """
    inter, p_sum, t_sum = _overlap_stats(preds, target, num_classes, include_background, threshold)
    denom = p_sum + t_sum
    dice = torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.full_like(denom, float(zero_division)))
    return dice.mean(1)


def per_image_iou(
    preds: Tensor, target: Tensor, num_classes: int = 2, include_background: bool = False,
    zero_division: float = 1.0, threshold: float = 0.5,
) -> Tensor:
    """Per-image IoU ``|P∩T| / |P∪T|``, averaged over classes -> ``(B,)`` (same arguments as Dice)."""
    inter, p_sum, t_sum = _overlap_stats(preds, target, num_classes, include_background, threshold)
    union = p_sum + t_sum - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float(zero_division)))
    return iou.mean(1)


def per_sample_correct(preds: Tensor, target: Tensor, threshold: float = 0.5) -> Tensor:
    """1.0 where the predicted class equals ``target`` -> ``(B,)`` float64.

    ``preds``: ``(B,)`` labels, ``(B,)`` binary probabilities/logits, or ``(B, C)`` class scores.
    """
    if target.ndim != 1:
        raise ValueError(f"Expected argument `target` to be 1-D (one label per sample), but got {tuple(target.shape)}.")
    if target.is_floating_point():
        raise TypeError(f"Expected argument `target` to hold integer class ids, but got dtype {target.dtype}.")
    labels = _to_labels(preds, target, threshold, preds.shape[1] if preds.ndim == 2 else 2)
    return (labels == target.long()).to(torch.float64)


# ------------------------------------------------------------------------------------------ aggregation
def _es_update(
    scores: Tensor, group: Tensor, num_groups: int, ignore_index: int | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample scores -> (total, count, group_total (G,), group_count (G,))."""
    scores = scores.to(torch.float64)
    keep = group != ignore_index if ignore_index is not None else torch.ones_like(group, dtype=torch.bool)
    g = group[keep]
    group_total = torch.zeros(num_groups, dtype=torch.float64, device=scores.device).index_add_(0, g, scores[keep])
    group_count = torch.bincount(g, minlength=num_groups)
    return scores.sum(), torch.tensor(scores.numel(), device=scores.device), group_total, group_count


def equity_scale(
    overall: Tensor, group_values: Tensor, present: Tensor | None = None, mode: EquityMode = "sum_abs",
    alpha: float = 1.0,
) -> Tensor:
    """``P / (1 + α Σ_g |P − P_g|)`` (``"sum_abs"``) or ``P / (1 + α std_g P_g)`` (``"std"``, ddof = 1).

    Only groups with ``present[g]`` enter the sum / std (all groups when ``present`` is None). With fewer
    than two present groups the std is 0.

    Example (worked): ``P = 0.8``, ``P_0 = 0.9``, ``P_1 = 0.6`` ->
    ``0.8 / (1 + 0.1 + 0.2) = 0.6154`` (sum_abs); ``std = 0.2121`` -> ``0.8 / 1.2121 = 0.6600`` (std).
    """
    _check_mode(mode, alpha)
    overall = torch.as_tensor(overall, dtype=torch.float64)
    values = torch.as_tensor(group_values, dtype=torch.float64, device=overall.device)
    if present is not None:
        values = values[present.to(values.device)]
    if mode == "sum_abs":
        spread = (values - overall).abs().sum()
    else:
        spread = values.std(unbiased=True) if values.numel() >= 2 else values.new_zeros(())
    return overall / (1 + alpha * spread)


def _es_compute(
    total: Tensor, count: Tensor, group_total: Tensor, group_count: Tensor, mode: EquityMode, alpha: float
) -> Tensor:
    if int(count) == 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=total.device)
    overall = total / count
    present = group_count > 0
    group_values = group_total / group_count.clamp_min(1)
    return equity_scale(overall, group_values, present, mode, alpha)


def _equity_scaled_scores(
    scores: Tensor, group: Tensor, num_groups: int, mode: EquityMode, alpha: float, ignore_index: int | None
) -> Tensor:
    _check_mode(mode, alpha)
    return _es_compute(*_es_update(scores, group, num_groups, ignore_index), mode, alpha)


def equity_scaled_dice(
    preds: Tensor, target: Tensor, group: Tensor, num_groups: int, *, num_classes: int = 2,
    include_background: bool = False, mode: EquityMode = "sum_abs", alpha: float = 1.0,
    ignore_index: int | None = -1, zero_division: float = 1.0, threshold: float = 0.5,
) -> Tensor:
    """Equity-scaled Dice (ES-Dice) over per-image Dice scores; see the module docstring.

    Example::

        es = equity_scaled_dice(logits, masks, group, num_groups=3)   # logits (B, 2, H, W), masks (B, H, W)
    """
    group = _check_group_for(group, target.shape[0], num_groups, ignore_index)
    scores = per_image_dice(preds, target, num_classes, include_background, zero_division, threshold)
    return _equity_scaled_scores(scores, group, num_groups, mode, alpha, ignore_index)


def equity_scaled_iou(
    preds: Tensor, target: Tensor, group: Tensor, num_groups: int, *, num_classes: int = 2,
    include_background: bool = False, mode: EquityMode = "sum_abs", alpha: float = 1.0,
    ignore_index: int | None = -1, zero_division: float = 1.0, threshold: float = 0.5,
) -> Tensor:
    """Equity-scaled IoU (ES-IoU) over per-image IoU scores; see the module docstring."""
    group = _check_group_for(group, target.shape[0], num_groups, ignore_index)
    scores = per_image_iou(preds, target, num_classes, include_background, zero_division, threshold)
    return _equity_scaled_scores(scores, group, num_groups, mode, alpha, ignore_index)


def equity_scaled_accuracy(
    preds: Tensor, target: Tensor, group: Tensor, num_groups: int, *, mode: EquityMode = "sum_abs",
    alpha: float = 1.0, ignore_index: int | None = -1, threshold: float = 0.5,
) -> Tensor:
    """Equity-scaled accuracy: ``P`` = accuracy over all samples, ``P_g`` = accuracy within group g."""
    group = _check_group_for(group, target.shape[0], num_groups, ignore_index)
    return _equity_scaled_scores(per_sample_correct(preds, target, threshold), group, num_groups, mode, alpha, ignore_index)


def _auroc(preds: Tensor, target: Tensor, num_classes: int | None) -> Tensor:
    from torchmetrics.functional.classification import binary_auroc, multiclass_auroc

    if preds.ndim == 1:
        return binary_auroc(preds.float(), target.long())
    return multiclass_auroc(preds.float(), target.long(), num_classes=num_classes or preds.shape[1])


def group_auroc(
    preds: Tensor, target: Tensor, group: Tensor, num_groups: int, ignore_index: int | None = -1
) -> tuple[Tensor, Tensor, Tensor]:
    """Overall AUROC and the AUROC within each group.

    Returns ``(overall, per_group (G,), defined (G,))``; a group is *defined* when it has samples of more than
    one class (AUROC is undefined otherwise). Binary scores ``(B,)`` or multi-class scores ``(B, C)``
    (macro one-vs-rest). Loops over groups, not samples.
    """
    num_classes = preds.shape[1] if preds.ndim == 2 else None
    overall = _auroc(preds, target, num_classes).double()
    values = torch.zeros(num_groups, dtype=torch.float64, device=preds.device)
    defined = torch.zeros(num_groups, dtype=torch.bool, device=preds.device)
    for g in range(num_groups):
        mask = group == g
        if bool(mask.any()) and torch.unique(target[mask]).numel() > 1:
            values[g] = _auroc(preds[mask], target[mask], num_classes).double()
            defined[g] = True
    return overall, values, defined


def _check_auroc_inputs(preds: Tensor, target: Tensor) -> None:
    if not preds.is_floating_point():
        raise TypeError(f"Expected argument `preds` to hold float scores for AUROC, but got dtype {preds.dtype}.")
    if target.ndim != 1 or preds.shape[0] != target.shape[0] or preds.ndim not in (1, 2):
        raise ValueError(
            f"Expected `preds` of shape (B,) or (B, C) and `target` of shape (B,), but got {tuple(preds.shape)} "
            f"and {tuple(target.shape)}."
        )


def equity_scaled_auroc(
    preds: Tensor, target: Tensor, group: Tensor, num_groups: int, *, mode: EquityMode = "sum_abs",
    alpha: float = 1.0, ignore_index: int | None = -1,
) -> Tensor:
    """Equity-scaled AUROC: ``P`` = AUROC over all samples, ``P_g`` = AUROC within group g.

    Groups whose samples hold a single class are left out of the sum (their AUROC is undefined).
    """
    _check_mode(mode, alpha)
    _check_auroc_inputs(preds, target)
    group = _check_group_for(group, target.shape[0], num_groups, ignore_index)
    overall, values, defined = group_auroc(preds, target, group, num_groups, ignore_index)
    return equity_scale(overall, values, defined, mode, alpha)
