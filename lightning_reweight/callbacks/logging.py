"""Weight diagnostics for the Trainer's loggers: histograms and summary scalars.

Scalars go straight to every logger (``logger.log_metrics``) at the callback's own cadence — not through
``pl_module.log``'s logger path, whose writes Lightning throttles to ``Trainer(log_every_n_steps)`` and would
drop when the two cadences differ; histograms go to every logger whose ``experiment`` has ``add_histogram``
(TensorBoard). Values are identical on every rank (they come from the gathered batch), so rank 0 alone
writes to the loggers.

The same scalars also reach ``trainer.callback_metrics`` on every rank, at the same cadence (through
``pl_module.log(..., logger=False)`` where the hook allows it, else written into ``trainer.callback_metrics``),
so ``ModelCheckpoint(monitor="reweight/ess")`` and ``EarlyStopping`` can use them; a key keeps its last value
between two logging steps.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_reweight.rules.instance import effective_sample_size


def to_host(*tensors: Tensor | None) -> list[Tensor | None]:
    """The tensors on the CPU, with their shapes and dtypes, copied in one transfer (one host synchronisation on
    a GPU, not one per tensor or per value read); CPU tensors and ``None`` come back as they are.

    The device tensors travel as one float64 buffer: exact for floats up to float64 and for integers and group
    ids below 2**53."""
    on_device = [t for t in tensors if t is not None and t.device.type != "cpu"]
    if not on_device:
        return list(tensors)
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in on_device]).cpu()
    out, pos = [], 0
    for t in tensors:
        if t is None or t.device.type == "cpu":
            out.append(t)
            continue
        n = t.numel()
        out.append(flat[pos:pos + n].reshape(t.shape).to(t.dtype))
        pos += n
    return out


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


def publish_metrics(trainer: pl.Trainer, metrics: dict[str, float], pl_module: pl.LightningModule | None = None) -> None:
    """Make scalars available in ``trainer.callback_metrics`` (every rank), for ``ModelCheckpoint(monitor=...)``,
    ``EarlyStopping`` and other callbacks.

    Uses ``pl_module.log(name, value, on_step=True, on_epoch=False, logger=False)`` when the current hook allows
    step logging (the loggers get the values from ``log_scalars``, at the callback's cadence), and writes the value
    into ``trainer.callback_metrics`` as well, so it is there at once and also from hooks where Lightning does not
    allow ``self.log`` (e.g. ``predict``, epoch-end hooks with ``on_step``).
    """
    if not metrics:
        return
    module = pl_module if pl_module is not None else getattr(trainer, "lightning_module", None)
    values = {k: torch.tensor(float(v)) for k, v in metrics.items()}
    if module is not None and getattr(module, "_current_fx_name", None) is not None:
        try:
            for k, v in values.items():
                module.log(k, v, on_step=True, on_epoch=False, logger=False, prog_bar=False, batch_size=1)
        except MisconfigurationException:  # this hook does not allow step logging: the direct write below suffices
            pass
    callback_metrics = trainer.callback_metrics
    for k, v in values.items():
        callback_metrics[k] = v


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int | None = None,
                pl_module: pl.LightningModule | None = None) -> None:
    """Write scalars to every logger now (rank 0 only), bypassing Lightning's logging cadence, and publish them
    in ``trainer.callback_metrics`` on every rank (``publish_metrics``)."""
    if not metrics:
        return
    publish_metrics(trainer, metrics, pl_module)
    if not trainer.is_global_zero:
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
    ``{prefix}/weights`` histogram. Returns the scalar dict (also handy in tests). Weights and groups on a GPU
    are copied to the host once (``to_host``) and summarised there."""
    weights, groups = to_host(weights, groups)
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
        log_scalars(trainer, {f"{prefix}/{k}": v for k, v in stats.items()}, step=step, pl_module=pl_module)
    if histogram:
        log_histogram(trainer, f"{prefix}/weights", weights, step=step)
    return stats
