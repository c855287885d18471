"""``GroupBalancing``: class/group temperature balancing by sampling ("upsample") or loss weights ("upweight").

Source: "Upsample or Upweight? Balanced Training on Heavily Imbalanced Datasets" (Li et al., NAACL 2025);
the math is in ``lightning_reweight.rules.balance``, the sampler in ``lightning_reweight.samplers.balanced``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_reweight.callbacks._install import train_dataset, train_loader_batch_size
from lightning_reweight.callbacks.base import GlobalBatch, WeightingCallback
from lightning_reweight.callbacks.sampling import install_sampler
from lightning_reweight.rules.balance import (
    ScheduleName,
    Shape,
    TemperatureSchedule,
    check_groups,
    temperature_distribution,
    upweight_factors,
)
from lightning_reweight.samplers.balanced import TemperatureSampler, Unit

__all__ = ["GroupBalancing"]

Mode = Literal["upsample", "upweight"]
By = Literal["auto", "group", "target"]


def dataset_group_ids(dataset: Any, by: By) -> tuple[Tensor, str]:
    """Per-sample ids to balance over: the data set's ``groups`` or ``targets`` (``IndexedDataset`` exposes both)."""
    candidates = {"group": ("groups",), "target": ("targets",), "auto": ("groups", "targets")}[by]
    for attr in candidates:
        ids = getattr(dataset, attr, None)
        if ids is not None:
            ids = torch.as_tensor(ids)
            if ids.ndim == 1 and not ids.is_floating_point():
                return ids.long(), attr
    raise ValueError(
        f"GroupBalancing(by={by!r}) found no per-sample {' or '.join(candidates)} on the training data set "
        f"({type(dataset).__name__}). Wrap it as `IndexedDataset(ds, groups=group_ids)` or "
        "`IndexedDataset(ds, targets=labels)` (targets are also read from `ds.targets`/`labels`/`y`)."
    )


