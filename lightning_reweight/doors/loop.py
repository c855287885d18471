"""Training without the Trainer: a ``Reweighter`` holds the weighting callbacks and runs the one step engine.

Two doors use it:

* a plain loop (a hand-written loop, the Hugging Face ``Trainer``'s ``compute_loss``): build a ``Reweighter``
  with the callbacks and call ``reweighter.reduce(losses, index)`` where the loss is reduced;
* Lightning Fabric: ``reduce_loss(model, losses, index)`` (a LightningModule set up by ``fabric.setup``) or
  ``reduce_loss(fabric, losses, index)`` finds the weighting callbacks passed to ``Fabric(callbacks=[...])``
  and runs them through the Fabric's own ``Reweighter`` (``Reweighter.for_fabric(fabric)``).

Both give the Trainer's guarantees: the same atomic step, the global batch gathered across processes
(``torch.distributed``, which Fabric's strategies initialise), warm-ups that count optimizer steps (each callback
keeps its ``optimizer_steps`` and checkpoints it), logging to the loggers (TensorBoard histograms too), and
checkpoints that resume exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_reweight.callbacks.base import WeightingCallback
from lightning_reweight.distributed import global_rank, world_size
from lightning_reweight.engine import check_per_sample, run_step
from lightning_reweight.state.validate import CheckpointStateError, as_int, require_keys

__all__ = ["LoopContext", "Reweighter"]


class LoopContext:
    """The facts of a run outside the Trainer that the callbacks read (the Trainer attributes they use).

    ``global_step`` is the optimizer step count the callbacks keep themselves; ``world_size`` / ``global_rank``
    come from ``torch.distributed`` (or the Fabric); scalars logged by the callbacks land in
    ``callback_metrics`` and in ``loggers``.
    """

    training = True
    strategy = None

    def __init__(self, callbacks: Sequence[WeightingCallback], *, fabric: Any = None, loggers: Iterable[Any] = (),
                 train_dataloader: Any = None, max_steps: int = -1, max_epochs: int | None = None,
                 accumulate_grad_batches: int = 1, module: Any = None) -> None:
        self._callbacks = callbacks
        self._fabric = fabric
        self._loggers = list(loggers)
        self.train_dataloader = train_dataloader
        self.max_steps = max_steps
        self.max_epochs = max_epochs
        self.accumulate_grad_batches = accumulate_grad_batches
        self.lightning_module = module
        self.current_epoch = 0
        self.callback_metrics: dict[str, Tensor] = {}

    @property
    def global_step(self) -> int:
        return max((cb.optimizer_steps for cb in self._callbacks), default=0)

    @property
    def world_size(self) -> int:
        return self._fabric.world_size if self._fabric is not None else world_size()

    @property
    def global_rank(self) -> int:
        return self._fabric.global_rank if self._fabric is not None else global_rank()

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    @property
    def loggers(self) -> list[Any]:
        return list(self._fabric.loggers) if self._fabric is not None else self._loggers

    @property
    def num_training_batches(self) -> float:
        try:
            return len(self.train_dataloader)
        except TypeError:
            return math.inf


def _refuse_outside_trainer(callbacks: Iterable[Any], door: str) -> None:
    """Callbacks that work only inside the Trainer's loops refuse here, naming what to use instead."""
    for cb in callbacks:
        why = getattr(cb, "outside_trainer_refusal", None)
        message = why() if callable(why) else None
        if message:
            raise RuntimeError(f"{type(cb).__name__} cannot run in {door}: {message}")


