"""Common corruptions (CIFAR-10-C style) and a corruption-shift DataModule for test-time adaptation.

The corruptions follow the CIFAR-10-C recipe of "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations" (Hendrycks & Dietterich, ICLR 2019): the same formulas and the same per-severity
parameters (table ``SEVERITY_PARAMS``), applied to uint8 RGB images and truncated back to uint8 as the reference
does. They are vectorised over the whole image stack with numpy/scipy/torch; only ``jpeg_compression`` and
``pixelate`` go through PIL one image at a time (an encoder and a resampler, as in the reference). Differences:
the HSV corruptions (``brightness``, ``saturate``) use the closed form of an HSV round trip instead of
scikit-image's conversion (same values up to float rounding); randomness comes from numpy ``Generator``s seeded
per (seed, corruption, severity, chunk of 1,000 images), so the released CIFAR-10-C files are *not* reproduced
bit for bit. Not implemented (they need ImageMagick, frost photos or a sequential pixel loop): motion blur,
glass blur, snow, frost, spatter, elastic transform.

Data: ``{root}/cifar10/cifar10_{train,test}_jpg.zip`` (members ``<split>/<class>/NNNN.jpg``), decoded once and
cached as ``.npz`` under ``cache_dir`` (default ``.cache/lightning_reweight``, git-ignored).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_reweight.data.cifar10 import load_cifar10
from lightning_reweight.data.indexed import IndexedDataset

__all__ = [
    "CORRUPTIONS",
    "SEVERITY_PARAMS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "corrupt",
    "load_cifar10",
    "CorruptedImages",
    "CIFAR10CDataModule",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_CHUNK = 1000  # images per RNG stream: results do not depend on how many images are corrupted

#: per-severity (1..5) parameters of the CIFAR-10-C recipe
SEVERITY_PARAMS: dict[str, list] = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],  # noise std on [0, 1]
    "shot_noise": [500, 250, 100, 75, 50],  # Poisson photon count scale
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],  # salt-and-pepper amount
    "speckle_noise": [0.06, 0.1, 0.12, 0.16, 0.2],  # multiplicative noise std
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],  # disk radius, alias blur
    "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1.0],  # sigma (pixels)
    "zoom_blur": [1.06, 1.11, 1.16, 1.21, 1.26],  # zoom factors arange(1, this, 0.01)
    "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],  # strength, plasma wibble decay
    "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],  # added to HSV value
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],  # factor around the per-channel mean
    "saturate": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],  # HSV saturation scale, shift
    "jpeg_compression": [80, 65, 58, 50, 40],  # JPEG quality
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],  # down-scale factor (BOX resampling)
}


# ----------------------------------------------------------------------------- corruption kernels
# Each kernel maps float64 images in [0, 1], shape (N, H, W, 3), to float64 images in [0, 1].

def _gaussian_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(x + rng.normal(scale=c, size=x.shape), 0, 1)


def _shot_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(rng.poisson(x * c) / c, 0, 1)


def _impulse_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    # salt-and-pepper on every channel value independently, half salt, half pepper
    flipped = rng.random(x.shape) < c
    salted = rng.random(x.shape) < 0.5
    out = x.copy()
    out[flipped & salted] = 1.0
    out[flipped & ~salted] = 0.0
    return out


def _speckle_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(x + x * rng.normal(scale=c, size=x.shape), 0, 1)


def _gaussian_blur(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(ndimage.gaussian_filter(x, sigma=(0, c, c, 0), mode="nearest", truncate=4.0), 0, 1)


def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """A normalised disk on a 17×17 grid, smoothed by a 3×3 Gaussian (σ = alias_blur) to anti-alias it."""
    grid = np.arange(-8, 9)
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    g = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias_blur ** 2))
    g /= g.sum()
    kernel = ndimage.correlate(disk, np.outer(g, g), mode="mirror")
    # drop all-zero border rings (the kernel is symmetric): same result, far fewer multiplications
    support = np.flatnonzero(kernel.any(axis=0))
    r = max(8 - int(support.min()), 0)
    return kernel[8 - r:9 + r, 8 - r:9 + r]


def _defocus_blur(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    kernel = torch.from_numpy(_disk_kernel(*c))
    pad = kernel.shape[0] // 2
    n, h, w, ch = x.shape
    t = torch.from_numpy(x).permute(0, 3, 1, 2).reshape(n * ch, 1, h, w)
    t = F.pad(t, (pad, pad, pad, pad), mode="reflect")  # reflect without repeating the edge (cv2 default)
    out = F.conv2d(t, kernel[None, None])  # correlation, like cv2.filter2D
    return np.clip(out.reshape(n, ch, h, w).permute(0, 2, 3, 1).numpy(), 0, 1)


def _bilinear_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """``scipy.ndimage.zoom(x, (1, factor, factor, 1), order=1)`` for square images, as two vectorised 1-D
    linear interpolations (output size ``round(n·factor)``, corners aligned)."""
    n_in = x.shape[1]
    n_out = int(round(n_in * factor))
    coords = np.arange(n_out) * ((n_in - 1) / (n_out - 1))
    i0 = np.clip(np.floor(coords).astype(np.int64), 0, n_in - 2)
    f = (coords - i0).astype(x.dtype)
    rows = x[:, i0] * (1 - f)[None, :, None, None] + x[:, i0 + 1] * f[None, :, None, None]
    return rows[:, :, i0] * (1 - f)[None, None, :, None] + rows[:, :, i0 + 1] * f[None, None, :, None]


def _clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom the centre of every image by ``factor`` (bilinear) and crop back to the original size."""
    h = x.shape[1]
    ch = int(np.ceil(h / factor))
    top = (h - ch) // 2
    zoomed = _bilinear_zoom(x[:, top:top + ch, top:top + ch], factor)
    trim = (zoomed.shape[1] - h) // 2
    return zoomed[:, trim:trim + h, trim:trim + h]


