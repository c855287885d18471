"""AdaWAC's per-sample mirror-descent step (pure functions, no Lightning).

"Adaptively Weighted Data Augmentation Consistency Regularization for Robust Optimization under Concept
Shift" (Dong, Xie, Ward, ICML 2023) gives every training sample i a point ``β_i = (β_sup, β_cons)`` on the
2-simplex, initialised at ``(½, ½)``. Each step, *before* the loss of that step is formed and from the
step's detached losses, the visited rows move by one exponentiated-gradient (entropic mirror ascent) step::

    β_sup  ← β_sup  · exp(η · ℓ_sup)
    β_cons ← β_cons · exp(η · ℓ_cons)
    β      ← β / (β_sup + β_cons)                       (L1 normalisation)

which is the same as ``β_sup ← σ(log(β_sup/β_cons) + η(ℓ_sup − ℓ_cons))``. The sample's loss is then
``β_sup·ℓ_sup + β_cons·ℓ_cons``: a sample whose supervised loss stays below its consistency loss (an
easy, e.g. all-background "label-sparse", sample) shifts its weight to the consistency term.

Defaults from the paper / official code (``gail-yxie/adawac``): ``η = 8.0`` for UNet, ``2.0`` for TransUNet;
no clipping; only the batch's rows change.

Ours, not the paper's:

* The step is computed in log-ratio space (float64), so ``exp(η·ℓ)`` cannot overflow to ``inf``/``NaN``
  for large losses (the official code multiplies in float32). Results equal the official update whenever
  that one is finite.
* A sample that appears ``k`` times in one (global) batch takes the ``k`` steps one after the other, i.e.
  its log-ratio moves by ``η·Σ(ℓ_sup − ℓ_cons)`` over its occurrences (the official loader never repeats
  a sample within a batch).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_reweight.rules.instance import double_range
from lightning_reweight.state.table import PAIR_MERGE_ROWS

__all__ = ["adawac_mirror_step", "adawac_update", "check_eta"]

# log of the smallest positive normal float32: keeps log(0) finite when a β has underflowed in storage
_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)


def check_eta(eta: float) -> float:
    """Validate the mirror-descent step size ``η`` (finite, ≥ 0; ``η = 0`` keeps ``β`` fixed at its init)."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"Expected argument `eta` to be a finite number >= 0, but got {eta!r}.")
    return float(eta)


