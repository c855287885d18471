"""The one step engine: propose → validate → commit, with no Trainer inside.

Every door into training (the Lightning ``Trainer``, Lightning Fabric, a plain loop) hands one step to
``run_step`` with the attached weighting callbacks and a *context*: the object the callbacks read the run's
facts from (``global_step``, ``current_epoch``, ``world_size``, ``global_rank``, ``is_global_zero``,
``loggers``, ``callback_metrics``, ``train_dataloader``, ``max_steps``, ``max_epochs``,
``accumulate_grad_batches``). Under the Trainer the context is the Trainer itself; the other doors build a
small object with the same attributes (``lightning_reweight.doors``).

A step, in order (each a function below):

1. ``check_inputs`` — shapes and dtypes, one loss per sample, losses that carry gradient; no computation yet.
   Under DDP a refusal on one rank is exchanged with the batch sizes, so every rank raises together;
2. ``gather_batch`` — the ``GlobalBatch``: detached losses, keys, groups, targets and extras of every rank
   (O(batch) communication), on the losses' device when every callback can work there;
3. ``check_batch`` — finite losses, indices in ``[0, N)``, no key on two ranks (each rank reading the same
   stream), then every callback's ``validate_batch``;
4. ``propose`` — ``transform_losses`` and ``compute_weights`` of every callback; nothing changes state;
5. ``combine`` — each proposal and their product validated (finite, non-negative, not all zero);
6. ``commit`` — ``on_weights_computed`` of every callback, the only place where state changes;
7. ``local_loss`` — ``(W / B_global) · Σ_local w_i ℓ_i``, the scalar to back-propagate.

Checks are read back to the host at most twice a step (``sync_checks=True``; on the CPU each is a cheap read),
or deferred to the callbacks' next ``check_deferred`` (``sync_checks=False`` on a GPU: no host sync).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_reweight.distributed import gather_rows, gather_sizes_and_codes, local_slice
from lightning_reweight.rules.instance import all_finite, check_losses, double_range
from lightning_reweight.state.table import BatchIndex

__all__ = ["GlobalBatch", "MissingIndexError", "StepInputError", "run_step", "TWO_LINES"]

TWO_LINES = """
    losses = F.cross_entropy(logits, y, reduction="none")   # one loss per sample
    return reduce_loss(self, losses, batch_index)            # batch_index from IndexedDataset
"""


class MissingIndexError(ValueError):
    """Raised when a weighting callback is attached but the module gave no sample indices."""


class StepInputError(ValueError):
    """Raised on every other rank when one rank's ``reduce_loss`` inputs were refused (DDP)."""


@dataclass
class GlobalBatch:
    """One training step's per-sample values from every DDP rank, identical on every rank.

    It lives on the losses' device when every attached callback is ``device_ready``, else on the CPU.

    Attributes:
        losses: detached float32 per-sample losses of the global batch (after any ``transform_losses``).
        index: int64 dataset indices (or stream keys); all ``-1`` on the index-free streaming path.
        group: int64 group ids or ``None``.
        target: targets or ``None``.
        extras: other per-sample tensors the module handed to ``reduce_loss`` (detached, gathered).
        local: this rank's rows (``losses[local]`` are the local samples).
        sizes: per-rank row counts, by global rank.
        global_step: the optimizer step count at this step (``trainer.global_step`` under the Trainer).
        index_info: whether ``index`` repeats (read with the step's checks on a device), for the table updates.
    """

    losses: Tensor
    index: Tensor
    group: Tensor | None = None
    target: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    local: slice = field(default_factory=lambda: slice(None))
    sizes: list[int] = field(default_factory=list)
    global_step: int = 0
    #: what the step knows about ``index`` (repeats), shared by the table updates of its commit
    index_info: BatchIndex = field(default_factory=BatchIndex)
    #: the step's ``Checks`` (set by ``run_step``): callbacks add their own checks of the batch to them
    checks: Any = field(default=None, repr=False, compare=False)

    @property
    def world_size(self) -> int:
        return max(len(self.sizes), 1)

    def __len__(self) -> int:
        return self.losses.numel()


