"""CIFAR-10 from the shared JPEG zips or torchvision's folder (decoded once, cached as ``.npz``), and its
long-tailed split.

Layouts ``load_cifar10(root)`` reads (the first one found):

* this project's JPEG zips: ``{root}/cifar10/cifar10_{train,test}_jpg.zip`` (member ``train/<class>/NNNN.jpg``);
* torchvision's / the original Python version: ``{root}/cifar-10-batches-py/`` (``data_batch_1`` … ``_5``,
  ``test_batch``, ``batches.meta``), also as ``{root}/cifar10/cifar-10-batches-py/`` or ``root`` itself;
* ``download=True`` fetches torchvision's copy into ``{root}`` when neither is there.

CIFAR-10-LT (imbalance ratio ρ): class c keeps its first ``n_c = int(5000 · ρ^(−c/9))`` training images (in
member-name order), e.g. ρ = 100: 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50 (12,406 images); the
test split stays balanced.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["load_cifar10", "find_cifar10", "cifar10_lt_counts", "long_tail_indices"]


_PICKLES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}

CIFAR10_LAYOUTS = (
    "`{root}/cifar10/cifar10_{train,test}_jpg.zip` (this project's JPEG zips), or torchvision's "
    "`{root}/cifar-10-batches-py/` (data_batch_1..5, test_batch, batches.meta; also `{root}/cifar10/cifar-10-"
    "batches-py/` or that folder itself as root)"
)


def _pickle_dir(root: Path) -> Path | None:
    for folder in (root / "cifar-10-batches-py", root / "cifar10" / "cifar-10-batches-py", root):
        if (folder / "batches.meta").exists() and (folder / "test_batch").exists():
            return folder
    return None


def find_cifar10(root: str | os.PathLike, split: str = "test", download: bool = False) -> tuple[str, Path]:
    """Which CIFAR-10 layout ``root`` holds: ``("jpg_zip", zip path)`` or ``("pickle", folder)``.

    With ``download=True`` and neither layout present, torchvision downloads the original into ``root``.

    Raises:
        FileNotFoundError: naming ``root`` and the layouts expected there.
    """
    base = Path(root)
    zip_path = base / "cifar10" / f"cifar10_{split}_jpg.zip"
    if zip_path.exists():
        return "jpg_zip", zip_path
    folder = _pickle_dir(base)
    if folder is None and download:
        from torchvision.datasets import CIFAR10

        base.mkdir(parents=True, exist_ok=True)
        CIFAR10(str(base), train=split == "train", download=True)
        folder = _pickle_dir(base)
    if folder is None:
        raise FileNotFoundError(
            f"Expected CIFAR-10 under root={str(base)!r} as {CIFAR10_LAYOUTS}, but found neither. Pass `root=` "
            "pointing at your copy (default '../shared/datasets', relative to the working directory), or "
            "`download=True` to fetch torchvision's copy into root."
        )
    missing = [n for n in _PICKLES[split] if not (folder / n).exists()]
    if missing:
        raise FileNotFoundError(f"Expected torchvision's CIFAR-10 files {missing} in {str(folder)!r}, but they are "
                                "missing. Re-extract cifar-10-python.tar.gz there, or pass `download=True`.")
    return "pickle", folder


def _str_keys(entry: dict) -> dict:
    """The original files are Python 2 pickles (``str`` keys under latin1); re-pickled copies may have bytes keys."""
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _read_pickles(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """torchvision's format: each batch a pickled dict with ``data`` (N, 3072 uint8, CHW) and ``labels``."""
    with (folder / "batches.meta").open("rb") as fh:
        meta = _str_keys(pickle.load(fh, encoding="latin1"))
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta["label_names"]]
    images, labels = [], []
    for name in _PICKLES[split]:
        with (folder / name).open("rb") as fh:
            entry = _str_keys(pickle.load(fh, encoding="latin1"))
        data = np.asarray(entry["data"], dtype=np.uint8)
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), classes


def load_cifar10(root: str | os.PathLike = "../shared/datasets", split: str = "test",
                 cache_dir: str | os.PathLike | None = ".cache/lightning_reweight",
                 download: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read CIFAR-10 ``split`` from ``root`` into ``(images uint8 (N,32,32,3), labels int64, classes)``.

    ``root`` may hold this project's JPEG zips or torchvision's ``cifar-10-batches-py`` folder (see the module
    docstring); ``download=True`` fetches torchvision's copy into ``root`` when neither is there. Classes are
    airplane … truck (the usual CIFAR-10 order). JPEG zips come in member order (sorted by class), pickles in
    the file order. The decoded arrays are cached as ``{cache_dir}/cifar10_{split}[_pickle].npz``
    (``cache_dir=None`` disables the cache).
    """
    if split not in ("train", "test"):
        raise ValueError(f"Expected argument `split` to be 'train' or 'test', but got {split!r}.")
    fmt, path = find_cifar10(root, split, download)
    suffix = "" if fmt == "jpg_zip" else "_pickle"
    cache = Path(cache_dir) / f"cifar10_{split}{suffix}.npz" if cache_dir is not None else None
    if cache is not None and cache.exists():
        with np.load(cache, allow_pickle=False) as f:
            return f["images"], f["labels"], [str(c) for c in f["classes"]]
    if fmt == "pickle":
        images, labels, classes = _read_pickles(path, split)
        _save_cache(cache, images, labels, classes)
        return images, labels, classes
    with zipfile.ZipFile(path) as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith(".jpg"))
        classes = sorted({n.split("/")[-2] for n in names})
        lookup = {c: i for i, c in enumerate(classes)}
        labels = np.array([lookup[n.split("/")[-2]] for n in names], dtype=np.int64)
        images = np.stack([np.asarray(Image.open(io.BytesIO(zf.read(n))).convert("RGB")) for n in names])
    _save_cache(cache, images, labels, classes)
    return images, labels, classes


def _save_cache(cache: Path | None, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    if cache is None:
        return
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, images=images, labels=labels, classes=np.array(classes))
    tmp.replace(cache)


def cifar10_lt_counts(imbalance_ratio: float = 100.0, n_max: int = 5000, num_classes: int = 10) -> list[int]:
    """Per-class counts ``n_c = int(n_max · ρ^(−c/(C−1)))`` of CIFAR-10-LT."""
    if imbalance_ratio < 1:
        raise ValueError(f"Expected argument `imbalance_ratio` to be >= 1, but got {imbalance_ratio!r}.")
    return [int(n_max * imbalance_ratio ** (-c / (num_classes - 1))) for c in range(num_classes)]


def long_tail_indices(labels: np.ndarray, counts: list[int]) -> np.ndarray:
    """Indices of the first ``counts[c]`` samples of every class ``c`` (in data order)."""
    keep = [np.flatnonzero(labels == c)[:k] for c, k in enumerate(counts)]
    return np.concatenate(keep)
