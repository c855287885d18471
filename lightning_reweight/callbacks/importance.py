"""``ImportanceSampling``: draw training samples in proportion to a per-sample score, refreshed every epoch(s).

Source: "PA&DA: Jointly Sampling PAth and DAta for Consistent NAS" (Lu et al., CVPR 2023), official code
``ShunLu91/PA-DA:nasbench201/train_panda_201.py``; the math is in ``lightning_reweight.rules.importance``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_reweight.callbacks._install import train_dataset, train_loader_batch_size
from lightning_reweight.callbacks.base import GlobalBatch, WeightingCallback
from lightning_reweight.callbacks.logging import log_histogram
from lightning_reweight.callbacks.sampling import install_sampler
from lightning_reweight.rules.importance import (
    Unseen,
    importance_probabilities,
    mixing_coefficient,
    scatter_ema_,
    unbiasing_weights,
)
from lightning_reweight.rules.instance import effective_sample_size
from lightning_reweight.samplers.importance import ImportanceSampler
from lightning_reweight.state.table import Column

__all__ = ["ImportanceSampling"]

Score = Literal["grad_norm", "loss"]

#: the per-sample extra the core ``ImageClassifier`` hands to ``reduce_loss`` (‖softmax(z) − onehot(y)‖₂)
GRAD_NORM_EXTRA = "grad_norm_proxy"


class ImportanceSampling(WeightingCallback):
    """Importance sampling from a per-sample score table, refreshed every ``refresh_every`` epochs.

    Each training step the score of every drawn sample (from the *gathered* global batch, so the table and
    hence the draw are identical on every DDP rank) updates a table entry:
    ``s ← (1 − smoothing)·s + smoothing·s_new`` (first visit since the last reset sets ``s = s_new``). At a
    refresh the next epoch's draw probabilities become ``p = (1 − ε)·s / Σ s + ε / N`` with the uniform share
    ``ε = max(floor, 1 − e / ramp_epochs)`` (e = epochs done before this refresh), then the table restarts at
    0 if ``reset_scores``. Epoch 0 draws uniformly.

    PA&DA defaults (official code): ``score="grad_norm"`` (``‖softmax(z) − onehot(y)‖₂``), ``smoothing=0.5``
    (the pairwise mean ``(s_old + s_new)/2``), ``reset_scores=True`` (samples not drawn in an epoch score 0),
    ``ramp_epochs=None`` → ``max_epochs`` (``τ_t = epoch/epochs``), ``floor=0``, refresh every epoch, N draws
    with replacement, and no loss correction (``importance_weighting=False``: biased, as in the paper). With
    ``importance_weighting=True`` each sample's loss gets the self-normalised weight ``1/(N p_i)``, which
    makes the expected gradient that of uniform sampling.

    The module must pass per-sample indices to ``reduce_loss``; ``score="grad_norm"`` also needs
    ``reduce_loss(..., grad_norm_proxy=...)`` (the core ``ImageClassifier`` does) or ``target=`` plus
    ``logits=``. The callback installs an ``ImportanceSampler`` in the train dataloader and needs
    ``SamplerState`` (added automatically if missing) and, under DDP, ``Trainer(use_distributed_sampler=False)``.

    Args:
        score: ``"grad_norm"`` (PA&DA) or ``"loss"`` (the per-sample training loss).
        smoothing: weight of a new observation in the score EMA, in (0, 1] (0.5 = PA&DA's pairwise mean).
        reset_scores: restart the score table at 0 after each refresh (PA&DA).
        ramp_epochs: length of the linear ramp from uniform (``None`` = ``trainer.max_epochs``; 0 = no ramp).
        floor: minimum uniform share ε (every sample keeps ``p_i >= floor/N``; > 0 is needed for
            ``importance_weighting`` to stay bounded).
        power: sharpen (> 1) or flatten (< 1) the score distribution, ``p ∝ s^power``.
        unseen: ``"zero"`` (PA&DA: unscored samples get only the uniform share) or ``"mean"``.
        refresh_every: refresh the distribution every this many refresh units.
        refresh_unit: ``"epoch"``, or ``"step"``: each sampler epoch is then ``refresh_every`` optimizer steps
            long (``num_samples = refresh_every × batch size × world size``), so Lightning's epochs become
            refresh periods — train with ``max_steps``.
        importance_weighting: multiply each loss by the self-normalised ``1/(N p_i)``.
        num_samples: global draws per sampler epoch (default N) when ``refresh_unit="epoch"``.
        replacement: draw with replacement (PA&DA) or without (the unbiasing weights then still use ``p_i``, an
            approximation of the without-replacement inclusion probabilities).
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

        trainer = Trainer(callbacks=[ImportanceSampling(score="grad_norm")], use_distributed_sampler=False)
    """

    log_prefix = "importance"

    def __init__(
        self,
        score: Score = "grad_norm",
        smoothing: float = 0.5,
        reset_scores: bool = True,
        ramp_epochs: int | None = None,
        floor: float = 0.0,
        power: float = 1.0,
        unseen: Unseen = "zero",
        refresh_every: int = 1,
        refresh_unit: Literal["epoch", "step"] = "epoch",
        importance_weighting: bool = False,
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
        super().__init__(num_samples=None, track_samples=True, log_every_n_steps=log_every_n_steps,
                         log_histogram=log_histogram, name=name, fresh_table=fresh_table, device=device, sync_checks=sync_checks)
        if score not in ("grad_norm", "loss"):
            raise ValueError(f"Expected argument `score` to be 'grad_norm' or 'loss', but got {score!r}.")
        if not (isinstance(smoothing, (int, float)) and 0 < smoothing <= 1):
            raise ValueError(f"Expected argument `smoothing` to be in (0, 1], but got {smoothing!r}.")
        if ramp_epochs is not None and (isinstance(ramp_epochs, bool) or not isinstance(ramp_epochs, int)
                                        or ramp_epochs < 0):
            raise ValueError(f"Expected argument `ramp_epochs` to be an int >= 0 or None, but got {ramp_epochs!r}.")
        if not (isinstance(floor, (int, float)) and 0 <= floor <= 1):
            raise ValueError(f"Expected argument `floor` to be in [0, 1], but got {floor!r}.")
        if not (isinstance(power, (int, float)) and math.isfinite(power) and power > 0):
            raise ValueError(f"Expected argument `power` to be a positive number, but got {power!r}.")
        if unseen not in ("zero", "mean"):
            raise ValueError(f"Expected argument `unseen` to be 'zero' or 'mean', but got {unseen!r}.")
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"Expected argument `refresh_every` to be a positive int, but got {refresh_every!r}.")
        if refresh_unit not in ("epoch", "step"):
            raise ValueError(f"Expected argument `refresh_unit` to be 'epoch' or 'step', but got {refresh_unit!r}.")
        if refresh_unit == "step" and num_samples is not None:
            raise ValueError("`num_samples` is derived from `refresh_every` when refresh_unit='step'; leave it None.")
        if importance_weighting and floor == 0:
            rank_zero_warn(
                "ImportanceSampling(importance_weighting=True, floor=0): samples with a near-zero score get huge "
                "1/(N p) weights. Set `floor` (e.g. 0.1) to bound them."
            )
        self.score, self.smoothing, self.reset_scores = score, float(smoothing), bool(reset_scores)
        self.ramp_epochs, self.floor, self.power, self.unseen = ramp_epochs, float(floor), float(power), unseen
        self.refresh_every, self.refresh_unit = refresh_every, refresh_unit
        self.importance_weighting = bool(importance_weighting)
        self.sampler_num_samples, self.replacement, self.seed = num_samples, bool(replacement), int(seed)
        self.sampler: ImportanceSampler | None = None
        self._refreshes = 0
        self._last_mixing = 1.0
        self._targets: Tensor | None = None
        self._num_classes = 0
        self._targets_device: Tensor | None = None
        # on a GPU batch the commit is tensor ops only; the loss weights read the sampler's CPU probabilities
        self.device_ready = not importance_weighting
        self._draws = torch.zeros(0, dtype=torch.float64)

    # ------------------------------------------------------------------ table columns
    @override
    def extra_columns(self) -> dict[str, Column]:
        return {"is_score": Column("last", 0.0), "is_seen": Column("last", 0.0)}

    # ------------------------------------------------------------------ sampler
    def _make_sampler(self, trainer: pl.Trainer, loader: Any) -> ImportanceSampler:
        dataset = train_dataset(loader)
        n = len(dataset)
        if self.sampler is not None and self.sampler.num_weights == n:
            return self.sampler  # reloaded dataloader: keep the sampler (and its distribution)
        num_samples = self.sampler_num_samples
        if self.refresh_unit == "step":
            num_samples = self.refresh_every * train_loader_batch_size(loader) * trainer.world_size \
                * trainer.accumulate_grad_batches
        targets = getattr(dataset, "targets", None)
        self._targets = targets.long() if isinstance(targets, Tensor) and targets.numel() == n else None
        self._targets_device = None
        # read once here (O(N)), not per step: 0 when there are no usable class ids
        self._num_classes = (int(self._targets.max()) + 1 if self._targets is not None and self._targets.numel()
                             and int(self._targets.min()) >= 0 else 0)
        self.sampler = ImportanceSampler(n, num_samples=num_samples, replacement=self.replacement, seed=self.seed,
                                         num_replicas=trainer.world_size, rank=trainer.global_rank)
        return self.sampler

    @override
    def outside_trainer_refusal(self) -> str | None:
        return ("it installs its sampler into the Trainer's train dataloader and refreshes it at the Trainer's "
                "epoch ends. Outside the Trainer, draw with `lightning_reweight.samplers.ImportanceSampler` and "
                "set its probabilities yourself, or train with the Trainer.")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            install_sampler(trainer, self._make_sampler, owner=type(self).__name__)

    # ------------------------------------------------------------------ per step
    def _scores(self, batch: GlobalBatch) -> Tensor:
        if self.score == "loss":
            return batch.losses
        if GRAD_NORM_EXTRA in batch.extras:
            return batch.extras[GRAD_NORM_EXTRA].reshape(-1).float()
        if "logits" in batch.extras and batch.target is not None:
            from lightning_reweight.rules.importance import gradnorm_score

            return gradnorm_score(batch.extras["logits"], batch.target)
        raise ValueError(
            "ImportanceSampling(score='grad_norm') needs the per-sample gradient-norm proxy: call "
            "`reduce_loss(self, losses, index, grad_norm_proxy=(logits.softmax(-1) - F.one_hot(y, C)).norm(dim=-1))` "
            "(the core ImageClassifier does), pass `target=y, logits=logits`, or use score='loss'."
        )

    @override
    def validate_batch(self, batch: GlobalBatch, trainer: pl.Trainer) -> None:
        super().validate_batch(batch, trainer)
        s = self._scores(batch)
        if s.numel() == len(batch) and batch.losses.device.type != "cpu":  # with the step's checks (no own read)
            if s is batch.losses:  # checked finite already
                self.check_within(batch, s.amin(), 0.0, math.inf, lambda: self._bad_scores(batch, s))
            else:
                self.check_finite(batch, s, lambda: self._bad_scores(batch, s), minimum=0.0)
        elif s.numel() != len(batch) or s.min().item() < 0 or (
                s is not batch.losses and not bool(torch.isfinite(s).all())):  # the losses were checked finite
            self._bad_scores(batch, s)

    def _bad_scores(self, batch: GlobalBatch, s: Tensor) -> None:
        raise ValueError(
            f"Expected one finite, non-negative {self.score!r} score per sample ({len(batch)}), but got "
            f"{s.numel()} values (min {float(s.min()) if s.numel() else 'n/a'})."
        )

    @override
    def compute_weights(self, batch: GlobalBatch, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor | None:
        if not self.importance_weighting or self.sampler is None:
            return None
        p = self.sampler.probabilities_of(batch.index)  # O(batch): the epoch's total is cached
        return unbiasing_weights(p, self.sampler.num_weights)

    @override
    def on_weights_computed(self, batch: GlobalBatch, weights: Tensor, trainer: pl.Trainer,
                            pl_module: pl.LightningModule) -> None:
        super().on_weights_computed(batch, weights, trainer, pl_module)
        table = self.table
        # the table update found where the indices repeat (draws with replacement): the score update reuses it
        repeats = self._repeats
        # O(batch): only the batch's rows of ``is_score`` / ``is_seen`` are read and written
        info = batch.index_info
        scatter_ema_(table.columns["is_score"], table.columns["is_seen"], batch.index, self._scores(batch),
                     self.smoothing, repeats=repeats, unique=bool(info.unique) and info.describes(batch.index))
        if self._num_classes and batch.index.device.type != "cpu":  # no bincount on a GPU (it syncs)
            if self._targets_device is None or self._targets_device.device != batch.index.device:
                self._targets_device = self._targets.to(batch.index.device)  # once
            ids = self._targets_device[batch.index]
            counts = torch.zeros(self._num_classes, dtype=torch.float64, device=ids.device)
            counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))
            if self._draws.device != counts.device:
                self._draws = self._draws.to(counts.device)
            self._draws = counts if self._draws.numel() != counts.numel() else self._draws + counts
        elif self._num_classes:  # empirical class frequency of the draws
            counts = torch.bincount(self._targets.index_select(0, batch.index), minlength=self._num_classes).double()
            self._draws = counts if self._draws.numel() != counts.numel() else self._draws + counts

    # ------------------------------------------------------------------ refresh
    def _ramp_length(self, trainer: pl.Trainer) -> int:
        if self.ramp_epochs is not None:
            return self.ramp_epochs
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            return int(trainer.max_epochs)
        if trainer.max_steps and trainer.max_steps > 0 and self.sampler is not None:
            steps_per_epoch = max(1, math.ceil(len(self.sampler) / max(1, self._batch_size(trainer))))
            return max(1, math.ceil(trainer.max_steps / steps_per_epoch))
        return 0

    def _batch_size(self, trainer: pl.Trainer) -> int:
        return train_loader_batch_size(trainer.train_dataloader) * trainer.accumulate_grad_batches

    def next_probabilities(self, epochs_done: int, trainer: pl.Trainer | None = None) -> Tensor:
        """The distribution a refresh after ``epochs_done`` epochs would install (float64, sums to 1)."""
        table = self.ensure_table(trainer)
        ramp = self._ramp_length(trainer) if trainer is not None else (self.ramp_epochs or 0)
        self._last_mixing = mixing_coefficient(epochs_done, ramp, self.floor)
        # the sampler draws on the CPU: a table on a GPU is read back here, once per refresh (not per step)
        return importance_probabilities(table["is_score"].cpu(), mixing=self._last_mixing, power=self.power,
                                        seen=table["is_seen"].cpu() > 0, unseen=self.unseen)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.sampler is None or self.table is None:
            return
        if self._draws.numel() and float(self._draws.sum()) > 0:  # this epoch's empirical class frequencies
            freq = self._draws / self._draws.sum()
            pl_module.log_dict({f"{self.prefix}/draw_freq/class_{c}": float(v) for c, v in enumerate(freq.tolist())},
                               on_step=False, on_epoch=True, rank_zero_only=True)
        self._draws = torch.zeros(0, dtype=torch.float64)
        epoch = trainer.current_epoch  # the epoch that just ended (0-based): PA&DA mixes tau = epoch / epochs
        period = 1 if self.refresh_unit == "step" else self.refresh_every  # step unit: a sampler epoch = a period
        if (epoch + 1) % period != 0:
            return
        p = self.next_probabilities(epoch, trainer)
        self.sampler.set_weights(p)
        self._refreshes += 1
        self._log_distribution(trainer, pl_module, p)
        if self.reset_scores:
            self.table["is_score"].zero_()
            self.table["is_seen"].zero_()

    def _log_distribution(self, trainer: pl.Trainer, pl_module: pl.LightningModule, p: Tensor) -> None:
        n = p.numel()
        w = (p * n).float()
        stats = {"next/ess_frac": float(effective_sample_size(w)) / n, "next/max_np": float(w.max()),
                 "next/mixing": self._last_mixing,
                 "next/scored_frac": float((self.table["is_seen"] > 0).float().mean())}
        targets = self._targets
        if targets is not None and targets.numel() == n and int(targets.min()) >= 0:
            mass = torch.bincount(targets, weights=p, minlength=int(targets.max()) + 1)
            stats.update({f"next/class_{c}/mass": float(m) for c, m in enumerate(mass.tolist())})
        pl_module.log_dict({f"{self.prefix}/{k}": v for k, v in stats.items()}, on_step=False, on_epoch=True,
                           rank_zero_only=True)
        if self.log_histogram:
            log_histogram(trainer, f"{self.prefix}/next/np", w[:: max(1, n // 1_000_000)])

    # ------------------------------------------------------------------ checkpoint
    @override
    def extra_state(self) -> dict[str, Any]:
        return {"refreshes": self._refreshes, "draws": self._draws.detach().to("cpu", copy=True)}

    @override
    def check_extra_state(self, state: dict[str, Any]) -> tuple[int, Tensor | None]:
        """Validate ``(refreshes, draws)`` (returned); assigns nothing."""
        from lightning_reweight.state.validate import as_int, as_tensor, require_keys

        where = self.checkpoint_where
        state = require_keys(state, [], where)
        refreshes = as_int(state, "refreshes", where, minimum=0) if "refreshes" in state else 0
        draws = as_tensor(state, "draws", where, minimum=0.0) if state.get("draws") is not None else None
        return refreshes, draws

    @override
    def assign_extra_state(self, checked: tuple[int, Tensor | None]) -> None:
        self._refreshes, draws = checked
        if draws is not None:
            self._draws = draws.to(torch.float64).clone()