# ---------------------------------------------------------------------------------------- 1. input checks
def check_per_sample(losses: Any) -> Tensor:
    """``losses`` must be a 1-D tensor, one loss per sample."""
    if not isinstance(losses, Tensor):
        raise TypeError(f"Expected argument `losses` to be a torch.Tensor, but got {type(losses).__name__}.")
    if losses.ndim == 0:
        raise ValueError(
            "Expected one loss per sample, but got a scalar: the loss was already reduced (reduction='mean'?). "
            "Compute it with `reduction='none'`:" + TWO_LINES
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
            f"Expected argument `{name}` to hold an integer {what} per sample, but got dtype {t.dtype}. Casting would "
            f"truncate silently (0.9 -> 0); pass an integer tensor (e.g. `{name}.long()` if the values are whole)."
        )
    return t.to(torch.int64)


def _index_free(callbacks: Sequence[Any], losses: Tensor) -> Tensor:
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
            "lines of `training_step`:" + TWO_LINES + hint
        )
    return torch.full((losses.shape[0],), -1, dtype=torch.int64, device=losses.device)


def _require_gradient(losses: Tensor) -> None:
    if not losses.requires_grad:
        raise ValueError(
            "Expected per-sample losses that carry gradient in a training step, but `losses` has none (computed "
            "under `torch.no_grad()` / `torch.inference_mode()`, or `.detach()`ed); nothing was updated. Compute "
            "the losses from the model's output with gradient enabled, and leave evaluation outside training "
            "(under the Trainer, validation steps are not training steps; in Fabric or a plain loop, put the model "
            "in `.eval()` mode or skip `reduce_loss` there)."
        )


def check_inputs(callbacks: Sequence[Any], losses: Any, index: Any, group: Any, target: Any,
                 extras: dict[str, Any]) -> tuple[dict[str, Tensor], bool]:
    """Step 1: the local inputs, checked before any computation. Returns the named per-sample tensors to
    gather (``losses`` detached) and whether the batch is keyed (an index or stream key was given)."""
    losses = check_per_sample(losses)
    if not losses.is_floating_point():
        raise TypeError(f"Expected argument `losses` to be a floating tensor, but got dtype {losses.dtype}.")
    _require_gradient(losses)
    keyed = index is not None
    if not keyed:
        index = _index_free(callbacks, losses)
    n = losses.shape[0]
    named: dict[str, Tensor] = {"losses": losses.detach(), "index": _check_ids("index", index, n, "dataset index")}
    if group is not None:
        named["group"] = _check_ids("group", group, n, "group id")
    if target is not None:
        named["target"] = _check_rows("target", target, n)
    for key, value in extras.items():
        named[f"extra:{key}"] = _check_rows(key, value, n)
    return named, keyed


# ---------------------------------------------------------------------------------------- 2. the global batch
def _batch_device(losses: Tensor, callbacks: Sequence[Any]) -> torch.device:
    """The losses' device when every callback can work there, else the CPU."""
    if losses.device.type == "cpu":
        return losses.device
    ok = all(cb.device_ready and (cb.device == "auto" or cb.device == losses.device) for cb in callbacks)
    return losses.device if ok else torch.device("cpu")


def exchange_refusal(n: int, error: Exception | None, rank: int) -> list[int]:
    """Exchange the per-rank batch sizes together with whether this rank refused its inputs (one collective,
    the size exchange the gather needs anyway). A refusing rank raises its own error; every other rank raises
    ``StepInputError`` naming it. Returns the sizes when no rank refused."""
    sizes, codes = gather_sizes_and_codes(n, 0 if error is None else 1)
    if error is not None:
        raise error
    bad = [r for r, c in enumerate(codes) if c]
    if bad:
        raise StepInputError(
            f"Rank(s) {bad} refused their `reduce_loss` inputs this step (see that rank's error: a bad shape, "
            f"dtype or a loss without gradient); rank {rank} stops with them, and no state was updated on any rank."
        )
    return sizes


