"""Weight diagnostics for the Trainer's loggers: histograms and summary scalars.

Scalars go through ``pl_module.log`` (so every logger, ``ModelCheckpoint(monitor=...)`` and the progress
bar see them); histograms go to every logger whose ``experiment`` has ``add_histogram`` (TensorBoard).
Values are identical on every rank (they come from the gathered batch), so rank 0 alone writes.
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


def log_weight_stats(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    prefix: str,
    weights: Tensor,
    groups: Tensor | None = None,
    histogram: bool = True,
    extra: dict[str, float] | None = None,
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
    if stats and pl_module._trainer is not None:
        pl_module.log_dict({f"{prefix}/{k}": v for k, v in stats.items()}, rank_zero_only=True,
                           on_step=True, on_epoch=False)
    if histogram:
        log_histogram(trainer, f"{prefix}/weights", weights)
    return stats
