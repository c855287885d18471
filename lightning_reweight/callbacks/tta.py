"""Test-time adaptation callbacks for ``trainer.test`` / ``trainer.predict``: ``Tent`` and ``EATA``.

Design (how predictions and adaptation meet, without changes to the LightningModule):

* At the start of a test/predict run the callback switches the model into *TTA mode*: every BatchNorm layer
  normalises with the statistics of the current batch (``training=True``, ``track_running_stats=False``, so the
  source running statistics are kept but neither used nor changed) and only the BatchNorm affine parameters
  (γ, β) require gradients. Everything is put back at the end of the run, including the source γ, β
  (``keep_adapted=False``, the default): after ``trainer.test`` the module is the model that was passed in. The
  adapted γ, β are kept in the callback (``adapted_state``, checkpointed) and put back into the module when the
  next run starts, so ``reset="continual"`` carries on across runs. ``keep_adapted=True`` leaves them in the
  module instead (with a warning: outside the callback BatchNorm normalises with the source running statistics,
  which the adapted γ, β were not trained with).
* It registers a forward pre-hook and a forward hook on the module whose output is the logits (the
  LightningModule itself by default, ``module_name`` for a submodule). The module's own ``test_step`` /
  ``predict_step`` calls ``self(x)`` as usual; the pre-hook turns gradients on for that call (Lightning runs
  evaluation under ``torch.no_grad``), the hook takes the logits, computes the entropy loss, runs one backward and
  one optimiser step, and hands the *same* logits (detached) back to ``test_step``. So predictions are the
  outputs of the adaptation forward pass, before the update — as in the Tent and EATA code — with one forward
  per batch and no cooperation from the module.
* Only the first forward call of a batch adapts; further calls in the same batch are plain TTA-mode forwards.

DDP: filter decisions need only the sample itself and EATA's moving average ``m``; ``m`` is updated from
all-reduced sums, the loss is normalised by the global number of selected samples, and the γ/β gradients are
all-reduced (O(#BatchNorm channels)) before the step, so parameters, optimiser state and ``m`` stay identical on
every rank. BatchNorm statistics are per rank (each rank's local batch), as with plain DDP.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_reweight.callbacks._restore import checkpoint_entry
from lightning_reweight.callbacks.logging import log_histogram, log_scalars
from lightning_reweight.distributed import gather_rows
from lightning_reweight.rules.tta import (
    EATASelection,
    eata_select,
    entropy_margin,
    estimate_fisher,
    fisher_penalty,
    selected_entropy_loss,
    softmax_entropy,
    tent_select,
    update_moving_average,
)
from lightning_reweight.state.validate import (
    CheckpointStateError,
    as_distribution,
    as_float,
    as_int,
    as_tensor,
    require_keys,
)

__all__ = ["EATA", "Tent", "EntropyAdaptation"]

ResetPolicy = Literal["continual", "episodic", "per_shift"]
SmallBatch = Literal["error", "skip"]
OptimizerName = Literal["adam", "sgd"]

_RESET_POLICIES = ("continual", "episodic", "per_shift")
_COUNTERS = ("batches", "samples", "forwards", "backward_passes", "backward_samples", "steps_without_backward",
             "reliable", "selected", "skipped_batches", "resets")


def as_tensor_any(state: dict[str, Any], key: str, where: str) -> Tensor:
    """``state[key]`` as a finite floating-point tensor of any shape."""
    return as_tensor(state, key, where, ndim=None)


def _batch_input(batch: Any) -> Tensor:
    """The model input of a batch: a tensor, the first element of a tuple/list, or ``image``/``input``/``x``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("image", "input", "x"):
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    raise TypeError(
        "Expected clean Fisher batches to be a tensor, a tuple/list whose first element is the input tensor, or a "
        f"dict with an 'image'/'input'/'x' tensor, but got {type(batch).__name__}."
    )