def gather_batch(named: dict[str, Tensor], sizes: list[int], device: torch.device, rank: int,
                 global_step: int) -> GlobalBatch:
    """Step 2: every rank's rows, ordered by global rank (O(batch) communication)."""
    gathered, sizes = gather_rows(list(named.values()), sizes)
    g = dict(zip(named, gathered))
    index = g["index"].to(device)
    return GlobalBatch(
        losses=g["losses"].to(device, torch.float32),
        index=index,
        index_info=BatchIndex(index),
        group=g["group"].to(device) if "group" in g else None,
        target=g["target"].to(device) if "target" in g else None,
        extras={k[6:]: v.to(device) for k, v in g.items() if k.startswith("extra:")},
        local=local_slice(sizes, rank if len(sizes) > 1 else 0),
        sizes=sizes,
        global_step=global_step,
    )


# ---------------------------------------------------------------------------------------- checks
#: the largest finite float32: a float32 value ``v`` is finite exactly when ``-F32_MAX <= v <= F32_MAX``
F32_MAX = float(torch.finfo(torch.float32).max)
#: the smallest positive float32 (a subnormal): ``v >= F32_TINY`` means ``v > 0``
F32_TINY = 2.0 ** -149


def _host(values: list[Tensor]) -> list[Any]:
    """Read a few 0-d tensors back to the host in one transfer (on the CPU a plain read of each, which costs less
    than stacking them). On a device the values travel as one byte buffer (one kernel to pack it): one host
    synchronisation, whatever their dtypes (``_pack``, ``_read``)."""
    if values[0].device.type == "cpu":
        return [v.item() for v in values]
    return _read(*_pack(values))


def _pack(values: list[Tensor]) -> tuple[Tensor, list[tuple[torch.dtype, int]]]:
    """The device half of ``_host``: the values' bytes in one buffer, one kernel whatever their dtypes (a 0-d
    tensor seen as ``(1,)`` and then as ``uint8`` is a free view). Returns the buffer and each value's
    ``(dtype, bytes)``."""
    layout = [(v.dtype, v.element_size()) for v in values]
    if len(values) == 1:
        return values[0].reshape(1), layout
    return torch.cat([v.reshape(1).view(torch.uint8) for v in values]), layout


def _read(packed: Tensor, layout: list[tuple[torch.dtype, int]]) -> list[Any]:
    """The host half of ``_host``: the one device-to-host copy, each value's bytes reinterpreted as its dtype."""
    host = packed.cpu()
    if len(layout) == 1:
        return host.tolist()
    out, start = [], 0
    for dtype, size in layout:
        out.append(host[start:start + size].clone().view(dtype).item())  # (clone: an aligned copy)
        start += size
    return out


_BOUNDS: dict[tuple, tuple[Tensor, Tensor]] = {}  # the deferred checks' bound vectors, by device and layout


def _bounds(device: torch.device, dtype: torch.dtype, lows: tuple, highs: tuple) -> tuple[Tensor, Tensor]:
    """The lower and upper bounds of a group of deferred checks as tensors on ``device``: made once per layout
    (on the first step), so a later step copies nothing to the device."""
    key = (device, dtype, lows, highs)
    found = _BOUNDS.get(key)
    if found is None:
        if len(_BOUNDS) > 64:
            _BOUNDS.clear()
        found = _BOUNDS[key] = (torch.tensor(lows, dtype=dtype, device=device),
                                torch.tensor(highs, dtype=dtype, device=device))
    return found


