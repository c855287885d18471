"""``GroupDRO``: online group distributionally robust optimisation as a weighting callback."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_reweight.callbacks._groups import GroupCallback
from lightning_reweight.callbacks.base import GlobalBatch
from lightning_reweight.callbacks.logging import to_host
from lightning_reweight.rules.fairness import (
    dro_adjustment,
    group_dro_update,
)
from lightning_reweight.state.validate import CheckpointStateError, as_distribution, as_int, require_keys

__all__ = ["GroupDRO"]


class GroupDRO(GroupCallback):
    """Group DRO ("Distributionally Robust Neural Networks for Group Shifts", Sagawa et al., ICLR 2020).

    Keeps group weights ``q`` (uniform at start). Each training step, from the *global* batch (all DDP ranks,
    so ``q`` is identical everywhere):

    1. ``ℓ_g`` = mean loss of group g in the batch (0 if absent);
    2. ``q ← q·exp(η·(ℓ_g + C_g/√n_g)) / Σ`` (``n_g`` = training-set count of group g);
    3. *then* the loss of the same step uses the updated ``q`` (official order):
       per-sample weights ``w_i = q_{g_i}·B/n_{g_i}^batch``, so ``(1/B) Σ_i w_i ℓ_i = Σ_g q_g ℓ̄_g``.

    Absent groups get ``exp(0)`` and decay relative to the others, as in the official code. The weights are
    not renormalised (``normalized = False``): they average ``Σ_{g present} q_g``, which makes the loss exactly
    the GroupDRO objective. Samples with ``ignore_index`` get weight 0 (they belong to no group).

    Defaults from the paper's code (``kohpangwei/group_DRO``): η = 0.01 (``--robust_step_size``), C = 0.
    Ours: ``adjustment`` applies per group (the official code applies it only if *every* ``C_g > 0``; mixed
    zeros warn). The paper's runs also sample groups uniformly (``--reweight_groups``); pair this callback
    with a group-balanced sampler to reproduce them.

    State changes (``q``, ``steps``) are committed only after every callback's weights for the step were
    accepted; a batch whose samples all have ``ignore_index`` raises before any change. The checkpointed
    ``q`` is validated at load (a distribution of ``num_groups`` entries).

    Args:
        num_groups: G; inferred from the training data set's ``groups`` (``IndexedDataset``) when ``None``.
        step_size: η of the exponentiated-gradient step.
        adjustment: generalisation adjustment C (one number or one per group); 0/``None`` disables it.
        group_counts: training-set count per group for the adjustment (inferred from the data set if ``None``).
        ignore_index: group id of samples outside every group.
        log_every_n_steps: how often ``group_dro/q/group_g``, ``group_dro/loss/group_g`` and weight stats are logged.
        fresh_table: keyword-only; start the per-sample table fresh on resume (see ``WeightingCallback``).
        device: keyword-only; where the state lives: ``"auto"`` (follows the module), ``"cpu"`` or a device
            (see ``WeightingCallback``).
        sync_checks: keyword-only; read the step's checks back to the host every step (``True``) or defer them
            (``False``: no host sync per step on a GPU; see ``WeightingCallback``).

    Example::

        trainer = Trainer(callbacks=[GroupDRO(step_size=0.01)])
        # training_step: return reduce_loss(self, losses, index, group=group)
    """

    normalized = False
    log_prefix = "group_dro"
    needs_sample_state = False  # per-group state only: runs without an index (streams)

    def __init__(
        self,
        num_groups: int | None = None,
        step_size: float = 0.01,
        adjustment: float | Sequence[float] | None = None,
        group_counts: Sequence[int] | None = None,
        ignore_index: int | None = -1,
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
        if not isinstance(step_size, (int, float)) or not math.isfinite(step_size) or step_size <= 0:
            raise ValueError(f"Expected argument `step_size` to be a positive finite number, but got {step_size!r}.")
        if adjustment is not None:
            c = torch.as_tensor(adjustment, dtype=torch.float64).flatten()
            if not bool(torch.isfinite(c).all()) or bool((c < 0).any()):
                raise ValueError(f"Expected argument `adjustment` to be finite and >= 0, but got {adjustment!r}.")
            if num_groups is not None and c.numel() not in (1, num_groups):
                raise ValueError(
                    f"Expected argument `adjustment` to be one number or {num_groups} numbers, but got {c.numel()}."
                )
            if bool((c > 0).any()) and bool((c == 0).any()):
                rank_zero_warn(
                    f"GroupDRO adjustment {c.tolist()} mixes zeros and positive values: it is applied to the "
                    "groups with C_g > 0 only (the official code would silently disable it for all groups)."
                )
        self.step_size = float(step_size)
        self.adjustment = adjustment
        self.group_counts = list(group_counts) if group_counts is not None else None
        self.q: Tensor | None = None
        self.steps = 0
        self._adj: Tensor | None = None
        self._adj_np: np.ndarray | None = None
        self._adj_device: Tensor | None = None
        self._last_group_loss: tuple[Tensor, Tensor] | None = None
        self._pending: tuple[GlobalBatch, Tensor, Tensor, Tensor] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def setup_groups(self, trainer: pl.Trainer | None) -> None:
        if self.q is not None and self.num_groups is None:
            self.num_groups = self.q.numel()
        num_groups = self.resolve_num_groups(trainer)
        if self.q is None:
            self.q = torch.full((num_groups,), 1.0 / num_groups, dtype=torch.float64)
        elif self.q.numel() != num_groups:
            raise ValueError(f"The restored GroupDRO q has {self.q.numel()} groups but num_groups={num_groups}.")
        if self._adj is None:
            counts = self.group_counts
            if counts is None and self.adjustment is not None:
                counts = self.train_group_counts(trainer)
            self._adj = dro_adjustment(self.adjustment, counts, num_groups)
            self._adj_np = self._adj.numpy() if bool((self._adj != 0).any()) else None

    def validate_batch(self, batch: GlobalBatch, trainer: pl.Trainer) -> None:
        super().validate_batch(batch, trainer)
        _, counts = self.prepared(batch)
        if batch.losses.device.type != "cpu":  # with the step's checks: no host read of its own
            self.check_step(batch, counts[-1] < len(batch), self._all_ignored)
        elif int(counts[-1]) == len(batch):
            self._all_ignored()

    def _all_ignored(self) -> None:
        raise ValueError(
            f"Expected at least one sample with a known group, but every sample of this batch has group "
            f"ignore_index={self.ignore_index}: GroupDRO gives such samples weight 0, so the whole batch would "
            "count 0. No state was updated. Drop unknown-group samples from the training set, or sample "
            "batches that contain known groups (e.g. a group-balanced sampler)."
        )

    def compute_weights(self, batch: GlobalBatch, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        # pure: the new q is committed in ``on_weights_computed`` once every callback's weights were accepted
        assert self.q is not None and self.num_groups is not None and batch.group is not None
        idx, bucket_counts = self.prepared(batch)
        if batch.losses.device.type != "cpu":
            return self._device_weights(batch, idx, bucket_counts)
        # the per-group math runs on numpy views of a few numbers (torch's per-op overhead dominates there)
        counts = bucket_counts.numpy()[: self.num_groups]
        sums = torch.bincount(idx, weights=batch.losses.double(), minlength=self.num_groups + 1).numpy()
        group_loss = sums[: self.num_groups] / np.maximum(counts, 1)
        q = group_dro_update(self.q.cpu().numpy(), group_loss, self.step_size, self._adj_np)  # update, then the loss
        self._pending = (batch, q, group_loss, counts)
        per_group = np.append(q * len(batch) / np.maximum(counts, 1), 0.0).astype(np.float32)
        return torch.from_numpy(per_group).index_select(0, idx)  # ignore_index samples (extra bucket): 0

    def _device_weights(self, batch: GlobalBatch, idx: Tensor, bucket_counts: Tensor) -> Tensor:
        """``compute_weights`` as tensor ops on the batch's device (no host read); ``q`` moves there once."""
        device, g = batch.losses.device, self.num_groups
        q = self.q if self.q.device == device else self.q.to(device)
        if self._adj_device is None or self._adj_device.device != device:
            self._adj_device = self._adj.to(device, torch.float64) if self._adj_np is not None else None
        counts = bucket_counts[:g]
        sums = torch.zeros(g + 1, dtype=torch.float64, device=device).index_add_(0, idx, batch.losses.double())
        group_loss = sums[:g] / counts.clamp_min(1)
        q = group_dro_update(q, group_loss, self.step_size, self._adj_device)  # update, then the loss
        self._pending = (batch, q, group_loss, counts)
        per_group = torch.cat([q * len(batch) / counts.clamp_min(1), q.new_zeros(1)]).float()
        return per_group[idx]  # ignore_index samples (extra bucket): 0

    def on_weights_computed(self, batch: GlobalBatch, weights: Tensor, trainer: pl.Trainer,
                            pl_module: pl.LightningModule) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and isinstance(pending[1], Tensor):  # a device step: q stays on the device
            self.q, self.steps = pending[1], self.steps + 1
            self._last_group_loss = (pending[2], pending[3])
        elif pending is not None:  # (cleared in validate_batch: never a previous, rejected step's)
            self.q, self.steps = torch.from_numpy(pending[1]), self.steps + 1
            self._last_group_loss = (torch.from_numpy(pending[2]), torch.from_numpy(pending[3].copy()))
        super().on_weights_computed(batch, weights, trainer, pl_module)

    def log_extras(self) -> dict[str, float]:
        out: dict[str, float] = {}
        loss, counts = self._last_group_loss if self._last_group_loss is not None else (None, None)
        q, loss, counts = to_host(self.q, loss, counts)  # one transfer on a GPU
        if q is not None:
            out.update({f"q/group_{g}": float(v) for g, v in enumerate(q.tolist())})
        if loss is not None and counts is not None:
            out.update({f"loss/group_{g}": float(loss[g]) for g in counts.nonzero().flatten().tolist()})
        return out

    def extra_state(self) -> dict[str, Any]:
        return {"q": None if self.q is None else self.q.detach().to("cpu", copy=True), "steps": self.steps}

    def check_extra_state(self, state: dict[str, Any]) -> tuple[Tensor | None, int] | None:
        """Validate a checkpoint's extra state (``None``: nothing saved, start fresh); assigns nothing."""
        where = self.checkpoint_where
        if not state:
            return None
        require_keys(state, ["q", "steps"], where)
        steps = as_int(state, "steps", where, minimum=0)
        if state["q"] is None:
            return None, steps
        q = as_distribution(state, "q", where)
        if q.numel() == 0:
            raise CheckpointStateError(where, "q", "expected at least one group, but got an empty tensor.")
        self.check_group_count(state, "q", q.numel())
        return q.detach().to("cpu", torch.float64).clone(), steps

    def assign_extra_state(self, checked: tuple[Tensor | None, int] | None) -> None:
        if checked is None:
            return
        q, steps = checked
        if q is not None:
            self.q, self._restored_state = q, True
        self.steps = steps

    def restored_groups(self) -> int | None:
        return None if self.q is None else self.q.numel()
