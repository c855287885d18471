"""SMOTE as a DataModule plugin, using imbalanced-learn's ``SMOTE`` (never re-implemented here).

Source: "SMOTE: Synthetic Minority Over-sampling Technique" (Chawla et al., JAIR 2002): for a minority sample
x, pick one of its k = 5 nearest minority neighbours x̃ and add x + u·(x̃ − x), u ~ U(0, 1).
``imblearn.over_sampling.SMOTE(k_neighbors=5, sampling_strategy="auto")`` does exactly this; its defaults
are the paper's and ours.

* ``smote_resample(x, y, ...)``: tensors/arrays in, resampled tensors out. ``x`` may have any trailing shape
  (``(N, D)`` tabular features, ``(N, C, H, W)`` images): it is flattened for SMOTE and reshaped back. The
  originals come first, unchanged and in order; synthetic rows follow (``is_synthetic`` marks them).
  ``seed`` is SMOTE's ``random_state``: same data + same seed -> the identical resampled set (on every rank).
* ``SMOTEDataModule(datamodule, ...)``: a ``SamplingDataModule`` whose training set is replaced once by its
  SMOTE-resampled version (an ``IndexedDataset`` with ``targets``; ``groups`` of synthetic rows are −1, i.e.
  unknown). Validation/test loaders are untouched.

Images: SMOTE interpolates between two images of a class. ``features="flatten"`` (default) does it in pixel
space — valid for small, roughly aligned images (digits, tabular-like), blurry for natural images. For
natural images, pass ``embed`` (any ``Tensor -> Tensor`` function, e.g. a frozen backbone's pooled
features): SMOTE then runs on the embeddings and the resampled training set holds embeddings, so train a
head (a linear/MLP classifier) on them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_reweight.data.indexed import IndexedDataset
from lightning_reweight.data.plugin import SamplingDataModule

__all__ = ["SMOTEDataModule", "dataset_arrays", "smote_resample"]


def smote_resample(
    x: Any,
    y: Any,
    sampling_strategy: Any = "auto",
    k_neighbors: int = 5,
    seed: int = 0,
    **smote_kwargs: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    """SMOTE-resample ``(x, y)`` with ``imblearn.over_sampling.SMOTE``.

    Args:
        x: ``(N, ...)`` features (tensor or array; flattened to ``(N, D)`` for SMOTE).
        y: ``(N,)`` integer class labels.
        sampling_strategy: imblearn's ``sampling_strategy`` ("auto" = oversample every class but the majority
            to the majority count; a float ratio for binary; a dict ``{class: target_count}``).
        k_neighbors: nearest minority neighbours (paper and imblearn default: 5).
        seed: ``random_state`` of SMOTE.
        smote_kwargs: other ``SMOTE`` arguments.

    Returns:
        ``(x_res, y_res, is_synthetic)``: float32 ``(M, ...)``, int64 ``(M,)``, bool ``(M,)``; the first N rows
        are the originals.
    """
    from imblearn.over_sampling import SMOTE

    x_t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    y_t = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y)
    if x_t.dim() < 2:
        raise ValueError(f"Expected argument `x` to have shape (N, ...) with N samples, but got {tuple(x_t.shape)}.")
    if y_t.dim() != 1 or y_t.numel() != x_t.shape[0] or y_t.is_floating_point():
        raise ValueError(
            f"Expected argument `y` to hold one integer label per row of `x` ({x_t.shape[0]}), but got shape"
            f" {tuple(y_t.shape)} and dtype {y_t.dtype}."
        )
    if isinstance(k_neighbors, bool) or not isinstance(k_neighbors, int) or k_neighbors < 1:
        raise ValueError(f"Expected argument `k_neighbors` to be a positive int, but got {k_neighbors!r}.")
    counts = torch.bincount(y_t[y_t >= 0]) if bool((y_t >= 0).all()) else None
    if counts is None:
        raise ValueError("Expected argument `y` to hold labels >= 0, but got negative labels.")
    present = counts[counts > 0]
    if present.numel() < 2:
        raise ValueError("Expected at least two classes in `y` for SMOTE, but got one.")
    majority = int(present.max())
    small = [(c, int(n)) for c, n in enumerate(counts.tolist()) if 0 < n <= k_neighbors and n < majority]
    if small:
        raise ValueError(
            f"Expected every class SMOTE oversamples to have more than `k_neighbors`={k_neighbors} samples, but"
            f" got (class, count) {small}; lower `k_neighbors` or drop those classes from `sampling_strategy`."
        )
    n, shape = x_t.shape[0], tuple(x_t.shape[1:])
    flat = x_t.reshape(n, -1).to(torch.float64).numpy()
    smote = SMOTE(sampling_strategy=sampling_strategy, k_neighbors=k_neighbors, random_state=seed, **smote_kwargs)
    x_res, y_res = smote.fit_resample(flat, y_t.numpy())
    x_out = torch.from_numpy(np.ascontiguousarray(x_res)).to(torch.float32).reshape(-1, *shape)
    y_out = torch.from_numpy(np.asarray(y_res)).to(torch.int64)
    is_synthetic = torch.arange(y_out.numel()) >= n
    return x_out, y_out, is_synthetic


def dataset_arrays(dataset: Dataset, batch_size: int = 1024) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(x, y, groups)`` of a whole map-style data set whose samples are ``(x, y, ...)`` (an ``IndexedDataset``
    or ``TensorDataset`` is read without iterating; otherwise one batched pass with ``default_collate``)."""
    groups = getattr(dataset, "groups", None) if isinstance(dataset, IndexedDataset) else None
    inner = dataset.dataset if isinstance(dataset, IndexedDataset) else dataset
    if isinstance(inner, TensorDataset) and len(inner.tensors) >= 2:
        return inner.tensors[0], inner.tensors[1], groups
    xs, ys = [], []
    for batch in DataLoader(inner, batch_size=batch_size, shuffle=False):
        if isinstance(batch, dict) or not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise TypeError(
                "Expected training samples of the form (x, y, ...) for SMOTE, but got"
                f" {type(batch).__name__}; wrap the data set so it returns (features, label)."
            )
        xs.append(torch.as_tensor(batch[0]))
        ys.append(torch.as_tensor(batch[1]))
    return torch.cat(xs), torch.cat(ys), groups