class Checks:
    """A step's checks: read at once on the CPU (``host``), read together in one transfer per phase on a
    device (``sync``), or kept on the device for the callbacks' deferred check (``sync_checks=False``).

    A check is a 0-d value and its bounds, ``low <= value <= high`` (a NaN fails): on a device with
    ``sync`` the *values* are read (one transfer per phase) and compared on the host, so a check costs its one
    reduction and nothing more; deferred checks keep their values, compared on the device for many steps at
    once (``DeferredChecks``): a step pays no kernel for them."""

    def __init__(self, device: torch.device, sync: bool) -> None:
        self.sync = sync
        self.host = sync and device.type == "cpu"
        self._pending: list[tuple[Tensor, float, float, Callable[[], None] | None]] = []
        self.deferred: list[tuple[Tensor, float, float]] = []

    def require(self, ok: Tensor | bool, fail: Callable[[], None]) -> None:
        """``fail()`` raises when ``ok`` is false (now, at ``flush``, or late for deferred checks)."""
        if isinstance(ok, bool) or self.host:
            if not bool(ok):
                fail()
        else:
            self.within(ok.reshape(()), 1, 1, fail)  # a bool tensor: True == 1

    def within(self, value: Tensor, low: float, high: float, fail: Callable[[], None]) -> int | None:
        """``fail()`` raises unless ``low <= value <= high`` (a NaN value fails); ``value`` is 0-d. In device
        ``sync`` mode returns the value's slot in the list the next ``flush`` returns."""
        if self.host:
            if not low <= value.item() <= high:
                fail()
        elif self.sync:
            self._pending.append((value, low, high, fail))
            return len(self._pending) - 1
        else:
            self.deferred.append((value, low, high))
        return None

    def read(self, value: Tensor) -> int:
        """Read ``value`` at the next ``flush`` (device ``sync`` mode, no check); returns its slot in the list
        ``flush`` returns."""
        self._pending.append((value, -math.inf, math.inf, None))
        return len(self._pending) - 1

    def flush(self) -> list[float]:
        """One host read of this phase's pending values (device ``sync`` mode); raises the first failure.
        Returns the values read, in the order they were added."""
        if not self._pending:
            return []
        pending, self._pending = self._pending, []
        values = _host([p[0] for p in pending])
        for v, (_, low, high, fail) in zip(values, pending):
            if fail is not None and not low <= v <= high:
                fail()
        return values

    def deferred_values(self) -> DeferredChecks:
        """This step's deferred checks, raw: their values (no kernel now) with the bounds they must meet; a
        callback keeps them (``WeightingCallback.defer_values``) and compares many steps' at once."""
        return DeferredChecks(self.deferred)


class DeferredChecks:
    """One step's deferred checks (``sync_checks=False`` on a device): 0-d values and their bounds, compared on
    the device only when many steps' are folded (``count_bad``): a step pays no kernel for its checks.

    The values are grouped by dtype; the bounds of each group live on the device (made on the first step of a
    layout, ``_bounds``), so folding copies nothing to the device."""

    def __init__(self, checks: list[tuple[Tensor, float, float]]) -> None:
        groups: dict[torch.dtype, list[tuple[Tensor, float, float]]] = {}
        for check in checks:
            groups.setdefault(check[0].dtype, []).append(check)
        self.device = checks[0][0].device
        self.layout = tuple((dtype, tuple(c[1] for c in g), tuple(c[2] for c in g)) for dtype, g in groups.items())
        self.parts: list[tuple[list[Tensor], tuple[Tensor, Tensor] | None]] = [
            ([c[0] for c in g], None if dtype == torch.bool else _bounds(self.device, dtype, lows, highs))
            for (dtype, lows, highs), g in zip(self.layout, groups.values())]

    @staticmethod
    def count_bad(steps: list[DeferredChecks]) -> Tensor:
        """How many of ``steps`` (on one device) failed a check, as a 0-d int64 on their device: per layout and
        dtype one stack of every step's values, one clamp to the bounds and one comparison."""
        layouts: dict[tuple, list[DeferredChecks]] = {}
        for step in steps:
            layouts.setdefault(step.layout, []).append(step)
        bad: Tensor | None = None
        for group in layouts.values():
            ok: Tensor | None = None
            for j, (_, bounds) in enumerate(group[0].parts):
                values = torch.stack([v for step in group for v in step.parts[j][0]]).view(len(group), -1)
                good = values.all(1) if bounds is None else (values.clamp(*bounds) == values).all(1)
                ok = good if ok is None else ok & good
            count = (~ok).sum()
            bad = count if bad is None else bad + count
        return bad


def _fail_losses(local: Tensor, what: str) -> Callable[[], None]:
    def fail() -> None:
        check_losses(local)  # raises, naming this rank's bad positions
        raise ValueError(f"Expected finite {what}per-sample losses on every rank, but another rank has NaN/inf "
                         "losses; no weight or state was updated.")
    return fail