def _zoom_blur(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    x = x.astype(np.float32)
    out = np.zeros_like(x)
    factors = np.arange(1, c, 0.01)
    for factor in factors:  # a handful of zoom factors, each applied to the whole stack
        out += _clipped_zoom(x, factor)
    return np.clip((x + out) / (len(factors) + 1), 0, 1).astype(np.float64)


def _plasma_fractal(n: int, size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` diamond-square height maps (``size`` a power of two), each rescaled to [0, 1]."""
    maps = np.zeros((n, size, size))
    step, wibble = size, 100.0

    def wibbled_mean(a: np.ndarray) -> np.ndarray:
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        half = step // 2
        corners = maps[:, 0:size:step, 0:size:step]
        square = corners + np.roll(corners, -1, axis=1)
        square = square + np.roll(square, -1, axis=2)
        maps[:, half:size:step, half:size:step] = wibbled_mean(square)
        dr = maps[:, half:size:step, half:size:step]
        ul = maps[:, 0:size:step, 0:size:step]
        maps[:, 0:size:step, half:size:step] = wibbled_mean(dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=2))
        maps[:, half:size:step, 0:size:step] = wibbled_mean(dr + np.roll(dr, 1, axis=2) + ul + np.roll(ul, -1, axis=1))
        step //= 2
        wibble /= decay
    maps -= maps.min(axis=(1, 2), keepdims=True)
    return maps / maps.max(axis=(1, 2), keepdims=True)


def _fog(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    n, h, w, _ = x.shape
    size = 1 << int(np.ceil(np.log2(max(h, w))))
    max_val = x.max(axis=(1, 2, 3), keepdims=True)
    x = x + c[0] * _plasma_fractal(n, size, c[1], rng)[:, :h, :w, None]
    return np.clip(x * max_val / (max_val + c[0]), 0, 1)


def _brightness(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    # HSV value V = max channel; with hue and saturation fixed, RGB scales linearly with V. Black pixels
    # (V = 0, saturation 0 by convention) become grey at the new value.
    v = x.max(axis=3, keepdims=True)
    v_new = np.clip(v + c, 0, 1)
    scaled = x * (v_new / np.where(v > 0, v, 1))
    return np.clip(np.where(v > 0, scaled, v_new), 0, 1)


def _contrast(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    means = x.mean(axis=(1, 2), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1)


def _saturate(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    # With hue and value fixed, each channel is V − S·V·a(H): rescale the distance to V by S'/S. Grey pixels
    # (S = 0, hue 0 by convention) gain a red hue when the shift c[1] > 0, as in an HSV round trip.
    v = x.max(axis=3, keepdims=True)
    mn = x.min(axis=3, keepdims=True)
    s = np.where(v > 0, (v - mn) / np.where(v > 0, v, 1), 0.0)
    s_new = np.clip(s * c[0] + c[1], 0, 1)
    chroma = v - mn
    colour = v - s_new * v * (v - x) / np.where(chroma > 0, chroma, 1)
    grey = np.concatenate([v, v * (1 - s_new), v * (1 - s_new)], axis=3)
    return np.clip(np.where(chroma > 0, colour, grey), 0, 1)


def _per_image_pil(x: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    u8 = (x * 255).astype(np.uint8)
    return np.stack([np.asarray(fn(Image.fromarray(img)).convert("RGB")) for img in u8]).astype(np.float64) / 255


def _jpeg_compression(x: np.ndarray, c: int, rng: np.random.Generator) -> np.ndarray:
    def encode(img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=c)
        return Image.open(buf)

    return _per_image_pil(x, encode)


def _pixelate(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[1:3]
    return _per_image_pil(
        x, lambda img: img.resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX)
    )


CORRUPTIONS: dict[str, Callable[[np.ndarray, object, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "speckle_noise": _speckle_noise,
    "defocus_blur": _defocus_blur,
    "gaussian_blur": _gaussian_blur,
    "zoom_blur": _zoom_blur,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "saturate": _saturate,
    "jpeg_compression": _jpeg_compression,
    "pixelate": _pixelate,
}
_CORRUPTION_IDS = {name: i for i, name in enumerate(CORRUPTIONS)}


def _check_corruption(name: str, severity: int) -> None:
    if name not in CORRUPTIONS:
        raise ValueError(f"Expected argument `corruption` to be one of {sorted(CORRUPTIONS)}, but got {name!r}.")
    if not isinstance(severity, (int, np.integer)) or not 1 <= int(severity) <= 5:
        raise ValueError(f"Expected argument `severity` to be an int in 1..5, but got {severity!r}.")


def corrupt(images: np.ndarray, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply one corruption at one severity to a stack of uint8 RGB images.

    Args:
        images: uint8 array ``(N, H, W, 3)``.
        corruption: a name in ``CORRUPTIONS``.
        severity: 1..5 (parameters from ``SEVERITY_PARAMS``).
        seed: random seed; image ``i`` always gets the same noise for a given seed, whatever ``N`` is.

    Returns:
        uint8 array of the same shape (values truncated, as ``np.uint8`` does in the reference recipe).
    """
    _check_corruption(corruption, severity)
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3):
        got = f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"Expected argument `images` to be a uint8 array (N, H, W, 3), but got {got}.")
    fn, param = CORRUPTIONS[corruption], SEVERITY_PARAMS[corruption][int(severity) - 1]
    out = np.empty_like(images)
    for k, start in enumerate(range(0, len(images), _CHUNK)):
        rng = np.random.default_rng([seed, _CORRUPTION_IDS[corruption], int(severity), k])
        chunk = images[start:start + _CHUNK].astype(np.float64) / 255.0
        out[start:start + _CHUNK] = (np.clip(fn(chunk, param, rng), 0, 1) * 255).astype(np.uint8)
    return out


class CorruptedImages(Dataset):
    """uint8 images ``(N, H, W, 3)`` + labels as a dataset of ``(x, y)``, ``x`` float ``(3, H, W)`` normalised.

    Args:
        images: uint8 array or tensor ``(N, H, W, 3)``.
        labels: int array ``(N,)``.
        mean, std: per-channel normalisation (``None`` keeps [0, 1]).
        augment: random crop (4-pixel zero padding) and horizontal flip, for training.
    """

    def __init__(self, images: np.ndarray | Tensor, labels: np.ndarray | Tensor,
                 mean: Sequence[float] | None = CIFAR10_MEAN, std: Sequence[float] | None = CIFAR10_STD,
                 augment: bool = False):
        self.images = torch.as_tensor(images)
        self.targets = torch.as_tensor(labels, dtype=torch.int64)
        if self.images.ndim != 4 or self.images.shape[0] != self.targets.shape[0]:
            raise ValueError(
                f"Expected images (N, H, W, C) and labels (N,), but got {tuple(self.images.shape)} and "
                f"{tuple(self.targets.shape)}."
            )
        self.mean = None if mean is None else torch.tensor(mean).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(-1, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return self.targets.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.images[i].permute(2, 0, 1).float().div_(255.0)
        if self.augment:
            h, w = x.shape[1:]
            x = F.pad(x, (4, 4, 4, 4))
            top, left = torch.randint(0, 9, (2,)).tolist()
            x = x[:, top:top + h, left:left + w]
            if torch.rand(()) < 0.5:
                x = x.flip(2)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x, self.targets[i]


class CIFAR10CDataModule(pl.LightningDataModule):
    """CIFAR-10 for the source model, and corrupted CIFAR-10 test streams for test-time adaptation.

    * ``train``: the CIFAR-10 training images minus ``val_size`` held out (crop + flip), as
      ``IndexedDataset`` batches ``(x, y, index)``;
    * ``val``: the ``val_size`` held-out clean training images (in-distribution, never trained on): the clean
      set EATA's Fisher regulariser is estimated on;
    * ``test`` / ``predict``: one dataloader per (severity, corruption) in ``shift_names`` order (severity-major),
      plus a final clean one with ``include_clean``. Each stream is a seeded permutation of the CIFAR-10 test
      images (so classes are mixed, as in the original order), cut to ``num_test_images``, corrupted with
      ``corrupt(..., seed)``. Corrupted arrays are cached under ``cache_dir``.

    Args:
        root: folder holding CIFAR-10 as this project's ``cifar10/cifar10_{train,test}_jpg.zip`` or as torchvision's
            ``cifar-10-batches-py/`` (default ``../shared/datasets``, relative to the working directory).
        corruptions: names from ``CORRUPTIONS`` (default: the 13 implemented ones).
        severities: severities 1..5 (default ``[5]``).
        num_test_images: images per stream (``None``: all 10,000).
        include_clean: append the clean test stream last (e.g. to measure forgetting after continual adaptation).
        batch_size: test/predict/val batch size (Tent's CIFAR-10-C setting: 200).
        train_batch_size: training batch size.
        val_size: clean training images held out for validation / the Fisher estimate.
        seed: seed of the stream order, the held-out split and the corruption noise.
        num_workers: DataLoader workers.
        cache_dir: where decoded and corrupted arrays are cached (``None``: no cache).
        normalize: normalise with the CIFAR-10 channel mean/std.
        download: fetch torchvision's CIFAR-10 into ``root`` if it holds neither layout (needs the network).

    Example::

        dm = CIFAR10CDataModule(corruptions=["gaussian_noise", "contrast"], severities=[5], num_test_images=2000)
        trainer = Trainer(inference_mode=False, callbacks=[EATA()])
        trainer.test(model, datamodule=dm)
    """

    num_classes = 10

    def __init__(self, root: str = "../shared/datasets", corruptions: list[str] | None = None,
                 severities: list[int] | None = None, num_test_images: int | None = None, include_clean: bool = False,
                 batch_size: int = 200, train_batch_size: int = 128, val_size: int = 5000, seed: int = 0,
                 num_workers: int = 0, cache_dir: str | None = ".cache/lightning_reweight", normalize: bool = True,
                 download: bool = False):
        super().__init__()
        corruptions = list(CORRUPTIONS) if corruptions is None else list(corruptions)
        severities = [5] if severities is None else list(severities)
        if not corruptions and not include_clean:
            raise ValueError("Expected at least one corruption (or include_clean=True), but got an empty list.")
        for name in corruptions:
            for s in severities:
                _check_corruption(name, s)
        if num_test_images is not None and not 1 <= num_test_images <= 10000:
            raise ValueError(f"Expected argument `num_test_images` in 1..10000 or None, but got {num_test_images!r}.")
        if not 0 <= val_size < 50000:
            raise ValueError(f"Expected argument `val_size` in [0, 50000), but got {val_size!r}.")
        for arg, v in (("batch_size", batch_size), ("train_batch_size", train_batch_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Expected argument `{arg}` to be a positive int, but got {v!r}.")
        self.save_hyperparameters()
        self.corruptions, self.severities = corruptions, severities
        self._test_sets: list[CorruptedImages] | None = None
        self._train_set: IndexedDataset | None = None
        self._val_set: CorruptedImages | None = None

    # ------------------------------------------------------------------ names and arrays
    @property
    def shift_names(self) -> list[str]:
        """One name per test dataloader: ``"<corruption>-<severity>"`` (and ``"clean"`` last)."""
        names = [f"{c}-{s}" for s in self.severities for c in self.corruptions]
        return names + (["clean"] if self.hparams.include_clean else [])

    def _norm(self) -> dict:
        return {} if self.hparams.normalize else {"mean": None, "std": None}

    def test_stream(self) -> tuple[np.ndarray, np.ndarray]:
        """The clean test stream: seeded permutation of the 10,000 test images, cut to ``num_test_images``."""
        hp = self.hparams
        images, labels, _ = load_cifar10(hp.root, "test", hp.cache_dir, download=hp.download)
        order = np.random.default_rng([hp.seed, 7]).permutation(len(labels))[: hp.num_test_images]
        return images[order], labels[order]

    def corrupted(self, corruption: str, severity: int) -> tuple[np.ndarray, np.ndarray]:
        """``(images, labels)`` of one corrupted stream (computed once, then read from the cache)."""
        hp = self.hparams
        images, labels = self.test_stream()
        cache = None
        if hp.cache_dir is not None:
            cache = Path(hp.cache_dir) / "cifar10c" / f"{corruption}-{severity}_seed{hp.seed}_n{len(labels)}.npy"
            if cache.exists():
                return np.load(cache), labels
        out = corrupt(images, corruption, severity, seed=hp.seed)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npy")
            np.save(tmp, out)
            tmp.replace(cache)
        return out, labels

    # ------------------------------------------------------------------ Lightning hooks
    def _ensure_fit_sets(self) -> None:
        if self._train_set is not None:
            return
        hp = self.hparams
        images, labels, _ = load_cifar10(hp.root, "train", hp.cache_dir, download=hp.download)
        perm = np.random.default_rng([hp.seed, 3]).permutation(len(labels))
        val_idx, train_idx = np.sort(perm[: hp.val_size]), np.sort(perm[hp.val_size:])
        self._train_set = IndexedDataset(CorruptedImages(images[train_idx], labels[train_idx], augment=True,
                                                         **self._norm()))
        self._val_set = CorruptedImages(images[val_idx], labels[val_idx], **self._norm())

    def _ensure_test_sets(self) -> None:
        if self._test_sets is not None:
            return
        sets = [CorruptedImages(*self.corrupted(c, s), **self._norm()) for s in self.severities for c in self.corruptions]
        if self.hparams.include_clean:
            sets.append(CorruptedImages(*self.test_stream(), **self._norm()))
        self._test_sets = sets

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate"):
            self._ensure_fit_sets()
        if stage in (None, "test", "predict"):
            self._ensure_test_sets()

    def train_dataloader(self) -> DataLoader:
        self._ensure_fit_sets()
        return DataLoader(self._train_set, batch_size=self.hparams.train_batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        self._ensure_fit_sets()
        if len(self._val_set) == 0:
            raise ValueError("val_size=0: there is no clean validation split. Set `val_size` > 0.")
        return DataLoader(self._val_set, batch_size=self.hparams.batch_size, shuffle=False,
                          num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> list[DataLoader]:
        self._ensure_test_sets()
        return [DataLoader(ds, batch_size=self.hparams.batch_size, shuffle=False, num_workers=self.hparams.num_workers)
                for ds in self._test_sets]

    def predict_dataloader(self) -> list[DataLoader]:
        return self.test_dataloader()
