"""Loss modules that need per-group state: ``FEBSDiceLoss`` (FairSeg's fair error-bound scaled Dice)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_reweight.distributed import is_distributed
from lightning_reweight.rules.fairness import (
    _dice_errors_from_group_sums,
    check_groups,
    febs_group_scales,
    group_sums,
    sample_scales,
    scaled_dice_loss,
    soft_dice_stats,
    update_group_errors,
)
from lightning_reweight.state.validate import CheckpointStateError, as_tensor, require_keys

__all__ = ["FEBSDiceLoss"]


class FEBSDiceLoss(nn.Module):
    """Fair Error-Bound Scaling Dice loss ("FairSeg", Tian et al., ICLR 2024).

    Per batch, each group g present gets the error bound ``L_g = Σ_c (1 − Dice_c)`` over the pooled pixels
    of its samples (squared-denominator soft Dice, smooth 1e-5) and the scale
    ``w_g = tanh((min_h L_h / L_g)^γ)`` (γ = 1). Each sample's class probabilities are multiplied by
    ``w_{g_i}`` inside the soft Dice loss (not the loss itself), which raises the harder groups' Dice loss.
    The paper combines it with cross-entropy: SAMed ``0.2·CE + 0.8·FEBS-Dice``, TransUNet ``0.5/0.5``.

    State (module buffers, so they are saved in the model checkpoint): ``group_error`` (running ``L_g``),
    ``group_seen``, ``last_scale``. Under DDP the per-group Dice sums (``G × C × 3`` numbers) are all-reduced
    before the errors are formed, so every rank holds the same errors and scales (``sync_dist=True``).

    Ours (documented fixes of the official code): the min runs over groups present in the batch (the official
    code takes it over all groups, so one absent group makes every scale 0 and the loss ≈ 1 with no
    gradient — FairSeg issue #9); ids are validated; ``ignore_index`` samples stay out of the group errors
    and are left unscaled. ``momentum < 1`` smooths ``L_g`` with an exponential moving average (ours; 1 =
    the paper's per-batch rule).

    Args:
        num_groups: G; ids in ``[0, G)`` or ``ignore_index``.
        gamma: γ of the scaling.
        smooth: Dice smoothing constant.
        momentum: weight of the current batch in the running group errors (1 = per batch, the paper).
        ignore_index: group id of unknown samples: negative (−1) or ``>= num_groups`` (e.g. 255); ``None``: none.
        from_logits: apply softmax (``C > 1``) or sigmoid (``C = 1``, expanded to background/foreground).
        class_weights: per-class multipliers of the Dice terms (default all 1).
        reduction: ``"batch"`` (pooled pixels, a scalar, as the paper) or ``"none"`` (one loss per image, for
            ``reduce_loss``).
        sync_dist: all-reduce the group statistics across DDP ranks.

    Example::

        self.dice = FEBSDiceLoss(num_groups=3)
        loss = 0.5 * F.cross_entropy(logits, masks) + 0.5 * self.dice(logits, masks, group)
    """

    group_error: Tensor
    group_seen: Tensor
    last_scale: Tensor

    def __init__(
        self, num_groups: int, gamma: float = 1.0, smooth: float = 1e-5, momentum: float = 1.0,
        ignore_index: int | None = -1, from_logits: bool = True, class_weights: Sequence[float] | None = None,
        reduction: Literal["batch", "none"] = "batch", sync_dist: bool = True,
    ):
        super().__init__()
        if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
            raise ValueError(f"Expected argument `num_groups` to be a positive int, but got {num_groups!r}.")
        if not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma <= 0:
            raise ValueError(f"Expected argument `gamma` to be a positive finite number, but got {gamma!r}.")
        if not isinstance(smooth, (int, float)) or smooth < 0:
            raise ValueError(f"Expected argument `smooth` to be >= 0, but got {smooth!r}.")
        if not isinstance(momentum, (int, float)) or not 0 < momentum <= 1:
            raise ValueError(f"Expected argument `momentum` to be in (0, 1], but got {momentum!r}.")
        if reduction not in ("batch", "none"):
            raise ValueError(f"Expected argument `reduction` to be 'batch' or 'none', but got {reduction!r}.")
        if ignore_index is not None and (not isinstance(ignore_index, int) or isinstance(ignore_index, bool)
                                         or 0 <= ignore_index < num_groups):
            raise ValueError(
                f"Expected argument `ignore_index` to be an int outside [0, {num_groups}) (e.g. -1 or 255) or None, "
                f"but got {ignore_index!r}."
            )
        self.num_groups, self.gamma, self.smooth, self.momentum = num_groups, float(gamma), float(smooth), float(momentum)
        self.ignore_index, self.from_logits, self.reduction, self.sync_dist = ignore_index, from_logits, reduction, sync_dist
        self.class_weights = list(class_weights) if class_weights is not None else None
        self.register_buffer("group_error", torch.zeros(num_groups, dtype=torch.float64))
        self.register_buffer("group_seen", torch.zeros(num_groups, dtype=torch.bool))
        self.register_buffer("last_scale", torch.ones(num_groups, dtype=torch.float64))

    def _probs_and_target(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        if logits.ndim < 3:
            raise ValueError(f"Expected argument `logits` of shape (B, C, H, W, ...), but got {tuple(logits.shape)}.")
        if target.ndim == logits.ndim and target.shape[1] == 1:
            target = target[:, 0]
        if target.is_floating_point():
            target = target.round()
        target = target.long()
        if logits.shape[1] == 1:
            p = logits[:, 0].sigmoid() if self.from_logits else logits[:, 0]
            return torch.stack([1 - p, p], dim=1), target
        return (F.softmax(logits, dim=1) if self.from_logits else logits), target

    #: ``forward`` takes a second view (``logits2=``, ``target2=``) and updates its state once per sample
    supports_views = True

    def forward(self, logits: Tensor, target: Tensor, group: Tensor | None, logits2: Tensor | None = None,
                target2: Tensor | None = None) -> Tensor:
        """FEBS-Dice of one batch: ``logits`` ``(B, C, *S)`` (or ``(B, 1, *S)`` binary), ``target`` labels
        ``(B, *S)`` (or a ``(B, 1, *S)`` mask), ``group`` ``(B,)``.

        Paired (AdaWAC) batches pass the second view as ``logits2``/``target2``: the group errors pool the
        pixels of both views and the running state moves once per step (once per sample, not once per
        view); the result is the mean of the two views' FEBS-Dice losses under the same scales.
        """
        if group is None:
            raise ValueError(
                "FEBSDiceLoss needs a group id per sample, but got none. Use a data set with groups "
                "(`IndexedDataset(ds, groups=...)`, e.g. PH2DataModule) and pass `group` to the loss."
            )
        if (logits2 is None) != (target2 is None):
            raise ValueError("Expected both `logits2` and `target2` for a paired batch, but got only one of them.")
        probs, target = self._probs_and_target(logits, target)
        group = check_groups(torch.as_tensor(group, device=probs.device), self.num_groups, self.ignore_index,
                             name="group")
        if group.shape[0] != probs.shape[0]:
            raise ValueError(f"Expected one group id per sample ({probs.shape[0]}), but got {group.shape[0]}.")
        views = [soft_dice_stats(probs, target)]
        if logits2 is not None:
            probs2, target2 = self._probs_and_target(logits2, target2)
            if probs2.shape[0] != probs.shape[0]:
                raise ValueError(f"Expected the second view to have {probs.shape[0]} samples, but got {probs2.shape[0]}.")
            views.append(soft_dice_stats(probs2, target2))
        stats = sum(torch.stack(v, dim=-1).detach().double() for v in views)  # pooled pixels of every view
        sums, counts = group_sums(stats, group, self.num_groups, self.ignore_index)
        if self.sync_dist and is_distributed():
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        present = counts > 0
        batch_error = _dice_errors_from_group_sums(sums, self.smooth) * present
        if self.training and bool(present.any()):
            error, seen = update_group_errors(self.group_error, self.group_seen, batch_error, present, self.momentum)
            self.group_error.copy_(error)
            self.group_seen.copy_(seen)
            scales = febs_group_scales(self.group_error, present, self.gamma)
            self.last_scale.copy_(scales)
        else:  # evaluation, or every sample has ignore_index: no state change
            error = torch.where(self.group_seen, self.group_error, batch_error)
            scales = febs_group_scales(error, present, self.gamma)
        s = sample_scales(scales.to(probs.device), group, self.ignore_index)
        losses = [scaled_dice_loss(i, z, y, s, self.smooth, self.class_weights, self.reduction) for i, z, y in views]
        return losses[0] if len(losses) == 1 else 0.5 * (losses[0] + losses[1])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # noqa: ANN001 - torch's signature
        """Validate the FEBS buffers before torch copies them in (finite errors of ``num_groups`` entries,
        a bool ``group_seen``, scales in [0, 1]); a bad entry raises ``CheckpointStateError`` naming it."""
        where = f"FEBSDiceLoss[{prefix!r}]"
        present = {k[len(prefix):]: v for k, v in state_dict.items()
                   if k.startswith(prefix) and k[len(prefix):] in ("group_error", "group_seen", "last_scale")}
        if present:
            require_keys(present, ["group_error", "group_seen", "last_scale"], where)
            as_tensor(present, "group_error", where, length=self.num_groups)
            seen = as_tensor(present, "group_seen", where, kind="any", length=self.num_groups)
            if seen.dtype != torch.bool:
                raise CheckpointStateError(where, "group_seen", f"expected a bool tensor, but got dtype {seen.dtype}.")
            as_tensor(present, "last_scale", where, length=self.num_groups, minimum=0.0, maximum=1.0)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"num_groups={self.num_groups}, gamma={self.gamma}, momentum={self.momentum}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")