def _fail_range(num_samples: int, lo: Tensor, hi: Tensor) -> Callable[[], None]:
    def fail() -> None:
        raise IndexError(
            f"Expected dataset indices in [0, {num_samples}) (the training set size), but got range "
            f"[{int(lo)}, {int(hi)}]; nothing was updated. Pass the indices `IndexedDataset` adds to the "
            "batch, unchanged, and `num_samples=len(train_dataset)` if you set it. On a stream keyed by "
            "`lightning_reweight.state.StreamKeys`, give the callback `num_samples=keys.num_samples` (otherwise "
            "its table is sized from the stream's `num_keys`)."
        )
    return fail


def cross_rank_repeats(index: Tensor, ranks: Tensor) -> Tensor:
    """How many neighbouring pairs of the sorted global keys come from two ranks: 0 when no key of this step is
    on two ranks (O(B log B) on the gathered keys: one sort, no table). ``ranks`` is each row's rank."""
    keys, order = torch.sort(index, stable=True)
    r = ranks[order]
    same_key = keys[1:] == keys[:-1]
    # a key on two ranks shows as two neighbours (in the sorted keys) of the same key from different ranks
    return (same_key & (r[1:] != r[:-1])).sum()


def _fail_repeats(batch: GlobalBatch, count: Tensor) -> Callable[[], None]:
    def fail() -> None:
        raise ValueError(
            f"Expected each sample of the global batch on one rank only, but {int(count)} key(s) of this step "
            f"appear on two ranks (world size {batch.world_size}); nothing was updated. The likely cause: every "
            "rank reads the same data (a stream or dataset built before the processes were launched, or a "
            "sampler that does not shard by rank). Build the dataset in the DataModule's `setup()` / "
            "`train_dataloader()` (litdata: create the `StreamingDataset` there), or shard it by "
            "`global_rank`; a sampler that draws with replacement may repeat keys: pass "
            "`allow_repeated_keys=True` to the door (see docs/fabric.md)."
        )
    return fail


_RANK = "__rank__"  # the per-row rank column gathered for the cross-rank key check


def check_batch(callbacks: Sequence[Any], batch: GlobalBatch, local_losses: Tensor, checks: Checks,
                num_samples: int | None, ctx: Any) -> None:
    """Step 3: the global batch (non-empty), once for every callback (every rank sees the same batch, so every
    rank raises together), then each callback's own ``validate_batch``.

    On a device each check is one reduction (``aminmax`` of the losses, of the indices); with ``sync`` the
    values are read in one transfer, together with whether an index repeats (``BatchIndex.unique``: the table
    updates of the step then skip the duplicate merge)."""
    if checks.host:  # a finite sum means finite losses on the host (an overflowing sum falls back to the exact check)
        checks.require(all_finite(batch.losses), _fail_losses(local_losses, ""))
    else:  # aminmax shows a NaN in both values, -inf in the min, +inf in the max (shared with the rules)
        _, lo, hi = double_range(batch.losses)
        checks.within(lo, -F32_MAX, math.inf, _fail_losses(local_losses, ""))
        checks.within(hi, -math.inf, F32_MAX, _fail_losses(local_losses, ""))
    if num_samples is not None:
        lo, hi = batch.index.aminmax()
        if checks.host:
            lo, hi = lo.item(), hi.item()
            checks.require(lo >= 0 and hi < num_samples, _fail_range(num_samples, lo, hi))
        else:
            checks.within(lo, 0, num_samples - 1, _fail_range(num_samples, lo, hi))
            checks.within(hi, 0, num_samples - 1, _fail_range(num_samples, lo, hi))
    ranks = batch.extras.pop(_RANK, None)
    if ranks is not None:
        # DistributedSampler pads an epoch with up to W - 1 of its first samples: only more repeats are refused
        count = cross_rank_repeats(batch.index, ranks)
        checks.within(count, 0, batch.world_size - 1, _fail_repeats(batch, count))
    slot = None
    if checks.sync and not checks.host and len(batch) > 1 and any(
            cb.table is not None and cb.table.device == batch.index.device for cb in callbacks):
        slot = checks.read(batch.index_info.is_unique(batch.index))  # one more value in the same transfer
    values = checks.flush()
    if slot is not None:
        batch.index_info.unique = bool(values[slot])
    for cb in callbacks:
        cb.validate_batch(batch, ctx)


