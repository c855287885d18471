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

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_reweight.callbacks.base import GlobalBatch, WeightingCallback, weighting_callbacks
from lightning_reweight.distributed import gather_rows, local_slice
from lightning_reweight.rules.instance import all_finite, check_losses

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


def _check_ids(name: str, value: Any, n: int, what: str) -> Tensor:
    """``index`` / ``group``: exactly 1-D, one integer per sample (no float or bool ids: 0.9 would become 0)."""
    t = value if isinstance(value, Tensor) else torch.as_tensor(value)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(
            f"Expected argument `{name}` to be 1-D with one {what} per sample, shape ({n},), but got shape "
            f"{tuple(t.shape)}. Pass one {what} per sample (e.g. the `{name}` column IndexedDataset adds)."
        )
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(
            f"Expected argument `{name}` to hold integer {what}s, but got dtype {t.dtype}. Casting would "
            f"truncate silently (0.9 -> 0); pass an integer tensor (e.g. `{name}.long()` if the values are whole)."
        )
    return t.to(torch.int64)


def _host(values: list[Tensor]) -> list[float]:
    """Read a few scalars back to the host in one transfer (the step's only host synchronisations; on the
    CPU a plain read of each, which costs less than stacking them)."""
    if values[0].device.type == "cpu":
        return [v.item() for v in values]
    return torch.stack([v.reshape(()).to(torch.float64) for v in values]).tolist()


def _reject_weights(cb: WeightingCallback) -> None:
    raise ValueError(
        f"Expected non-negative, finite weights from {type(cb).__name__}, but it returned negative or "
        "non-finite weights; the step was rejected and no callback state was updated."
    )


def _training_set_size(callbacks: list[WeightingCallback], trainer: pl.Trainer) -> int | None:
    sizes = [n for n in (cb.table.num_samples if cb.table is not None else cb.training_set_size(trainer)
                         for cb in callbacks) if n is not None]
    return min(sizes) if sizes else None


