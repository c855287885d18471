"""Importance sampling from per-sample scores (loss, or PA&DA's gradient-norm proxy).

Source: "PA&DA: Jointly Sampling PAth and DAta for Consistent NAS" (Lu et al., CVPR 2023); the math lives in
``lightning_reweight.rules.importance`` and the Lightning side in
``lightning_reweight.callbacks.importance.ImportanceSampling``.

``ImportanceSampler`` is a ``WeightedSampler`` that starts uniform and whose weights the callback replaces at
each refresh (``set_weights``: the running epoch keeps its draw, the next epoch uses the new weights). It
knows the probabilities of the epoch it is drawing, which the optional unbiasing weights ``1/(N p_i)`` need.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_reweight.samplers.core import WeightedSampler

__all__ = ["ImportanceSampler"]


class ImportanceSampler(WeightedSampler):
    """A uniform-at-start ``WeightedSampler`` driven by ``ImportanceSampling``.

    Args:
        num_items: N, the training set size.
        num_samples: global draws per epoch (default N; PA&DA draws N with replacement).
        replacement: as in ``WeightedSampler``.
        seed: as in ``WeightedSampler``.
        num_replicas: as in ``WeightedSampler``.
        rank: as in ``WeightedSampler``.
        drop_last: as in ``WeightedSampler``.

    Example::

        sampler = ImportanceSampler(len(train_set))
        sampler.set_weights(probabilities)   # next epoch draws from them
    """

    def __init__(
        self,
        num_items: int,
        num_samples: int | None = None,
        replacement: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 1:
            raise ValueError(f"Expected argument `num_items` to be a positive int, but got {num_items!r}.")
        super().__init__(torch.full((num_items,), 1.0 / num_items, dtype=torch.float64), num_samples=num_samples,
                         replacement=replacement, seed=seed, num_replicas=num_replicas, rank=rank,
                         drop_last=drop_last)

    def current_probabilities(self) -> Tensor:
        """Draw probabilities (float64, sum 1) of the epoch being iterated (after a resume: the saved ones)."""
        used = self._epoch_weights_used
        w = used if used is not None else self.epoch_weights(self.epoch)
        w = w.to(torch.float64)
        return w / w.sum()

    def probabilities_of(self, index: Tensor) -> Tensor:
        """Draw probabilities (float64) of the rows ``index`` in the epoch being iterated: O(batch) per call.

        The epoch's weights tensor is fixed while the epoch runs, so its float64 total is computed once per
        weights tensor (one O(N) pass per epoch, not per step) and reused.
        """
        used = self._epoch_weights_used
        w = used if used is not None else self.epoch_weights(self.epoch)
        cached = getattr(self, "_total_cache", None)
        if cached is None or cached[0] is not w:
            cached = (w, w.to(torch.float64).sum())
            self._total_cache = cached
        return w[index.to(w.device)].to(torch.float64) / cached[1]

    def pending_probabilities(self) -> Tensor:
        """Probabilities the next ``iter()`` will draw from."""
        w = self.weights.to(torch.float64)
        return w / w.sum()
