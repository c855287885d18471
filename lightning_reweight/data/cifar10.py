"""CIFAR-10 from the shared JPEG zips (decoded once, cached as ``.npz``) and its long-tailed split.

CIFAR-10-LT (imbalance ratio ρ): class c keeps its first ``n_c = int(5000 · ρ^(−c/9))`` training images (in
member-name order), e.g. ρ = 100: 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50 (12,406 images); the
test split stays balanced.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["load_cifar10", "cifar10_lt_counts", "long_tail_indices"]


def load_cifar10(root: str | os.PathLike = "../shared/datasets", split: str = "test",
                 cache_dir: str | os.PathLike | None = ".cache/lightning_reweight") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode ``{root}/cifar10/cifar10_{split}_jpg.zip`` into ``(images uint8 (N,32,32,3), labels int64, classes)``.

    Classes are the sorted folder names (airplane … truck, the usual CIFAR-10 order); images come in member
    order (sorted by class). The decoded arrays are cached as ``{cache_dir}/cifar10_{split}.npz``
    (``cache_dir=None`` disables the cache).
    """
    if split not in ("train", "test"):
        raise ValueError(f"Expected argument `split` to be 'train' or 'test', but got {split!r}.")
    cache = Path(cache_dir) / f"cifar10_{split}.npz" if cache_dir is not None else None
    if cache is not None and cache.exists():
        with np.load(cache, allow_pickle=False) as f:
            return f["images"], f["labels"], [str(c) for c in f["classes"]]
    path = Path(root) / "cifar10" / f"cifar10_{split}_jpg.zip"
    if not path.exists():
        raise FileNotFoundError(
            f"CIFAR-10 archive not found at {path}. Pass `root=` pointing at the folder that holds "
            "`cifar10/cifar10_{train,test}_jpg.zip` (default '../shared/datasets', relative to the working directory)."
        )
    with zipfile.ZipFile(path) as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith(".jpg"))
        classes = sorted({n.split("/")[-2] for n in names})
        lookup = {c: i for i, c in enumerate(classes)}
        labels = np.array([lookup[n.split("/")[-2]] for n in names], dtype=np.int64)
        images = np.stack([np.asarray(Image.open(io.BytesIO(zf.read(n))).convert("RGB")) for n in names])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, images=images, labels=labels, classes=np.array(classes))
        tmp.replace(cache)
    return images, labels, classes


def cifar10_lt_counts(imbalance_ratio: float = 100.0, n_max: int = 5000, num_classes: int = 10) -> list[int]:
    """Per-class counts ``n_c = int(n_max · ρ^(−c/(C−1)))`` of CIFAR-10-LT."""
    if imbalance_ratio < 1:
        raise ValueError(f"Expected argument `imbalance_ratio` to be >= 1, but got {imbalance_ratio!r}.")
    return [int(n_max * imbalance_ratio ** (-c / (num_classes - 1))) for c in range(num_classes)]


def long_tail_indices(labels: np.ndarray, counts: list[int]) -> np.ndarray:
    """Indices of the first ``counts[c]`` samples of every class ``c`` (in data order)."""
    keep = [np.flatnonzero(labels == c)[:k] for c, k in enumerate(counts)]
    return np.concatenate(keep)
