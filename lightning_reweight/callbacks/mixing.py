"""``StreamMixing``: temperature sampling ("upsample") or upweighting over a ``StreamMixture`` of streams.

Source: "Upsample or Upweight? Balanced Training on Heavily Imbalanced Datasets" (Li et al., NAACL 2025): the
domain (language) of each sequence is drawn from ``p_k(τ) ∝ n_k^(1/τ)``; its twin trains on the natural mixture
(τ = 1) and weighs domain ``k``'s loss by ``p_k(τ)/p_k(1)``; Cooldown moves τ from 5 to 1 at half the run. The
math is ``rules.balance`` (shared with ``GroupBalancing``), the draw ``samplers.mixture``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_reweight.callbacks._install import restart_train_iterator, train_dataset
from lightning_reweight.callbacks.base import GlobalBatch, WeightingCallback
from lightning_reweight.callbacks.logging import log_scalars
from lightning_reweight.rules.balance import ScheduleName, Shape, TemperatureSchedule, upweight_factors
from lightning_reweight.samplers.mixture import StreamMixture

__all__ = ["StreamMixing", "effective_tau"]

Mode = Literal["upsample", "upweight"]


def effective_tau(sizes: Tensor, mass: Tensor) -> float:
    """The τ that fits a per-domain training mass best: ``1 / slope`` of ``log mass_k`` on ``log n_k``
    (least squares over the domains with mass > 0; ``p_k(τ) ∝ n_k^(1/τ)`` has slope ``1/τ``). ``inf`` for a
    flat (uniform) mass, ``nan`` with fewer than two distinct sizes."""
    keep = (mass > 0) & (sizes > 0)
    x, y = sizes[keep].double().log(), mass[keep].double().log()
    if x.numel() < 2 or float(x.var(unbiased=False)) == 0.0:
        return math.nan
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    return math.inf if slope <= 1e-9 else 1.0 / slope


class StreamMixing(WeightingCallback):
    """Mix streams by temperature (``"upsample"``) or weigh the natural mixture's domains (``"upweight"``).

    The train dataloader's data set must be a ``StreamMixture`` (e.g. ``MultilingualDataModule``'s). One config
    switches the mode, as ``GroupBalancing`` does for classes:

    * ``mode="upsample"``: the mixture draws each sequence's domain from ``p_k(τ)``, τ from the schedule.
    * ``mode="upweight"``: the mixture draws at τ = 1 (proportional) and this callback weighs each sequence's loss by
      ``w_k = p_k(τ)/p_k(1)`` through ``reduce_loss(self, losses, group=batch["domain"])``. The weights average 1
      under the natural mixture and are not renormalised per batch (``normalized = False``), so the expected loss
      is the temperature-sampled one (the paper's Thm 1), with more gradient variance.

    τ follows the schedule at each sequence's place in the run (``position / total_sequences``): ``constant``
    (``tau``) or ``cooldown`` (paper: ``tau_start=5 → tau_end=1`` at ``switch_fraction=0.5``, one ``"step"``;
    ``"linear"``/``"cosine"`` are gradual alternatives the paper found worse). ``total_sequences`` defaults to
    ``Trainer(max_steps) × batch_size × world_size`` and is kept by a resumed run.

    The callback counts the global position in the main process (from each batch's ``end``) and checkpoints the
    mixture (position, per-domain counts, ``total_sequences``, identity); a resumed run continues with exactly the
    sequences not yet trained on, on the same or another number of processes. A checkpoint of other streams or
    another seed is refused (``CheckpointStateError``) before the first step.

    Logged every ``log_every_n_steps`` (and in ``trainer.callback_metrics``): ``{name}/tau`` (the target τ),
    ``{name}/draw_tau`` (τ of the draws), ``{name}/tau_effective`` (fitted from the window's training mass: draws,
    times the weights in upweight mode), ``{name}/share/<domain>`` (draw share since the last log),
    ``{name}/p/<domain>`` (the target ``p_k(τ)``), ``{name}/passes/<domain>`` (passes through the domain so far),
    ``{name}/train_loss/<domain>`` (mean training loss since the last log; needs ``group=batch["domain"]`` in
    ``reduce_loss``), ``{name}/w/<domain>`` in upweight mode.

    Args:
        mode: ``"upsample"`` (temperature sampling) or ``"upweight"`` (natural mixture, weighted losses).
        tau: constant temperature (``schedule="constant"``); 1 = natural mixture, ``inf`` = uniform.
        schedule: ``"constant"`` or ``"cooldown"``.
        tau_start, tau_end, switch_fraction, shape: Cooldown (paper: 5, 1, 0.5, ``"step"``).
        total_sequences: sequences of the run (the schedule's 100 %); default from ``max_steps``.
        log_every_n_steps: logging cadence (0: off).
        name: log prefix and checkpoint key (two instances need two names).

    Example::

        trainer = Trainer(max_steps=2000, callbacks=[StreamMixing(mode="upsample", schedule="cooldown")])
        trainer = Trainer(max_steps=2000, callbacks=[StreamMixing(mode="upweight", tau=5.0)])
    """

    log_prefix = "mix"
    needs_sample_state = False

    def __init__(self, mode: Mode = "upsample", tau: float = 5.0, schedule: ScheduleName = "constant",
                 tau_start: float = 5.0, tau_end: float = 1.0, switch_fraction: float = 0.5, shape: Shape = "step",
                 total_sequences: int | None = None, log_every_n_steps: int = 50, name: str | None = None, *,
                 sync_checks: bool = True) -> None:
        super().__init__(track_samples=False, log_every_n_steps=log_every_n_steps, log_histogram=False, name=name,
                         sync_checks=sync_checks)
        if mode not in ("upsample", "upweight"):
            raise ValueError(f"Expected argument `mode` to be 'upsample' or 'upweight', but got {mode!r}.")
        if total_sequences is not None and (isinstance(total_sequences, bool) or not isinstance(total_sequences, int)
                                            or total_sequences < 1):
            raise ValueError(f"Expected argument `total_sequences` to be a positive int or None, but got "
                             f"{total_sequences!r}.")
        self.mode = mode
        self.schedule = TemperatureSchedule(schedule, tau=tau, tau_start=tau_start, tau_end=tau_end,
                                            switch_fraction=switch_fraction, shape=shape)
        self.total_sequences = total_sequences
        self.normalized = mode != "upweight"  # upweight factors average 1 under the natural mixture
        self.mixture: StreamMixture | None = None
        self._pending: Any = None  # the checkpoint's mixture state, assigned when the mixture is known
        self._factors: tuple[float, Tensor] | None = None
        self._window_start: Tensor | None = None  # counts at the last log
        self._loss_sums: Tensor | None = None  # (K, 2): per-domain loss sum and count since the last log

    # ------------------------------------------------------------------ the mixture
    def _find_mixture(self, trainer: pl.Trainer) -> StreamMixture:
        dataset = train_dataset(getattr(trainer, "train_dataloader", None))
        if not isinstance(dataset, StreamMixture):
            raise TypeError(
                f"Expected the train dataloader's data set to be a `StreamMixture`, but got "
                f"{type(dataset).__name__}. Build one over your streams "
                "(`DataLoader(StreamMixture(streams, batch_size=...), batch_size=None)`) or use "
                "`lightning_reweight.data.MultilingualDataModule`; for classes or groups of a map-style data set "
                "use `GroupBalancing`.")
        return dataset

    def target_tau(self, position: int) -> float:
        """τ the run aims at for the sequence at ``position`` (the draws' τ in upsample mode)."""
        if self.schedule.schedule == "constant":
            return self.schedule.tau
        assert self.mixture is not None and self.mixture.total_sequences is not None
        return self.schedule(position / self.mixture.total_sequences)

    def _total_for(self, trainer: pl.Trainer, mixture: StreamMixture) -> int | None:
        if self.total_sequences is not None:
            return self.total_sequences
        if mixture.total_sequences is not None:
            return mixture.total_sequences
        if trainer.max_steps is not None and trainer.max_steps > 0:
            accumulate = max(1, trainer.accumulate_grad_batches)
            return int(trainer.max_steps) * accumulate * mixture.batch_size * trainer.world_size
        return None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        mixture = self._find_mixture(trainer)
        values = None
        if self._pending is not None:  # validate against this mixture before anything is assigned
            values = mixture.check_state_dict(self._pending, where=self.checkpoint_where)
        total = values["total_sequences"] if values is not None and values["total_sequences"] else None
        total = total or self._total_for(trainer, mixture)
        if self.schedule.schedule != "constant" and total is None:
            raise ValueError(
                f"{type(self).__name__}(schedule={self.schedule.schedule!r}) needs the run's length: set "
                "`Trainer(max_steps=...)` or `StreamMixing(total_sequences=...)`.")
        mixture.total_sequences = total
        if values is not None:
            mixture.position, mixture.counts = values["position"], values["counts"]
            self._pending = None
        if self.mode == "upsample":
            mixture.schedule = self.schedule
        else:
            mixture.set_temperature(1.0)
        mixture.rank, mixture.world_size = trainer.global_rank, trainer.world_size
        self.mixture = mixture
        self._window_start = mixture.counts.clone()
        self._loss_sums = torch.zeros(mixture.num_domains, 2, dtype=torch.float64)
        # Lightning starts the train iterator (and fetches a batch) before `on_train_start`: start it again, so
        # the first batch is drawn with this schedule, world and position (nothing was counted yet)
        restart_train_iterator(trainer)

    @override
    def outside_trainer_refusal(self) -> str | None:
        return ("it configures and checkpoints the Trainer's train dataloader. Outside the Trainer drive the "
                "`StreamMixture` yourself: set `mixture.schedule`, call `mixture.advance(batch['end'], "
                "batch['counts'])` per step and save `mixture.state_dict()`; upweight with "
                "`upweight_factors(mixture.sizes, tau)[batch['domain']]`.")

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.mixture is not None and isinstance(batch, dict) and "end" in batch and "counts" in batch:
            self.mixture.advance(int(batch["end"]), batch["counts"])  # counted in the main process

    # ------------------------------------------------------------------ upweight: the loss weights
    def factors(self, tau: float) -> Tensor:
        """``w_k = p_k(τ)/p_k(1)`` (float64 ``(K,)``), cached per τ."""
        assert self.mixture is not None
        if self._factors is None or self._factors[0] != tau:
            self._factors = (tau, upweight_factors(self.mixture.sizes.to(torch.float64), tau))
        return self._factors[1]

    @override
    def validate_batch(self, batch: GlobalBatch, trainer: pl.Trainer) -> None:
        super().validate_batch(batch, trainer)
        assert self.mixture is not None, "found at on_train_start"
        if batch.group is None and self.mode == "upweight":
            raise ValueError(
                f"Expected {type(self).__name__}(mode='upweight') to get each sequence's domain id, but "
                "`reduce_loss` got no `group`. Pass it: `reduce_loss(self, losses, group=batch[\"domain\"])`.")
        if batch.group is not None and batch.group.numel():
            hi = int(batch.group.max())
            if hi >= self.mixture.num_domains or int(batch.group.min()) < 0:
                raise ValueError(f"Expected domain ids in [0, {self.mixture.num_domains}), but got {hi}. Pass the "
                                 "mixture's ids: `group=batch[\"domain\"]`.")

    @override
    def compute_weights(self, batch: GlobalBatch, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor | None:
        if self.mode != "upweight":
            return None
        assert self.mixture is not None and batch.group is not None
        # the τ of the batch's own sequences (the position was advanced to the batch's end at its start)
        start = self.mixture.position - self.mixture.batch_size * self.mixture.world_size
        w = self.factors(self.target_tau(max(start, 0)))
        return w.to(batch.group.device, torch.float32)[batch.group]

    @override
    def on_weights_computed(self, batch: GlobalBatch, weights: Tensor, trainer: pl.Trainer,
                            pl_module: pl.LightningModule) -> None:
        super().on_weights_computed(batch, weights, trainer, pl_module)
        if batch.group is None or self._loss_sums is None:
            return
        g = batch.group.detach().cpu()
        losses = batch.losses.detach().to("cpu", torch.float64)
        self._loss_sums[:, 0].index_add_(0, g, losses)
        self._loss_sums[:, 1].index_add_(0, g, torch.ones_like(losses))

    # ------------------------------------------------------------------ monitoring
    @property
    @override
    def requires_reduce_loss(self) -> bool:
        return self.mode == "upweight"  # upsampling works through the mixture alone

    @override
    def log_step(self, ctx: Any, module: Any) -> None:
        self._last = None  # the weights are per-domain constants: the per-domain scalars below say it all

    def stats(self) -> dict[str, float]:
        """The monitoring scalars of the window since the last log (see the class docstring)."""
        mix = self.mixture
        if mix is None or self._window_start is None:
            return {}
        tau = self.target_tau(mix.position)
        draw_tau = tau if self.mode == "upsample" else 1.0
        out: dict[str, float] = {"tau": tau, "draw_tau": draw_tau}
        drawn = (mix.counts - self._window_start).to(torch.float64)
        p = mix.probabilities(tau)
        w = self.factors(tau) if self.mode == "upweight" else torch.ones_like(p)
        if float(drawn.sum()) > 0:
            out["tau_effective"] = effective_tau(mix.sizes, drawn * w)
        for k, name in enumerate(mix.names):
            if float(drawn.sum()) > 0:
                out[f"share/{name}"] = float(drawn[k] / drawn.sum())
            out[f"p/{name}"] = float(p[k])
            out[f"passes/{name}"] = float(mix.passes[k])
            if self.mode == "upweight":
                out[f"w/{name}"] = float(w[k])
            if self._loss_sums is not None and self._loss_sums[k, 1] > 0:
                out[f"train_loss/{name}"] = float(self._loss_sums[k, 0] / self._loss_sums[k, 1])
        return out

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.mixture is None or not self.should_log(trainer):
            return
        stats = self.stats()
        log_scalars(trainer, {f"{self.prefix}/{k}": v for k, v in stats.items()}, pl_module=pl_module)
        self._window_start = self.mixture.counts.clone()
        if self._loss_sums is not None:
            self._loss_sums.zero_()

    # ------------------------------------------------------------------ checkpoint
    @override
    def extra_state(self) -> dict[str, Any]:
        if self.mixture is not None:
            return {"mixture": self.mixture.state_dict()}
        return {"mixture": self._pending}

    @override
    def check_extra_state(self, state: dict[str, Any]) -> Any:
        """Shape checks here; the identity (sizes, seed) is checked against the mixture at ``on_train_start``,
        before it is assigned (the train dataloader does not exist yet when Lightning restores callbacks)."""
        from lightning_reweight.state.validate import as_int, as_tensor, require_keys

        where = self.checkpoint_where
        state = require_keys(state, ["mixture"], where)
        mix = state["mixture"]
        if mix is None:
            return None
        mix = require_keys(mix, ["position", "counts", "sizes", "seed"], f"{where}['mixture']")
        as_int(mix, "position", f"{where}['mixture']", minimum=0)
        as_tensor(mix, "counts", f"{where}['mixture']", kind="int", minimum=0)
        as_tensor(mix, "sizes", f"{where}['mixture']", kind="int", minimum=1)
        if self.mixture is not None:
            self.mixture.check_state_dict(mix, where=f"{where}['mixture']")
        return mix

    @override
    def assign_extra_state(self, checked: Any) -> None:
        if checked is None:
            return
        if self.mixture is not None:
            self.mixture.load_state_dict(checked)
        else:
            self._pending = checked