# ---------------------------------------------------------------------------------------- 4. propose
def propose_losses(callbacks: Sequence[Any], losses: Tensor, extras: dict[str, Any], batch: GlobalBatch,
                   checks: Checks, ctx: Any, module: Any) -> Tensor:
    """``transform_losses`` of every callback (e.g. AdaWAC); the transformed losses are gathered again.
    Returns the local per-sample losses training reduces."""
    local, transformed = losses, False
    for cb in callbacks:
        out = cb.transform_losses(local, extras, batch, ctx, module)
        if out is not None:
            local, transformed = check_per_sample(out), True
    if transformed:
        (glob,), _ = gather_rows([local.detach()], batch.sizes)
        batch.losses = glob.to(batch.losses.device, torch.float32)
        if checks.host:
            checks.require(all_finite(batch.losses), _fail_losses(local, "transformed "))
        else:
            lo, hi = batch.losses.aminmax()
            checks.within(lo, -F32_MAX, math.inf, _fail_losses(local, "transformed "))
            checks.within(hi, -math.inf, F32_MAX, _fail_losses(local, "transformed "))
        checks.flush()  # before any callback weighs NaN losses
    return local


def _reject_weights(cb: Any) -> Callable[[], None]:
    def fail() -> None:
        raise ValueError(
            f"Expected non-negative, finite weights from {type(cb).__name__}, but it returned negative or "
            "non-finite weights; the step was rejected and no callback state was updated."
        )
    return fail


def propose_weights(callbacks: Sequence[Any], batch: GlobalBatch, ctx: Any, module: Any
                    ) -> list[tuple[Any, Tensor | None]]:
    """``compute_weights`` of every callback, as float32 ``(B_global,)`` on the batch's device."""
    device = batch.losses.device
    proposals: list[tuple[Any, Tensor | None]] = []
    for cb in callbacks:
        w = cb.compute_weights(batch, ctx, module)
        if w is not None:
            if w.requires_grad or w.dim() != 1 or w.dtype != torch.float32 or w.device != device:
                w = w.detach().reshape(-1).to(device, torch.float32)
            if w.numel() != len(batch):
                raise ValueError(
                    f"Expected {type(cb).__name__} to return one weight per sample of the global batch "
                    f"({len(batch)}), but got {w.numel()}; no callback state was updated."
                )
        proposals.append((cb, w))
    return proposals


# ---------------------------------------------------------------------------------------- 5. combine
def _fail_overflow() -> None:
    raise ValueError(
        "Expected finite combined weights, but the product of the callbacks' weights overflowed; the step "
        "was rejected and no callback state was updated. Clip the weights (e.g. `max_weight=`)."
    )


def _fail_all_zero() -> None:
    raise ValueError(
        "All per-sample weights of this batch are zero, so the loss would be zero; the step was rejected "
        "and no callback state was updated. Check the callbacks' settings (e.g. a clip or a filter that "
        "removes every sample)."
    )