class SMOTEDataModule(SamplingDataModule):
    """Replace a DataModule's training set by its SMOTE-resampled version (imblearn), keeping everything else.

    Args:
        datamodule: the user's ``LightningDataModule`` (or a training ``Dataset`` with ``batch_size``).
        sampling_strategy: SMOTE's target class counts (paper / imblearn default ``"auto"``).
        k_neighbors: SMOTE's neighbours per synthetic sample (paper / imblearn default 5).
        seed: SMOTE's random seed (identical on every rank).
        embed: optional ``Tensor -> Tensor`` feature extractor; SMOTE runs on (and the training set holds) its
            outputs (see the module docstring). ``None``: flattened inputs.
        sampler: an optional lightning_reweight sampler on top (default ``"none"``: keep the
            loader's shuffling).
        sampler_kwargs: an optional lightning_reweight sampler on top (default ``"none"``: keep the
            loader's shuffling).
        batch_size: as in ``SamplingDataModule``.
        num_workers: as in ``SamplingDataModule``.
        add_sampler_state: as in ``SamplingDataModule``.
    """

    def __init__(
        self,
        datamodule: Any,
        sampling_strategy: Any = "auto",
        k_neighbors: int = 5,
        seed: int = 0,
        embed: Callable[[Tensor], Tensor] | None = None,
        sampler: str = "none",
        sampler_kwargs: dict[str, Any] | None = None,
        batch_size: int | None = None,
        num_workers: int | None = None,
        add_sampler_state: bool = True,
    ) -> None:
        super().__init__(datamodule, sampler=sampler, sampler_kwargs=sampler_kwargs, seed=seed,
                         batch_size=batch_size, num_workers=num_workers, add_sampler_state=add_sampler_state)
        if isinstance(k_neighbors, bool) or not isinstance(k_neighbors, int) or k_neighbors < 1:
            raise ValueError(f"Expected argument `k_neighbors` to be a positive int, but got {k_neighbors!r}.")
        if embed is not None and not callable(embed):
            raise TypeError(f"Expected argument `embed` to be callable, but got {type(embed).__name__}.")
        self.sampling_strategy = sampling_strategy
        self.k_neighbors = k_neighbors
        self.embed = embed
        self.is_synthetic: Tensor | None = None
        self._resampled: tuple[int, IndexedDataset] | None = None

    def transform_train_dataset(self, dataset: Dataset) -> Dataset:
        if self._resampled is not None and self._resampled[0] == id(dataset):
            return self._resampled[1]
        x, y, groups = dataset_arrays(dataset)
        if self.embed is not None:
            with torch.no_grad():
                x = self.embed(x)
        x_res, y_res, self.is_synthetic = smote_resample(x, y, self.sampling_strategy, self.k_neighbors, self.seed)
        if groups is not None:
            groups = torch.cat([groups, torch.full((y_res.numel() - groups.numel(),), -1, dtype=torch.int64)])
        resampled = IndexedDataset(TensorDataset(x_res, y_res), groups=groups, targets=y_res)
        self._resampled = (id(dataset), resampled)
        return resampled
