"""CIFAR-10-LT from the shared JPEG zips, decoded once and cached as ``.npz`` under a git-ignored folder.

CIFAR-10-LT (imbalance ratio ρ): class c keeps its first ``n_c = int(5000 · ρ^(−c/9))`` training images (by file
name), e.g. ρ = 100: 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50 (12,406 images). The test split stays
balanced (1,000 per class). Classes are numbered in CIFAR-10's order (alphabetical folder names).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def lt_counts(imbalance_ratio: float = 100.0, n_max: int = 5000, num_classes: int = 10) -> list[int]:
    """``n_c = int(n_max · ρ^(−c/(C−1)))``."""
    return [int(n_max * imbalance_ratio ** (-c / (num_classes - 1))) for c in range(num_classes)]


def _decode(zip_path: Path, split: str, per_class: list[int] | None) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".jpg"))
        by_class: dict[str, list[str]] = {c: [] for c in CLASSES}
        for n in names:
            parts = n.split("/")
            if len(parts) == 3 and parts[0] == split and parts[1] in by_class:
                by_class[parts[1]].append(n)
        xs, ys = [], []
        for c, cls in enumerate(CLASSES):
            members = by_class[cls] if per_class is None else by_class[cls][: per_class[c]]
            for n in members:
                with Image.open(io.BytesIO(zf.read(n))) as im:
                    xs.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            ys.extend([c] * len(members))
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def load_cifar10_lt(
    root: str | Path = "../shared/datasets",
    imbalance_ratio: float = 100.0,
    cache_dir: str | Path = ".cache/cifar10_lt",
) -> dict[str, np.ndarray]:
    """Return ``{"x_train", "y_train", "x_test", "y_test"}`` (uint8 ``(n, 32, 32, 3)`` images, int64 labels)."""
    root, cache_dir = Path(root), Path(cache_dir)
    src = root / "cifar10"
    if not (src / "cifar10_train_jpg.zip").exists():
        raise FileNotFoundError(
            f"Expected CIFAR-10 JPEG zips under {src} (cifar10_train_jpg.zip, cifar10_test_jpg.zip); pass --root."
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    counts = lt_counts(imbalance_ratio)
    train_cache = cache_dir / f"train_rho{imbalance_ratio:g}.npz"
    test_cache = cache_dir / "test.npz"
    if not train_cache.exists():
        x, y = _decode(src / "cifar10_train_jpg.zip", "train", counts)
        np.savez(train_cache, x=x, y=y)
    if not test_cache.exists():
        x, y = _decode(src / "cifar10_test_jpg.zip", "test", None)
        np.savez(test_cache, x=x, y=y)
    tr, te = np.load(train_cache), np.load(test_cache)
    return {"x_train": tr["x"], "y_train": tr["y"], "x_test": te["x"], "y_test": te["y"]}
