"""Repeated Random Sampling (RS2): each round (epoch) trains on a fresh random fraction of the data.

Source: "Repeated Random Sampling for Minimizing the Time-to-Accuracy of Learning" (Okanovic et al., ICLR 2024;
official code ``PatrikOkanovic/RS2``). Each round trains on ``k = round(r·N)`` samples, shuffled within the
round. Without replacement (the paper's default) the rounds are consecutive chunks of a stream of random
permutations, so the whole data set is seen before any sample repeats.

Differences from the official code (its bugs, METHODS.md §4), on purpose:

* the stream is the concatenation of independent permutations ``perm_0, perm_1, ...`` (permutation ``p`` from
  a generator seeded by ``(seed, p)``); round ``t`` is stream positions ``[t·k, (t+1)·k)`` — exactly ``k``
  samples every round, the remainder of a permutation is carried into the next round (the official cursor
  wraps modulo N+1, giving k−1 samples, and refills from the head of the already-used permutation);
* the round is then shuffled (generator ``(seed, t)``), sharded by GLOBAL rank like ``WeightedSampler``
  (pad with the round's head or drop its tail to a multiple of the world size);
* the step count is exact: ``len(sampler)`` is the per-rank round size, so Lightning's
  ``trainer.estimated_stepping_batches`` (= rounds × ceil(len / batch_size) / accumulation) is the real
  number of optimiser steps; ``RS2Sampler.total_steps`` computes the same without a Trainer, and
  ``rs2_cosine_schedule`` builds the paper's per-iteration cosine (η_min = 1e-4) from it;
* no silent ``drop_last``: with ``drop_last=False`` every drawn sample is trained on.

Resume: the round is a pure function of ``(seed, epoch)``, so ``state_dict`` needs only the seed, the epoch
(round), the permutation number / stream position it implies, and the cursor within the round.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_reweight.samplers.core import EpochPlan, WeightedSampler, epoch_generator

__all__ = ["RS2Sampler", "rs2_cosine_schedule"]

_PERM_STREAM = 0x5253325F50  # separate generator streams for permutations and within-round shuffles
_ROUND_STREAM = 0x5253325F52


class RS2Sampler(WeightedSampler):
    """Draw ``k = round(fraction · N)`` samples per round (epoch), without replacement across rounds.

    Args:
        num_items: ``N``, the data set length (or pass the data set itself: ``len()`` is taken).
        fraction: ``r`` in (0, 1], the share of the data set per round (paper: 0.1 on CIFAR-10).
        replacement: ``False`` (default): rounds stream over concatenated permutations, no repeat before every
            sample was seen. ``True``: an independent uniform subset (without duplicates) every round.
        seed: as in ``WeightedSampler``.
        num_replicas: as in ``WeightedSampler``.
        rank: as in ``WeightedSampler`` (the GLOBAL rank).
        drop_last: as in ``WeightedSampler`` (pad or drop per round).

    Example::

        sampler = RS2Sampler(len(train_set), fraction=0.1, seed=0)
        loader = DataLoader(IndexedDataset(train_set), batch_size=128, sampler=sampler)
        trainer = Trainer(max_epochs=200, use_distributed_sampler=False, callbacks=[SamplerState()])
        # LR schedule over the exact step count: trainer.estimated_stepping_batches (ImageClassifier uses it)
    """

    def __init__(
        self,
        num_items: Any,
        fraction: float = 0.1,
        replacement: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        if not isinstance(num_items, (int, np.integer)) or isinstance(num_items, bool):
            try:
                num_items = len(num_items)
            except TypeError as err:
                raise TypeError(
                    f"Expected argument `num_items` to be a positive int or a sized data set, but got"
                    f" {type(num_items).__name__}."
                ) from err
        if num_items < 1:
            raise ValueError(f"Expected argument `num_items` to be a positive int, but got {num_items!r}.")
        if isinstance(fraction, bool) or not isinstance(fraction, (float, int)) or not 0 < fraction <= 1:
            raise ValueError(f"Expected argument `fraction` to be a float in (0, 1], but got {fraction!r}.")
        k = round(fraction * int(num_items))
        if k < 1:
            raise ValueError(
                f"Expected `round(fraction * num_items)` to be at least 1, but got round({fraction} *"
                f" {num_items}) = {k}; raise `fraction`."
            )
        self.fraction = float(fraction)
        self.num_items = int(num_items)
        # the base class draws nothing itself: `_draw` below replaces it; weights stay uniform
        super().__init__(torch.ones(1).expand(self.num_items), num_samples=k, replacement=True, seed=seed,
                         num_replicas=num_replicas, rank=rank, drop_last=drop_last)
        self.round_replacement = bool(replacement)

    _stores_weights = False

    @property
    def round_size(self) -> int:
        """``k``: global samples per round (before padding to the world size)."""
        return self.num_samples

    def stream_position(self, epoch: int | None = None) -> tuple[int, int]:
        """``(permutation number, offset)`` where round ``epoch`` starts in the permutation stream."""
        start = (self.epoch if epoch is None else int(epoch)) * self.num_samples
        return divmod(start, self.num_items)

    def _permutation(self, p: int) -> Tensor:
        return _random_permutation(self.num_items, epoch_generator(self.seed ^ _PERM_STREAM, p))

    def _draw(self, plan: EpochPlan) -> Tensor:
        k, n, epoch = plan.num_samples, self.num_items, plan.epoch
        if self.round_replacement:
            return _random_permutation(n, epoch_generator(self.seed ^ _ROUND_STREAM, epoch))[:k]
        perm, offset = self.stream_position(epoch)
        parts, need = [], k
        while need > 0:
            take = self._permutation(perm)[offset : offset + need]
            parts.append(take)
            need -= take.numel()
            perm, offset = perm + 1, 0
        chunk = torch.cat(parts)
        shuffle = _random_permutation(k, epoch_generator(self.seed ^ _ROUND_STREAM, epoch))
        return chunk.index_select(0, shuffle)

    # ------------------------------------------------------------------------------------- step counts
    def steps_per_epoch(self, batch_size: int, drop_last: bool = False, accumulate_grad_batches: int = 1) -> int:
        """Optimiser steps per round on each rank for a ``DataLoader(batch_size, drop_last)``."""
        _check_positive("batch_size", batch_size)
        _check_positive("accumulate_grad_batches", accumulate_grad_batches)
        batches = len(self) // batch_size if drop_last else math.ceil(len(self) / batch_size)
        return math.ceil(batches / accumulate_grad_batches)

    def total_steps(self, num_rounds: int, batch_size: int, drop_last: bool = False,
                    accumulate_grad_batches: int = 1) -> int:
        """Exact optimiser steps of ``num_rounds`` rounds: the ``T_max`` of a per-iteration cosine schedule."""
        _check_positive("num_rounds", num_rounds)
        return num_rounds * self.steps_per_epoch(batch_size, drop_last, accumulate_grad_batches)

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        perm, offset = self.stream_position()
        state["rs2"] = {"num_items": self.num_items, "fraction": self.fraction, "permutation": perm,
                        "stream_offset": offset, "replacement": self.round_replacement}
        return state

    def check_state_dict(self, state_dict: Any) -> dict[str, Any]:
        from lightning_reweight.state.validate import CheckpointStateError, as_float, as_int, require_keys

        where = f"{type(self).__name__}.state_dict['rs2']"
        rs2 = require_keys(require_keys(state_dict, ["rs2"], f"{type(self).__name__}.state_dict")["rs2"],
                           ["num_items", "fraction", "permutation", "stream_offset", "replacement"], where)
        num_items = as_int(rs2, "num_items", where, minimum=1)
        if num_items != self.num_items:
            raise CheckpointStateError(
                where, "num_items", f"expected the checkpointed RS2 sampler to cover {self.num_items} items, but it"
                f" covers {num_items}; was the checkpoint made with another data set?"
            )
        fraction = as_float(rs2, "fraction", where, minimum=0.0, maximum=1.0)
        if not isinstance(rs2["replacement"], bool):
            raise CheckpointStateError(where, "replacement", f"expected a bool, but got {rs2['replacement']!r}.")
        out = super().check_state_dict(state_dict)
        perm, offset = divmod(out["epoch"] * round(fraction * num_items), num_items)
        for key, value in (("permutation", perm), ("stream_offset", offset)):
            saved = as_int(rs2, key, where, minimum=0)
            if saved != value:
                raise CheckpointStateError(
                    where, key, f"expected {value} (round {out['epoch']} of {round(fraction * num_items)} samples"
                    f" over {num_items} items), but got {saved}."
                )
        out["rs2"] = {"fraction": fraction, "replacement": rs2["replacement"]}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rs2 = self.check_state_dict(state_dict)["rs2"]
        self.round_replacement = bool(rs2["replacement"])
        self.fraction = float(rs2["fraction"])
        super().load_state_dict(state_dict)


def _random_permutation(n: int, generator: torch.Generator) -> Tensor:
    """A uniform random permutation: argsort of float64 uniforms (``torch.randperm`` draws its swaps from 32
    random bits modulo the remaining length, a bias of up to n / 2^32)."""
    return torch.argsort(torch.rand(n, dtype=torch.float64, generator=generator))


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"Expected argument `{name}` to be a positive int, but got {value!r}.")


def rs2_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int,
                        eta_min: float = 1e-4) -> torch.optim.lr_scheduler.CosineAnnealingLR:
    """The RS2 paper's per-iteration cosine schedule (``T_max`` = exact total steps, ``η_min = 1e-4``).

    Step it every optimiser step (Lightning: ``{"scheduler": s, "interval": "step"}``); get ``total_steps``
    from ``trainer.estimated_stepping_batches`` or ``RS2Sampler.total_steps``.
    """
    _check_positive("total_steps", total_steps)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(total_steps), eta_min=eta_min)
