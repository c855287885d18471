"""Rule objects and the ``create_rule`` registry."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_reweight.rules.instance import (
    Direction,
    check_losses,
    kl_dro_weights,
    log_mean_exp,
    loss_based_weights,
)


def _check_direction(direction: str) -> None:
    if direction not in ("up", "down"):
        raise ValueError(f"Expected argument `direction` to be 'up' or 'down', but got {direction!r}.")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"Expected argument `{name}` to be a positive finite number, but got {value!r}.")


class Rule:
    """Base rule: ``rule(losses) -> weights``. Stateless unless a subclass overrides the state methods."""

    #: whether the weights this rule returns average exactly 1 over the batch
    normalized: bool = True

    def __call__(self, losses: Tensor) -> Tensor:
        return self.weights(check_losses(losses))

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


class LossBasedRule(Rule):
    """LinUpper / Quadratic / Extremes ("Dynamic Loss-Based Sample Reweighting for Improved LLM Pretraining").

    Args:
        strategy: ``"linupper"``, ``"quadratic"`` or ``"extremes"`` (paper names).
        delta: half-width δ of the normalised score range (paper: 1).
        r: KL-regulariser / softmax temperature (paper configs: 0.4).
        direction: ``"up"`` (the paper) or ``"down"`` (negated score, for noisy labels).
    """

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


class KLDRORule(Rule):
    """KL-regularised DRO tilt ``w ∝ exp(ℓ/r)`` ("Doubly Robust Instance-Reweighted Adversarial Training").

    Args:
        r: temperature in loss units (ours: 1.0; the paper gives none).
        direction: ``"up"`` (the paper: hard samples count more) or ``"down"`` (``exp(−ℓ/r)``, noisy labels).
        normalizer: ``"batch"`` (per-batch softmax, weights average 1) or ``"ema"`` (divide by a running
            average of ``mean exp(ℓ/r)``, as the paper's compositional solver tracks it; weights then average
            about, not exactly, 1).
        ema_rate: rate of that running average (ours: 0.1).
    """

    def __init__(
        self, r: float = 1.0, direction: Direction = "up", normalizer: str = "batch", ema_rate: float = 0.1
    ):
        _check_positive("r", r)
        _check_direction(direction)
        if normalizer not in ("batch", "ema"):
            raise ValueError(f"Expected argument `normalizer` to be 'batch' or 'ema', but got {normalizer!r}.")
        if not 0 < ema_rate <= 1:
            raise ValueError(f"Expected argument `ema_rate` to be in (0, 1], but got {ema_rate!r}.")
        self.r, self.direction, self.normalizer, self.ema_rate = float(r), direction, normalizer, float(ema_rate)
        self.normalized = normalizer == "batch"
        self._log_z: float | None = None

    def weights(self, losses: Tensor) -> Tensor:
        if self.normalizer == "batch":
            return kl_dro_weights(losses, self.r, self.direction)
        z = losses / self.r if self.direction == "up" else -losses / self.r
        batch_log_z = float(log_mean_exp(z))
        if self._log_z is None or self.ema_rate == 1:
            self._log_z = batch_log_z
        else:  # log((1 - a)·Z + a·Z_batch), computed in log space
            a = self.ema_rate
            self._log_z = float(np.logaddexp(math.log1p(-a) + self._log_z, math.log(a) + batch_log_z))
        return kl_dro_weights(losses, self.r, self.direction, log_normalizer=self._log_z)

    def state_dict(self) -> dict[str, Any]:
        return {"log_z": self._log_z}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._log_z = state.get("log_z", None)


RULES: dict[str, Callable[..., Rule]] = {
    "uniform": UniformRule,
    "linupper": lambda **kw: LossBasedRule("linupper", **kw),
    "quadratic": lambda **kw: LossBasedRule("quadratic", **kw),
    "extremes": lambda **kw: LossBasedRule("extremes", **kw),
    "kl_dro": KLDRORule,
}


def register_rule(name: str, factory: Callable[..., Rule]) -> None:
    """Add a rule factory to the registry (raises if the name is taken)."""
    if name in RULES:
        raise ValueError(f"A rule named {name!r} is already registered.")
    RULES[name] = factory


def create_rule(name: str, **kwargs: Any) -> Rule:
    """Build a registered rule by name, e.g. ``create_rule("linupper", r=0.4)``."""
    if name not in RULES:
        raise ValueError(f"Unknown weight rule {name!r}. Expected one of {sorted(RULES)}.")
    try:
        return RULES[name](**kwargs)
    except TypeError as err:
        raise TypeError(f"Bad arguments for rule {name!r}: {err}") from err