def _check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    for name, t in ((name_a, a), (name_b, b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"Expected argument `{name}` to be a torch.Tensor, but got {type(t).__name__}.")
        if t.ndim != 1:
            raise ValueError(f"Expected argument `{name}` to be 1-D (one value per sample), but got shape {tuple(t.shape)}.")
    if a.shape != b.shape:
        raise ValueError(
            f"Expected arguments `{name_a}` and `{name_b}` to have the same shape, but got {tuple(a.shape)} and "
            f"{tuple(b.shape)}."
        )


def adawac_mirror_step(
    beta_sup: Tensor, beta_cons: Tensor, loss_sup: Tensor, loss_cons: Tensor, eta: float = 8.0
) -> tuple[Tensor, Tensor]:
    """One exponentiated-gradient step of AdaWAC's per-sample weights.

    Args:
        beta_sup: ``(B,)`` current weights of the supervised loss (in ``[0, 1]``).
        beta_cons: ``(B,)`` current weights of the consistency loss (``beta_sup + beta_cons = 1``).
        loss_sup: ``(B,)`` detached per-sample supervised losses ``ℓ_sup``.
        loss_cons: ``(B,)`` detached per-sample consistency losses ``ℓ_cons``.
        eta: step size ``η`` (paper: 8.0 for UNet, 2.0 for TransUNet).

    Returns:
        ``(beta_sup, beta_cons)`` after the step, on the simplex, in the dtype of ``beta_sup``.

    Example::

        >>> b_sup, b_cons = adawac_mirror_step(torch.tensor([.5]), torch.tensor([.5]),
        ...                                    torch.tensor([1.0]), torch.tensor([0.0]), eta=1.0)
        >>> round(float(b_sup), 4)  # e / (e + 1)
        0.7311
    """
    eta = check_eta(eta)
    _check_pair("beta_sup", beta_sup, "beta_cons", beta_cons)
    _check_pair("loss_sup", loss_sup, "loss_cons", loss_cons)
    if beta_sup.shape != loss_sup.shape:
        raise ValueError(
            f"Expected one loss per weight, but got weights of shape {tuple(beta_sup.shape)} and losses of shape "
            f"{tuple(loss_sup.shape)}."
        )
    step = eta * (loss_sup.detach().double() - loss_cons.detach().double())
    return _step_log_ratio(beta_sup, beta_cons, step)


def _step_log_ratio(beta_sup: Tensor, beta_cons: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
    if beta_sup.device.type != "cpu" and beta_sup.shape == beta_cons.shape:
        # on a device both weights in one (2, B) tensor: each elementwise op is one kernel for the pair
        logs = torch.stack([beta_sup.detach(), beta_cons.detach()]).double().clamp_min(0).log().clamp_min(_LOG_TINY)
        z = logs[0] - logs[1] + step.to(logs.device)
        new = torch.sigmoid(torch.stack([z, -z])).to(beta_sup.dtype)
        return new[0], new[1]
    log_sup = beta_sup.detach().double().clamp_min(0).log().clamp_min(_LOG_TINY)
    log_cons = beta_cons.detach().double().clamp_min(0).log().clamp_min(_LOG_TINY)
    z = log_sup - log_cons + step.to(log_sup.device)
    return torch.sigmoid(z).to(beta_sup.dtype), torch.sigmoid(-z).to(beta_sup.dtype)


def adawac_update(
    beta_sup: Tensor, beta_cons: Tensor, index: Tensor, loss_sup: Tensor, loss_cons: Tensor, eta: float = 8.0,
    return_inverse: bool = False, index_info: Any = None,
) -> tuple[Tensor, ...]:
    """The mirror step for a (global) batch read from and meant for per-sample columns of length N.

    Args:
        beta_sup: ``(N,)`` column of supervised weights (not modified).
        beta_cons: ``(N,)`` column of consistency weights (not modified).
        index: ``(B,)`` dataset indices of the batch; repeats allowed (their steps add up).
        loss_sup: ``(B,)`` detached supervised losses.
        loss_cons: ``(B,)`` detached consistency losses.
        eta: step size ``η``.
        return_inverse: also return each batch position's place in ``rows`` (``new[inverse]`` are the batch's
            weights in batch order).
        index_info: on a device, the step's ``state.table.BatchIndex`` of ``index``: with no repeated index
            each position takes its own step (no sort); otherwise the repeats' steps add up through its pair
            matrix (batches up to ``PAIR_MERGE_ROWS``) or a sort and prefix sums.

    Returns:
        ``(rows, new_beta_sup, new_beta_cons)`` (plus ``inverse`` when asked): the distinct indices of the batch
        and their updated weights; write them back with ``column[rows] = new``. On a GPU (no host sync: the
        number of distinct indices is not read) ``rows`` is ``index`` itself, a repeated index carrying the
        same new weights at each of its positions, and ``inverse`` is ``arange(B)``.
    """
    eta = check_eta(eta)
    _check_pair("loss_sup", loss_sup, "loss_cons", loss_cons)
    if index.dim() != 1 or index.dtype != torch.int64:  # (the step's own index tensor stays itself)
        index = index.reshape(-1).to(torch.int64)
    if index.numel() != loss_sup.numel():
        raise ValueError(
            f"Expected one index per loss, but got {index.numel()} indices and {loss_sup.numel()} losses."
        )
    if index.device.type != "cpu":  # fixed shapes, no host sync: every batch position is its own "row"
        return _device_update(beta_sup, beta_cons, index, loss_sup, loss_cons, eta, return_inverse, index_info)
    rows, inverse = torch.unique(index.cpu(), return_inverse=True)
    diff = loss_sup.detach().double().cpu() - loss_cons.detach().double().cpu()
    step = torch.zeros(rows.numel(), dtype=torch.float64).index_add_(0, inverse, eta * diff)
    new_sup, new_cons = _step_log_ratio(beta_sup[rows], beta_cons[rows], step)
    return (rows, new_sup, new_cons, inverse) if return_inverse else (rows, new_sup, new_cons)


def _device_update(beta_sup: Tensor, beta_cons: Tensor, index: Tensor, loss_sup: Tensor, loss_cons: Tensor,
                   eta: float, return_inverse: bool, index_info: Any = None) -> tuple[Tensor, ...]:
    """``adawac_update`` with fixed shapes: each position's step is the sum over its index's repeats (a sorted
    prefix sum between ``searchsorted`` bounds), so repeated positions get identical new weights."""
    sup64 = double_range(loss_sup.detach()) if loss_sup.device.type != "cpu" else None  # (the step's copy)
    diff = ((sup64[0] if sup64 is not None else loss_sup.detach().double()) - loss_cons.detach().double())
    step = eta * diff.to(index.device)
    if index_info is not None and index_info.describes(index) and index_info.unique:
        pass  # no index repeats: each position's own step (as the CPU path's sum of one)
    elif index_info is not None and index_info.describes(index) and index.numel() <= PAIR_MERGE_ROWS:
        step = index_info.pairs64(index) @ step  # each position: the sum of its sample's steps (one product)
    else:
        sorted_index, perm = torch.sort(index)
        csum = torch.cat([step.new_zeros(1), torch.cumsum(step[perm], 0)])
        left = torch.searchsorted(sorted_index, index)
        right = torch.searchsorted(sorted_index, index, right=True)
        step = csum[right] - csum[left]
    new_sup, new_cons = _step_log_ratio(beta_sup[index], beta_cons[index], step)
    if return_inverse:
        return index, new_sup, new_cons, torch.arange(index.numel(), device=index.device)
    return index, new_sup, new_cons
