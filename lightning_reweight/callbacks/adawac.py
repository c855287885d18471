"""``AdaWAC``: per-sample adaptive weights between a supervised and a consistency loss."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_reweight.callbacks.base import GlobalBatch, WeightingCallback
from lightning_reweight.callbacks.logging import log_histogram, log_scalars, log_weight_stats
from lightning_reweight.rules.adawac import adawac_update, check_eta
from lightning_reweight.rules.instance import all_finite, host_kernels
from lightning_reweight.state.table import Column
from lightning_reweight.state.validate import CheckpointStateError, as_tensor, require_keys

__all__ = ["AdaWAC"]

_HOW = """
    sup = F.cross_entropy(logits, mask, reduction="none").flatten(1).mean(1)         # (B,) supervised
    cons = lam * (feat_view1 - feat_view2).pow(2).flatten(1).mean(1)                # (B,) consistency
    loss = reduce_loss(self, sup, index, consistency=cons)
(`lightning_reweight.models.segmenter.SegmentationModule` does this for paired batches.)"""


class AdaWAC(WeightingCallback):
    """Adaptively weighted augmentation consistency ("Adaptively Weighted Data Augmentation Consistency
    Regularization for Robust Optimization under Concept Shift", Dong, Xie, Ward, ICML 2023).

    Every training sample i keeps ``(β_sup, β_cons)`` on the simplex (init ``(½, ½)``) in the state table.
    Each step, from the detached losses of the *global* batch and before the step's loss is formed, the
    visited rows take one exponentiated-gradient step ``β_sup ← β_sup·exp(η ℓ_sup)``,
    ``β_cons ← β_cons·exp(η ℓ_cons)``, then L1-normalise (``lightning_reweight.rules.adawac``); the
    sample's loss becomes ``β_sup·ℓ_sup + β_cons·ℓ_cons``. Samples whose supervised loss stays small
    (label-sparse, all-background ones) move their weight to the consistency term. Sample weights are
    otherwise uniform: the callback acts through ``transform_losses`` only. Every rank applies the same
    update to the same gathered batch, so the tables stay identical under DDP; they are checkpointed.

    The module hands the supervised loss as ``losses`` and the consistency loss as the ``consistency``
    extra (``SegmentationModule`` does so for paired batches); the paper's Dice term stays outside
    ``reduce_loss`` with a fixed weight. ``η = 0`` keeps ``(½, ½)``: plain ERM + consistency regularisation.

    Table columns: ``beta_sup``, ``beta_cons``, ``loss_sup``, ``loss_cons`` (last seen values), ``sparse``
    (−1 unknown, 0 label-dense, 1 label-sparse, from the ``sparse`` extra when the batch has one), plus the
    base columns (``loss`` = the combined loss, ``count``, ...).

    Logged every ``log_every_n_steps`` (TensorBoard): ``adawac/beta_sup/{mean,max,min,ess,ess_frac}`` and
    the ``adawac/beta_sup/weights`` histogram over the global batch (``group_{g}/mean|mass`` when the batch
    has groups), ``adawac/loss_sup``, ``adawac/loss_cons``, and over all visited samples of the table
    ``adawac/table/beta_sup_mean`` with histogram ``adawac/table/beta_sup`` — split into
    ``..._dense``/``..._sparse`` when the label-sparse flags are known.

    Args:
        eta: mirror-descent step size η (paper: 8.0 for UNet, 2.0 for TransUNet).
        consistency_key: name of the ``reduce_loss`` extra holding the per-sample consistency loss.
        sparse_key: name of the optional extra flagging label-sparse samples (logging only).
        num_samples: training set size N (inferred from the train dataloader if ``None``).
        ema_decay: see ``WeightingCallback``.
        log_every_n_steps: see ``WeightingCallback``.
        log_histogram: see ``WeightingCallback``.
        name: see ``WeightingCallback``.
        fresh_table: keyword-only; start the per-sample table fresh on resume (see ``WeightingCallback``).
        device: keyword-only; where the state lives: ``"auto"`` (follows the module), ``"cpu"`` or a device
            (see ``WeightingCallback``).
        sync_checks: keyword-only; read the step's checks back to the host every step (``True``) or defer them
            (``False``: no host sync per step on a GPU; see ``WeightingCallback``).

    Raises:
        ValueError: a negative or non-finite ``eta``; at run time a missing or mis-shaped consistency loss.

    Example::

        trainer = Trainer(callbacks=[AdaWAC(eta=8.0)])
        trainer.fit(SegmentationModule(in_channels=3), datamodule=PH2DataModule(paired=True))
    """

    device_ready = True  # on a GPU batch: fixed-shape tensor ops, the consistency check deferred
    log_prefix = "adawac"

    def __init__(
        self,
        eta: float = 8.0,
        consistency_key: str = "consistency",
        sparse_key: str = "sparse",
        num_samples: int | None = None,
        ema_decay: float = 0.9,
        log_every_n_steps: int = 50,
        log_histogram: bool = True,
        name: str | None = None,
        *,
        fresh_table: bool = False,
        device: str | torch.device = "auto",
        sync_checks: bool = True,
    ):
        super().__init__(num_samples, True, ema_decay, log_every_n_steps, log_histogram, name,
                         fresh_table=fresh_table, device=device, sync_checks=sync_checks)
        self.eta = check_eta(eta)
        if not isinstance(consistency_key, str) or not consistency_key:
            raise ValueError(f"Expected argument `consistency_key` to be a non-empty string, but got {consistency_key!r}.")
        self.consistency_key = consistency_key
        self.sparse_key = sparse_key
        self._parts: tuple[Tensor, Tensor] | None = None
        self._pending: tuple[GlobalBatch, Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ table
    @override
    def extra_columns(self) -> dict[str, Column]:
        return {
            "beta_sup": Column("last", 0.5),
            "beta_cons": Column("last", 0.5),
            "loss_sup": Column("last", 0.0),
            "loss_cons": Column("last", 0.0),
            "sparse": Column("last", -1.0),
        }

    def betas(self, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(β_sup, β_cons)`` of the samples ``index`` (all samples if ``None``); raises before training."""
        if self.table is None:
            raise RuntimeError("AdaWAC has no table yet: it is created at the first training step (or on resume).")
        rows = slice(None) if index is None else self.table.check_index(index)
        return self.table["beta_sup"][rows].clone(), self.table["beta_cons"][rows].clone()

    # ------------------------------------------------------------------ the step
    @override
    def validate_batch(self, batch: GlobalBatch, trainer: pl.Trainer) -> None:
        self._pending = None  # a proposal of an earlier, rejected step is never committed
        super().validate_batch(batch, trainer)
        cons = batch.extras.get(self.consistency_key)
        if cons is None:
            raise ValueError(
                f"AdaWAC needs a per-sample consistency loss, but `reduce_loss` got no `{self.consistency_key}=` "
                f"extra (extras: {sorted(batch.extras)}). Train on paired views (e.g. `PH2DataModule(paired=True)`) "
                "and pass it:" + _HOW
            )
        if cons.ndim != 1 or cons.shape != batch.losses.shape:
            raise ValueError(
                f"Expected the `{self.consistency_key}` loss to have shape {tuple(batch.losses.shape)} (one value per "
                f"sample, like `losses`), but got {tuple(cons.shape)}. Average it over features per sample."
            )
        if batch.losses.device.type != "cpu":  # with the step's checks: no host read of its own
            self.check_finite(batch, cons, self._not_finite)
        elif not all_finite(cons):
            self._not_finite()

    def _not_finite(self) -> None:
        raise ValueError(f"Expected a finite `{self.consistency_key}` loss, but got NaN or inf; no state was updated.")

    @override
    def transform_losses(self, losses: Tensor, extras: dict[str, Tensor], batch: GlobalBatch, trainer: pl.Trainer,
                         pl_module: pl.LightningModule) -> Tensor:
        cons_local = extras[self.consistency_key]
        if not isinstance(cons_local, Tensor) or cons_local.shape != losses.shape:
            raise ValueError(
                f"Expected the `{self.consistency_key}` loss to be a tensor of shape {tuple(losses.shape)}, but got "
                f"{tuple(getattr(cons_local, 'shape', ()))}."
            )
        # pure: the new β rows are committed in ``on_weights_computed`` once every callback's weights were accepted
        loss_sup, loss_cons = batch.losses, batch.extras[self.consistency_key].float()
        new_sup, new_cons = self._step(batch.index, loss_sup, loss_cons, batch.index_info)
        self._pending = (batch, new_sup, new_cons)
        self._parts = (loss_sup, loss_cons)  # detached global copies already; nothing mutates them
        b_sup = new_sup[batch.local].to(losses.device, losses.dtype)
        b_cons = new_cons[batch.local].to(losses.device, losses.dtype)
        return b_sup * losses + b_cons * cons_local.to(losses.dtype)

    def _step(self, index: Tensor, loss_sup: Tensor, loss_cons: Tensor, index_info: Any = None) -> tuple[Tensor, Tensor]:
        """The global batch's ``(β_sup, β_cons)`` after the mirror step, per batch position (a repeated sample
        carries the same new β at each of its positions); reads the table, changes nothing."""
        sup_col, cons_col = self.table["beta_sup"], self.table["beta_cons"]
        kernels = host_kernels() if index.device.type == "cpu" and sup_col.device.type == "cpu" else None
        if (kernels is not None and sup_col.dtype == cons_col.dtype == torch.float32
                and loss_sup.dtype == loss_cons.dtype == torch.float32):
            # one compiled call (``rules._kernels.adawac_step``): the ops of ``adawac_update``, per position
            new_sup, new_cons = torch.empty_like(loss_sup), torch.empty_like(loss_sup)
            kernels.adawac_step(sup_col.numpy(), cons_col.numpy(), index.numpy(), loss_sup.numpy(),
                                loss_cons.numpy(), self.eta, new_sup.numpy(), new_cons.numpy())
            return new_sup, new_cons
        if index.device.type != "cpu":  # the fixed-shape (device) update: already one value per position
            _, new_sup, new_cons = adawac_update(sup_col, cons_col, index, loss_sup, loss_cons, self.eta,
                                                 index_info=index_info)
            return new_sup, new_cons
        rows, new_sup, new_cons, inverse = adawac_update(sup_col, cons_col, index, loss_sup, loss_cons, self.eta,
                                                         return_inverse=True)
        return new_sup[inverse], new_cons[inverse]

    @override
    def on_weights_computed(self, batch: GlobalBatch, weights: Tensor, trainer: pl.Trainer,
                            pl_module: pl.LightningModule) -> None:
        pending, self._pending = self._pending, None
        if pending is None:  # (cleared in validate_batch: never a previous, rejected step's)
            return
        _, new_sup, new_cons = pending
        table = self.table
        sparse = batch.extras.get(self.sparse_key)
        if sparse is not None and sparse.shape == batch.index.shape:
            table["sparse"][batch.index] = sparse.float()
        extra = {}
        if self._parts is not None:
            extra = {"loss_sup": self._parts[0], "loss_cons": self._parts[1]}
        if table.device.type == "cpu":
            # one table update for every column: on the CPU a repeated sample's identical β values merge to
            # exactly that value (their float64 mean), so this equals writing the distinct rows
            extra.update(beta_sup=new_sup, beta_cons=new_cons)
        else:  # the fixed-shape merge averages repeats through prefix sums: write the (identical) values directly
            table["beta_sup"][batch.index] = new_sup
            table["beta_cons"][batch.index] = new_cons
        table.update(batch.index, check=False, index_info=batch.index_info, loss=batch.losses, ema_loss=batch.losses,
                     weight=weights, **extra)
        self._last = (batch, weights)

    # ------------------------------------------------------------------ checkpoint
    @override
    def check_state_dict(self, state_dict: Any) -> Any:
        """Also validate the checkpointed β columns (finite, in [0, 1], β_sup + β_cons = 1); assigns nothing."""
        where = f"AdaWAC[{self.state_key}]['table']"
        table = state_dict.get("table") if isinstance(state_dict, dict) else None
        if table is not None:
            require_keys(table, ["columns"], where)
            columns = require_keys(table["columns"], ["beta_sup", "beta_cons"], f"{where}['columns']")
            n = len(columns["beta_sup"]) if isinstance(columns["beta_sup"], Tensor) else None
            sup = as_tensor(columns, "beta_sup", f"{where}['columns']", minimum=0.0, maximum=1.0)
            cons = as_tensor(columns, "beta_cons", f"{where}['columns']", length=n, minimum=0.0, maximum=1.0)
            if sup.numel() and float((sup.double() + cons.double() - 1).abs().max()) > 1e-3:
                raise CheckpointStateError(f"{where}['columns']", "beta_cons",
                                           "expected beta_sup + beta_cons = 1 for every sample, but they differ.")
        return super().check_state_dict(state_dict)

    # ------------------------------------------------------------------ logging
    @override
    def log_step(self, trainer: Any, pl_module: Any) -> None:
        """Every ``log_every_n_steps``: the batch's β_sup statistics and mean losses (O(batch))."""
        if self._last is None:
            return
        gbatch, _ = self._last
        parts, self._last, self._parts = self._parts, None, None
        if not (self.log_every_n_steps > 0 and gbatch.global_step % self.log_every_n_steps == 0):
            return
        prefix, step = self.prefix, gbatch.global_step
        log_weight_stats(trainer, pl_module, f"{prefix}/beta_sup", self.table["beta_sup"][gbatch.index],
                         gbatch.group, histogram=self.log_histogram, step=step)
        if parts is not None:
            log_scalars(trainer, {f"{prefix}/loss_sup": float(parts[0].mean()),
                                  f"{prefix}/loss_cons": float(parts[1].mean())}, step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Once per epoch: β_sup over every visited sample, split label-dense / label-sparse (O(N))."""
        super().on_train_epoch_end(trainer, pl_module)
        table = self.table
        if table is None or self.log_every_n_steps == 0:
            return
        prefix, step = self.prefix, trainer.global_step
        seen = table["count"] > 0
        flags = table["sparse"]
        splits = {"beta_sup": seen}
        if bool((seen & (flags >= 0)).any()):
            splits.update(beta_sup_dense=seen & (flags == 0), beta_sup_sparse=seen & (flags == 1))
        values: dict[str, float] = {}
        for key, rows in splits.items():
            beta = table["beta_sup"][rows]
            if beta.numel() == 0:
                continue
            values[f"{prefix}/table/{key}_mean"] = float(beta.mean())
            if self.log_histogram:
                log_histogram(trainer, f"{prefix}/table/{key}", beta, step)
        log_scalars(trainer, values, step)
