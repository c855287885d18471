"""Per-token to per-sequence losses for language models.

Loss-based reweighting ("Dynamic Loss-Based Sample Reweighting for Improved LLM Pretraining") weights
*sequences*: each sequence gets one loss, the mean of its tokens' cross-entropies, and one weight. This
module turns token logits ``(B, T, V)`` and targets ``(B, T)`` with an ignore index for padding into the
``(B,)`` per-sequence losses that ``reduce_loss`` expects::

    losses = sequence_losses(logits, targets, ignore_index=-100)   # (B,)
    return reduce_loss(self, losses)                               # stream: no index needed

Padding-only sequences: a sequence with no target token has loss 0; left in the batch it would be the minimum of
the min-max rules and change the other sequences' weights. Pass the token counts on as a mask, and
``LossReweighting`` leaves such rows out of the rule and gives them weight 0::

    losses, counts = sequence_losses(logits, targets, return_counts=True)
    return reduce_loss(self, losses, valid=counts > 0)

Token- versus sequence-level weighting: with a per-sequence mean, every sequence counts equally before the
weights, whatever its length, and a weight moves all of a sequence's tokens together (a sequence of 10 real
tokens and one of 1000 get the same say). The usual LM loss averages over all tokens of the batch instead, so
long sequences count more. ``reduction="sum"`` gives that token-proportional view (a sequence's loss is its
token sum; with all weights 1 the result is the token mean times the mean length). Weighting individual
tokens would need per-token weights and a per-token normaliser, which the per-sample contract does not do.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sequence_losses"]


def sequence_losses(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int = -100,
    reduction: Literal["mean", "sum"] = "mean",
    empty: Literal["zero", "error"] = "zero",
    return_counts: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """One cross-entropy loss per sequence from token logits.

    Args:
        logits: ``(B, T, V)`` token logits.
        targets: ``(B, T)`` integer targets; positions equal to ``ignore_index`` (padding) are left out.
        ignore_index: target value of padding tokens.
        reduction: ``"mean"`` over the sequence's non-ignored tokens (default; every sequence counts equally)
            or ``"sum"`` (a sequence counts in proportion to its token count).
        empty: a sequence whose tokens are all ignored has no loss. ``"zero"``: its loss is ``0`` (with
            gradient, so it contributes nothing to the weighted sum; pass ``valid=counts > 0`` to ``reduce_loss``
            so that it takes no part in the weights either);
            ``"error"``: raise.
        return_counts: also return the ``(B,)`` number of non-ignored tokens per sequence (``counts > 0`` is the
            ``valid=`` mask of ``reduce_loss``).

    Returns:
        ``(B,)`` float losses with gradient (and the counts when ``return_counts``).

    Raises:
        ValueError: wrong shapes, or an empty sequence with ``empty="error"``.
    """
    if logits.ndim != 3:
        raise ValueError(f"Expected logits of shape (B, T, V), but got shape {tuple(logits.shape)}.")
    if targets.shape != logits.shape[:2]:
        raise ValueError(
            f"Expected targets of shape {tuple(logits.shape[:2])} (B, T) to match the logits, but got "
            f"{tuple(targets.shape)}."
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"Expected argument `reduction` to be 'mean' or 'sum', but got {reduction!r}.")
    if empty not in ("zero", "error"):
        raise ValueError(f"Expected argument `empty` to be 'zero' or 'error', but got {empty!r}.")
    b, t, v = logits.shape
    token = F.cross_entropy(logits.reshape(b * t, v), targets.reshape(b * t), ignore_index=ignore_index,
                            reduction="none").reshape(b, t)  # ignored positions are 0
    counts = (targets != ignore_index).sum(dim=1)
    if empty == "error" and bool((counts == 0).any()):
        rows = torch.nonzero(counts == 0).flatten()[:5].tolist()
        raise ValueError(
            f"Expected every sequence to have at least one non-ignored target token, but sequences {rows} have "
            f"none (all targets == ignore_index={ignore_index}). Drop them, or pass `empty='zero'`."
        )
    total = token.sum(dim=1)
    losses = total if reduction == "sum" else total / counts.clamp(min=1).to(total.dtype)
    return (losses, counts) if return_counts else losses