def combine(proposals: list[tuple[Any, Tensor | None]], batch: GlobalBatch, checks: Checks) -> Tensor:
    """Step 5: validate each proposal and combine them. The product of the ``normalized`` factors is
    renormalised to mean 1 over the global batch; the other factors multiply in at their own scale.

    On a device each proposal costs one ``aminmax`` and the product one sum. Without other factors (the common
    case) the sum is the only total to check (each renormalised weight is at most the batch size, so none
    overflows): with ``sync`` it is read with the checks and the product is scaled on the host's value, as on
    the CPU; deferred, the scale ``B / total`` stays on the device, a total below ``4·B / 3.4e38`` counting as
    all zero (its scale would overflow float32)."""
    if checks.host:
        return _combine_host(proposals, batch, checks)
    def check(cb: Any, low: Tensor, high: Tensor) -> None:
        checks.within(low, 0.0, math.inf, _reject_weights(cb))
        checks.within(high, -math.inf, F32_MAX, _reject_weights(cb))

    normalized, raw = _factor_products(proposals, check)
    n = len(batch)
    if normalized is None and raw is None:
        checks.flush()
        return torch.ones(n, dtype=torch.float32, device=batch.losses.device)
    least = 4.0 * n / F32_MAX  # the smallest total whose scale B / total is finite in float32 (with margin)
    if normalized is not None:
        total = normalized.sum()
        if raw is None:
            checks.within(total, -math.inf, F32_MAX, _fail_overflow)
            if checks.sync:  # read with the checks: scale on the host, as the CPU path does
                at = checks.within(total, F32_TINY, math.inf, _fail_all_zero)
                value = checks.flush()[at]
                return normalized * (n / value if value > 0 else 1.0)
            checks.within(total, least, math.inf, _fail_all_zero)
            return normalized * (total.clamp_min(least).reciprocal() * n)
        normalized = normalized * (total.clamp_min(least).reciprocal() * n)
    weights = raw if normalized is None else normalized * raw
    # the parts are finite and non-negative once the checks above hold, so a finite positive total means finite
    # combined weights (an overflow shows as an infinite total)
    total = weights.sum()
    checks.within(total, -math.inf, F32_MAX, _fail_overflow)
    checks.within(total, F32_TINY, math.inf, _fail_all_zero)
    checks.flush()
    return weights


def _factor_products(proposals: list[tuple[Any, Tensor | None]],
                     check: Callable[[Any, Tensor, Tensor], None]) -> tuple[Tensor | None, Tensor | None]:
    """``check(cb, min, max)`` each proposal (a NaN shows in both; -inf in the min, +inf in the max), and return
    the product of the ``normalized`` factors and the product of the others (``None`` where there is none)."""
    normalized: Tensor | None = None
    raw: Tensor | None = None
    for cb, w in proposals:
        if w is None:
            continue
        low, high = w.aminmax()
        check(cb, low, high)
        if cb.normalized:
            normalized = w if normalized is None else normalized * w
        else:
            raw = w if raw is None else raw * w
    return normalized, raw


def _combine_host(proposals: list[tuple[Any, Tensor | None]], batch: GlobalBatch, checks: Checks) -> Tensor:
    """``combine`` on the CPU: every check read at once."""
    def check(cb: Any, low: Tensor, high: Tensor) -> None:
        checks.require(low.item() >= 0 and high.item() < math.inf, _reject_weights(cb))

    normalized, raw = _factor_products(proposals, check)
    n = len(batch)
    if normalized is None and raw is None:
        return torch.ones(n, dtype=torch.float32, device=batch.losses.device)
    total: float | None = None
    if normalized is not None:
        total = normalized.sum().item()
        normalized = normalized * (n / total if total > 0 else 1.0)
    weights = normalized if raw is None else raw if normalized is None else normalized * raw
    # the parts are finite and non-negative once the checks above hold, so a finite positive total means finite
    # combined weights (an overflow shows as an infinite total). Mean-1 factors alone are renormalised to total
    # n when their own total is finite and positive (each weight <= total, none overflows): no second sum
    if raw is not None:
        total = weights.sum().item()
    checks.require(math.isfinite(total), _fail_overflow)
    checks.require(total > 0, _fail_all_zero)
    return weights


# ---------------------------------------------------------------------------------------- 6. commit
def commit(callbacks: Sequence[Any], proposals: list[tuple[Any, Tensor | None]], batch: GlobalBatch,
           weights: Tensor, ctx: Any, module: Any) -> None:
    """Step 6: every callback updates its state from the accepted step (``on_weights_computed``)."""
    for cb, w in proposals:
        cb.last_weights = w
    committed: list[str] = []
    for cb in callbacks:
        try:
            cb.on_weights_computed(batch, weights, ctx, module)
        except Exception as err:  # a commit must not fail on an accepted step: say what did change
            done = ", ".join(committed) or "none"
            raise RuntimeError(
                f"{type(cb).__name__}.on_weights_computed failed on an accepted step; callbacks that had already "
                f"committed this step: {done}. Their state includes this step; resume from the last checkpoint. "
                "(Checks that can fail belong in `validate_batch` or `compute_weights`.)"
            ) from err
        committed.append(type(cb).__name__)


