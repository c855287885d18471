"""The per-sample loss contract: where a module's per-sample losses meet the attached callbacks.

An existing LightningModule changes two lines::

    losses = F.cross_entropy(logits, y, reduction="none")   # 1. per-sample losses
    return reduce_loss(self, losses, index)                  # 2. the callbacks decide the reduction

With manual optimisation the same call gives the loss to back-propagate::

    loss = reduce_loss(self, losses, index)
    self.manual_backward(loss)

The same call works under Lightning Fabric (``reduce_loss(model, ...)`` for a LightningModule set up by
``fabric.setup``, ``reduce_loss(fabric, ...)`` for any module), and ``Reweighter.reduce`` in any other loop.
Each door only finds the callbacks and the run's facts; the step itself is ``lightning_reweight.engine``.

Composition: each attached ``WeightingCallback`` returns global per-sample weights; the weights are
multiplied in ``trainer.callbacks`` order. The product of the factors from callbacks with ``normalized =
True`` is renormalised to mean 1 over the global batch; factors from callbacks that declare
``normalized = False`` (GroupDRO, upweighting, KL-DRO with an EMA normaliser: their scale is part of the
method) multiply in unchanged. A rank's loss is ``(W / B_global) · Σ_local w_i ℓ_i``; DDP's gradient averaging
over the W ranks turns it into the global weighted mean ``(1/B_global) Σ_global w_i ℓ_i``, exactly, even with
uneven per-rank batch sizes (one process: ``mean(w_i ℓ_i)``). Weights never carry gradient.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.fabric import Fabric
from lightning.fabric.wrappers import _FabricModule
from torch import Tensor, nn

from lightning_reweight.callbacks.base import weighting_callbacks
from lightning_reweight.doors.loop import Reweighter
from lightning_reweight.engine import MissingIndexError, StepInputError, check_per_sample, run_step

__all__ = ["reduce_loss", "MissingIndexError", "StepInputError"]


def _fabric_of(module: Any) -> tuple[Any, Any] | None:
    """``(fabric, module)`` when ``module`` runs under Lightning Fabric (a LightningModule set up by
    ``fabric.setup``, or its ``_FabricModule`` wrapper), else ``None``."""
    inner = module.module if isinstance(module, _FabricModule) else module
    fabric = getattr(inner, "_fabric", None) if isinstance(inner, pl.LightningModule) else None
    if fabric is not None:
        return fabric, inner
    if inner is not module and inner is not None:
        raise TypeError(
            f"`reduce_loss` got a module set up by Lightning Fabric ({type(inner).__name__}, not a "
            "LightningModule), which does not know its Fabric. Pass the Fabric instead: "
            "`reduce_loss(fabric, losses, index)`."
        )
    return None


def _trainer_door(trainer: pl.Trainer, module: pl.LightningModule, losses: Tensor, index: Tensor | None,
                  group: Tensor | None, target: Tensor | None, extras: dict[str, Tensor]) -> Tensor:
    """The Trainer's door: the callbacks of ``trainer.callbacks``, the Trainer as the context."""
    callbacks = weighting_callbacks(trainer)
    if not callbacks or not trainer.training:
        return check_per_sample(losses).mean()
    return run_step(callbacks, trainer, module, losses, index, group=group, target=target, extras=extras,
                    rank=trainer.global_rank, global_step=trainer.global_step,
                    allow_repeated_keys=trainer.world_size > 1 and _draws_with_replacement(trainer))


def _draws_with_replacement(trainer: pl.Trainer) -> bool:
    """Whether the train loader's sampler may put one sample on two ranks in a step (drawing with replacement);
    looked up once per train dataloader."""
    from lightning_reweight.callbacks._install import find_samplers

    loader = getattr(trainer, "train_dataloader", None)
    cached = getattr(trainer, "_lightning_reweight_replacement", None)
    if cached is not None and cached[0] is loader:
        return cached[1]
    try:
        found = any(bool(getattr(s, "replacement", False)) for _, s in find_samplers(loader))
    except (TypeError, AttributeError):  # no loader yet (a hand-driven step): nothing known
        found = False
    trainer._lightning_reweight_replacement = (loader, found)
    return found


