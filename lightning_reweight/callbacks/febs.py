"""``FairErrorBoundScaling``: FairSeg's fair error-bound scaling as a weighting callback (classification).

For segmentation use the loss :class:`lightning_reweight.losses.FEBSDiceLoss` (FEBS-Dice, as the paper),
re-exported here.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from lightning_reweight.callbacks._groups import GroupCallback
from lightning_reweight.callbacks.base import GlobalBatch
from lightning_reweight.callbacks.logging import to_host
from lightning_reweight.losses import FEBSDiceLoss
from lightning_reweight.rules.fairness import (
    febs_group_scales,
    update_group_errors,
)
from lightning_reweight.rules.instance import double_range
from lightning_reweight.state.validate import CheckpointStateError, as_int, as_tensor, require_keys

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

    The running errors and ``steps`` are committed only after every callback's weights for the step were
    accepted. A batch whose samples all have ``ignore_index`` is a no-op for this callback (multipliers 1,
    no state change, ``steps`` not advanced). The checkpointed errors are validated at load.

    Args:
        num_groups: G; inferred from the training data set's ``groups`` (``IndexedDataset``) when ``None``.
        gamma: γ (paper: 1).
        momentum: weight of the current batch in the running group errors, in (0, 1] (1 = paper).
        ignore_index: group id of unknown samples.
        min_scale: floor of ``w_g`` before inverting (keeps multipliers finite).
        log_every_n_steps: how often ``febs/error/group_g``, ``febs/scale/group_g`` and weight stats are logged.
        fresh_table: keyword-only; start the per-sample table fresh on resume (see ``WeightingCallback``).
        device: keyword-only; where the state lives: ``"auto"`` (follows the module), ``"cpu"`` or a device
            (see ``WeightingCallback``).
        sync_checks: keyword-only; read the step's checks back to the host every step (``True``) or defer them
            (``False``: no host sync per step on a GPU; see ``WeightingCallback``).

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
        *,
        fresh_table: bool = False,
        device: str | torch.device = "auto",
        sync_checks: bool = True,
    ):
        super().__init__(num_groups, ignore_index, log_every_n_steps, log_histogram, name,
                         fresh_table=fresh_table, device=device, sync_checks=sync_checks)
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
        self._steps_device: Tensor | None = None
        self._last_scales: tuple[Tensor, Tensor] | None = None
        self._pending: tuple[Any, ...] | None = None

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
        # pure: the running errors are committed in ``on_weights_computed`` once every callback's weights
        # were accepted
        assert self.errors is not None and self.seen is not None and self.num_groups is not None
        idx, bucket_counts = self.prepared(batch)
        if batch.losses.device.type != "cpu":
            return self._device_weights(batch, idx, bucket_counts)
        if int(bucket_counts[-1]) == len(batch):  # every sample has ignore_index: a no-op (multipliers 1)
            self._pending = None
            return torch.ones(len(batch), dtype=torch.float32)
        # the per-group math runs on numpy views of a few numbers (torch's per-op overhead dominates there)
        counts = bucket_counts.numpy()[: self.num_groups]
        present = counts > 0
        sums = torch.bincount(idx, weights=batch.losses.double(), minlength=self.num_groups + 1).numpy()
        batch_error = sums[: self.num_groups] / np.maximum(counts, 1)
        errors, seen = update_group_errors(self.errors.cpu().numpy(), self.seen.cpu().numpy(), batch_error, present,
                                           self.momentum)
        scales = febs_group_scales(errors, present, self.gamma)
        self._pending = (batch, errors, seen, scales, present)
        # multipliers ∝ 1/w_g, mean 1 over the grouped samples; ignore_index samples (extra bucket) keep 1
        inv = 1.0 / np.maximum(scales, self.min_scale)
        inv *= counts.sum() / (inv * counts).sum()
        return torch.from_numpy(np.append(inv, 1.0).astype(np.float32)).index_select(0, idx)

    def _device_weights(self, batch: GlobalBatch, idx: Tensor, bucket_counts: Tensor) -> Tensor:
        """``compute_weights`` as tensor ops on the batch's device (no host read). A batch without a known
        group leaves the errors as they are (no group is present) and does not advance ``steps``: counted on
        the device, folded in at logging / checkpointing."""
        device, g = batch.losses.device, self.num_groups
        errors = self.errors if self.errors.device == device else self.errors.to(device)
        seen = self.seen if self.seen.device == device else self.seen.to(device)
        counts = bucket_counts[:g]
        present = counts > 0
        losses64 = double_range(batch.losses)[0]  # (the float64 copy the step's finite check made)
        sums = torch.zeros(g + 1, dtype=torch.float64, device=device).index_add_(0, idx, losses64)
        errors, seen = update_group_errors(errors, seen, sums[:g] / counts.clamp_min(1), present, self.momentum)
        lo = torch.where(present, errors, torch.inf).amin()  # the min over the groups present (FairSeg, ours)
        ratio = torch.where(errors > 1e-12, lo / errors.clamp_min(1e-12), 1.0)
        ratio = ratio.clamp_min(0) if self.gamma == 1.0 else ratio.clamp_min(0) ** self.gamma  # x ** 1.0 == x
        scales = torch.where(present, torch.tanh(ratio), 1.0)
        inv = scales.clamp_min(self.min_scale).reciprocal()  # (1.0 / t is the reciprocal)
        denom = (inv * counts).sum()
        inv = inv * torch.where(denom > 0, counts.sum() / denom, 1.0)
        self._pending = (batch, errors, seen, scales, present, present.any())
        # ignore_index samples (extra bucket) keep 1
        return torch.nn.functional.pad(inv, (0, 1), value=1.0).float()[idx]

    def _fold_steps(self) -> None:
        """Add the steps counted on the device (one host read, at logging cadence or a checkpoint)."""
        if self._steps_device is not None:
            self.steps, self._steps_device = self.steps + int(self._steps_device), None

    def on_weights_computed(self, batch: GlobalBatch, weights: Tensor, trainer: pl.Trainer,
                            pl_module: pl.LightningModule) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and len(pending) == 6:  # a device step: the state stays on the device
            _, self.errors, self.seen, scales, present, advanced = pending
            self._steps_device = advanced.long() if self._steps_device is None \
                else self._steps_device + advanced.long()
            self._last_scales = (scales, present)
        elif pending is not None:  # (cleared in validate_batch: never a previous, rejected step's)
            _, errors, seen, scales, present = pending
            self.errors, self.seen = torch.from_numpy(errors), torch.from_numpy(seen)
            self.steps += 1
            self._last_scales = (torch.from_numpy(scales), torch.from_numpy(present))
        super().on_weights_computed(batch, weights, trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._fold_steps()  # what a GPU run counted on the device since the last log

    def log_extras(self) -> dict[str, float]:
        self._fold_steps()
        out: dict[str, float] = {}
        scales, present = self._last_scales if self._last_scales is not None else (None, None)
        errors, seen, scales, present = to_host(self.errors, self.seen, scales, present)  # one transfer on a GPU
        if errors is not None and seen is not None:
            out.update({f"error/group_{g}": float(errors[g]) for g in seen.nonzero().flatten().tolist()})
        if scales is not None and present is not None:
            out.update({f"scale/group_{g}": float(scales[g]) for g in present.nonzero().flatten().tolist()})
        return out

    def extra_state(self) -> dict[str, Any]:
        self._fold_steps()
        return {
            "errors": None if self.errors is None else self.errors.detach().to("cpu", copy=True),
            "seen": None if self.seen is None else self.seen.detach().to("cpu", copy=True),
            "steps": self.steps,
        }

    def check_extra_state(self, state: dict[str, Any]) -> tuple[Tensor | None, Tensor | None, int] | None:
        """Validate a checkpoint's extra state (``None``: nothing saved, start fresh); assigns nothing."""
        where = self.checkpoint_where
        if not state:
            return None
        require_keys(state, ["errors", "seen", "steps"], where)
        steps = as_int(state, "steps", where, minimum=0)
        if state["errors"] is None:
            return None, None, steps
        errors = as_tensor(state, "errors", where)
        self.check_group_count(state, "errors", errors.numel())
        seen = as_tensor(state, "seen", where, kind="any", length=errors.shape[0])
        if seen.dtype != torch.bool:
            raise CheckpointStateError(where, "seen", f"expected a bool tensor, but got dtype {seen.dtype}.")
        if bool((errors[~seen] != 0).any()):
            raise CheckpointStateError(where, "errors", "expected 0 for every group not seen yet, but got others.")
        return errors.detach().to("cpu", torch.float64).clone(), seen.detach().cpu().clone(), steps

    def assign_extra_state(self, checked: tuple[Tensor | None, Tensor | None, int] | None) -> None:
        if checked is None:
            return
        errors, seen, steps = checked
        self._steps_device = None  # device counts of the run before the restore are superseded
        if errors is not None:
            self.errors, self.seen, self._restored_state = errors, seen, True
        self.steps = steps

    def restored_groups(self) -> int | None:
        return None if self.errors is None else self.errors.numel()
