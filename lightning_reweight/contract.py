"""The per-sample loss contract: where a module's per-sample losses meet the attached callbacks.

An existing LightningModule changes two lines::

    losses = F.cross_entropy(logits, y, reduction="none")   # 1. per-sample losses
    return reduce_loss(self, losses, index)                  # 2. the callbacks decide the reduction

With manual optimisation the same call gives the loss to back-propagate::

    loss = reduce_loss(self, losses, index)
    self.manual_backward(loss)

Composition: each attached ``WeightingCallback`` returns global per-sample weights; the weights are
multiplied in ``trainer.callbacks`` order. The product of the factors from callbacks with ``normalized =
True`` is renormalised to mean 1 over the global batch; factors from callbacks that declare
``normalized = False`` (GroupDRO, upweighting, KL-DRO with an EMA normaliser: their scale is part of the
method) multiply in unchanged. A rank's
loss is ``(W / B_global) · Σ_local w_i ℓ_i``; DDP's gradient averaging over the W ranks turns it into the
global weighted mean ``(1/B_global) Σ_global w_i ℓ_i``, exactly, even with uneven per-rank batch sizes
(one process: ``mean(w_i ℓ_i)``). Weights never carry gradient.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_reweight.callbacks.base import GlobalBatch, weighting_callbacks
from lightning_reweight.distributed import gather_rows, local_slice
from lightning_reweight.rules.instance import check_losses

__all__ = ["reduce_loss", "MissingIndexError"]

_TWO_LINES = """
    losses = F.cross_entropy(logits, y, reduction="none")   # one loss per sample
    return reduce_loss(self, losses, batch_index)            # batch_index from IndexedDataset