class GroupBalancing(WeightingCallback):
    """Balance classes or groups by temperature, by sampling or by loss weights, with an optional Cooldown.

    Temperature: ``p(g; τ) ∝ n_g^{1/τ}`` (τ = 1 proportional, τ = ∞ uniform over groups).

    * ``mode="upsample"``: installs a ``TemperatureSampler`` in the train dataloader — groups are drawn with
      ``p(g; τ)`` and samples uniformly within a group (with replacement, N draws per epoch by default).
    * ``mode="upweight"``: keeps the loader's plain shuffling (proportional) and weights each sample's loss by
      ``w_g = p(g; τ) / p(g; 1)`` via ``reduce_loss``. The weights average 1 under proportional sampling, so
      they are not renormalised per batch (``normalized = False``): the expected loss is exactly that of
      temperature sampling (the paper's Thm 1), with more gradient variance (Thm 2-3).

    ``schedule="cooldown"`` moves τ from ``tau_start`` to ``tau_end`` at ``switch_fraction`` of training
    (paper: 5 → 1 at one half, a single ``"step"``; ``"linear"``/``"cosine"`` are gradual alternatives that did
    worse in the paper). ``unit="epoch"`` measures progress as ``epoch / max_epochs`` (τ fixed within an epoch);
    ``unit="step"`` as optimizer steps over the run (``max_steps`` or ``max_epochs`` × steps per epoch), so the
    switch can fall inside an epoch (the upsample draw is then made in segments).

    Ids come from the training data set: ``IndexedDataset(groups=...)`` or its ``targets`` (``by="auto"``
    prefers groups). Under DDP pass ``Trainer(use_distributed_sampler=False)`` in upsample mode;
    ``SamplerState`` is added automatically when missing.

    Logged: ``{name}/tau``, ``{name}/p/group_g`` (target group distribution), ``{name}/draw_freq/group_g``
    (empirical share of each group among the samples trained on this epoch, from the gathered batches),
    ``{name}/w/group_g`` in upweight mode, plus the base class's weight statistics (mean, max, ESS, histogram)
    and ``SamplerState``'s per-group sampling mass.

    Args:
        mode: ``"upsample"`` (temperature sampling) or ``"upweight"`` (scalarization).
        tau: constant temperature (``schedule="constant"``); default ∞ = class/group-balanced.
        schedule: ``"constant"`` or ``"cooldown"``.
        tau_start: Cooldown: τ before the switch (paper: 5).
        tau_end: Cooldown: τ after the switch (paper: 1).
        switch_fraction: Cooldown: fraction of training at which τ switches (paper: 0.5).
        shape: Cooldown: how τ moves from ``tau_start`` to ``tau_end`` (paper: ``"step"``).
        unit: progress in ``"epoch"`` or ``"step"``.
        by: balance over ``"group"`` ids, class ``"target"`` s, or ``"auto"``.
        num_samples: draws per epoch in upsample mode (default N).
        replacement: upsample with replacement (default) or without (then ``num_samples`` ≤ N nonzero items).
        seed: sampler seed (shared by all ranks).
        log_every_n_steps: as in ``WeightingCallback``.
        log_histogram: as in ``WeightingCallback``.
        name: as in ``WeightingCallback``.
        fresh_table: keyword-only; start the per-sample table fresh on resume (see ``WeightingCallback``).
        device: keyword-only; where the state lives: ``"auto"`` (follows the module), ``"cpu"`` or a device
            (see ``WeightingCallback``).
        sync_checks: keyword-only; read the step's checks back to the host every step (``True``) or defer them
            (``False``: no host sync per step on a GPU; see ``WeightingCallback``).

    Example::

        trainer = Trainer(callbacks=[GroupBalancing(mode="upsample", schedule="cooldown")], max_epochs=10)
        trainer = Trainer(callbacks=[GroupBalancing(mode="upweight", tau=float("inf"))], max_epochs=10)
    """

    log_prefix = "balance"
    device_ready = True  # upweight on a GPU batch: gathers only (group ids and weights move there once)

    def __init__(
        self,
        mode: Mode = "upsample",
        tau: float = math.inf,
        schedule: ScheduleName = "constant",
        tau_start: float = 5.0,
        tau_end: float = 1.0,
        switch_fraction: float = 0.5,
        shape: Shape = "step",
        unit: Unit = "epoch",
        by: By = "auto",
        num_samples: int | None = None,
        replacement: bool = True,
        seed: int = 0,
        log_every_n_steps: int = 50,
        log_histogram: bool = True,
        name: str | None = None,
        *,
        fresh_table: bool = False,
        device: str | torch.device = "auto",
        sync_checks: bool = True,
    ) -> None:
        super().__init__(track_samples=False, log_every_n_steps=log_every_n_steps, log_histogram=log_histogram,
                         name=name, fresh_table=fresh_table, device=device, sync_checks=sync_checks)
        if mode not in ("upsample", "upweight"):
            raise ValueError(f"Expected argument `mode` to be 'upsample' or 'upweight', but got {mode!r}.")
        if unit not in ("epoch", "step"):
            raise ValueError(f"Expected argument `unit` to be 'epoch' or 'step', but got {unit!r}.")
        if by not in ("auto", "group", "target"):
            raise ValueError(f"Expected argument `by` to be 'auto', 'group' or 'target', but got {by!r}.")
        self.schedule = TemperatureSchedule(schedule, tau=tau, tau_start=tau_start, tau_end=tau_end,
                                            switch_fraction=switch_fraction, shape=shape)
        self.mode, self.unit, self.by = mode, unit, by
        self.sampler_num_samples, self.replacement, self.seed = num_samples, bool(replacement), int(seed)
        # upweight: the weights average 1 under proportional sampling; a per-batch renormalisation would bias them
        self.normalized = mode != "upweight"
        self.sampler: TemperatureSampler | None = None
        self.groups: Tensor | None = None
        self.counts: Tensor | None = None
        self._total_steps: int | None = None
        self._draws = torch.zeros(0, dtype=torch.float64)
        self._device_cache: tuple[Any, Tensor] | None = None  # ((tau, device), group weights there)
        self._groups_device: tuple[Tensor, Tensor] | None = None  # (self.groups, the same on the batch's device)
        self._cache: tuple[float, Tensor] | None = None

    # ------------------------------------------------------------------ ids and schedule
    def _set_groups(self, dataset: Any) -> None:
        ids, _ = dataset_group_ids(dataset, self.by)
        self.groups = check_groups(ids)
        self.counts = torch.bincount(self.groups).to(torch.float64)

    def _ensure_groups(self, trainer: pl.Trainer) -> None:
        if self.groups is None:
            dataset = train_dataset(getattr(trainer, "train_dataloader", None))
            if dataset is None:
                raise ValueError(
                    f"{type(self).__name__} reads every training sample's group id from the train dataloader's "
                    "data set, but the run has none. Outside the Trainer pass it to the door: "
                    "`Reweighter([...], train_dataloader=loader)` (Fabric: "
                    "`Reweighter.for_fabric(fabric, train_dataloader=loader)`)."
                )
            self._set_groups(dataset)

    @staticmethod
    def _total_steps_for(trainer: pl.Trainer, batches_per_epoch: int) -> int:
        """Optimizer steps of the run: ``max_steps``, or ``max_epochs`` × steps per epoch (the smaller if both)."""
        accumulate = max(1, trainer.accumulate_grad_batches)
        candidates = []
        if trainer.max_steps is not None and trainer.max_steps > 0:
            candidates.append(int(trainer.max_steps))
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            candidates.append(int(trainer.max_epochs) * max(1, batches_per_epoch // accumulate))
        if not candidates:
            raise ValueError("GroupBalancing(unit='step') needs a finite `max_steps` or `max_epochs`.")
        return min(candidates)

    def _max_epochs(self, trainer: pl.Trainer) -> int:
        if trainer.max_epochs is None or trainer.max_epochs < 1:
            raise ValueError(
                f"{type(self).__name__}(schedule='cooldown', unit='epoch') needs `Trainer(max_epochs=...)`; "
                "for a run bounded by `max_steps` use unit='step'."
            )
        return int(trainer.max_epochs)

    def progress(self, trainer: pl.Trainer) -> float:
        """Training progress in [0, 1] that the schedule reads (epoch- or step-based)."""
        if self.schedule.schedule == "constant":
            return 0.0
        if self.unit == "epoch":
            return trainer.current_epoch / self._max_epochs(trainer)
        if self._total_steps is None:
            self._total_steps = self._total_steps_for(trainer, len(trainer.train_dataloader))
        return trainer.global_step / self._total_steps

    def tau(self, trainer: pl.Trainer) -> float:
        return self.schedule(self.progress(trainer))

    # ------------------------------------------------------------------ upsample: the sampler
    def _make_sampler(self, trainer: pl.Trainer, loader: Any) -> TemperatureSampler:
        if self.sampler is not None and self.sampler.num_weights == len(loader.dataset):
            return self.sampler  # reloaded dataloader: keep the sampler (and its state)
        self._set_groups(loader.dataset)
        num_epochs = total_steps = batch = None
        if self.schedule.schedule != "constant":
            if self.unit == "epoch":
                num_epochs = self._max_epochs(trainer)
            else:
                # count the real batches of each rank (the last one of an epoch may be partial), the same step
                # count that upweight mode reads from `trainer.global_step`
                batch = train_loader_batch_size(loader)
                accumulate = max(1, trainer.accumulate_grad_batches)
                per_rank = math.ceil((self.sampler_num_samples or len(loader.dataset)) / trainer.world_size)
                self._total_steps = self._total_steps_for(trainer, math.ceil(per_rank / batch))
                total_steps = self._total_steps * accumulate
        self.sampler = TemperatureSampler(
            self.groups, schedule=self.schedule, unit=self.unit, num_epochs=num_epochs, batch_size=batch,
            total_steps=total_steps, num_samples=self.sampler_num_samples, replacement=self.replacement,
            seed=self.seed, num_replicas=trainer.world_size, rank=trainer.global_rank,
        )
        return self.sampler

    def _adopt(self, sampler: TemperatureSampler) -> None:
        self.sampler, self.groups, self.counts = sampler, sampler.groups, sampler.counts

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.mode == "upsample":
            install_sampler(trainer, self._make_sampler, owner=type(self).__name__, sampler_type=TemperatureSampler,
                            adopt=self._adopt)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # ids are read once here, so `compute_weights` only reads state (atomic steps)
        self._ensure_groups(trainer)
        if self._draws.numel() and self._draws.numel() != self.counts.numel():
            from lightning_reweight.state.validate import CheckpointStateError

            raise CheckpointStateError(f"{self.state_key}['extra']", "draws",
                                       f"expected {self.counts.numel()} per-group counts (this data set's groups), "
                                       f"but got {self._draws.numel()}.")

    # ------------------------------------------------------------------ upweight: the loss weights
    def group_weights(self, tau: float) -> Tensor:
        """``w_g = p(g; τ) / p(g; 1)`` (float64 ``(G,)``), cached per τ."""
        if self._cache is None or self._cache[0] != tau:
            self._cache = (tau, upweight_factors(self.counts, tau))
        return self._cache[1]

    @override
    def compute_weights(self, batch: GlobalBatch, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor | None:
        if self.mode != "upweight":
            return None
        if self.groups is None:
            raise RuntimeError("GroupBalancing has no group ids yet: it reads them at `on_train_start`.")
        tau = self.tau(trainer)
        device = batch.index.device
        if device.type == "cpu":
            return self.group_weights(tau).index_select(0, self.groups.index_select(0, batch.index)).float()
        # a GPU batch: the group ids and the per-tau weights move there once (and again when tau changes)
        groups = self._groups_on(device)
        if self._device_cache is None or self._device_cache[0] != (tau, device):
            self._device_cache = ((tau, device), self.group_weights(tau).to(device, torch.float32))
        return self._device_cache[1][groups[batch.index]]

    def _groups_on(self, device: torch.device) -> Tensor:
        """The group ids on ``device``, copied once per device and per group assignment (a GPU step then
        indexes them without a host transfer; "upsample" mode needs them too, for the draw counts)."""
        cache = self._groups_device
        if cache is None or cache[0] is not self.groups or cache[1].device != device:
            self._groups_device = cache = (self.groups, self.groups.to(device))
        return cache[1]

    @override
    def on_weights_computed(self, batch: GlobalBatch, weights: Tensor, trainer: pl.Trainer,
                            pl_module: pl.LightningModule) -> None:
        super().on_weights_computed(batch, weights, trainer, pl_module)
        if self.groups is None:
            return
        if batch.index.device.type != "cpu":  # no bincount and no host copy of the index (both sync)
            ids = self._groups_on(batch.index.device)[batch.index]
            counts = torch.zeros(self.counts.numel(), dtype=torch.float64, device=ids.device)
            counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))
        else:
            counts = torch.bincount(self.groups[batch.index.cpu()], minlength=self.counts.numel()).to(torch.float64)
        if self._draws.device != counts.device:
            self._draws = self._draws.to(counts.device)
        self._draws = counts if self._draws.numel() != counts.numel() else self._draws + counts

    # ------------------------------------------------------------------ logging
    @override
    def outside_trainer_refusal(self) -> str | None:
        if self.mode == "upsample":
            return ("mode='upsample' installs its sampler into the Trainer's train dataloader. Outside the Trainer, "
                    "build the sampler yourself (`lightning_reweight.samplers.TemperatureSampler(group_ids, tau=...)` "
                    "in your DataLoader), or use mode='upweight'.")
        return None

    @property
    @override
    def requires_reduce_loss(self) -> bool:
        return self.mode == "upweight"  # upsampling works through the sampler alone

    @override
    def log_step(self, trainer: Any, pl_module: Any) -> None:
        if self.mode == "upsample":  # no loss weights to log (all 1); SamplerState logs the draw distribution
            self._last = None
            return
        super().log_step(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.groups is None:
            return
        tau = self.sampler.tau_for_epoch(trainer.current_epoch) if self.sampler is not None else self.tau(trainer)
        stats = {"tau": tau if math.isfinite(tau) else float("inf")}
        p = temperature_distribution(self.counts, tau)
        stats.update({f"p/group_{g}": float(v) for g, v in enumerate(p.tolist())})
        if self.mode == "upweight":
            stats.update({f"w/group_{g}": float(v) for g, v in enumerate(self.group_weights(tau).tolist())})
        if self._draws.numel() and float(self._draws.sum()) > 0:
            freq = self._draws / self._draws.sum()
            stats.update({f"draw_freq/group_{g}": float(v) for g, v in enumerate(freq.tolist())})
        self._draws = torch.zeros(0, dtype=torch.float64)
        pl_module.log_dict({f"{self.prefix}/{k}": v for k, v in stats.items()}, on_step=False, on_epoch=True,
                           rank_zero_only=True)

    # ------------------------------------------------------------------ checkpoint
    @override
    def extra_state(self) -> dict[str, Any]:
        return {"total_steps": self._total_steps, "draws": self._draws.detach().to("cpu", copy=True)}

    @override
    def check_extra_state(self, state: dict[str, Any]) -> Tensor | None:
        """Validate the epoch's draw counts (returned); assigns nothing. ``total_steps`` is derived from this
        run's Trainer (it depends on the world size), so a resume on another world size follows this run's step
        schedule: it is only checked."""
        from lightning_reweight.state.validate import as_int, as_tensor, require_keys

        where = self.checkpoint_where
        state = require_keys(state, [], where)
        if "total_steps" in state:
            as_int(state, "total_steps", where, minimum=1, optional=True)
        if state.get("draws") is None:
            return None
        length = self.counts.numel() if self.counts is not None else None
        return as_tensor(state, "draws", where, length=length if length and state["draws"].numel() else None,
                         minimum=0.0)

    @override
    def assign_extra_state(self, checked: Tensor | None) -> None:
        if checked is not None:
            self._draws = checked.to(torch.float64).clone()
