"""Test-time adaptation math for EATA and Tent (pure torch, no Lightning).

Sources (equations and defaults, see ``../shared/METHODS.md`` §10):

* "Tent: Fully Test-time Adaptation by Entropy Minimization" (Wang et al., ICLR 2021): minimise the mean
  prediction entropy ``E(x) = −Σ_c p_c log p_c`` of every test sample over the BatchNorm affine parameters.
* "Efficient Test-Time Model Adaptation without Forgetting" (EATA; Niu et al., ICML 2022):

  - reliable samples: ``E(x) < E0`` with ``E0 = 0.4·ln C`` (the official ``main.py`` value);
  - non-redundant samples: ``|cos(p(x), m)| < ε`` where ``m`` is the moving average of the probabilities of
    previously selected samples, taken *before* this batch (no filter while ``m`` does not exist yet);
  - ``m ← 0.9·m + 0.1·mean(p of samples passing both filters)``; the first ``m`` is the mean of the reliable
    samples' probabilities; a batch with no selected sample leaves ``m`` unchanged;
  - loss ``= mean over selected samples of exp(E0 − E)·E`` (the weight is detached) plus the anti-forgetting
    regulariser ``λ·Σ_k ω_k (θ_k − θ⁰_k)²``; no selected sample → no backward, no step;
  - ``ω`` = mean over clean batches of the squared gradient of the batch-mean cross-entropy against argmax
    pseudo-labels; ``θ⁰`` = the parameters before adaptation.

Shapes: ``logits``/``probs`` ``(B, C)``, per-sample tensors ``(B,)``, ``m`` ``(C,)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "EATASelection",
    "softmax_entropy",
    "entropy_margin",
    "reliable_mask",
    "redundancy_mask",
    "eata_weights",
    "eata_select",
    "tent_select",
    "selected_entropy_loss",
    "update_moving_average",
    "fisher_penalty",
    "estimate_fisher",
]


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"Expected argument `logits` to be a torch.Tensor, but got {type(logits).__name__}.")
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"Expected argument `logits` to have shape (batch, classes) with at least 2 classes, but got shape "
            f"{tuple(logits.shape)}. Test-time entropy adaptation needs the classifier's raw logits."
        )
    if not logits.is_floating_point():
        raise TypeError(f"Expected argument `logits` to be a floating tensor, but got dtype {logits.dtype}.")


def softmax_entropy(logits: Tensor) -> Tensor:
    """Per-sample prediction entropy ``−Σ_c softmax(z)_c · log_softmax(z)_c`` in nats, shape ``(B,)``.

    Differentiable (Tent/EATA minimise it); computed from ``log_softmax`` so that saturated logits stay finite.
    """
    _check_logits(logits)
    log_p = logits.log_softmax(dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def entropy_margin(num_classes: int, factor: float = 0.4) -> float:
    """EATA's reliability threshold ``E0 = factor · ln C`` (official ``main.py``: factor 0.4)."""
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"Expected argument `num_classes` to be an int >= 2, but got {num_classes!r}.")
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"Expected argument `factor` to be a positive finite number, but got {factor!r}.")
    return factor * math.log(num_classes)


def reliable_mask(entropy: Tensor, e_margin: float) -> Tensor:
    """``E(x) < E0``: the samples EATA trusts (bool ``(B,)``)."""
    return entropy.detach() < e_margin


def redundancy_mask(probs: Tensor, moving_average: Tensor | None, d_margin: float) -> Tensor:
    """``|cos(p(x), m)| < ε``: samples whose prediction differs enough from the recent average (bool ``(B,)``).

    With no moving average yet (first batch) every sample passes.
    """
    if moving_average is None:
        return torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
    if moving_average.shape != probs.shape[1:]:
        raise ValueError(
            f"Expected the moving average to have shape {tuple(probs.shape[1:])} (one entry per class), but got "
            f"{tuple(moving_average.shape)}. Did the number of classes change? Call `reset()` or load a matching state."
        )
    cos = F.cosine_similarity(probs.detach(), moving_average.to(probs).unsqueeze(0), dim=1)
    return cos.abs() < d_margin


def eata_weights(entropy: Tensor, e_margin: float) -> Tensor:
    """EATA's sample weight ``exp(E0 − E(x))`` (detached, ``(B,)``): confident samples count more."""
    return torch.exp(e_margin - entropy.detach())


@dataclass
class EATASelection:
    """Which samples of a batch are used, and with what weight.

    Attributes:
        selected: bool ``(B,)``, samples that enter the loss.
        weights: float ``(B,)``, loss weight of each sample (0 where not selected).
        reliable: bool ``(B,)``, passed the entropy filter (all True for Tent).
        non_redundant: bool ``(B,)``, passed the redundancy filter on its own (all True while ``m`` is None).
    """

    selected: Tensor
    weights: Tensor
    reliable: Tensor
    non_redundant: Tensor