"""


class MissingIndexError(ValueError):
    """Raised when a weighting callback is attached but the module gave no sample indices."""


def _check_per_sample(losses: Any) -> Tensor:
    if not isinstance(losses, Tensor):
        raise TypeError(f"Expected argument `losses` to be a torch.Tensor, but got {type(losses).__name__}.")
    if losses.ndim == 0:
        raise ValueError(
            "Expected one loss per sample, but got a scalar: the loss was already reduced (reduction='mean'?). "
            "Compute it with `reduction='none'`:" + _TWO_LINES
        )
    if losses.ndim > 1:
        raise ValueError(
            f"Expected 1-D per-sample losses, but got shape {tuple(losses.shape)}. Average the per-pixel/token "
            "dimensions per sample first, e.g. `losses.flatten(1).mean(1)`."
        )
    return losses


def _check_rows(name: str, value: Any, n: int) -> Tensor:
    t = value if isinstance(value, Tensor) else torch.as_tensor(value)
    if t.ndim == 0 or t.shape[0] != n:
        raise ValueError(
            f"Expected argument `{name}` to have one row per sample ({n}), but got shape {tuple(t.shape)}."
        )
    return t


def _index_free(callbacks: list, losses: Tensor) -> Tensor:
    """The index-free (streaming) path: every callback must work from the global batch alone.

    Returns the placeholder index (all ``-1``) that ``GlobalBatch.index`` then holds; raises
    ``MissingIndexError`` naming each callback that needs per-sample state and the fix.
    """
    needing = [cb for cb in callbacks if cb.needs_index]
    if needing:
        names = ", ".join(type(cb).__name__ for cb in needing)
        stateless = [type(cb).__name__ for cb in needing if not cb.needs_sample_state]
        hint = (
            f" {', '.join(stateless)} only keeps a per-sample table for bookkeeping: pass `track_samples=False` "
            "to run it on a stream without an index (docs/lm.md)." if stateless else ""
        )
        raise MissingIndexError(
            f"{names} needs the dataset index (or a stable stream key) of every sample, but `reduce_loss` got "
            "none. Wrap a map-style training dataset in `lightning_reweight.data.IndexedDataset`, or pass a "
            "stable per-sample key from the stream (`lightning_reweight.state.StreamKeys`), and change two "
            "lines of `training_step`:" + _TWO_LINES + hint
        )
    return torch.full((losses.shape[0],), -1, dtype=torch.int64, device=losses.device)


def reduce_loss(
    module: pl.LightningModule,
    losses: Tensor,
    index: Tensor | None = None,
    *,
    group: Tensor | None = None,
    target: Tensor | None = None,
    **extras: Tensor,
) -> Tensor:
    """Reduce per-sample ``losses`` to the scalar to back-propagate, as the attached callbacks decide.

    Args:
        module: the LightningModule (``self`` inside ``training_step``).
        losses: ``(B,)`` per-sample losses with gradient (``reduction="none"``).
        index: ``(B,)`` dataset indices of the samples (``IndexedDataset`` provides them) or stable stream
            keys mapped by ``StreamKeys``; ``None`` on a stream when every attached callback needs only the
            global batch (``needs_index`` is false, e.g. ``LossReweighting(track_samples=False)``).
        group: optional ``(B,)`` group ids (−1 = unknown).
        target: optional ``(B,)`` targets (for class-aware callbacks).
        **extras: other per-sample tensors a callback needs (e.g. ``consistency=`` for AdaWAC).

    Returns:
        The scalar loss. Outside training (validation, test, predict) or with no weighting callback
        attached it is ``losses.mean()`` and no state changes.

    Raises:
        ValueError: scalar or multi-dimensional losses, NaN/inf losses, size mismatches, all-zero weights.
        MissingIndexError: ``index`` is ``None`` but an attached callback needs per-sample state.
        IndexError: indices outside ``[0, N)``.
    """
    losses = _check_per_sample(losses)
    trainer = getattr(module, "_trainer", None)
    callbacks = weighting_callbacks(trainer)
    if not callbacks or not trainer.training:
        return losses.mean()
    if index is None:
        index = _index_free(callbacks, losses)
    n = losses.shape[0]
    index = _check_rows("index", index, n)
    if index.is_floating_point() or index.dtype == torch.bool:
        raise TypeError(f"Expected argument `index` to hold integer dataset indices, but got dtype {index.dtype}.")
    detached = check_losses(losses)  # NaN/inf -> error before any state changes
    named: dict[str, Tensor] = {"losses": detached, "index": index.reshape(-1).to(torch.int64)}
    if group is not None:
        named["group"] = _check_rows("group", group, n).reshape(-1).to(torch.int64)
    if target is not None:
        named["target"] = _check_rows("target", target, n)
    for key, value in extras.items():
        named[f"extra:{key}"] = _check_rows(key, value, n)

    gathered, sizes = gather_rows(list(named.values()))
    g = dict(zip(named, gathered))
    batch = GlobalBatch(
        losses=g["losses"].float().cpu(),
        index=g["index"].cpu(),
        group=g["group"].cpu() if "group" in g else None,
        target=g["target"].cpu() if "target" in g else None,
        extras={k[6:]: v.cpu() for k, v in g.items() if k.startswith("extra:")},
        local=local_slice(sizes, trainer.global_rank if len(sizes) > 1 else 0),
        sizes=sizes,
        global_step=trainer.global_step,
    )
    for cb in callbacks:
        cb.validate_batch(batch, trainer)

    local_losses, transformed = losses, False
    for cb in callbacks:
        out = cb.transform_losses(local_losses, extras, batch, trainer, module)
        if out is not None:
            local_losses, transformed = _check_per_sample(out), True
    if transformed:
        (batch.losses,), _ = gather_rows([check_losses(local_losses)], sizes)
        batch.losses = batch.losses.float().cpu()

    normalized_part = torch.ones(len(batch), dtype=torch.float32)
    raw_part = torch.ones(len(batch), dtype=torch.float32)
    any_normalized = False
    for cb in callbacks:
        w = cb.compute_weights(batch, trainer, module)
        cb.last_weights = None if w is None else w.detach().float().cpu().reshape(-1)
        if w is None:
            continue
        w = cb.last_weights
        if w.numel() != len(batch):
            raise ValueError(f"{type(cb).__name__} returned {w.numel()} weights for a global batch of {len(batch)}.")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(f"{type(cb).__name__} returned negative or non-finite weights; no state was updated.")
        if cb.normalized:
            normalized_part, any_normalized = normalized_part * w, True
        else:
            raw_part = raw_part * w
    if any_normalized:  # renormalise the product of the mean-1 factors; unnormalised factors keep their scale
        total = normalized_part.sum()
        normalized_part = normalized_part * (len(batch) / total) if bool(total > 0) else normalized_part
    weights = normalized_part * raw_part
    if not bool(weights.sum() > 0):
        raise ValueError(
            "All per-sample weights of this batch are zero, so the loss would be zero. Check the callbacks' "
            "settings (e.g. a clip or a filter that removes every sample)."
        )
    for cb in callbacks:
        cb.on_weights_computed(batch, weights, trainer, module)
    w_local = weights[batch.local].to(local_losses.device, local_losses.dtype)
    # W/B_global · Σ_local w·ℓ: DDP's gradient mean over W ranks gives exactly (1/B_global) Σ_global w·ℓ,
    # also when ranks hold different batch sizes (one process: the plain weighted mean)
    return (w_local * local_losses).sum() * (batch.world_size / len(batch))
