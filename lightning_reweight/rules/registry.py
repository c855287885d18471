"""Rule objects and the ``create_rule`` registry."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_reweight.rules.instance import (
    Direction,
    _tilt,
    check_losses,
    host_kernels,
    kl_dro_weights,
    log_mean_exp,
    loss_based_weights,
)
from lightning_reweight.state.validate import CheckpointStateError, as_float


def _check_direction(direction: str) -> None:
    if direction not in ("up", "down"):
        raise ValueError(f"Expected argument `direction` to be 'up' or 'down', but got {direction!r}.")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"Expected argument `{name}` to be a positive finite number, but got {value!r}.")


class Rule:
    """Base rule: ``rule(losses) -> weights``. Stateless unless a subclass overrides the state methods.

    Stateful rules split a step in two, so a step whose weights are rejected later changes nothing:
    ``propose(losses) -> (weights, pending)`` is pure, ``commit(pending)`` applies the state change.
    ``rule(losses)`` does both (the functional convenience).
    """

    #: whether the weights this rule returns average exactly 1 over the batch
    normalized: bool = True
    #: uniform-weight warm-up steps ``LossReweighting`` uses when ``warmup_steps=None``
    default_warmup_steps: int = 0

    def __call__(self, losses: Tensor) -> Tensor:
        weights, pending = self.propose(losses)
        self.commit(pending)
        return weights

    def propose(self, losses: Tensor, validate: bool = True) -> tuple[Tensor, Any]:
        """Weights for ``losses`` and the state change they imply (``None``: none); changes nothing.

        ``validate=False`` skips the loss checks (1-D, floating, finite) for callers that already made them
        (``reduce_loss`` does, once per step).
        """
        return self.weights(check_losses(losses) if validate else losses), None

    def commit(self, pending: Any) -> None:
        """Apply the state change ``propose`` returned."""
        return None

    def tensor_state(self, device: torch.device) -> Tensor | None:
        """The rule's state as ``propose_tensors`` takes it (a tensor on ``device``, or ``None``)."""
        return None

    def propose_tensors(self, losses: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``propose`` with tensor operations only: no host read, no Python state read or written, so that
        ``torch.compile`` can trace it (``LossReweighting(compile=True)``). ``state`` is ``tensor_state()``; returns
        the weights and the pending state ``commit`` takes. The losses are already validated. A rule without it
        runs only eagerly."""
        raise NotImplementedError(
            f"{type(self).__name__} has no tensor-only step (`propose_tensors`), so it cannot be compiled. Implement "
            "`propose_tensors(losses, state)` (and `tensor_state(device)` for a stateful rule), or use `compile=False`."
        )

    def weights(self, losses: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class UniformRule(Rule):
    """All weights 1 (plain ERM)."""

    def weights(self, losses: Tensor) -> Tensor:
        return torch.ones_like(losses)

    def propose_tensors(self, losses: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return torch.ones_like(losses), None


class LossBasedRule(Rule):
    """LinUpper / Quadratic / Extremes ("Dynamic Loss-Based Sample Reweighting for Improved LLM Pretraining").

    Args:
        strategy: ``"linupper"``, ``"quadratic"`` or ``"extremes"`` (paper names).
        delta: half-width δ of the normalised score range (paper: 1).
        r: KL-regulariser / softmax temperature (paper configs: 0.4).
        direction: ``"up"`` (the paper) or ``"down"`` (negated score, for noisy labels).
    """

    #: the paper's code trains with uniform weights for its first 1000 steps (``burnout_steps``)
    default_warmup_steps = 1000

    def __init__(self, strategy: str = "linupper", delta: float = 1.0, r: float = 0.4, direction: Direction = "up"):
        if strategy not in ("linupper", "quadratic", "extremes"):
            raise ValueError(
                f"Expected argument `strategy` to be one of ['extremes', 'linupper', 'quadratic'], but got {strategy!r}."
            )
        _check_positive("delta", delta)
        _check_positive("r", r)
        _check_direction(direction)
        self.strategy, self.delta, self.r, self.direction = strategy, float(delta), float(r), direction

    def weights(self, losses: Tensor) -> Tensor:
        return loss_based_weights(losses, self.strategy, self.delta, self.r, self.direction)

    def propose_tensors(self, losses: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return loss_based_weights(losses, self.strategy, self.delta, self.r, self.direction, traceable=True), None


class KLDRORule(Rule):
    """KL-regularised DRO tilt ``w ∝ exp(ℓ/r)`` ("Doubly Robust Instance-Reweighted Adversarial Training").

    ``normalizer="ema"`` keeps DONE's running normaliser ``Z ← (1 − a)·Z + a·mean_batch exp(±ℓ/r)`` and
    returns ``w_i = exp(±ℓ_i/r) / Z``. Everything runs in log space (float64): ``log Z`` is updated with
    ``logaddexp`` and ``log w = ±ℓ/r − log Z``, so huge losses neither overflow nor turn every weight into
    exactly 0.

    Ours (a safeguard; DONE's rule whenever it does not bind): once ``Z`` exists, a sample's tilt enters the
    normaliser and its weight at most ``outlier_cap`` times ``Z`` (``±ℓ/r`` is capped at
    ``log Z + log(outlier_cap)``). Without it, one outlier loss of +80 at r = 1 multiplies ``Z`` by ~e^73
    and every later weight is ~1e-32 for ~750 steps (at ``ema_rate=0.1``); +200 makes them exactly 0.

    Args:
        r: temperature in loss units (ours: 1.0; the paper gives none).
        direction: ``"up"`` (the paper: hard samples count more) or ``"down"`` (``exp(−ℓ/r)``, noisy labels).
        normalizer: ``"batch"`` (per-batch softmax, weights average 1) or ``"ema"`` (divide by a running
            average of ``mean exp(ℓ/r)``, as the paper's compositional solver tracks it; weights then average
            about, not exactly, 1).
        ema_rate: rate ``a`` of that running average (ours: 0.1).
        outlier_cap: cap of a sample's tilt relative to the running normaliser (``"ema"`` only; ``None``
            disables it).
    """

    #: DONE trains with the tilt from the first step
    default_warmup_steps = 0

    def __init__(
        self, r: float = 1.0, direction: Direction = "up", normalizer: str = "batch", ema_rate: float = 0.1,
        outlier_cap: float | None = 1e3,
    ):
        _check_positive("r", r)
        _check_direction(direction)
        if normalizer not in ("batch", "ema"):
            raise ValueError(f"Expected argument `normalizer` to be 'batch' or 'ema', but got {normalizer!r}.")
        if isinstance(ema_rate, bool) or not isinstance(ema_rate, (int, float)) or not 0 < ema_rate <= 1:
            raise ValueError(f"Expected argument `ema_rate` to be in (0, 1], but got {ema_rate!r}.")
        if outlier_cap is not None and not (isinstance(outlier_cap, (int, float)) and outlier_cap > 1
                                            and math.isfinite(outlier_cap)):
            raise ValueError(f"Expected argument `outlier_cap` to be a finite number > 1 or None, but got {outlier_cap!r}.")
        self.r, self.direction, self.normalizer, self.ema_rate = float(r), direction, normalizer, float(ema_rate)
        self.outlier_cap = None if outlier_cap is None else float(outlier_cap)
        self.normalized = normalizer == "batch"
        self._log_z: float | Tensor | None = None  # a 0-d tensor after a step on a GPU

    @property
    def log_normalizer(self) -> float | None:
        """``log Z`` of the running normaliser (``None`` before the first step or with ``"batch"``)."""
        return None if self._log_z is None else float(self._log_z)

    def propose(self, losses: Tensor, validate: bool = True) -> tuple[Tensor, Any]:
        if validate:
            losses = check_losses(losses)
        if self.normalizer == "batch":
            return kl_dro_weights(losses, self.r, self.direction), None
        if losses.device.type == "cpu":
            return self._propose_ema_host(losses)
        # tensor ops only (no host synchronisation): ``log_z`` stays a 0-d tensor
        z = _tilt(losses, self.r, self.direction)  # (the float64 copy the step's finite check made)
        weights, log_z = self._ema_tilt(z, self.tensor_state(z.device))
        return weights.to(losses.dtype), log_z

    def _ema_tilt(self, z: Tensor, log_z: Tensor | None) -> tuple[Tensor, Tensor]:
        """The EMA normaliser's step on the tilt ``z`` (float64) with tensor ops only: ``(exp(z − log Z'), log Z')``
        from the previous ``log Z`` (a 0-d tensor, ``None`` before the first step)."""
        if log_z is not None and self.outlier_cap is not None:
            z = z.clamp(max=log_z + math.log(self.outlier_cap))
        batch_z = log_mean_exp(z)
        if log_z is None or self.ema_rate == 1:
            new = batch_z
        else:
            a = self.ema_rate
            new = torch.logaddexp(math.log1p(-a) + log_z, math.log(a) + batch_z)
        return torch.exp(z - new), new

    def _propose_ema_host(self, losses: Tensor) -> tuple[Tensor, float]:
        """The EMA step of a CPU batch, in float64 numpy (numpy's per-call overhead is a fraction of torch's).

        The log-space computation of the tensor path with one exp pass: with the batch's tilt ``z`` (capped as
        there) and a shift ``c``, ``e = exp(z − c)``, ``log Z_batch = c + log Σe − log n`` and ``w = e ·
        exp(c − log Z)``. The shift is the previous ``log Z`` when the cap bounds ``e`` by ``outlier_cap``
        and ``a < 1`` (a batch whose every ``e`` underflows then adds less than float64 resolution to ``Z``),
        else the batch's max (the first step, ``outlier_cap=None``, ``ema_rate=1``): nothing overflows.
        Equal to ``exp(z − log Z)`` up to float64 rounding (a few units in the last place, relative to
        ``|z|``), so the float32 weights agree with it to a float32 rounding step (nearly always exactly).
        """
        x = losses.detach()
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        divisor = self.r if self.direction == "up" else -self.r  # ℓ/(−r) is exactly −(ℓ/r)
        prev = None if self._log_z is None else float(self._log_z)
        a, cap = self.ema_rate, self.outlier_cap
        clamp = prev is not None and cap is not None
        limit = prev + math.log(cap) if clamp else 0.0
        shift_prev = clamp and a < 1
        kernels = host_kernels()
        if kernels is not None:  # the same steps in one compiled call (see ``rules._kernels``)
            out = torch.empty(x.shape[0], dtype=x.dtype)
            log_z = kernels.kl_dro_ema_step(x.numpy(), divisor, 0.0 if prev is None else prev, prev is not None,
                                            limit, clamp, shift_prev, a, out.numpy())
            return (out if out.dtype == losses.dtype else out.to(losses.dtype)), float(log_z)
        # ±ℓ/r in float64: the values of ``_tilt`` (an exact conversion, one correctly rounded division)
        z = np.divide(x.numpy(), divisor, dtype=np.float64)
        if clamp:
            np.minimum(z, limit, out=z)
        shift = prev if shift_prev else float(z.max())
        z -= shift
        np.exp(z, out=z)
        total = float(z.sum())
        batch_log_z = shift + math.log(total) - math.log(z.size) if total > 0 else -math.inf
        if prev is None or a == 1:
            log_z = batch_log_z
        else:  # log((1 - a)·Z + a·Z_batch), computed in log space
            log_z = float(np.logaddexp(math.log1p(-a) + prev, math.log(a) + batch_log_z))
        z *= math.exp(shift - log_z)
        weights = torch.from_numpy(z if losses.dtype == torch.float64 else z.astype(np.float32))
        return (weights if weights.dtype == losses.dtype else weights.to(losses.dtype)), log_z

    def tensor_state(self, device: torch.device) -> Tensor | None:
        """``log Z`` as a 0-d float64 tensor on ``device`` (``None`` before the first step or with ``"batch"``)."""
        if self.normalizer == "batch" or self._log_z is None:
            return None
        if isinstance(self._log_z, Tensor) and self._log_z.device == device:
            return self._log_z
        return torch.as_tensor(float(self._log_z), dtype=torch.float64).to(device)

    def propose_tensors(self, losses: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self.normalizer == "batch":
            return kl_dro_weights(losses, self.r, self.direction, traceable=True), None
        weights, log_z = self._ema_tilt(_tilt(losses, self.r, self.direction, traceable=True), state)
        return weights.to(losses.dtype), log_z

    def commit(self, pending: Any) -> None:
        if pending is not None:  # a 0-d tensor from a GPU step stays there (read at logging / checkpointing)
            self._log_z = pending if isinstance(pending, Tensor) and pending.device.type != "cpu" else float(pending)

    def weights(self, losses: Tensor) -> Tensor:
        return self.propose(losses)[0]

    def state_dict(self) -> dict[str, Any]:
        return {"log_z": self.log_normalizer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``log_z``, validated first: a finite number, or ``None`` (no step taken yet: the normaliser
        starts fresh). A state without ``log_z`` (e.g. one written by another rule) is refused, naming the key."""
        where = "KLDRORule"
        if not isinstance(state, dict):
            raise CheckpointStateError(where, None, f"expected a dict, but got {type(state).__name__}.")
        if "log_z" not in state:
            raise CheckpointStateError(
                where, "log_z", f"missing key; present: {sorted(state)}. The state was not written by the KL-DRO "
                "rule, and restoring it would restart the EMA normaliser.",
                fix="Resume from a checkpoint written with rule 'kl_dro', or start the normaliser fresh on purpose "
                    "by setting the entry's 'log_z' to None.")
        self._log_z = as_float(state, "log_z", where, optional=True)


