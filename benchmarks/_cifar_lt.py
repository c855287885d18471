"""CIFAR-10-LT for the long-tail benchmark, built with the library's CIFAR-10 loader.

Class c keeps its first ``n_c = int(5000 · ρ^(−c/9))`` training images (member-name order); the test split
stays balanced (1,000 per class). Classes are numbered in CIFAR-10's order (alphabetical folder names).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lightning_reweight.data.cifar10 import cifar10_lt_counts, load_cifar10, long_tail_indices

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def lt_counts(imbalance_ratio: float = 100.0, n_max: int = 5000, num_classes: int = 10) -> list[int]:
    return cifar10_lt_counts(imbalance_ratio, n_max, num_classes)


def load_cifar10_lt(
    root: str | Path = "../shared/datasets",
    imbalance_ratio: float = 100.0,
    cache_dir: str | Path = ".cache/lightning_reweight",
) -> dict[str, np.ndarray]:
    """Return ``{"x_train", "y_train", "x_test", "y_test"}`` (uint8 ``(n, 32, 32, 3)`` images, int64 labels)."""
    x_train, y_train, classes = load_cifar10(root, "train", cache_dir)
    if tuple(classes) != CLASSES:
        raise ValueError(f"Unexpected CIFAR-10 class folders {classes}.")
    keep = long_tail_indices(y_train, lt_counts(imbalance_ratio))
    x_test, y_test, _ = load_cifar10(root, "test", cache_dir)
    return {"x_train": x_train[keep], "y_train": y_train[keep], "x_test": x_test, "y_test": y_test}