# ---------------------------------------------------------------------------------------- 7. the loss
def local_loss(weights: Tensor, batch: GlobalBatch, local_losses: Tensor) -> Tensor:
    """``(W / B_global) · Σ_local w·ℓ``: DDP's gradient mean over W ranks gives exactly ``(1/B_global) Σ_global
    w·ℓ``, also when ranks hold different batch sizes (one process: the plain weighted mean)."""
    w = weights if len(batch.sizes) == 1 else weights[batch.local]  # one process: every row is local
    if w.device != local_losses.device or w.dtype != local_losses.dtype:
        w = w.to(local_losses.device, local_losses.dtype)
    if local_losses.dtype in (torch.float32, torch.float64):
        return torch.dot(w, local_losses) * (batch.world_size / len(batch))
    return (w * local_losses).sum() * (batch.world_size / len(batch))


def _training_set_size(callbacks: Sequence[Any], ctx: Any) -> int | None:
    sizes = [n for n in (cb.table.num_samples if cb.table is not None else cb.training_set_size(ctx)
                         for cb in callbacks) if n is not None]
    return min(sizes) if sizes else None


def run_step(callbacks: Sequence[Any], ctx: Any, module: Any, losses: Any, index: Any = None, *,
             group: Any = None, target: Any = None, extras: dict[str, Any] | None = None, rank: int = 0,
             global_step: int = 0, allow_repeated_keys: bool = False) -> Tensor:
    """One atomic weighting step of ``callbacks`` (non-empty) on this rank's per-sample ``losses``.

    ``ctx`` is what the callbacks read the run's facts from (the Trainer, or a door's context); ``rank`` is this
    process's global rank and ``global_step`` the optimizer step count. Returns the scalar loss of this rank.
    """
    extras = dict(extras or {})
    error: Exception | None = None
    try:
        named, keyed = check_inputs(callbacks, losses, index, group, target, extras)
    except (ValueError, TypeError) as err:
        error = err
    n = 0 if error is not None else named["losses"].shape[0]
    sizes = exchange_refusal(n, error, rank)
    if keyed and len(sizes) > 1 and not allow_repeated_keys:  # one more column in the same packed gather
        named[f"extra:{_RANK}"] = torch.full((n,), rank, dtype=torch.int64, device=named["index"].device)
    device = _batch_device(losses, callbacks)
    batch = gather_batch(named, sizes, device, rank, global_step)
    if len(batch) == 0:  # every rank sees the same global size, so every rank raises together
        raise ValueError(
            "Expected at least one sample in the (global) training batch, but got 0 with weighting callbacks "
            f"attached ({', '.join(type(cb).__name__ for cb in callbacks)}); nothing was updated. If your data "
            "pipeline can produce empty batches (a filtering collate), skip them in `training_step` (return None) "
            "before calling `reduce_loss`."
        )
    for cb in callbacks:
        cb.ensure_table(ctx, module)
        cb._reduce_calls += 1
    checks = Checks(device, sync=any(cb.sync_checks for cb in callbacks))
    batch.checks = checks
    # the index range is checked against the training set size, except on the index-free path (all -1)
    num_samples = _training_set_size(callbacks, ctx) if keyed else None
    check_batch(callbacks, batch, losses, checks, num_samples, ctx)
    local = propose_losses(callbacks, losses, extras, batch, checks, ctx, module)
    proposals = propose_weights(callbacks, batch, ctx, module)
    weights = combine(proposals, batch, checks)
    if checks.deferred:
        callbacks[0].defer_check(checks.deferred_values())
    commit(callbacks, proposals, batch, weights, ctx, module)
    batch.index_info.release()  # the pair matrix / sort served the commit: not kept with the batch
    return local_loss(weights, batch, local)
