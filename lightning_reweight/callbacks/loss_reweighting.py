"""``LossReweighting``: instance-level, loss-based sample weights each training step."""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_reweight._compile import CompiledFunction
from lightning_reweight.callbacks.base import DEFERRED_FOLD, GlobalBatch, WeightingCallback
from lightning_reweight.rules import RULES, Rule, clip_weights, create_rule, effective_sample_size
from lightning_reweight.rules.instance import host_kernels
from lightning_reweight.rules.registry import rule_arguments
from lightning_reweight.state.validate import CheckpointStateError, as_int

__all__ = ["LossReweighting", "resolve_rule_arguments"]

#: a GPU run keeps at most this many weights (over its last steps) before it counts their ESS collapses
_KEPT_ROWS = 1 << 20

#: the rule-specific constructor arguments of ``LossReweighting``
RULE_ARGUMENTS = ("r", "delta", "direction", "normalizer", "ema_rate")


def resolve_rule_arguments(rule: str, given: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Split rule-specific arguments into the ones rule ``rule`` takes and the ones to ignore.

    ``None`` means "the rule's default" and is dropped. An argument the rule does not take is ignored (with a
    warning, returned as the second value) when its value is the default of some registered rule that does
    take it — a leftover of a config written for another rule, e.g. ``delta: 1.0`` after switching to
    ``kl_dro``. Any other value of such an argument raises, since it would otherwise be silently lost.

    Raises:
        ValueError: naming the argument, the rule, the arguments it takes and the rules that take the argument.
    """
    accepted = rule_arguments(rule)
    kwargs, ignored = {}, []
    for key, value in given.items():
        if value is None:
            continue
        if accepted is None or key in accepted:
            kwargs[key] = value
            continue
        takers = {name: args[key] for name in RULES if (args := rule_arguments(name)) and key in args}
        if any(_same(value, default) for default in takers.values()):
            ignored.append(f"{key}={value!r}")
            continue
        raise ValueError(
            f"Expected no `{key}` for rule {rule!r} (it takes {sorted(accepted)}), but got {key}={value!r}. "
            f"`{key}` belongs to rule(s) {sorted(takers)}: pick one of those, or remove `{key}` (or set it to "
            "null) in the config."
        )
    return kwargs, ignored


def _weight_mass(weights: Tensor) -> tuple[float, float]:
    """``(Σw, Σw²)`` of CPU weights as Python floats, accumulated in float64 (one compiled call with numba)."""
    kernels = host_kernels()
    if kernels is not None and weights.dtype in (torch.float32, torch.float64):
        total, square = kernels.weight_mass(weights.detach().numpy())
        return float(total), float(square)
    w = weights.detach().double()
    return w.sum().item(), w.dot(w).item()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b))
    return a == b


class LossReweighting(WeightingCallback):
    """Weight each sample of the (global) batch by a loss-based rule.

    Rules (``rule=``): ``"linupper"``, ``"quadratic"``, ``"extremes"`` — "Dynamic Loss-Based Sample Reweighting
    for Improved LLM Pretraining" (defaults δ = 1, r = 0.4, 1000 uniform warm-up steps); ``"kl_dro"`` — the
    KL-regularised DRO tilt w ∝ exp(ℓ/r) of "Doubly Robust Instance-Reweighted Adversarial Training" (ours:
    r = 1; no warm-up, as DONE); ``"uniform"``; or any ``Rule`` instance / name added with ``register_rule``.
    ``direction="down"`` flips the preference towards low-loss samples (noisy labels).

    Weights are computed on the losses of the whole global batch (all DDP ranks), so every rank uses the
    same weights; they carry no gradient and are optionally clipped at ``max_weight``. They average 1,
    except for ``kl_dro`` with ``normalizer="ema"``, whose scale is DONE's running normaliser.

    Rule-specific arguments (``r``, ``delta``, ``direction``, ``normalizer``, ``ema_rate``) default to
    ``None`` = the chosen rule's default. One the chosen rule does not take is ignored with a warning when
    its value is another rule's default (so a recipe's ``delta: 1.0`` survives switching to ``kl_dro``),
    and raises otherwise.

    A step whose weights' effective sample size falls below ``min_ess_frac`` of the batch warns (once per
    episode) and counts in the logged scalar ``<prefix>/ess_collapsed_steps``; ESS is Kish's
    ``(Σw)²/Σw²``, for the EMA normaliser ``min((Σw)²/Σw², Σw)`` (uniformly tiny weights collapse too).
    On a GPU batch the collapses are counted on the device and read (and warned about) at the logging
    cadence and at checkpoints, so a step issues no host sync.

    Args:
        rule: rule name or ``Rule`` object.
        r: temperature / KL regulariser (rule default if ``None``: 0.4 loss-based rules, 1.0 ``kl_dro``).
        delta: score half-width δ for the loss-based rules (default 1).
        direction: ``"up"`` or ``"down"`` (rule default ``"up"`` if ``None``).
        normalizer: ``"batch"`` or ``"ema"`` (``kl_dro`` only; default ``"batch"``).
        ema_rate: rate of the EMA normaliser (``kl_dro`` only; default 0.1).
        warmup_steps: uniform weights for the first ``warmup_steps`` optimizer steps (statistics are still
            recorded). ``None``: the rule's own default (1000 for the loss-based rules as their paper, 0 for
            ``kl_dro`` and ``uniform``); lower it for short runs.
        max_weight: clip weights at this multiple of the mean (``None``: no clip). Mean-1 rules are
            renormalised to mean 1 after the clip; the EMA normaliser's weights are only clipped.
        min_ess_frac: warn when the effective sample size falls below this fraction of the batch (0 disables).
        fresh_table: start the per-sample table fresh instead of restoring it from a checkpoint (the rest of
            the state is restored); see ``WeightingCallback``.
        device: where the per-sample state lives: ``"auto"`` (the module's device when the callback is
            ``device_ready``, else the CPU), ``"cpu"`` or a device.
        sync_checks: read the step's validation results back to the host every step (``True``) or defer them
            to the end of the epoch / the next checkpoint (``False``: no host sync per step on a GPU).
        valid_key: name of the optional ``reduce_loss`` extra that marks the samples that have a loss (bool,
            one per sample): rows marked ``False`` (e.g. all-padding sequences, ``counts == 0`` from
            ``sequence_losses(..., return_counts=True)``) take no part in the rule's statistics (min-max,
            softmax, normaliser, warm-up) and get weight 0; the other rows get exactly the weights they would get
            without them. Without the extra every row counts.
        compile: run the rule (with the clip) and the table's merge through ``torch.compile``: ``True`` (mode
            ``"default"``) or a mode name (``"reduce-overhead"``: CUDA graphs on a GPU). The numbers equal the
            eager path's up to float rounding; where compilation is unavailable the eager code runs, with a
            ``CompileFallbackWarning``. Pays off on a GPU, where a step's cost is its kernel launches (docs/gpu.md).
        num_samples: as in ``WeightingCallback``.
        track_samples: as in ``WeightingCallback`` (``False``: no per-sample table, the streaming mode).
        ema_decay: as in ``WeightingCallback``.
        log_every_n_steps: as in ``WeightingCallback``.
        log_histogram: as in ``WeightingCallback``.
        name: as in ``WeightingCallback``.

    Example::

        trainer = Trainer(callbacks=[LossReweighting("linupper", r=0.4, warmup_steps=100)])
    """

    log_prefix = "reweight"
    device_ready = True  # tensor ops only on a GPU batch; the ESS-collapse warning is read at logging cadence
    needs_sample_state = False  # the weights need only the global batch (streams: ``track_samples=False``)

    def __init__(
        self,
        rule: str | Rule = "linupper",
        r: float | None = None,
        delta: float | None = None,
        direction: Literal["up", "down"] | None = None,
        normalizer: Literal["batch", "ema"] | None = None,
        ema_rate: float | None = None,
        warmup_steps: int | None = None,
        max_weight: float | None = None,
        min_ess_frac: float = 0.1,
        num_samples: int | None = None,
        track_samples: bool = True,
        ema_decay: float = 0.9,
        log_every_n_steps: int = 50,
        log_histogram: bool = True,
        name: str | None = None,
        *,
        fresh_table: bool = False,
        device: str | torch.device = "auto",
        sync_checks: bool = True,
        valid_key: str = "valid",
        compile: bool | str = False,
    ):
        super().__init__(num_samples, track_samples, ema_decay, log_every_n_steps, log_histogram, name,
                         fresh_table=fresh_table, device=device, sync_checks=sync_checks, compile=compile)
        given = dict(r=r, delta=delta, direction=direction, normalizer=normalizer, ema_rate=ema_rate)
        if isinstance(rule, Rule):
            set_args = sorted(k for k, v in given.items() if v is not None)
            if set_args:
                raise ValueError(
                    f"Expected the rule's arguments on the `Rule` object, but got {set_args} next to "
                    f"{type(rule).__name__}. Pass them to the rule, or pass the rule by name."
                )
            self.rule = rule
        else:
            if rule not in RULES:
                raise ValueError(f"Unknown weight rule {rule!r}. Expected one of {sorted(RULES)}.")
            kwargs, ignored = resolve_rule_arguments(rule, given)
            if ignored:
                rank_zero_warn(f"LossReweighting(rule={rule!r}) ignores {', '.join(ignored)}: rule {rule!r} does "
                               "not take it (it is another rule's default, e.g. left over in a config).")
            self.rule = create_rule(rule, **kwargs)
        if warmup_steps is None:
            warmup_steps = int(getattr(self.rule, "default_warmup_steps", 0))
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"Expected argument `warmup_steps` to be an int >= 0 or None, but got {warmup_steps!r}.")
        if max_weight is not None and not max_weight >= 1:
            raise ValueError(f"Expected argument `max_weight` to be >= 1 (a multiple of the mean weight), but got {max_weight!r}.")
        if not isinstance(min_ess_frac, (int, float)) or not 0 <= min_ess_frac <= 1:
            raise ValueError(f"Expected argument `min_ess_frac` to be in [0, 1], but got {min_ess_frac!r}.")
        if not isinstance(valid_key, str) or not valid_key:
            raise ValueError(f"Expected argument `valid_key` to be a non-empty string, but got {valid_key!r}.")
        self.valid_key = valid_key
        self.rule_name = rule if isinstance(rule, str) else type(rule).__name__
        self.warmup_steps = warmup_steps
        self.max_weight = max_weight
        self.min_ess_frac = float(min_ess_frac)
        self.normalized = self.rule.normalized
        self._skip_validation = "validate" in inspect.signature(self.rule.propose).parameters
        self._rule_graph: CompiledFunction | None = None
        if self.compile_mode is not None:
            if type(self.rule).propose_tensors is Rule.propose_tensors:
                raise ValueError(
                    f"Expected a rule with a tensor-only step for `compile={compile!r}`, but "
                    f"{type(self.rule).__name__} has no `propose_tensors`. Implement `propose_tensors(losses, "
                    "state)` (see `lightning_reweight.rules.Rule`), or pass `compile=False`."
                )
            self._rule_graph = CompiledFunction(self._tensor_rule, self.compile_mode,
                                                f"LossReweighting({self.rule_name!r})'s rule")
        self.ess_collapsed_steps = 0
        self._pending: tuple[GlobalBatch, Any, bool] | None = None
        self._collapsed = False
        self._collapsed_device: Tensor | None = None
        self._collapse_batch: tuple[int, int] | None = None
        self._last_ess: float | Tensor | None = None
        self._ess_weights: Tensor | None = None  # a GPU step's weights, for ``last_ess``
        self._ess_kept: list[tuple[Tensor, int]] = []  # a GPU run's weights whose ESS is not computed yet
        self._valid_rows: tuple[GlobalBatch, Tensor] | None = None  # the step's valid rows (``valid`` extra)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(rule=self.rule_name, name=self.name)

    @property
    def last_ess(self) -> float | Tensor | None:
        """The last step's effective sample size (a 0-d tensor after a step on a GPU, computed on first access:
        no host read)."""
        if self._last_ess is None and self._ess_weights is not None:
            self._last_ess = effective_sample_size(self._ess_weights, unit_mass=not self.rule.normalized)
        return self._last_ess

    def validate_batch(self, batch: GlobalBatch, trainer: pl.Trainer) -> None:
        self._pending = None  # a proposal of an earlier, rejected step is never committed
        self._valid_rows = None
        valid = batch.extras.get(self.valid_key)
        if valid is not None and (valid.dtype != torch.bool or valid.shape != batch.losses.shape):
            raise ValueError(
                f"Expected the `{self.valid_key}` extra of `reduce_loss` to be a bool tensor of shape "
                f"{tuple(batch.losses.shape)} (True = the sample has a loss), but got dtype {valid.dtype} and shape "
                f"{tuple(valid.shape)}. Pass `{self.valid_key}=counts > 0` with the token counts of "
                "`sequence_losses(..., return_counts=True)`."
            )
        super().validate_batch(batch, trainer)

    def compute_weights(self, batch: GlobalBatch, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        # pure: the rule's state change (e.g. the EMA normaliser, which advances during warm-up too) is
        # committed in ``on_weights_computed``, after every callback's weights were accepted
        valid = batch.extras.get(self.valid_key)
        if valid is None:
            weights, pending = self._propose(batch.losses)
            size = len(batch)
        else:  # rows without a loss (all-padding sequences) take no part in the rule and get weight 0
            weights, pending, rows = self._propose_valid(batch.losses, valid)
            size = rows.numel()
            self._valid_rows = (batch, rows)  # the table write of the commit reuses them (no second host read)
        if batch.global_step < self.warmup_steps:
            self._pending = (batch, pending, False)
            return torch.ones_like(weights) if valid is None or size == 0 else valid.to(weights.dtype)
        ess, collapsed = None, False
        if self.min_ess_frac > 0:
            if weights.device.type == "cpu":  # host floats: Σw and Σw² in float64, as ``effective_sample_size``
                total, square = _weight_mass(weights)
                ess = total * total / max(square, 1e-300)
                ess = min(ess, total) if not self.rule.normalized else ess
                collapsed = ess < self.min_ess_frac * size
            else:  # on a GPU: the weights are kept and their ESS computed with other steps' at the next fold
                ess, collapsed = None, (weights, size)
        self._pending = (batch, pending, collapsed)
        self._last_ess, self._ess_weights = ess, collapsed[0] if isinstance(collapsed, tuple) else None
        return weights

    def _propose_valid(self, losses: Tensor, valid: Tensor) -> tuple[Tensor, Any, int]:
        """The rule (and the clip) on the valid rows only: their min-max, softmax and normaliser, exactly as if the
        other rows were not in the batch; the other rows get weight 0. With no valid row every weight is 1 (there
        is nothing to weigh) and the rule's state does not move. Returns ``(weights, pending, the valid rows'
        positions)``.

        ``reduce_loss`` renormalises mean-1 factors over the whole batch, so the returned loss is the weighted mean
        over the valid rows, as without the other rows."""
        rows = valid.nonzero().flatten()  # one host sync on a GPU (the number of valid rows)
        size = rows.numel()
        if size == 0:
            return torch.ones_like(losses), None, rows
        part, pending = self._propose(losses.index_select(0, rows))  # clipped among the valid rows
        if not self.rule.normalized and size < len(losses):
            # a rule whose scale matters (the EMA normaliser) is not renormalised by ``reduce_loss``, which divides
            # by the whole batch: scale the valid rows by B / B_valid so the loss is their weighted mean
            part = part * (len(losses) / size)
        weights = torch.zeros_like(losses, dtype=part.dtype).index_copy_(0, rows, part)
        return weights, pending, rows

    def _propose(self, losses: Tensor) -> tuple[Tensor, Any]:
        """The rule's weights (clipped at ``max_weight``) and its pending state change."""
        if self._rule_graph is not None:
            return self._rule_graph(losses, self.rule.tensor_state(losses.device))
        # ``reduce_loss`` validated the losses already (1-D, finite): skip the rule's second check when it can
        weights, pending = self.rule.propose(losses, validate=False) if self._skip_validation else \
            self.rule.propose(losses)
        return clip_weights(weights, self.max_weight, renormalize=self.rule.normalized), pending

    def _tensor_rule(self, losses: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The rule and the clip with tensor operations only (``compile=``): what ``torch.compile`` traces."""
        weights, pending = self.rule.propose_tensors(losses, state)
        return clip_weights(weights, self.max_weight, renormalize=self.rule.normalized), pending

    def on_weights_computed(self, batch: GlobalBatch, weights: Tensor, trainer: pl.Trainer,
                            pl_module: pl.LightningModule) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:  # (cleared in validate_batch: never a previous, rejected step's)
            self.rule.commit(pending[1])
            collapsed = pending[2]
            if isinstance(collapsed, tuple):  # a GPU step: its ESS is computed with the others' at the fold
                self._ess_kept.append(collapsed)
                self._collapse_batch = (len(batch), batch.global_step)
                if len(self._ess_kept) >= DEFERRED_FOLD or \
                        len(self._ess_kept) * collapsed[0].numel() >= _KEPT_ROWS:
                    self._fold_ess()
                collapsed = self._collapsed
            elif collapsed:
                self.ess_collapsed_steps += 1
                if not self._collapsed:
                    rank_zero_warn(
                        f"LossReweighting({self.rule_name!r}): the weights' effective sample size fell to "
                        f"{self.last_ess:.3g} of {len(batch)} samples at step {batch.global_step} (below "
                        f"min_ess_frac={self.min_ess_frac}); a few samples (or none) drive the update. Raise `r`, "
                        "set `max_weight`, or check for outlier losses. (Warned once per episode; counted in "
                        f"`{self.prefix}/ess_collapsed_steps`.)"
                    )
            self._collapsed = collapsed
        super().on_weights_computed(batch, weights, trainer, pl_module)

    @override
    def record_in_table(self, batch: GlobalBatch, weights: Tensor) -> Any:
        """Rows marked invalid by the ``valid`` extra (all-padding sequences) carry no loss: they are not recorded
        (at the rows the rule found: no second host read of the mask on a GPU)."""
        valid = batch.extras.get(self.valid_key)
        kept, self._valid_rows = self._valid_rows, None
        if valid is None:
            return super().record_in_table(batch, weights)
        rows = kept[1] if kept is not None and kept[0] is batch else valid.nonzero().flatten()
        if rows.numel() == len(batch):
            return super().record_in_table(batch, weights)
        self.table.update(batch.index[rows], check=False, loss=batch.losses[rows], ema_loss=batch.losses[rows],
                          weight=weights[rows])
        return None  # the repeats refer to the valid rows only: no subclass reuses them

    def _fold_ess(self) -> None:
        """Count the ESS collapses of the kept GPU steps on the device (no host read): one batched computation for
        every step of one batch size (a few kernels per fold instead of eight per step)."""
        kept, self._ess_kept = self._ess_kept, []
        groups: dict[tuple[int, int], list[Tensor]] = {}
        for weights, size in kept:
            groups.setdefault((weights.numel(), size), []).append(weights)
        for (_, size), ws in groups.items():
            w = torch.stack(ws).double()  # as ``effective_sample_size``, one row per step
            total = w.sum(1)
            ess = total.square() / (w * w).sum(1).clamp_min(1e-300)
            if not self.rule.normalized:
                ess = torch.minimum(ess, total)
            count = (ess.float() < self.min_ess_frac * size).sum()
            self._collapsed_device = count if self._collapsed_device is None else self._collapsed_device + count

    def _fold_collapses(self) -> None:
        """Read the ESS collapses counted on a GPU (one host read, at logging cadence or a checkpoint) and
        warn once per episode, as the CPU path does per step."""
        if self._ess_kept:
            self._fold_ess()
        if self._collapsed_device is None:
            return
        new, self._collapsed_device = int(self._collapsed_device), None
        size, step = self._collapse_batch or (0, 0)
        if new and not self._collapsed:
            rank_zero_warn(
                f"LossReweighting({self.rule_name!r}): the weights' effective sample size fell below "
                f"min_ess_frac={self.min_ess_frac} of the {size}-sample batch at {new} step(s) up to step {step}; "
                "a few samples (or none) drive the update. Raise `r`, set `max_weight`, or check for outlier "
                f"losses. (Checked at logging cadence on a GPU; counted in `{self.prefix}/ess_collapsed_steps`.)"
            )
        self._collapsed = bool(new)
        self.ess_collapsed_steps += new

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._fold_collapses()  # what a GPU run counted on the device since the last log

    def log_extras(self) -> dict[str, float]:
        self._fold_collapses()
        out = {"ess_collapsed_steps": float(self.ess_collapsed_steps)}
        log_z = getattr(self.rule, "log_normalizer", None)
        if log_z is not None:
            out["log_normalizer"] = float(log_z)
        return out

    def extra_state(self) -> dict[str, Any]:
        self._fold_collapses()
        return {"rule": self.rule.state_dict(), "ess_collapsed_steps": self.ess_collapsed_steps}

    def check_extra_state(self, state: dict[str, Any]) -> tuple[Rule, int]:
        """Validate a checkpoint's extra state into a restored copy of the rule; assigns nothing. A rule with
        state (KL-DRO's normaliser) refuses a checkpoint without it (``CheckpointStateError`` naming the key)."""
        where = self.checkpoint_where
        collapsed = as_int(state, "ess_collapsed_steps", where, minimum=0) if "ess_collapsed_steps" in state else 0
        rule = copy.deepcopy(self.rule)  # a rule is small (no per-sample state)
        try:
            rule.load_state_dict(state.get("rule", {}))
        except CheckpointStateError as err:
            raise CheckpointStateError(f"{where}['rule']", err.key, str(err).split(": ", 1)[-1], fix="") from err
        return rule, collapsed

    def assign_extra_state(self, checked: tuple[Rule, int]) -> None:
        self.rule, self.ess_collapsed_steps = checked
        self._collapsed_device = None  # device counts of the run before the restore are superseded
        self._ess_kept = []