RULES: dict[str, Callable[..., Rule]] = {
    "uniform": UniformRule,
    "linupper": partial(LossBasedRule, "linupper"),
    "quadratic": partial(LossBasedRule, "quadratic"),
    "extremes": partial(LossBasedRule, "extremes"),
    "kl_dro": KLDRORule,
}


def register_rule(name: str, factory: Callable[..., Rule]) -> None:
    """Add a rule factory to the registry (raises if the name is taken)."""
    if name in RULES:
        raise ValueError(f"A rule named {name!r} is already registered.")
    RULES[name] = factory


def rule_arguments(name: str) -> dict[str, Any] | None:
    """The keyword arguments rule ``name`` takes, with their defaults (``None``: the factory takes any).

    Example::

        >>> rule_arguments("kl_dro")["r"]
        1.0
    """
    if name not in RULES:
        raise ValueError(f"Unknown weight rule {name!r}. Expected one of {sorted(RULES)}.")
    try:
        params = inspect.signature(RULES[name]).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name: p.default for p in params
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def create_rule(name: str, **kwargs: Any) -> Rule:
    """Build a registered rule by name, e.g. ``create_rule("linupper", r=0.4)``.

    Raises:
        ValueError: an unknown name (the message lists the registered ones).
        TypeError: an argument the rule does not take (the message lists the ones it takes).
    """
    accepted = rule_arguments(name)
    if accepted is not None:
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise TypeError(
                f"Bad arguments for rule {name!r}: it takes no argument {unknown}; it takes {sorted(accepted)}."
            )
    try:
        return RULES[name](**kwargs)
    except TypeError as err:
        raise TypeError(f"Bad arguments for rule {name!r}: {err}") from err
