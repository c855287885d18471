"""Class/group temperature sampling ("upsample") and its loss-weight twin ("upweight"), with Cooldown.

Source: "Upsample or Upweight? Balanced Training on Heavily Imbalanced Datasets" (Li et al., NAACL 2025); the
math lives in ``lightning_reweight.rules.balance``.

* ``TemperatureSampler`` — a ``WeightedSampler`` whose per-sample weight is ``p(g_i; τ) / n_{g_i}`` (uniform
  within a group), with τ from a constant or Cooldown schedule over epochs or steps.
* ``GroupBalancing`` — the one Lightning callback for both of the paper's modes::

      GroupBalancing(mode="upsample", schedule="cooldown")   # temperature sampling, τ = 5 -> 1
      GroupBalancing(mode="upweight", schedule="cooldown")   # proportional sampling, loss weight p(g;τ)/p(g;1)

  ``mode="upsample"`` installs a ``TemperatureSampler`` in the training DataLoader; ``mode="upweight"``
  keeps the loader's plain shuffling and gives each sample the loss weight ``w_g = p(g; τ) / p(g; 1)``
  through ``reduce_loss``. Same schedule, same expected gradient (Thm 1), different variance (Thm 2-3).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_reweight.rules.balance import (
    TemperatureSchedule,
    check_groups,
    sample_probabilities,
    temperature_distribution,
)
from lightning_reweight.samplers.core import EpochPlan, WeightedSampler, draw_weighted, epoch_generator

Unit = Literal["epoch", "step"]

__all__ = ["TemperatureSampler"]


class TemperatureSampler(WeightedSampler):
    """Draws group g with probability ``p(g; τ) ∝ n_g^{1/τ}`` and a sample uniformly within its group.

    Args:
        groups: ``(N,)`` integer group (or class) id of every dataset item, ``>= 0``.
        schedule: a ``TemperatureSchedule``, or its name ``"constant"`` (default) / ``"cooldown"`` built from the
            next arguments (so the DataModule plugin can configure it from YAML).
        tau: the constant temperature (``inf`` = class-balanced, 1 = proportional).
        tau_start: Cooldown: τ before the switch (paper: 5).
        tau_end: Cooldown: τ after the switch (paper: 1).
        switch_fraction: Cooldown: fraction of training at which τ switches (paper: 0.5).
        shape: Cooldown: how τ moves from ``tau_start`` to ``tau_end`` (paper: ``"step"``).
        unit: ``"epoch"``: τ of epoch e is ``schedule(e / num_epochs)``, fixed within the epoch.
            ``"step"`` with ``batch_size`` and ``total_steps`` (what ``GroupBalancing`` passes): τ follows the
            training step that consumes a draw: position j of epoch e's global sequence is trained at step
            ``e · batches_per_epoch + j // (batch_size · num_replicas)``, where ``batches_per_epoch =
            ceil(len(sampler) / batch_size)`` counts the real batches (the last one may be partial), and
            ``progress = step / total_steps`` — exactly the step count of ``GroupBalancing(mode="upweight")``.
            ``"step"`` with ``total_draws`` instead: ``progress = (e · total_size + j) / total_draws``.
            A Cooldown switch then lands inside an epoch. Needs ``replacement=True``.
        num_epochs: training length in epochs (``unit="epoch"`` with a non-constant schedule).
        total_draws: global samples drawn over the whole run (``unit="step"`` without ``batch_size``).
        batch_size: per-rank batch size of the loader (``unit="step"``): progress counts real batches.
        total_steps: batches (steps) per rank over the whole run (``unit="step"`` with ``batch_size``).
        segment_size: with ``unit="step"``, τ is re-evaluated every ``segment_size`` draws (default: one global
            batch with ``batch_size``, else ``total_size // 100``); ``shape="step"`` needs only the switch.
        num_groups: G, if some groups are empty in ``groups``.
        num_samples: as in ``WeightedSampler``.
        replacement: as in ``WeightedSampler``.
        seed: as in ``WeightedSampler``.
        num_replicas: as in ``WeightedSampler``.
        rank: as in ``WeightedSampler``.
        drop_last: as in ``WeightedSampler``.

    Example::

        sampler = TemperatureSampler(labels, tau=float("inf"))      # class-balanced
        loader = DataLoader(IndexedDataset(ds), batch_size=128, sampler=sampler)
    """

    def __init__(
        self,
        groups: Any,
        schedule: TemperatureSchedule | str | None = None,
        tau: float = math.inf,
        tau_start: float = 5.0,
        tau_end: float = 1.0,
        switch_fraction: float = 0.5,
        shape: str = "step",
        unit: Unit = "epoch",
        num_epochs: int | None = None,
        total_draws: int | None = None,
        segment_size: int | None = None,
        batch_size: int | None = None,
        total_steps: int | None = None,
        num_groups: int | None = None,
        num_samples: int | None = None,
        replacement: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        self.groups = check_groups(torch.as_tensor(groups) if not isinstance(groups, Tensor) else groups, num_groups)
        self.num_groups = int(num_groups) if num_groups is not None else int(self.groups.max()) + 1
        self.counts = torch.bincount(self.groups, minlength=self.num_groups).to(torch.float64)
        if schedule is None or isinstance(schedule, str):
            schedule = TemperatureSchedule(schedule or "constant", tau=tau, tau_start=tau_start, tau_end=tau_end,
                                           switch_fraction=switch_fraction, shape=shape)  # type: ignore[arg-type]
        if not isinstance(schedule, TemperatureSchedule):
            raise TypeError(
                f"Expected argument `schedule` to be a TemperatureSchedule, 'constant' or 'cooldown', but got {schedule!r}."
            )
        self.schedule = schedule
        if unit not in ("epoch", "step"):
            raise ValueError(f"Expected argument `unit` to be 'epoch' or 'step', but got {unit!r}.")
        self.unit = unit
        self.num_epochs = _check_optional_positive("num_epochs", num_epochs)
        self.total_draws = _check_optional_positive("total_draws", total_draws)
        self.segment_size = _check_optional_positive("segment_size", segment_size)
        self.batch_size = _check_optional_positive("batch_size", batch_size)
        self.total_steps = _check_optional_positive("total_steps", total_steps)
        if unit == "step" and not replacement:
            raise ValueError(
                "Expected `replacement=True` with unit='step' (τ changes inside an epoch, so the epoch is drawn in "
                "segments); use unit='epoch' for draws without replacement."
            )
        super().__init__(
            sample_probabilities(self.groups, self.tau_at(0.0), self.num_groups),
            num_samples=num_samples, replacement=replacement, seed=seed, num_replicas=num_replicas, rank=rank,
            drop_last=drop_last,
        )

    # ------------------------------------------------------------------ schedule
    def tau_at(self, progress: float) -> float:
        return self.schedule(progress)

    def epoch_progress(self, epoch: int) -> float:
        if self.schedule.schedule == "constant":
            return 0.0
        if self.unit == "epoch":
            if self.num_epochs is None:
                raise ValueError(
                    "TemperatureSampler with a Cooldown schedule over epochs needs `num_epochs` (the training length)."
                )
            return epoch / self.num_epochs
        if self.batch_size is not None:
            return epoch * self.batches_per_epoch() / self._total_steps(self._plan_extra())
        return epoch * self.total_size / self._total_draws()

    def batches_per_epoch(self, num_samples: int | None = None, num_replicas: int | None = None) -> int:
        """Real batches per rank per epoch (the last one may be partial): ``ceil(len(sampler) / batch_size)``."""
        if self.batch_size is None:
            raise ValueError("Expected `batch_size` to count batches, but got None.")
        per_rank = self._per_rank_for(self.num_samples if num_samples is None else num_samples,
                                      self.num_replicas if num_replicas is None else num_replicas)
        return math.ceil(per_rank / self.batch_size)

    def _total_steps(self, extra: dict) -> int:
        total = extra.get("total_steps")
        if total is None:
            raise ValueError(
                "TemperatureSampler with unit='step' and `batch_size` needs `total_steps` (the run's batches per rank)."
            )
        return int(total)

    def _total_draws(self) -> int:
        if self.total_draws is None:
            raise ValueError(
                "TemperatureSampler with unit='step' needs `total_draws` (= total optimizer steps x global batch size)."
            )
        return self.total_draws

    def tau_for_epoch(self, epoch: int) -> float:
        """τ at the start of ``epoch`` (the whole epoch with ``unit="epoch"``)."""
        return self.tau_at(self.epoch_progress(epoch))

    def group_probabilities(self, epoch: int | None = None) -> Tensor:
        """``p(g; τ)`` at the start of ``epoch`` (default: the current epoch), float64 ``(G,)``."""
        return temperature_distribution(self.counts, self.tau_for_epoch(self.epoch if epoch is None else epoch))

    def epoch_weights(self, epoch: int) -> Tensor:
        return sample_probabilities(self.groups, self.tau_for_epoch(epoch), self.num_groups)

    def _segmented(self) -> bool:
        return self.unit == "step" and self.schedule.schedule != "constant"

    def _plan_extra(self) -> dict:
        return {"total_draws": self.total_draws, "total_steps": self.total_steps, "batch_size": self.batch_size}

    def _draw(self, plan: EpochPlan) -> Tensor:
        if not self._segmented():
            return super()._draw(plan)
        # τ varies inside the epoch: draw consecutive segments of the global stream, each from its own τ.
        generator = epoch_generator(self.seed, plan.epoch)
        parts = []
        for lo, hi, progress in self._segments(plan):
            p = sample_probabilities(self.groups, self.tau_at(progress), self.num_groups)
            parts.append(draw_weighted(p, hi - lo, generator, replacement=True))
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def _segments(self, plan: EpochPlan) -> list[tuple[int, int, float]]:
        """``(lo, hi, progress)`` of the epoch's draw segments (positions of the global sequence)."""
        n, s, extra = plan.num_samples, self.schedule, plan.extra
        batch = extra.get("batch_size")
        if batch is not None:  # progress counts the real batches of the epoch's plan
            total = self._total_steps(extra)
            per_rank = self._per_rank_for(plan.num_samples, plan.world)
            step0 = plan.epoch * math.ceil(per_rank / batch)
            span = batch * plan.world  # global positions per step
            if s.shape == "step":
                switch = (math.ceil(s.switch_fraction * total) - step0) * span  # first position of the switch step
                cuts = [switch] if 0 < switch < n else []
            else:
                cuts = list(range(self.segment_size or span, n, self.segment_size or span))
            bounds = [0, *cuts, n]
            return [(lo, hi, (step0 + lo // span) / total) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
        total = extra.get("total_draws") or self._total_draws()
        start_pos = plan.epoch * plan.total
        if s.shape == "step":
            switch = math.ceil(s.switch_fraction * total) - start_pos  # first position with progress >= switch
            bounds = [0, *([switch] if 0 < switch < n else []), n]
        else:
            seg = self.segment_size or max(1, plan.total // 100)
            bounds = [*range(0, n, seg), n]
        return [(lo, hi, (start_pos + lo) / total) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]

    # ------------------------------------------------------------------ diagnostics
    def segments(self, epoch: int | None = None) -> list[tuple[int, int, float]]:
        """``(lo, hi, tau)``: the temperature of each stretch ``[lo, hi)`` of ``epoch``'s global sequence (as planned
        on this world size). With ``batch_size``, position ``j`` is trained at step
        ``epoch · batches_per_epoch() + j // (batch_size · num_replicas)``."""
        plan = self._fresh_plan(self.epoch if epoch is None else int(epoch))
        if not self._segmented():
            return [(0, plan.num_samples, self.tau_for_epoch(plan.epoch))]
        return [(lo, hi, self.tau_at(progress)) for lo, hi, progress in self._segments(plan)]

    def draw_frequencies(self, indices: Tensor) -> Tensor:
        """Share of each group among ``indices`` (e.g. ``global_indices()``), float64 ``(G,)``."""
        g = self.groups[indices.to(torch.long)]
        return torch.bincount(g, minlength=self.num_groups).to(torch.float64) / max(g.numel(), 1)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["temperature"] = {"unit": self.unit, "num_epochs": self.num_epochs, "total_draws": self.total_draws,
                                "total_steps": self.total_steps, "batch_size": self.batch_size,
                                "num_groups": self.num_groups}
        return state

    def check_state_dict(self, state_dict: Any) -> dict[str, Any]:
        from lightning_reweight.state.validate import CheckpointStateError, as_int, require_keys

        out = super().check_state_dict(state_dict)
        where = f"{type(self).__name__}.state_dict['temperature']"
        t = state_dict.get("temperature", {})
        t = require_keys(t, [], where)
        if t.get("unit", self.unit) != self.unit:
            raise CheckpointStateError(where, "unit", f"expected {self.unit!r} (this run's), but got {t['unit']!r}.")
        if "num_groups" in t and as_int(t, "num_groups", where, minimum=1) != self.num_groups:
            raise CheckpointStateError(where, "num_groups", f"expected {self.num_groups} groups (this data set's), "
                                       f"but got {t['num_groups']}; was the checkpoint made with another data set?")
        for key in ("num_epochs", "total_draws", "total_steps", "batch_size"):
            if key in t:
                as_int(t, key, where, minimum=1, optional=True)
        for key in ("total_draws", "total_steps", "batch_size"):
            if key in out["epoch_extra"]:
                as_int(out["epoch_extra"], key, f"{type(self).__name__}.state_dict['epoch_extra']", minimum=1,
                       optional=True)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore (validated). The restored epoch is drawn with its saved schedule parameters; later epochs use
        this sampler's own (which depend on the world size with ``unit="step"``)."""
        self.check_state_dict(state_dict)
        t = state_dict.get("temperature", {})
        super().load_state_dict(state_dict)
        if self.num_epochs is None:
            self.num_epochs = t.get("num_epochs")


def _check_optional_positive(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected argument `{name}` to be a positive int or None, but got {value!r}.")
    return int(value)
