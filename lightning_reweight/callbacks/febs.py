"""``FairErrorBoundScaling``: FairSeg's fair error-bound scaling as a weighting callback (classification).

For segmentation use the loss :class:`lightning_reweight.losses.FEBSDiceLoss` (FEBS-Dice, as the paper),
re-exported here.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_reweight.callbacks._groups import GroupCallback
from lightning_reweight.callbacks.base import GlobalBatch
from lightning_reweight.losses import FEBSDiceLoss
from lightning_reweight.rules.fairness import (
    febs_group_scales,
    febs_loss_multipliers,
    group_means,
    update_group_errors,
)

__all__ = ["FairErrorBoundScaling", "FEBSDiceLoss"]


class FairErrorBoundScaling(GroupCallback):
    """Fair Error-Bound Scaling ("FairSeg", Tian et al., ICLR 2024), generalised to per-sample losses.

    Each training step, from the *global* batch (identical on every DDP rank):

    1. ``L_g`` = mean per-sample loss of group g in the batch, blended into a running error
       ``e_g ← (1 − m)·e_g + m·L_g`` (``momentum`` m = 1: the current batch only, as the paper);
    2. FairSeg's scale ``w_g = tanh((min_h e_h / e_g)^γ)`` over the groups present in the batch (the
       easiest group gets ``tanh(1) ≈ 0.76``, harder groups less);
    3. **ours** — per-sample loss multipliers ``∝ 1/w_{g_i}``, renormalised to mean 1 over the grouped
       samples; ``ignore_index`` samples keep 1.

    Step 3 is our generalisation, not the paper's: FairSeg multiplies ``w_g`` into the probabilities inside
    the Dice loss, which raises the hard groups' loss. Cross-entropy has no such place (scaling a probability
    only adds a constant) and ``w_g`` used directly as a loss multiplier would *down*-weight the hard groups,
    so we use ``1/w_g``: for γ = 1 and large gaps it grows like ``e_g / min_h e_h``. For segmentation with a
    Dice term use :class:`~lightning_reweight.losses.FEBSDiceLoss`, the paper's form.

    Ours (documented fixes): the min runs over groups present in the batch (the official code takes it over
    all groups, so one absent group zeroes every scale); group ids are validated; ``ignore_index`` (−1)
    samples are left out of the errors and unscaled.

    Args:
        num_groups: G; inferred from the training data set's ``groups`` (``IndexedDataset``) when ``None``.
        gamma: γ (paper: 1).
        momentum: weight of the current batch in the running group errors, in (0, 1] (1 = paper).
        ignore_index: group id of unknown samples.
        min_scale: floor of ``w_g`` before inverting (keeps multipliers finite).
        log_every_n_steps: how often ``febs/error/group_g``, ``febs/scale/group_g`` and weight stats are logged.

    Example::

        trainer = Trainer(callbacks=[FairErrorBoundScaling(gamma=1.0)])
        # training_step: return reduce_loss(self, losses, index, group=group)
    """

    log_prefix = "febs"

    def __init__(
        self,
        num_groups: int | None = None,
        gamma: float = 1.0,
        momentum: float = 1.0,
        ignore_index: int | None = -1,
        min_scale: float = 1e-6,
        log_every_n_steps: int = 50,
        log_histogram: bool = True,
        name: str | None = None,
    ):
        super().__init__(num_groups, ignore_index, log_every_n_steps, log_histogram, name)
        if not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma <= 0:
            raise ValueError(f"Expected argument `gamma` to be a positive finite number, but got {gamma!r}.")
        if not isinstance(momentum, (int, float)) or not 0 < momentum <= 1:
            raise ValueError(f"Expected argument `momentum` to be in (0, 1], but got {momentum!r}.")
        if not isinstance(min_scale, (int, float)) or not 0 < min_scale < 1:
            raise ValueError(f"Expected argument `min_scale` to be in (0, 1), but got {min_scale!r}.")
        self.gamma, self.momentum, self.min_scale = float(gamma), float(momentum), float(min_scale)
        self.errors: Tensor | None = None
        self.seen: Tensor | None = None
        self.steps = 0
        self._last_scales: tuple[Tensor, Tensor] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def setup_groups(self, trainer: pl.Trainer | None) -> None:
        if self.errors is not None and self.num_groups is None:
            self.num_groups = self.errors.numel()
        num_groups = self.resolve_num_groups(trainer)
        if self.errors is None:
            self.errors = torch.zeros(num_groups, dtype=torch.float64)
            self.seen = torch.zeros(num_groups, dtype=torch.bool)
        elif self.errors.numel() != num_groups:
            raise ValueError(f"The restored FEBS errors have {self.errors.numel()} groups but num_groups={num_groups}.")

    def compute_weights(self, batch: GlobalBatch, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        assert self.errors is not None and self.seen is not None and self.num_groups is not None
        group = batch.group.long()  # type: ignore[union-attr]
        batch_error, counts = group_means(batch.losses.double(), group, self.num_groups, self.ignore_index)
        present = counts > 0
        self.errors, self.seen = update_group_errors(self.errors, self.seen, batch_error, present, self.momentum)
        self.steps += 1
        scales = febs_group_scales(self.errors, present, self.gamma)
        self._last_scales = (scales, present)
        return febs_loss_multipliers(scales, group, self.ignore_index, self.min_scale)

    def log_extras(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.errors is not None and self.seen is not None:
            out.update({f"error/group_{g}": float(self.errors[g]) for g in self.seen.nonzero().flatten().tolist()})
        if self._last_scales is not None:
            scales, present = self._last_scales
            out.update({f"scale/group_{g}": float(scales[g]) for g in present.nonzero().flatten().tolist()})
        return out

    def extra_state(self) -> dict[str, Any]:
        return {
            "errors": None if self.errors is None else self.errors.clone(),
            "seen": None if self.seen is None else self.seen.clone(),
            "steps": self.steps,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        errors, seen = state.get("errors"), state.get("seen")
        if errors is not None:
            errors = torch.as_tensor(errors, dtype=torch.float64)
            if self.num_groups is not None and errors.numel() != self.num_groups:
                raise ValueError(
                    f"The checkpoint's FEBS errors have {errors.numel()} groups but num_groups={self.num_groups}."
                )
            self.errors = errors
            self.seen = torch.as_tensor(seen, dtype=torch.bool) if seen is not None else torch.ones_like(errors, dtype=torch.bool)
        self.steps = int(state.get("steps", 0))