def reduce_loss(
    module: pl.LightningModule | Any,
    losses: Tensor,
    index: Tensor | None = None,
    *,
    group: Tensor | None = None,
    target: Tensor | None = None,
    **extras: Tensor,
) -> Tensor:
    """Reduce per-sample ``losses`` to the scalar to back-propagate, as the attached callbacks decide.

    A step is atomic: every callback first *proposes* (``validate_batch``, ``transform_losses``,
    ``compute_weights``; no state changes), then the proposals and their combination are *validated*, and only
    then every callback *commits* (``on_weights_computed``). A rejected step leaves every callback's state and
    table as they were.

    Args:
        module: the LightningModule (``self`` inside ``training_step``) run by a ``Trainer`` or set up by
            Lightning Fabric; or the ``Fabric`` itself (any module under Fabric); or a ``Reweighter``.
        losses: ``(B,)`` per-sample losses with gradient (``reduction="none"``).
        index: ``(B,)`` integer dataset indices of the samples (``IndexedDataset`` provides them) or stable
            stream keys mapped by ``StreamKeys``; ``None`` on a stream when every attached callback needs only
            the global batch (``needs_index`` is false, e.g. ``LossReweighting(track_samples=False)``).
        group: optional ``(B,)`` integer group ids (−1 = unknown).
        target: optional ``(B,)`` targets (for class-aware callbacks).
        **extras: other per-sample tensors a callback needs (e.g. ``consistency=`` for AdaWAC).

    Returns:
        The scalar loss. Outside training (validation, test, predict; under Fabric a module in ``eval()``
        mode) or with no weighting callback attached it is ``losses.mean()`` and no state changes.

    Raises:
        ValueError: scalar or multi-dimensional losses, losses without gradient in training, NaN/inf losses,
            size mismatches, an index or group tensor that is not 1-D, an empty global batch, a key on two
            ranks, weights that are negative, non-finite or all zero.
        TypeError: float or bool ``index`` / ``group``; a module that is neither a LightningModule, a Fabric
            nor a ``Reweighter``.
        MissingIndexError: ``index`` is ``None`` but an attached callback needs per-sample state.
        StepInputError: under DDP, another rank's inputs were refused (every rank stops together).
        IndexError: indices outside ``[0, N)``, N the training set size (``num_samples`` or the train
            dataloader's data set), also for callbacks without a table.
    """
    extras_ = dict(extras)
    if isinstance(module, Reweighter):
        return module.reduce(losses, index, group=group, target=target, **extras_)
    if isinstance(module, Fabric):
        return Reweighter.for_fabric(module).reduce(losses, index, group=group, target=target, **extras_)
    under_fabric = _fabric_of(module)
    if under_fabric is not None:
        fabric, inner = under_fabric
        door = Reweighter.for_fabric(fabric)
        if door.model is None:
            door.model = inner
        return door.reduce(losses, index, group=group, target=target, **extras_)
    if not isinstance(module, pl.LightningModule):
        raise TypeError(
            f"Expected `reduce_loss(module, ...)` to get a LightningModule, a Lightning `Fabric` or a "
            f"`lightning_reweight.Reweighter`, but got {type(module).__name__}. In a loop without Lightning, hold "
            "the callbacks in `Reweighter([...])` and call `reweighter.reduce(losses, index)`."
            + (" (A plain nn.Module under Fabric: `reduce_loss(fabric, losses, index)`.)"
               if isinstance(module, nn.Module) else "")
        )
    trainer = getattr(module, "_trainer", None)
    if trainer is None:  # not attached to a Trainer or a Fabric: no callbacks anywhere
        return check_per_sample(losses).mean()
    return _trainer_door(trainer, module, losses, index, group, target, extras_)
