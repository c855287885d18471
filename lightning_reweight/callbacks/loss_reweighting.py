"""``LossReweighting``: instance-level, loss-based sample weights each training step."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_reweight.callbacks.base import GlobalBatch, WeightingCallback
from lightning_reweight.rules import RULES, Rule, clip_weights, create_rule


class LossReweighting(WeightingCallback):
    """Weight each sample of the (global) batch by a loss-based rule.

    Rules (``rule=``): ``"linupper"``, ``"quadratic"``, ``"extremes"`` — "Dynamic Loss-Based Sample Reweighting
    for Improved LLM Pretraining" (defaults δ = 1, r = 0.4, 1000 uniform warm-up steps); ``"kl_dro"`` — the
    KL-regularised DRO tilt w ∝ exp(ℓ/r) of "Doubly Robust Instance-Reweighted Adversarial Training" (ours:
    r = 1); ``"uniform"``; or any ``Rule`` instance / name added with ``register_rule``.
    ``direction="down"`` flips the preference towards low-loss samples (noisy labels).

    Weights are computed on the losses of the whole global batch (all DDP ranks), so every rank uses the
    same weights; they average 1, carry no gradient, and are optionally clipped at ``max_weight``.

    Args:
        rule: rule name or ``Rule`` object.
        r: temperature / KL regulariser (rule default if ``None``).
        delta: score half-width δ for the loss-based rules.
        direction: ``"up"`` or ``"down"`` (rule default ``"up"`` if ``None``).
        normalizer: ``"batch"`` or ``"ema"`` (``kl_dro`` only).
        warmup_steps: uniform weights for the first ``warmup_steps`` optimizer steps (statistics are still
            recorded). Paper default 1000; lower it for short runs.
        max_weight: clip weights at this multiple of the mean, then renormalise (``None``: no clip).
        **kwargs: ``WeightingCallback`` options (``num_samples``, ``track_samples``, ``log_every_n_steps``, ...).

    Example::

        trainer = Trainer(callbacks=[LossReweighting("linupper", r=0.4, warmup_steps=100)])
    """

    log_prefix = "reweight"
    needs_sample_state = False  # the weights need only the global batch (streams: ``track_samples=False``)

    def __init__(
        self,
        rule: str | Rule = "linupper",
        r: float | None = None,
        delta: float | None = None,
        direction: Literal["up", "down"] | None = None,
        normalizer: Literal["batch", "ema"] | None = None,
        warmup_steps: int = 1000,
        max_weight: float | None = None,
        num_samples: int | None = None,
        track_samples: bool = True,
        ema_decay: float = 0.9,
        log_every_n_steps: int = 50,
        log_histogram: bool = True,
        name: str | None = None,
    ):
        super().__init__(num_samples, track_samples, ema_decay, log_every_n_steps, log_histogram, name)
        if isinstance(rule, Rule):
            self.rule = rule
        else:
            if rule not in RULES:
                raise ValueError(f"Unknown weight rule {rule!r}. Expected one of {sorted(RULES)}.")
            kwargs = {k: v for k, v in dict(r=r, delta=delta, direction=direction, normalizer=normalizer).items()
                      if v is not None}
            self.rule = create_rule(rule, **kwargs)
        if warmup_steps < 0:
            raise ValueError(f"Expected argument `warmup_steps` to be >= 0, but got {warmup_steps!r}.")
        if max_weight is not None and not max_weight >= 1:
            raise ValueError(f"Expected argument `max_weight` to be >= 1 (a multiple of the mean weight), but got {max_weight!r}.")
        self.rule_name = rule if isinstance(rule, str) else type(rule).__name__
        self.warmup_steps = warmup_steps
        self.max_weight = max_weight
        self.normalized = self.rule.normalized

    @property
    def state_key(self) -> str:
        return self._generate_state_key(rule=self.rule_name, name=self.name)

    def compute_weights(self, batch: GlobalBatch, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        weights = self.rule(batch.losses)  # rule state (e.g. an EMA normaliser) advances during warm-up too
        if batch.global_step < self.warmup_steps:
            return torch.ones_like(weights)
        return clip_weights(weights, self.max_weight)

    def extra_state(self) -> dict[str, Any]:
        return {"rule": self.rule.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.rule.load_state_dict(state.get("rule", {}))