def eata_select(entropy: Tensor, probs: Tensor, e_margin: float, d_margin: float | None,
                moving_average: Tensor | None) -> EATASelection:
    """EATA's two filters and weights for one batch.

    Args:
        entropy: ``(B,)`` per-sample entropy (``softmax_entropy``).
        probs: ``(B, C)`` softmax probabilities of the same forward pass.
        e_margin: reliability threshold ``E0``.
        d_margin: redundancy threshold ``ε`` (``None`` disables the redundancy filter).
        moving_average: ``m`` from before this batch, or ``None``.
    """
    reliable = reliable_mask(entropy, e_margin)
    if d_margin is None:
        non_redundant = torch.ones_like(reliable)
    else:
        non_redundant = redundancy_mask(probs, moving_average, d_margin)
    selected = reliable & non_redundant
    weights = torch.where(selected, eata_weights(entropy, e_margin), torch.zeros_like(entropy.detach()))
    return EATASelection(selected=selected, weights=weights, reliable=reliable, non_redundant=non_redundant)


def tent_select(entropy: Tensor) -> EATASelection:
    """Tent uses every sample with weight 1."""
    ones = torch.ones_like(entropy.detach(), dtype=torch.bool)
    return EATASelection(selected=ones, weights=torch.ones_like(entropy.detach()), reliable=ones, non_redundant=ones)


def selected_entropy_loss(entropy: Tensor, weights: Tensor, num_selected: int | Tensor) -> Tensor:
    """``Σ_i w_i·E_i / n_selected`` — the mean of the weighted entropy over the selected samples.

    ``num_selected`` may be larger than the local count (DDP: the global count), which makes the sum of
    per-rank losses equal the global mean. With nothing selected the result is an exact zero that keeps the
    graph (so callers can still decide collectively whether to step).
    """
    n = float(num_selected)
    return (weights * entropy).sum() / max(n, 1.0)


def update_moving_average(moving_average: Tensor | None, probs_sum: Tensor, count: int | float,
                          momentum: float = 0.1) -> Tensor | None:
    """EATA's ``m`` update from the sum and count of the selected samples' probabilities.

    ``m ← (1 − momentum)·m + momentum·probs_sum/count``; the first ``m`` is ``probs_sum/count``; ``count == 0``
    leaves ``m`` unchanged (``None`` stays ``None``). Sums (not means) let DDP ranks all-reduce first.
    """
    if count <= 0:
        return moving_average
    mean = probs_sum.detach() / count
    if moving_average is None:
        return mean.clone()
    return (1.0 - momentum) * moving_average.to(mean) + momentum * mean


def fisher_penalty(params: Mapping[str, Tensor], fisher: Mapping[str, Tensor], anchor: Mapping[str, Tensor],
                   alpha: float) -> Tensor:
    """EATA's anti-forgetting term ``α · Σ_k ω_k (θ_k − θ⁰_k)²`` over the named parameters in ``fisher``.

    Parameters absent from ``fisher`` are not regularised. Gradient: ``2α·ω_k(θ_k − θ⁰_k)``.
    """
    total = None
    for name, omega in fisher.items():
        if name not in params:
            raise KeyError(
                f"Fisher entry {name!r} has no matching adapted parameter; the model changed since the Fisher "
                "was estimated. Re-estimate it (reset the callback) or load a matching state."
            )
        theta = params[name]
        term = (omega.to(theta) * (theta - anchor[name].to(theta)) ** 2).sum()
        total = term if total is None else total + term
    if total is None:
        first = next(iter(params.values()), None)
        return torch.zeros((), device=first.device if first is not None else None)
    return alpha * total


def estimate_fisher(forward: Callable[[object], Tensor], batches: Iterable[object],
                    params: Mapping[str, Tensor], max_samples: int | None = None) -> tuple[dict[str, Tensor], int]:
    """Diagonal Fisher ``ω_k = (1/n_batches) Σ_b (∂ CE_b / ∂θ_k)²`` with argmax pseudo-labels (EATA).

    ``CE_b`` is the batch-mean cross-entropy of batch ``b`` against its own argmax predictions, so no labels
    are needed. Iteration stops once ``max_samples`` inputs have been used (the last batch is used whole).

    Args:
        forward: maps one element of ``batches`` to logits ``(B, C)`` (e.g. ``lambda x: model(x)``).
        batches: an iterable of inputs (already on the right device).
        params: the parameters to estimate ``ω`` for (leaf tensors with ``requires_grad``).
        max_samples: stop after this many samples (EATA: 2000); ``None`` uses every batch.

    Returns:
        ``({name: ω}, number of samples used)``.
    """
    named = dict(params)
    if not named:
        raise ValueError("Expected at least one parameter to estimate the Fisher information for, but got none.")
    sums = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in named.items()}
    n_batches, n_samples = 0, 0
    with torch.enable_grad():
        for batch in batches:
            logits = forward(batch)
            _check_logits(logits)
            pseudo = logits.detach().argmax(dim=1)
            loss = F.cross_entropy(logits, pseudo)
            grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
            for (k, _), g in zip(named.items(), grads):
                if g is not None:
                    sums[k] += g.detach().float() ** 2
            n_batches += 1
            n_samples += logits.shape[0]
            if max_samples is not None and n_samples >= max_samples:
                break
    if n_batches == 0:
        raise ValueError("Expected at least one clean batch to estimate the Fisher information, but the loader was empty.")
    return {k: s / n_batches for k, s in sums.items()}, n_samples