class Reweighter:
    """The weighting callbacks of a training loop that is not Lightning's ``Trainer``.

    Call ``reduce(losses, index)`` where the loop reduces its per-sample losses; it returns the scalar to
    back-propagate, exactly as ``reduce_loss`` does inside the Trainer (the same atomic step; under
    ``torch.distributed`` the global batch is gathered across processes, so per-sample state stays identical on
    every rank). The callbacks count optimizer steps themselves: one per ``accumulate_grad_batches`` calls of
    ``reduce``. ``state_dict()`` / ``load_state_dict()`` checkpoint every callback and that count.

    Args:
        callbacks: the weighting callbacks (``LossReweighting``, ``GroupDRO``, ...), in composition order.
        model: the module being trained; outside ``model.training`` (evaluation) ``reduce`` returns the plain
            mean and changes nothing. Without a model every call is a training step.
        loggers: Lightning or Fabric loggers that receive the weight scalars and histograms.
        train_dataloader: the training loader, for callbacks that read the data set (its size, its group ids).
        max_steps: the run's length in optimizer steps, for schedules (Cooldown) that need it.
        max_epochs: the run's length in epochs, for schedules (Cooldown) that need it.
        accumulate_grad_batches: ``reduce`` calls per optimizer step.
        allow_repeated_keys: accept the same key on two ranks in one step (a sampler that draws with
            replacement); otherwise such a step is refused, since it usually means every rank reads the same data.
        samplers: the library's samplers feeding the loop (``WeightedSampler`` and its kind): each accepted step
            advances their position by this rank's batch, so ``sampler.state_dict()`` (saved with the rest, e.g.
            ``fabric.save(path, {..., "sampler": sampler})``) resumes the epoch exactly. Samplers that draw with
            replacement also allow repeated keys.

    Example::

        reweighter = Reweighter([LossReweighting("linupper", num_samples=len(train_set))], model=model)
        for x, y, index in loader:
            loss = reweighter.reduce(F.cross_entropy(model(x), y, reduction="none"), index)
            loss.backward(); optimizer.step(); optimizer.zero_grad()
    """

    def __init__(self, callbacks: Sequence[WeightingCallback], *, model: Any = None, loggers: Iterable[Any] = (),
                 train_dataloader: Any = None, max_steps: int = -1, max_epochs: int | None = None,
                 accumulate_grad_batches: int = 1, allow_repeated_keys: bool = False, samplers: Iterable[Any] = (),
                 _fabric: Any = None) -> None:
        callbacks = list(callbacks)
        for cb in callbacks:
            if not isinstance(cb, WeightingCallback):
                raise TypeError(f"Expected weighting callbacks (e.g. LossReweighting, GroupDRO), but got "
                                f"{type(cb).__name__}.")
        if len({cb.state_key for cb in callbacks}) != len(callbacks):
            raise ValueError("Expected callbacks with distinct `state_key`s; give two instances of one class "
                             "different `name=` arguments.")
        if isinstance(accumulate_grad_batches, bool) or not isinstance(accumulate_grad_batches, int) \
                or accumulate_grad_batches < 1:
            raise ValueError(f"Expected argument `accumulate_grad_batches` to be a positive int, but got "
                             f"{accumulate_grad_batches!r}.")
        self._fabric = _fabric
        self._fixed = None if _fabric is not None else callbacks
        self.model = model
        self.allow_repeated_keys = bool(allow_repeated_keys)
        self.context = LoopContext(callbacks, fabric=_fabric, loggers=loggers, train_dataloader=train_dataloader,
                                   max_steps=max_steps, max_epochs=max_epochs,
                                   accumulate_grad_batches=accumulate_grad_batches, module=model)
        self.samplers = list(samplers)
        for sampler in self.samplers:
            if not callable(getattr(sampler, "set_cursor", None)):
                raise TypeError(f"Expected the library's resumable samplers (e.g. WeightedSampler) in `samplers`, "
                                f"but got {type(sampler).__name__}, whose position cannot be tracked.")
        self.micro_steps = 0
        self._started: set[int] = set()

    # ------------------------------------------------------------------ Fabric
    @classmethod
    def for_fabric(cls, fabric: Any, **kwargs: Any) -> Reweighter:
        """The ``Reweighter`` that ``reduce_loss`` uses under this Fabric (created on first use; keyword
        arguments, e.g. ``train_dataloader=`` or ``max_steps=``, configure it). Its callbacks are the weighting
        callbacks of ``Fabric(callbacks=[...])``; they count the Fabric optimizers' steps themselves."""
        door = getattr(fabric, "_lightning_reweight", None)
        if door is None:
            door = cls([], _fabric=fabric, **kwargs)
            fabric._lightning_reweight = door
        else:
            for key, value in kwargs.items():
                if key == "allow_repeated_keys":
                    door.allow_repeated_keys = bool(value)
                elif key == "samplers":
                    door.samplers = list(value)
                elif key == "model":
                    door.model = value
                elif hasattr(door.context, key):
                    setattr(door.context, key, value)
                else:
                    raise TypeError(f"Reweighter.for_fabric() got an unexpected keyword argument {key!r}.")
        return door

    @property
    def callbacks(self) -> list[WeightingCallback]:
        if self._fixed is not None:
            return self._fixed
        cbs = [cb for cb in self._fabric._callbacks if isinstance(cb, WeightingCallback)]
        self.context._callbacks = cbs
        return cbs

    @property
    def metrics(self) -> dict[str, Tensor]:
        """The last logged value of every scalar the callbacks log (``reweight/ess``, ``group_dro/q/group_0``...)."""
        return self.context.callback_metrics

    # ------------------------------------------------------------------ the step
    def _training(self, losses: Tensor) -> bool:
        model = self.model
        if model is not None:
            return bool(model.training)
        if self._fabric is not None:  # reduce_loss(fabric, ...): evaluation runs under torch.no_grad()
            return torch.is_grad_enabled()
        return True

    def reduce(self, losses: Tensor, index: Tensor | None = None, *, group: Tensor | None = None,
               target: Tensor | None = None, **extras: Tensor) -> Tensor:
        """Reduce per-sample ``losses`` to the scalar to back-propagate, as the callbacks decide (see
        ``lightning_reweight.reduce_loss`` for the arguments and errors). Outside training (``model.eval()``) or
        without callbacks it returns ``losses.mean()`` and changes nothing."""
        callbacks = self.callbacks
        door = "Lightning Fabric" if self._fabric is not None else "a loop without the Trainer"
        _refuse_outside_trainer(self._fabric._callbacks if self._fabric is not None else callbacks, door)
        if not callbacks or not self._training(losses):
            return check_per_sample(losses).mean()
        # the inputs are checked inside the step: under torch.distributed a refusal on one rank stops every rank
        ctx, module = self.context, self.model
        if ctx.lightning_module is None:
            ctx.lightning_module = module
        for cb in callbacks:
            if id(cb) not in self._started:  # what the Trainer does at on_train_start, once per callback
                cb.start_outside_trainer(ctx, module if module is not None else _DeviceOf(losses.device))
                self._started.add(id(cb))
        loss = run_step(callbacks, ctx, module if module is not None else _DeviceOf(losses.device), losses,
                        index, group=group, target=target, extras=extras, rank=ctx.global_rank,
                        global_step=ctx.global_step, allow_repeated_keys=self.allow_repeated_keys
                        or any(getattr(s, "replacement", False) for s in self.samplers))
        for sampler in self.samplers:  # this rank consumed its batch of the sampler's epoch
            sampler.set_cursor(sampler.cursor + losses.shape[0])
        self.micro_steps += 1
        if self._fabric is None and self.micro_steps % ctx.accumulate_grad_batches == 0:
            for cb in callbacks:  # under Fabric the optimizer's own hook counts (on_after_optimizer_step)
                cb.optimizer_steps += 1
        for cb in callbacks:
            cb.log_step(ctx, module)
        return loss

    __call__ = reduce

    def set_epoch(self, epoch: int) -> None:
        """Tell the callbacks a new epoch starts (epoch-based schedules, e.g. Cooldown with ``unit="epoch"``)."""
        self.context.current_epoch = int(epoch)
        for cb in self.callbacks:
            cb._train_size = None

    def check_deferred(self) -> None:
        """Read the checks that ``sync_checks=False`` deferred and raise if a step failed (call it at the end
        of an epoch or before a checkpoint; ``state_dict`` does it too)."""
        for cb in self.callbacks:
            cb.check_deferred()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Every callback's state (by ``state_key``), the micro-step count and the epoch."""
        return {"callbacks": {cb.state_key: cb.state_dict() for cb in self.callbacks},
                "micro_steps": self.micro_steps, "epoch": self.context.current_epoch}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()``: every callback's entry is validated before any is assigned. A callback
        without an entry, or an entry without a callback, is refused (naming it)."""
        where = "Reweighter.state_dict"
        state = require_keys(state_dict, ["callbacks", "micro_steps", "epoch"], where)
        entries = state["callbacks"]
        if not isinstance(entries, Mapping):
            raise CheckpointStateError(where, "callbacks", f"expected a dict, but got {type(entries).__name__}.")
        micro = as_int(state, "micro_steps", where, minimum=0)
        epoch = as_int(state, "epoch", where, minimum=0)
        keys = {cb.state_key for cb in self.callbacks}
        if set(entries) != keys:
            raise CheckpointStateError(
                where, "callbacks",
                f"expected entries for {sorted(keys)}, but got {sorted(entries)}: the checkpoint was written with "
                "other callbacks or other constructor arguments. Build the Reweighter with the same callbacks.")
        checked = [cb.check_state_dict(entries[cb.state_key]) for cb in self.callbacks]  # validate all ...
        for cb, state in zip(self.callbacks, checked):  # ... then assign all
            cb._assign_state(state)
        self.micro_steps, self.context.current_epoch = micro, epoch


class _DeviceOf:
    """Stands in for a module the door does not know (``reduce_loss(fabric, ...)``, a ``Reweighter`` without a
    model): its device is the losses' device, where device-ready tables then live."""

    training = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
