"""Long-tailed scikit-learn digits: a no-download image classification DataModule."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight.data.indexed import IndexedDataset


def long_tail_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> np.ndarray:
    """Per-class counts ``n_c = n_max · ρ^(−c/(C−1))`` (class 0 largest, class C−1 = n_max/ρ)."""
    if imbalance_ratio < 1:
        raise ValueError(f"Expected argument `imbalance_ratio` to be >= 1, but got {imbalance_ratio!r}.")
    c = np.arange(num_classes)
    return np.maximum(1, np.floor(n_max * imbalance_ratio ** (-c / max(num_classes - 1, 1)))).astype(int)


def long_tail_subset(labels: np.ndarray, imbalance_ratio: float, seed: int) -> np.ndarray:
    """Indices of a long-tailed subset of a (roughly balanced) labelled set, chosen with ``seed``."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    n_max = min(int((labels == c).sum()) for c in classes)
    counts = long_tail_counts(n_max, len(classes), imbalance_ratio)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, counts)]
    return np.sort(np.concatenate(keep))


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's bundled 8×8 digits (1,797 images, no download) with a long-tailed training split.

    A stratified test split stays balanced; the rest is subsampled to ``n_c = n_max·ρ^(−c/9)`` per class
    (class 0 the head, class 9 the tail). Images are scaled to [0, 1] and resized to ``image_size``. The
    training set is an ``IndexedDataset`` yielding ``(x, y, index)``.

    Args:
        imbalance_ratio: ρ = n_head / n_tail of the training split (1 = balanced).
        image_size: side length the 8×8 images are resized to (bilinear).
        test_fraction: share of every class held out for the balanced validation/test split.
        batch_size: training and evaluation batch size.
        seed: seed of the splits.
        num_workers: DataLoader workers.
    """

    num_classes = 10

    def __init__(self, imbalance_ratio: float = 10.0, image_size: int = 32, test_fraction: float = 0.3,
                 batch_size: int = 64, seed: int = 0, num_workers: int = 0):
        super().__init__()
        if not 0 < test_fraction < 1:
            raise ValueError(f"Expected argument `test_fraction` in (0, 1), but got {test_fraction!r}.")
        if imbalance_ratio < 1:
            raise ValueError(f"Expected argument `imbalance_ratio` to be >= 1, but got {imbalance_ratio!r}.")
        self.save_hyperparameters()
        self.train_set: IndexedDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        hp = self.hparams
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        if hp.image_size != 8:
            x = F.interpolate(x, size=(hp.image_size, hp.image_size), mode="bilinear", align_corners=False)
        y = digits.target.astype(np.int64)
        train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=hp.test_fraction, stratify=y,
                                               random_state=hp.seed)
        train_idx = train_idx[long_tail_subset(y[train_idx], hp.imbalance_ratio, hp.seed)]
        yt = torch.from_numpy(y)
        self.train_set = IndexedDataset(TensorDataset(x[train_idx], yt[train_idx]), targets=yt[train_idx])
        self.test_set = TensorDataset(x[test_idx], yt[test_idx])

    def class_counts(self) -> torch.Tensor:
        self.setup()
        return torch.bincount(self.train_set.targets, minlength=self.num_classes)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True,
                          num_workers=self.hparams.num_workers, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256, num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