def _batch_device(losses: Tensor, callbacks: list[WeightingCallback]) -> torch.device:
    """The losses' device when every callback can work there, else the CPU."""
    if losses.device.type == "cpu":
        return losses.device
    ok = all(cb.device_ready and (cb.device == "auto" or cb.device == losses.device) for cb in callbacks)
    return losses.device if ok else torch.device("cpu")


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

    A step is atomic: every callback first *proposes* (``validate_batch``, ``transform_losses``,
    ``compute_weights``; no state changes), then the proposals and their combination are *validated*, and only
    then every callback *commits* (``on_weights_computed``). A rejected step leaves every callback's state and
    table as they were.

    Args:
        module: the LightningModule (``self`` inside ``training_step``).
        losses: ``(B,)`` per-sample losses with gradient (``reduction="none"``).
        index: ``(B,)`` integer dataset indices of the samples (``IndexedDataset`` provides them) or stable
            stream keys mapped by ``StreamKeys``; ``None`` on a stream when every attached callback needs only
            the global batch (``needs_index`` is false, e.g. ``LossReweighting(track_samples=False)``).
        group: optional ``(B,)`` integer group ids (−1 = unknown).
        target: optional ``(B,)`` targets (for class-aware callbacks).
        **extras: other per-sample tensors a callback needs (e.g. ``consistency=`` for AdaWAC).

    Returns:
        The scalar loss. Outside training (validation, test, predict) or with no weighting callback
        attached it is ``losses.mean()`` and no state changes.

    Raises:
        ValueError: scalar or multi-dimensional losses, NaN/inf losses, size mismatches, an index or group
            tensor that is not 1-D, an empty global batch, weights that are negative, non-finite or all zero.
        TypeError: float or bool ``index`` / ``group``.
        MissingIndexError: ``index`` is ``None`` but an attached callback needs per-sample state.
        IndexError: indices outside ``[0, N)``, N the training set size (``num_samples`` or the train
            dataloader's data set), also for callbacks without a table.
    """
    losses = _check_per_sample(losses)
    trainer = getattr(module, "_trainer", None)
    callbacks = weighting_callbacks(trainer)
    if not callbacks or not trainer.training:
        return losses.mean()
    keyed = index is not None
    if not keyed:
        index = _index_free(callbacks, losses)
    # ---- 1. local input checks (shapes and dtypes: no computation yet)
    n = losses.shape[0]
    if not losses.is_floating_point():
        raise TypeError(f"Expected argument `losses` to be a floating tensor, but got dtype {losses.dtype}.")
    named: dict[str, Tensor] = {"losses": losses.detach(), "index": _check_ids("index", index, n, "dataset index")}
    if group is not None:
        named["group"] = _check_ids("group", group, n, "group id")
    if target is not None:
        named["target"] = _check_rows("target", target, n)
    for key, value in extras.items():
        named[f"extra:{key}"] = _check_rows(key, value, n)
    sync = any(cb.sync_checks for cb in callbacks)

    # ---- 2. gather the global batch (O(batch)), on the losses' device when every callback can work there
    device = _batch_device(losses, callbacks)
    gathered, sizes = gather_rows(list(named.values()))
    g = dict(zip(named, gathered))
    batch = GlobalBatch(
        losses=g["losses"].to(device, torch.float32),
        index=g["index"].to(device),
        group=g["group"].to(device) if "group" in g else None,
        target=g["target"].to(device) if "target" in g else None,
        extras={k[6:]: v.to(device) for k, v in g.items() if k.startswith("extra:")},
        local=local_slice(sizes, trainer.global_rank if len(sizes) > 1 else 0),
        sizes=sizes,
        global_step=trainer.global_step,
    )
    if len(batch) == 0:  # every rank sees the same global size, so every rank raises together
        raise ValueError(
            "Expected at least one sample in the (global) training batch, but got 0 with weighting callbacks "
            f"attached ({', '.join(type(cb).__name__ for cb in callbacks)}); nothing was updated. If your data "
            "pipeline can produce empty batches (a filtering collate), skip them in `training_step` (return None) "
            "before calling `reduce_loss`."
        )

    # ---- 3. propose: validate, transform and weigh without changing any state
    for cb in callbacks:
        cb.ensure_table(trainer, module)
    # the index range is checked against the training set size, except on the index-free path (all -1)
    num_samples = _training_set_size(callbacks, trainer) if keyed else None
    # first host read (with sync_checks): the losses are finite and the indices lie in [0, N). Checked on the
    # gathered batch, so under DDP every rank raises together (a rank-local raise would hang the others)
    host = sync and device.type == "cpu"  # host reads are cheap: read each check right away, fewer tensor ops
    lo, hi = batch.index.aminmax()
    if host:  # a finite sum means finite losses (an overflowing sum falls back to the exact check)
        good = all_finite(batch.losses)
        lo, hi = lo.item(), hi.item()
    else:
        finite = torch.isfinite(batch.losses).all()
    if sync:
        if not host:
            good, lo, hi = _host([finite, lo, hi])
        if not good:
            check_losses(losses)  # raises, naming this rank's bad positions
            raise ValueError("Expected finite per-sample losses on every rank, but another rank has NaN/inf "
                             "losses; no weight or state was updated.")
        if num_samples is not None and (lo < 0 or hi >= num_samples):
            raise IndexError(
                f"Expected dataset indices in [0, {num_samples}) (the training set size), but got range "
                f"[{int(lo)}, {int(hi)}]; nothing was updated. Pass the indices `IndexedDataset` adds to the "
                "batch, unchanged, and `num_samples=len(train_dataset)` if you set it."
            )
        deferred: list[Tensor] = []
    else:
        deferred = [finite] + ([(lo >= 0) & (hi < num_samples)] if num_samples is not None else [])
    for cb in callbacks:
        cb.validate_batch(batch, trainer)

    local_losses, transformed = losses, False
    for cb in callbacks:
        out = cb.transform_losses(local_losses, extras, batch, trainer, module)
        if out is not None:
            local_losses, transformed = _check_per_sample(out), True
    if transformed:
        (batch.losses,), _ = gather_rows([local_losses.detach()], sizes)
        batch.losses = batch.losses.to(device, torch.float32)
        # checked globally: every rank raises (on the CPU a finite sum means finite losses, as for the inputs)
        if sync and not (all_finite(batch.losses) if host else _host([torch.isfinite(batch.losses).all()])[0]):
            check_losses(local_losses)
            raise ValueError("Expected finite transformed per-sample losses on every rank, but another rank has "
                             "NaN/inf; no weight or state was updated.")
    if transformed and not sync:
        deferred.append(torch.isfinite(batch.losses).all())

    proposals: list[tuple[WeightingCallback, Tensor | None]] = []
    for cb in callbacks:
        w = cb.compute_weights(batch, trainer, module)
        if w is not None:
            if w.requires_grad or w.dim() != 1 or w.dtype != torch.float32 or w.device != device:
                w = w.detach().reshape(-1).to(device, torch.float32)
            if w.numel() != len(batch):
                raise ValueError(
                    f"Expected {type(cb).__name__} to return one weight per sample of the global batch "
                    f"({len(batch)}), but got {w.numel()}; no callback state was updated."
                )
        proposals.append((cb, w))

    # ---- 4. validate the proposals and their combination (one host read)
    normalized_part: Tensor | None = None
    raw_part: Tensor | None = None
    flags: list[Tensor] = []
    for cb, w in proposals:
        if w is None:
            continue
        low, high = w.aminmax()  # a NaN shows in both; -inf in the min, +inf in the max
        if host:
            if not (low.item() >= 0 and high.item() < math.inf):
                _reject_weights(cb)
        else:
            flags.append((low >= 0) & (high < math.inf))
        if cb.normalized:
            normalized_part = w if normalized_part is None else normalized_part * w
        else:
            raw_part = w if raw_part is None else raw_part * w
    t_normalized: float | None = None  # host mode, mean-1 factors only: their total decides the checks below
    if normalized_part is not None:  # renormalise the product of the mean-1 factors; unnormalised ones keep scale
        total = normalized_part.sum()
        if host:
            t = t_normalized = total.item()
            normalized_part = normalized_part * (len(batch) / t if t > 0 else 1.0)
        else:
            normalized_part = normalized_part * torch.where(total > 0, len(batch) / total, torch.ones_like(total))
    if normalized_part is None and raw_part is None:
        weights = torch.ones(len(batch), dtype=torch.float32, device=device)
    else:
        weights = normalized_part if raw_part is None else raw_part if normalized_part is None \
            else normalized_part * raw_part
    # the parts are finite and non-negative when the checks above hold, so a finite positive total means
    # finite combined weights (an overflow of the product shows as an infinite total)
    if host and raw_part is None and t_normalized is not None:
        # renormalised to total B when their total t is finite and positive (each weight <= t, so none
        # overflows): t itself answers both checks, no second sum
        flags = [math.isfinite(t_normalized), t_normalized > 0]
    elif host:
        t = weights.sum().item()
        flags = [math.isfinite(t), t > 0]
    else:
        total = weights.sum()
        flags += [torch.isfinite(total), total > 0]
    if sync:
        ok = flags if host else _host(flags)
        named_cbs = [cb for cb, w in proposals if w is not None]
        for cb, good in zip(named_cbs, ok[:-2]):
            if not good:
                _reject_weights(cb)
        if not ok[-2]:
            raise ValueError(
                "Expected finite combined weights, but the product of the callbacks' weights overflowed; the step "
                "was rejected and no callback state was updated. Clip the weights (e.g. `max_weight=`)."
            )
        if not ok[-1]:
            raise ValueError(
                "All per-sample weights of this batch are zero, so the loss would be zero; the step was rejected "
                "and no callback state was updated. Check the callbacks' settings (e.g. a clip or a filter that "
                "removes every sample)."
            )
    else:
        callbacks[0].defer_check(torch.stack(deferred + flags).all())

    # ---- 5. commit: every callback updates its state from the accepted step
    for cb, w in proposals:
        cb.last_weights = w
    committed: list[str] = []
    for cb in callbacks:
        try:
            cb.on_weights_computed(batch, weights, trainer, module)
        except Exception as err:  # a commit must not fail on an accepted step: say what did change
            done = ", ".join(committed) or "none"
            raise RuntimeError(
                f"{type(cb).__name__}.on_weights_computed failed on an accepted step; callbacks that had already "
                f"committed this step: {done}. Their state includes this step; resume from the last checkpoint. "
                "(Checks that can fail belong in `validate_batch` or `compute_weights`.)"
            ) from err
        committed.append(type(cb).__name__)
    w_local = weights if len(batch.sizes) == 1 else weights[batch.local]  # one process: every row is local
    if w_local.device != local_losses.device or w_local.dtype != local_losses.dtype:
        w_local = w_local.to(local_losses.device, local_losses.dtype)
    # W/B_global · Σ_local w·ℓ: DDP's gradient mean over W ranks gives exactly (1/B_global) Σ_global w·ℓ,
    # also when ranks hold different batch sizes (one process: the plain weighted mean)
    if local_losses.dtype in (torch.float32, torch.float64):
        return torch.dot(w_local, local_losses) * (batch.world_size / len(batch))
    return (w_local * local_losses).sum() * (batch.world_size / len(batch))
