"""Weight diagnostics for the Trainer's loggers: histograms and summary scalars.

Scalars go straight to every logger (``logger.log_metrics``) at the callback's own cadence — not through
``pl_module.log``, whose writes Lightning throttles to ``Trainer(log_every_n_steps)`` and would drop when the
two cadences differ; histograms go to every logger whose ``experiment`` has ``add_histogram``
(TensorBoard). Values are identical on every rank (they come from the gathered batch), so rank 0 alone
writes.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_reweight.rules.instance import effective_sample_size


def weight_summary(weights: Tensor) -> dict[str, float]:
    """``mean``, ``max``, ``min``, ``ess`` (Kish) and ``ess_frac`` (ESS / count) of a weight vector."""
    w = weights.detach().float().reshape(-1)
    if w.numel() == 0:
        return {}
    ess = float(effective_sample_size(w))
    return {"mean": float(w.mean()), "max": float(w.max()), "min": float(w.min()), "ess": ess,
            "ess_frac": ess / w.numel()}


def log_histogram(trainer: pl.Trainer, tag: str, values: Tensor, step: int | None = None) -> None:
    """Write a histogram to every logger that supports it (rank 0 only)."""
    if not trainer.is_global_zero or values.numel() == 0:
        return
    step = trainer.global_step if step is None else step
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_histogram"):
            experiment.add_histogram(tag, values.detach().float().cpu(), global_step=step)


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int | None = None) -> None:
    """Write scalars to every logger now (rank 0 only), bypassing Lightning's logging cadence."""
    if not trainer.is_global_zero or not metrics:
        return
    step = trainer.global_step if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def log_weight_stats(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    prefix: str,
    weights: Tensor,
    groups: Tensor | None = None,
    histogram: bool = True,
    extra: dict[str, float] | None = None,
    step: int | None = None,
) -> dict[str, float]:
    """Log ``{prefix}/mean|max|min|ess|ess_frac`` (+ ``{prefix}/group_{g}/mean`` and ``/mass``) and a
    ``{prefix}/weights`` histogram. Returns the scalar dict (also handy in tests)."""
    stats = weight_summary(weights)
    if groups is not None and groups.numel() == weights.numel():
        w = weights.detach().float().reshape(-1)
        g = groups.reshape(-1).to(torch.int64)
        valid = g >= 0
        if bool(valid.any()):
            n_groups = int(g[valid].max()) + 1
            counts = torch.bincount(g[valid], minlength=n_groups).float()
            sums = torch.bincount(g[valid], weights=w[valid], minlength=n_groups)
            total = sums.sum().clamp_min(1e-30)
            for k in torch.nonzero(counts).flatten().tolist():
                stats[f"group_{k}/mean"] = float(sums[k] / counts[k])
                stats[f"group_{k}/mass"] = float(sums[k] / total)
    if extra:
        stats.update(extra)
    if stats:
        log_scalars(trainer, {f"{prefix}/{k}": v for k, v in stats.items()}, step=step)
    if histogram:
        log_histogram(trainer, f"{prefix}/weights", weights, step=step)
    return stats