class EntropyAdaptation(Callback):
    """Shared machinery of entropy-minimisation test-time adaptation (subclassed by ``Tent`` and ``EATA``).

    Subclasses decide which samples count and with what weight (``select``) and may add a regulariser
    (``penalty``). Everything else — TTA mode, hooks, optimiser, reset policies, DDP synchronisation, logging,
    counters and ``state_dict`` — lives here.

    Args:
        optimizer: ``"adam"`` or ``"sgd"`` over the BatchNorm affine parameters.
        lr: learning rate (Tent's CIFAR-10-C config: Adam 1e-3; EATA's ImageNet setting: SGD 0.00025).
        momentum: SGD momentum (0.9 in both papers).
        betas: Adam betas (Tent: 0.9, 0.999).
        weight_decay: weight decay (0 in both papers).
        steps: adaptation steps per batch (1 in both papers). ``0`` only normalises with batch statistics and
            never updates (Tent's "BN adapt"/"norm" baseline, or evaluation of an already adapted model).
        reset: ``"per_shift"`` restores the source parameters (and optimiser, ``m``) at the start of every
            test/predict dataloader and every run (Tent's CIFAR-10-C protocol: reset per corruption × severity);
            ``"continual"`` never resets (lifelong adaptation, also across runs); ``"episodic"`` resets before
            every batch.
        module_name: dotted name of the submodule whose forward returns the logits (``None``: the
            LightningModule itself; its ``test_step``/``predict_step`` must call ``self(x)``).
        min_batch_size: smallest batch that is adapted on (batch statistics of fewer samples are meaningless;
            a BatchNorm1d after global pooling even raises for one sample).
        small_batch: ``"error"`` raises on a smaller batch; ``"skip"`` predicts it with the source running
            statistics and current γ/β, without an update (counted in ``skipped_batches``).
        log_every_n_batches: scalar/histogram logging period in adapted batches (0 disables).
        log_histogram: also write entropy/weight histograms (TensorBoard).
        keep_adapted: leave the adapted γ, β in the module at the end of a run (default ``False``: restore the
            source parameters, so the module is left as it was found; the adapted values stay available in
            ``adapted_state`` and resume at the next run).
        name: checkpoint key and log prefix (two instances need different names).
    """

    log_prefix = "tta"

    def __init__(self, optimizer: OptimizerName = "adam", lr: float = 1e-3, momentum: float = 0.9,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0, steps: int = 1,
                 reset: ResetPolicy = "per_shift", module_name: str | None = None, min_batch_size: int = 2,
                 small_batch: SmallBatch = "error", log_every_n_batches: int = 10, log_histogram: bool = True,
                 keep_adapted: bool = False, name: str | None = None):
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"Expected argument `optimizer` to be 'adam' or 'sgd', but got {optimizer!r}.")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"Expected argument `lr` to be a positive finite number, but got {lr!r}.")
        if not 0 <= momentum < 1:
            raise ValueError(f"Expected argument `momentum` to be in [0, 1), but got {momentum!r}.")
        if len(tuple(betas)) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Expected argument `betas` to be two numbers in [0, 1), but got {betas!r}.")
        if weight_decay < 0:
            raise ValueError(f"Expected argument `weight_decay` to be >= 0, but got {weight_decay!r}.")
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"Expected argument `steps` to be an int >= 0, but got {steps!r}.")
        if reset not in _RESET_POLICIES:
            raise ValueError(f"Expected argument `reset` to be one of {list(_RESET_POLICIES)}, but got {reset!r}.")
        if not isinstance(min_batch_size, int) or min_batch_size < 1:
            raise ValueError(f"Expected argument `min_batch_size` to be an int >= 1, but got {min_batch_size!r}.")
        if small_batch not in ("error", "skip"):
            raise ValueError(f"Expected argument `small_batch` to be 'error' or 'skip', but got {small_batch!r}.")
        if not isinstance(log_every_n_batches, int) or log_every_n_batches < 0:
            raise ValueError(f"Expected argument `log_every_n_batches` to be an int >= 0, but got {log_every_n_batches!r}.")
        self.optimizer_name, self.lr, self.momentum = optimizer, float(lr), float(momentum)
        self.betas, self.weight_decay = (float(betas[0]), float(betas[1])), float(weight_decay)
        self.steps, self.reset_policy, self.module_name = steps, reset, module_name
        self.min_batch_size, self.small_batch = min_batch_size, small_batch
        self.log_every_n_batches, self.log_histogram, self.name = log_every_n_batches, log_histogram, name
        self.keep_adapted = bool(keep_adapted)

        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self._target: nn.Module | None = None
        self._params: dict[str, nn.Parameter] = {}
        self._source: dict[str, Tensor] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending: dict[str, Any] | None = None
        self._resume_shift = False
        self._last_shift: tuple[int, int] | None = None
        self._run = 0
        self._trainer: pl.Trainer | None = None
        self._hooks: list[Any] = []
        self._saved_modes: list[tuple[nn.Module, bool, bool]] = []
        self._saved_grad: dict[str, bool] = {}
        self._active = False
        self._adapted_in_batch = False
        self._skip_forward = False
        self._grad_prev: bool | None = None
        self._warned_second_forward = False
        self._last_log: dict[str, Any] | None = None
        #: adapted γ/β taken out of the module at the end of a run (``keep_adapted=False``); back in at the next
        self._stash: dict[str, Tensor] | None = None
        self._running = False

    # ------------------------------------------------------------------ identity
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    @property
    def prefix(self) -> str:
        return self.name or self.log_prefix

    # ------------------------------------------------------------------ subclass API
    def select(self, entropy: Tensor, probs: Tensor) -> EATASelection:
        """Which samples enter the loss and their weights (``entropy``/``probs`` of this rank's batch)."""
        raise NotImplementedError

    def after_select(self, probs_sum: Tensor, num_selected: int) -> None:
        """Global (all-reduced) sum of the selected samples' probabilities and their count, once per step."""

    def penalty(self) -> Tensor | None:
        """A regulariser on the adapted parameters added to the loss (``None``: none)."""
        return None

    def on_adaptation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called once the model is in TTA mode, before the first batch of a run (EATA: Fisher estimate)."""

    def reset_extra(self) -> None:
        """Reset method-specific state on ``reset()``."""

    def on_new_model(self) -> None:
        """The callback is attached to a different module than before (and no state was loaded for it)."""
        self.reset_extra()

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        return None

    # ------------------------------------------------------------------ public
    @property
    def adapted_parameters(self) -> dict[str, nn.Parameter]:
        """The BatchNorm affine parameters being adapted (names relative to the hooked module)."""
        return dict(self._params)

    @property
    def source_state(self) -> dict[str, Tensor]:
        """A copy of the source γ/β snapshot (what ``reset`` and the end of a run restore), by parameter name."""
        return {k: v.detach().clone() for k, v in self._source.items()}

    @property
    def adapted_state(self) -> dict[str, Tensor]:
        """A copy of the current adapted γ/β, by parameter name — also after a run that restored the source
        parameters into the module (``keep_adapted=False``)."""
        if self._stash is not None:
            return {k: v.detach().clone() for k, v in self._stash.items()}
        return {k: p.detach().clone() for k, p in self._params.items()}

    @property
    def backward_passes(self) -> int:
        """Adaptation steps that ran a backward pass (a step that selects no sample runs none)."""
        return self.counters["backward_passes"]

    @property
    def backward_samples(self) -> int:
        """Samples that entered a backward pass (EATA's "#backwards"), over all ranks."""
        return self.counters["backward_samples"]

    def reset(self) -> None:
        """Restore the source γ/β, a fresh optimiser state and method state (EATA's ``m``). Counters keep running."""
        self._stash = None
        if self._params:
            with torch.no_grad():
                for k, p in self._params.items():
                    p.copy_(self._source[k].to(p))
            self._optimizer = self._make_optimizer()
        self.reset_extra()
        self.counters["resets"] += 1

    # ------------------------------------------------------------------ Lightning hooks
    def outside_trainer_refusal(self) -> str | None:
        """Test-time adaptation runs inside ``trainer.test`` / ``trainer.predict`` only."""
        return ("test-time adaptation adapts the model inside `trainer.test()` / `trainer.predict()`; it has no "
                "training step to weigh. Remove it from the training loop's callbacks and run it with a Trainer.")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        stage = str(getattr(stage, "value", stage))  # Lightning passes its TrainerFn enum
        if stage not in ("test", "predict"):
            return
        loop = trainer.test_loop if stage == "test" else trainer.predict_loop
        if getattr(loop, "inference_mode", False):
            raise RuntimeError(
                f"{type(self).__name__} adapts the model during trainer.{stage}() and needs gradients, but the "
                "Trainer runs evaluation under torch.inference_mode. Expected `Trainer(inference_mode=False)`, "
                "but got inference_mode=True. Fix: Trainer(inference_mode=False, callbacks=[...]) (CLI: "
                "--trainer.inference_mode=false)."
            )

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module, "test")

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module, "predict")

    @override
    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._batch_start(dataloader_idx)

    @override
    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        self._batch_start(dataloader_idx)

    @override
    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_end(trainer, pl_module, "test")

    @override
    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_end(trainer, pl_module, "predict")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop()

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:
            return dict(self._pending)
        return {
            "version": 1,
            "source": {k: v.detach().cpu().clone() for k, v in self._source.items()},
            "adapted": {k: v.cpu() for k, v in self.adapted_state.items()},
            "optimizer": self._optimizer.state_dict() if self._optimizer is not None else None,
            "counters": dict(self.counters),
            "last_shift": self._last_shift,
            "extra": self.extra_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from ``state_dict()``: γ/β, source snapshot and optimiser are applied when the next
        test/predict run starts (the model is not known before); counters and method state at once.

        Everything is validated first (``check_state_dict``; ``CheckpointStateError`` names the key; nothing is
        assigned on error), then assigned."""
        counters, last, extra = self.check_state_dict(state_dict)
        self.counters = {**dict.fromkeys(_COUNTERS, 0), **counters}
        self._last_shift = tuple(last) if last is not None else None
        self.load_extra_state(extra)
        self._pending = dict(state_dict)
        self._resume_shift = True
        if self._params and self._running:  # attached and inside a run: apply now (otherwise at the next run)
            self._apply_pending()

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Dry run before Lightning assigns any callback's state (see ``callbacks/_restore.py``)."""
        entry = checkpoint_entry(self, checkpoint)
        if entry is not None:
            self.check_state_dict(entry)

    def check_state_dict(self, state_dict: Any) -> tuple[dict[str, int], Any, dict[str, Any]]:
        """Validate a checkpoint entry without assigning anything; returns ``(counters, last_shift, extra)``.

        Checks source and adapted γ/β (same names and shapes, finite; against the module's BatchNorm parameters
        as soon as it is known), counters (non-negative ints), the last shift, the optimiser's form and the
        method state (``validate_extra_state``)."""
        where = self._where
        require_keys(state_dict, ["source", "adapted", "optimizer", "counters", "last_shift", "extra"], where)
        source, adapted = state_dict["source"], state_dict["adapted"]
        for key, values in (("source", source), ("adapted", adapted)):
            if not isinstance(values, dict):
                raise CheckpointStateError(where, key, f"expected a dict of tensors, but got {type(values).__name__}.")
            for name, v in values.items():
                if not isinstance(v, Tensor) or not v.is_floating_point() or not bool(torch.isfinite(v).all()):
                    raise CheckpointStateError(where, f"{key}.{name}", "expected a finite floating-point tensor, but "
                                               f"got {v if not isinstance(v, Tensor) else 'dtype ' + str(v.dtype)}.")
        if source and set(source) != set(adapted):
            raise CheckpointStateError(where, "adapted", f"expected the same parameters as 'source', but got "
                                       f"{sorted(set(adapted) ^ set(source))[:5]} in only one of them.")
        for name, v in adapted.items():
            if name in source and v.shape != source[name].shape:
                raise CheckpointStateError(where, f"adapted.{name}", f"expected shape {tuple(source[name].shape)} "
                                           f"(as in 'source'), but got {tuple(v.shape)}.")
        counters_state = state_dict["counters"]
        required = [k for k in _COUNTERS if k != "steps_without_backward"]  # added later: optional
        require_keys(counters_state, required, f"{where}['counters']")
        counters = {k: as_int(counters_state, k, f"{where}['counters']", minimum=0)
                    for k in _COUNTERS if k in counters_state}
        last = state_dict["last_shift"]
        if last is not None and not (isinstance(last, (tuple, list)) and len(last) == 2
                                     and all(isinstance(v, int) and v >= 0 for v in last)):
            raise CheckpointStateError(where, "last_shift", f"expected None or (run, dataloader_idx), but got {last!r}.")
        optimizer = state_dict["optimizer"]
        if optimizer is not None and not (isinstance(optimizer, dict) and {"state", "param_groups"} <= set(optimizer)):
            raise CheckpointStateError(where, "optimizer", "expected None or a torch optimizer state_dict (with "
                                       f"'state' and 'param_groups'), but got {type(optimizer).__name__}.")
        extra = self.validate_extra_state(state_dict["extra"], set(source))
        if self._params:
            self._check_against_module(state_dict)
        return counters, last, extra

    # ------------------------------------------------------------------ internals: setup / teardown
    def _resolve_target(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.module_name is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module_name)
        except AttributeError as err:
            names = [n for n, _ in pl_module.named_children()]
            raise ValueError(
                f"Expected argument `module_name` to name a submodule of {type(pl_module).__name__} "
                f"(top-level children: {names}), but got {self.module_name!r}."
            ) from err

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = list(self._params.values())
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def _bn_modules(self) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
        assert self._target is not None
        return [(n, m) for n, m in self._target.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def _attach(self, target: nn.Module) -> None:
        """First run on this module: find γ/β, snapshot them as the source, build the optimiser."""
        self._target = target
        params: dict[str, nn.Parameter] = {}
        for mod_name, bn in self._bn_modules():
            for p_name in ("weight", "bias"):
                p = getattr(bn, p_name, None)
                if isinstance(p, nn.Parameter):
                    params[f"{mod_name}.{p_name}" if mod_name else p_name] = p
        if not params:
            raise ValueError(
                f"{type(self).__name__} adapts the affine parameters of BatchNorm layers, but "
                f"{type(target).__name__} has none (no BatchNorm, or affine=False). Use a model with BatchNorm."
            )
        self._params = params
        self._stash = None
        self._source = {k: p.detach().clone() for k, p in params.items()}
        self._optimizer = self._make_optimizer()

    @property
    def _where(self) -> str:
        return f"callbacks[{self.state_key!r}]"

    def validate_extra_state(self, extra: Any, param_names: set[str]) -> dict[str, Any]:
        """Check the method state of a checkpoint before anything is assigned; returns what
        ``load_extra_state`` receives (``param_names``: the checkpoint's adapted parameter names)."""
        if not isinstance(extra, dict):
            raise CheckpointStateError(self._where, "extra", f"expected a dict, but got {type(extra).__name__}.")
        return extra

    def _check_against_module(self, state: dict[str, Any]) -> None:
        """The checkpoint's γ/β must be exactly the module's BatchNorm affine parameters, with their shapes."""
        for key in ("source", "adapted"):
            values = state.get(key) or {}
            unknown = sorted(set(values) - set(self._params))
            missing = sorted(set(self._params) - set(values)) if values else []
            if unknown or missing:
                raise CheckpointStateError(
                    self._where, key,
                    f"expected the module's BatchNorm parameters {sorted(self._params)[:5]}..., but the checkpoint "
                    f"has {unknown[:5]} that the module does not have and lacks {missing[:5]}. Load it into the same "
                    "architecture (and the same `module_name`).")
            for name, v in values.items():
                if tuple(v.shape) != tuple(self._params[name].shape):
                    raise CheckpointStateError(self._where, f"{key}.{name}", f"expected shape "
                                               f"{tuple(self._params[name].shape)} (the module's), but got {tuple(v.shape)}.")

    def _apply_pending(self) -> None:
        state, self._pending = self._pending, None
        if not state:
            return
        try:
            self._check_against_module(state)
        except CheckpointStateError:
            self._pending = state  # nothing applied; the state is kept as loaded
            raise
        self._stash = None
        with torch.no_grad():
            for k, v in (state.get("source") or {}).items():
                self._source[k] = v.to(self._params[k]).clone()
            for k, v in (state.get("adapted") or {}).items():
                self._params[k].copy_(v.to(self._params[k]))
        self._optimizer = self._make_optimizer()
        if state.get("optimizer") is not None:
            self._optimizer.load_state_dict(state["optimizer"])

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if torch.is_inference_mode_enabled():
            self.setup(trainer, pl_module, stage)  # raises with the fix
        self._trainer = trainer
        self._run += 1
        target = self._resolve_target(pl_module)
        if target is not self._target:
            self._attach(target)
            if self._pending is None:  # a new model: state from another model does not apply
                self.on_new_model()
        if self._stash is not None:  # the adapted γ/β taken out at the end of the previous run
            with torch.no_grad():
                for k, p in self._params.items():
                    p.copy_(self._stash[k].to(p))
            self._stash = None
        if self._pending is not None:
            self._apply_pending()
        self._running = True
        self._enter_tta_mode()
        pre = target.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        post = target.register_forward_hook(self._post_forward, with_kwargs=True, always_call=True)
        self._hooks = [pre, post]
        if trainer.world_size > 1:
            self._check_equal_batches(trainer, stage)
        self.on_adaptation_start(trainer, pl_module)

    def _enter_tta_mode(self) -> None:
        assert self._target is not None
        self._saved_grad = {n: p.requires_grad for n, p in self._target.named_parameters()}
        self._saved_modes = []
        for p in self._target.parameters():
            p.requires_grad_(False)
        for p in self._params.values():
            p.requires_grad_(True)
        for _, bn in self._bn_modules():
            self._saved_modes.append((bn, bn.training, bn.track_running_stats))
            bn.train()
            bn.track_running_stats = False  # batch statistics; running buffers kept but unused

    def _stop(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._grad_prev is not None:
            torch.set_grad_enabled(self._grad_prev)
            self._grad_prev = None
        for bn, training, track in self._saved_modes:
            bn.train(training)
            bn.track_running_stats = track
        self._saved_modes = []
        if self._target is not None:
            for n, p in self._target.named_parameters():
                if n in self._saved_grad:
                    p.requires_grad_(self._saved_grad[n])
        self._saved_grad = {}
        for p in self._params.values():
            p.grad = None
        self._active = False
        if self._running:
            self._running = False
            self._leave_adapted_parameters()

    def _leave_adapted_parameters(self) -> None:
        """End of a run: put the source γ/β back into the module (default) or leave the adapted ones, with a
        warning about the statistics they will meet outside the callback."""
        if not self._params:
            return
        if self.keep_adapted:
            rank_zero_warn(
                f"{type(self).__name__}(keep_adapted=True) leaves the adapted BatchNorm γ/β in the module. They were "
                "adapted while BatchNorm normalised with each test batch's statistics; outside the callback (eval "
                "mode) BatchNorm normalises with the source running statistics instead, so the module's predictions "
                "differ from the adapted ones and can be worse than the source model's. Evaluate the adapted model "
                "through the callback (`steps=0`, `reset='continual'`), or keep the default keep_adapted=False."
            )
            return
        with torch.no_grad():
            self._stash = {k: p.detach().clone() for k, p in self._params.items()}
            for k, p in self._params.items():
                p.copy_(self._source[k].to(p))

    def _check_equal_batches(self, trainer: pl.Trainer, stage: str) -> None:
        counts = trainer.num_test_batches if stage == "test" else trainer.num_predict_batches
        local = torch.tensor([float(sum(counts))], device=trainer.strategy.root_device)
        every = trainer.strategy.all_gather(local).reshape(-1)
        if bool((every != every[0]).any()):
            raise RuntimeError(
                f"{type(self).__name__} synchronises every adaptation step across DDP ranks, but the ranks have "
                f"different numbers of {stage} batches ({every.long().tolist()}). Make every rank's share equal "
                "(dataset size divisible by world_size × batch_size, or `drop_last=True`)."
            )

    # ------------------------------------------------------------------ internals: per batch
    def _batch_start(self, dataloader_idx: int) -> None:
        key = (self._run, int(dataloader_idx))
        if self._resume_shift:
            self._resume_shift = False
        elif self.reset_policy == "episodic" or (self.reset_policy == "per_shift" and key != self._last_shift):
            if self.counters["batches"] > 0 or self.reset_policy == "episodic":
                self.reset()
        self._last_shift = key
        self._active = True
        self._adapted_in_batch = False

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._active:
            return
        if self._adapted_in_batch:
            if not self._warned_second_forward:
                rank_zero_warn(
                    f"{type(self).__name__}: the hooked module was called more than once in one batch; only the "
                    "first call adapts, later calls are plain forwards with batch statistics."
                )
                self._warned_second_forward = True
            return
        x = args[0] if args else next(iter(kwargs.values()), None)
        n = int(x.shape[0]) if isinstance(x, Tensor) and x.ndim > 0 else None
        self._skip_forward = False
        if n is not None and n < self.min_batch_size:
            if self.small_batch == "error":
                raise ValueError(
                    f"{type(self).__name__} normalises with the statistics of the test batch, which needs at least "
                    f"min_batch_size={self.min_batch_size} samples, but got a batch of {n}. Expected a larger test "
                    "batch (the papers use 64-200; `drop_last=True` drops a short last batch), or "
                    "small_batch='skip' to predict such batches with the source running statistics, without an update."
                )
            self._skip_forward = True
            for _, bn in self._bn_modules():
                bn.eval()
                bn.track_running_stats = True
            return
        self._grad_prev = torch.is_grad_enabled()
        torch.set_grad_enabled(True)

    def _post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self._active or self._adapted_in_batch:
            return None
        self._adapted_in_batch = True
        if self._skip_forward:
            self._skip_forward = False
            for _, bn in self._bn_modules():
                bn.train()
                bn.track_running_stats = False
            self.counters["skipped_batches"] += 1
            self.counters["forwards"] += 1
            return None
        try:
            if output is None:  # the forward raised; always_call hook only restores state
                return None
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"{type(self).__name__} expects the hooked module's forward to return a logits tensor (batch, "
                    f"classes), but got {type(output).__name__}. Set `module_name` to the submodule that returns "
                    "the logits."
                )
            return self._adapt(module, args, kwargs, output)
        finally:
            if self._grad_prev is not None:
                torch.set_grad_enabled(self._grad_prev)
                self._grad_prev = None

    def _all_sum(self, t: Tensor) -> Tensor:
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return t
        return trainer.strategy.reduce(t, reduce_op="sum")

    def _sync_grads(self) -> None:
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return
        params = list(self._params.values())
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        flat = trainer.strategy.reduce(flat, reduce_op="sum")
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def _adapt(self, module: nn.Module, args: tuple, kwargs: dict, logits: Tensor) -> Tensor:
        n_local = logits.shape[0]
        self.counters["batches"] += 1
        self.counters["forwards"] += 1
        if self.steps == 0:
            self._record(None, logits.detach(), None, None)
            return logits.detach()
        world = self._trainer.world_size if self._trainer is not None else 1
        for step in range(self.steps):
            if step > 0:  # Tent's multi-step variant: a fresh forward per step, without the hooks
                logits = module.forward(*args, **kwargs)
                self.counters["forwards"] += 1
            entropy = softmax_entropy(logits)
            probs = logits.detach().float().softmax(dim=1)
            sel = self.select(entropy.detach(), probs)
            weights = sel.weights.to(entropy)
            # one collective per step: counts, Σw, Σw·E and Σp over the selected samples of every rank
            local = torch.cat([
                torch.stack([torch.tensor(float(n_local), device=probs.device), sel.reliable.sum().float(),
                             sel.selected.sum().float(), weights.sum().float(),
                             (weights * entropy.detach()).sum().float()]),
                probs[sel.selected].sum(dim=0),
            ])
            glob = self._all_sum(local)
            n_all, n_rel, n_sel = (int(round(float(v))) for v in glob[:3])
            self.after_select(glob[5:], n_sel)
            loss_value = None
            if n_sel > 0:
                loss = selected_entropy_loss(entropy, weights, n_sel)
                reg = self.penalty()
                if reg is not None:  # identical on every rank: divide so that the gradient all-reduce sums to it once
                    loss = loss + reg / world
                assert self._optimizer is not None
                self._optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self._sync_grads()
                self._optimizer.step()
                self._optimizer.zero_grad(set_to_none=True)
                loss_value = float(glob[4]) / n_sel + (float(reg.detach()) if reg is not None else 0.0)
                self.counters["backward_passes"] += 1
                self.counters["backward_samples"] += n_sel
            else:  # no sample selected on any rank: no loss, no backward, no optimiser step
                self.counters["steps_without_backward"] += 1
            if step == 0:
                self.counters["samples"] += n_all
                self.counters["reliable"] += n_rel
                self.counters["selected"] += n_sel
                self._record(sel, entropy.detach(), (n_all, n_rel, n_sel, float(glob[3])), loss_value)
        return logits.detach()

    # ------------------------------------------------------------------ internals: logging
    def _record(self, sel: EATASelection | None, entropy_or_logits: Tensor, stats: tuple | None,
                loss: float | None) -> None:
        if sel is None:  # steps == 0: count samples only
            n = entropy_or_logits.shape[0]
            n_all = int(self._all_sum(torch.tensor([float(n)], device=entropy_or_logits.device))[0])
            self.counters["samples"] += n_all
            entropy = softmax_entropy(entropy_or_logits.float())
            self._last_log = {"n": n_all, "n_rel": n_all, "n_sel": 0, "w_sum": 0.0, "loss": None, "backward": 0,
                              "entropy": entropy, "weights": None}
            return
        n_all, n_rel, n_sel, w_sum = stats  # type: ignore[misc]
        self._last_log = {"n": n_all, "n_rel": n_rel, "n_sel": n_sel, "w_sum": w_sum, "loss": loss,
                          "backward": (1 if n_sel > 0 else 0) * self.steps,
                          "entropy": entropy_or_logits, "weights": sel.weights[sel.selected].detach()}

    def _batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._active = False
        if not self._adapted_in_batch:
            raise RuntimeError(
                f"{type(self).__name__} saw no forward call of {'the LightningModule' if self.module_name is None else repr(self.module_name)} "
                f"during this {stage} batch, so nothing was adapted or predicted by the adapted model. The "
                f"module's {stage}_step must call `self(x)` (or set `module_name` to the submodule it calls)."
            )
        rec, self._last_log = self._last_log, None
        if rec is None:
            return
        n, n_rel, n_sel = rec["n"], rec["n_rel"], rec["n_sel"]
        p = self.prefix
        scalars = {
            f"{p}/kept_reliable": n_rel / max(n, 1),
            f"{p}/kept_non_redundant": n_sel / max(n_rel, 1),
            f"{p}/kept": n_sel / max(n, 1),
            f"{p}/weight_mean": rec["w_sum"] / max(n_sel, 1),
            f"{p}/entropy_mean": float(rec["entropy"].float().mean()),
            f"{p}/backward_passes": float(self.counters["backward_passes"]),
            f"{p}/backward_samples": float(self.counters["backward_samples"]),
        }
        if rec["loss"] is not None:
            scalars[f"{p}/loss"] = rec["loss"]
        if stage == "test":  # epoch summaries in trainer.test()'s results (predict does not allow logging)
            pl_module.log(f"{p}/kept_frac", n_sel / max(n, 1), on_step=False, on_epoch=True, batch_size=max(n, 1))
            pl_module.log(f"{p}/backward_samples_run", float(n_sel if self.steps else 0), on_step=False,
                          on_epoch=True, reduce_fx="sum")
            pl_module.log(f"{p}/backward_passes_run", float(rec["backward"]), on_step=False, on_epoch=True,
                          reduce_fx="sum")
        step = self.counters["batches"]
        if self.log_every_n_batches and (step - 1) % self.log_every_n_batches == 0:
            log_scalars(trainer, scalars, step=step, pl_module=pl_module)
            if self.log_histogram:
                entropy = rec["entropy"].float()
                weights = rec["weights"]
                if trainer.world_size > 1:
                    (entropy,), _ = gather_rows([entropy])
                    if weights is not None:
                        (weights,), _ = gather_rows([weights.float()])
                log_histogram(trainer, f"{p}/entropy", entropy, step=step)
                if weights is not None and weights.numel():
                    log_histogram(trainer, f"{p}/weights", weights, step=step)


class Tent(EntropyAdaptation):
    """Tent: minimise the mean prediction entropy of every test sample over the BatchNorm affine parameters.

    "Tent: Fully Test-time Adaptation by Entropy Minimization" (Wang et al., ICLR 2021). Defaults are the
    official CIFAR-10-C configuration (``DequanWang/tent:cfgs/tent.yaml``): Adam, lr 1e-3, β = (0.9, 0.999),
    one step per batch, test batch 200, reset per corruption × severity (``reset="per_shift"``).
    ``Tent(steps=0)`` is the "BN adapt"/"norm" baseline (batch statistics, no update).

    Example::

        trainer = Trainer(inference_mode=False, callbacks=[Tent()])
        trainer.test(model, datamodule=CIFAR10CDataModule(severities=[5]))
    """

    log_prefix = "tent"

    @override
    def select(self, entropy: Tensor, probs: Tensor) -> EATASelection:
        return tent_select(entropy)


class EATA(EntropyAdaptation):
    """EATA: sample-efficient entropy minimisation with an anti-forgetting Fisher regulariser.

    "Efficient Test-Time Model Adaptation without Forgetting" (Niu et al., ICML 2022). Per batch: keep samples
    with entropy ``E < E0`` (reliable) and ``|cos(p, m)| < d_margin`` (non-redundant; ``m`` = moving average of
    the probabilities of earlier selected samples), weight them by ``exp(E0 − E)``, minimise the mean weighted
    entropy over them plus ``fisher_alpha·Σ ω(θ − θ⁰)²``; no selected sample → no backward. ``fisher_alpha=0``
    is ETA (no regulariser, no clean data needed).

    Defaults: ``E0 = 0.4·ln C`` (official ``main.py``); ``d_margin = 0.4`` and ``fisher_alpha = 1`` are the
    CIFAR-10-C values used by reproductions (the official ImageNet values are 0.05 and 2000; 0.05 rejects almost
    everything at C = 10, see ``../shared/METHODS.md`` §10); ``m`` momentum 0.1; Fisher from 2,000 clean samples.
    The optimiser defaults follow the CIFAR-10-C reproductions (Adam, lr 1e-3); EATA's ImageNet setting is
    ``optimizer="sgd", lr=0.00025, momentum=0.9``.

    Args:
        e_margin: reliability threshold ``E0`` in nats (``None``: ``e_margin_factor·ln C`` from the logits).
        e_margin_factor: the factor of ``ln C`` when ``e_margin`` is ``None``.
        d_margin: redundancy threshold ε on ``|cos(p, m)|`` (``None`` disables the redundancy filter).
        fisher_alpha: λ of the Fisher regulariser (0 disables it: ETA).
        fisher_samples: clean samples used for the Fisher estimate (EATA: 2000).
        fisher_dataloader: an iterable of clean in-distribution batches (inputs first, labels unused). If
            ``None``, the DataModule's ``val_dataloader()`` (``fisher_source="val"``) or ``train_dataloader()``
            (``"train"``) is used. The model is in TTA mode while ``ω`` is estimated, as in EATA.
        fisher_source: which DataModule loader to take when ``fisher_dataloader`` is ``None``.
        fisher_normalize: divide ``ω`` by its mean over all adapted parameters, so that ``fisher_alpha`` is on the
            scale of the entropy loss: the penalty is ``fisher_alpha·Σ ω̂(θ − θ⁰)²`` with mean ``ω̂`` = 1. The raw
            Fisher of a confident 10-class model is tiny (mean ``ω`` ~1e-4), so at ``fisher_alpha=1`` the raw
            penalty hardly acts (EATA ≈ ETA); EATA's ImageNet value 2000 compensates for that scale.
        momentum_m: update rate of the moving average ``m`` (EATA: 0.1).
        **kwargs: ``EntropyAdaptation`` arguments (optimizer, lr, steps, reset, module_name, ...).

    Example::

        trainer = Trainer(inference_mode=False, callbacks=[EATA(d_margin=0.4, fisher_alpha=1.0)])
        trainer.test(model, datamodule=CIFAR10CDataModule(severities=[5]))
    """

    log_prefix = "eata"

    def __init__(self, e_margin: float | None = None, e_margin_factor: float = 0.4, d_margin: float | None = 0.4,
                 fisher_alpha: float = 1.0, fisher_samples: int = 2000, fisher_dataloader: Iterable | None = None,
                 fisher_source: Literal["val", "train"] = "val", fisher_normalize: bool = False,
                 momentum_m: float = 0.1, **kwargs: Any):
        super().__init__(**kwargs)
        if e_margin is not None and not (math.isfinite(e_margin) and e_margin > 0):
            raise ValueError(f"Expected argument `e_margin` to be a positive finite number or None, but got {e_margin!r}.")
        if not (math.isfinite(e_margin_factor) and e_margin_factor > 0):
            raise ValueError(f"Expected argument `e_margin_factor` to be a positive number, but got {e_margin_factor!r}.")
        if d_margin is not None and not 0 < d_margin <= 1:
            raise ValueError(f"Expected argument `d_margin` to be in (0, 1] or None, but got {d_margin!r}.")
        if not (math.isfinite(fisher_alpha) and fisher_alpha >= 0):
            raise ValueError(f"Expected argument `fisher_alpha` to be a finite number >= 0, but got {fisher_alpha!r}.")
        if not isinstance(fisher_samples, int) or fisher_samples < 1:
            raise ValueError(f"Expected argument `fisher_samples` to be a positive int, but got {fisher_samples!r}.")
        if fisher_source not in ("val", "train"):
            raise ValueError(f"Expected argument `fisher_source` to be 'val' or 'train', but got {fisher_source!r}.")
        if not 0 < momentum_m <= 1:
            raise ValueError(f"Expected argument `momentum_m` to be in (0, 1], but got {momentum_m!r}.")
        self.e_margin, self.e_margin_factor, self.d_margin = e_margin, float(e_margin_factor), d_margin
        self.fisher_alpha, self.fisher_samples = float(fisher_alpha), fisher_samples
        self.fisher_dataloader, self.fisher_source, self.momentum_m = fisher_dataloader, fisher_source, float(momentum_m)
        self.fisher_normalize = bool(fisher_normalize)
        self.moving_average: Tensor | None = None
        self.fisher: dict[str, Tensor] | None = None
        self.fisher_num_samples = 0
        self._fisher_cache: dict[str, Tensor] | None = None
        self._e0: float | None = e_margin

    # ------------------------------------------------------------------ EATA pieces
    @property
    def entropy_margin(self) -> float | None:
        """The reliability threshold ``E0`` in nats in use: ``e_margin``, or ``e_margin_factor·ln C`` once the
        first batch showed the number of classes ``C`` (``None`` before that)."""
        return self._e0

    @property
    def fisher_weights(self) -> dict[str, Tensor] | None:
        """The ``ω`` the penalty uses: the estimated Fisher, divided by its mean when ``fisher_normalize``."""
        if not self.fisher:
            return None
        if not self.fisher_normalize:
            return self.fisher
        total = sum(float(v.sum()) for v in self.fisher.values())
        count = sum(v.numel() for v in self.fisher.values())
        mean = total / max(count, 1)
        if not mean > 0:
            return self.fisher
        return {k: v / mean for k, v in self.fisher.items()}

    @override
    def select(self, entropy: Tensor, probs: Tensor) -> EATASelection:
        if self._e0 is None:
            self._e0 = entropy_margin(probs.shape[1], self.e_margin_factor)
        m = self.moving_average.to(probs) if self.moving_average is not None else None
        return eata_select(entropy, probs, self._e0, self.d_margin, m)

    @override
    def after_select(self, probs_sum: Tensor, num_selected: int) -> None:
        if self.d_margin is None:
            return
        self.moving_average = update_moving_average(self.moving_average, probs_sum, num_selected, self.momentum_m)

    @override
    def penalty(self) -> Tensor | None:
        if self.fisher_alpha == 0 or not self.fisher:
            return None
        if self._fisher_cache is None:
            self._fisher_cache = self.fisher_weights
        return fisher_penalty(self._params, self._fisher_cache, self._source, self.fisher_alpha)

    @override
    def reset_extra(self) -> None:
        self.moving_average = None

    @override
    def on_new_model(self) -> None:
        self.moving_average = None
        self.fisher, self.fisher_num_samples = None, 0
        self._fisher_cache = None
        self._e0 = self.e_margin

    @override
    def on_adaptation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fisher_alpha == 0 or self.fisher is not None:
            return
        loader = self._clean_loader(trainer)
        device = next(iter(self._params.values())).device
        target = self._target
        assert target is not None

        def batches():
            for batch in loader:
                yield _batch_input(batch).to(device)

        fisher, n = estimate_fisher(lambda x: target(x), batches(), self._params, self.fisher_samples)
        if trainer.world_size > 1:  # identical on every rank whatever each rank's loader did
            fisher, n = trainer.strategy.broadcast((fisher, n), src=0)
            fisher = {k: v.to(device) for k, v in fisher.items()}
        self.fisher, self.fisher_num_samples = fisher, n
        self._fisher_cache = None

    def _clean_loader(self, trainer: pl.Trainer) -> Iterable:
        if self.fisher_dataloader is not None:
            return self.fisher_dataloader
        dm = trainer.datamodule
        hook = f"{self.fisher_source}_dataloader"
        if dm is not None and callable(getattr(dm, hook, None)):
            try:
                return getattr(dm, hook)()
            except Exception as err:  # a DataModule without that split raises its own error type
                raise RuntimeError(
                    f"EATA could not get clean samples for its Fisher regulariser from {type(dm).__name__}.{hook}() "
                    f"({type(err).__name__}: {err}). Pass `fisher_dataloader=DataLoader(clean_set)` or "
                    "`fisher_alpha=0` (ETA)."
                ) from err
        raise RuntimeError(
            "EATA's anti-forgetting regulariser needs clean in-distribution samples, but none were given and the "
            f"Trainer has no DataModule with a `{hook}()`. Expected `fisher_dataloader=DataLoader(clean_set)` (e.g. "
            "2,000 held-out training images), a DataModule with that loader, or `fisher_alpha=0` (ETA)."
        )

    # ------------------------------------------------------------------ state
    @override
    def extra_state(self) -> dict[str, Any]:
        return {
            "moving_average": None if self.moving_average is None else self.moving_average.detach().cpu().clone(),
            "fisher": None if self.fisher is None else {k: v.detach().cpu().clone() for k, v in self.fisher.items()},
            "fisher_num_samples": self.fisher_num_samples,
            "e_margin": self._e0,
        }

    @override
    def validate_extra_state(self, extra: Any, param_names: set[str]) -> dict[str, Any]:
        where = f"{self._where}['extra']"
        require_keys(extra, ["moving_average", "fisher", "fisher_num_samples", "e_margin"], where)
        m = extra["moving_average"]
        if m is not None:
            m = as_distribution(extra, "moving_average", where, atol=1e-3)
        fisher = extra["fisher"]
        if fisher is not None:
            if not isinstance(fisher, dict):
                raise CheckpointStateError(where, "fisher", f"expected a dict of tensors, but got {type(fisher).__name__}.")
            for name in fisher:
                omega = as_tensor_any(fisher, name, f"{where}['fisher']")
                if param_names and name not in param_names:
                    raise CheckpointStateError(f"{where}['fisher']", name, "expected a Fisher entry per adapted "
                                               f"parameter, but this parameter is not among {sorted(param_names)[:5]}...")
                if bool((omega < 0).any()):
                    raise CheckpointStateError(f"{where}['fisher']", name, "expected non-negative Fisher values, but "
                                               f"the minimum is {omega.min().item()}.")
            fisher = dict(fisher)
        n = as_int(extra, "fisher_num_samples", where, minimum=0)
        e0 = as_float(extra, "e_margin", where, minimum=0.0, optional=True)
        if e0 is not None and e0 <= 0:
            raise CheckpointStateError(where, "e_margin", f"expected a positive entropy margin, but got {e0}.")
        return {"moving_average": m, "fisher": fisher, "fisher_num_samples": n, "e_margin": e0}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.moving_average = state.get("moving_average")
        fisher = state.get("fisher")
        self.fisher = None if fisher is None else dict(fisher)
        self._fisher_cache = None
        self.fisher_num_samples = state.get("fisher_num_samples", 0)
        self._e0 = state.get("e_margin", self.e_margin)
