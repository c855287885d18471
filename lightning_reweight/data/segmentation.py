"""Binary segmentation DataModules (ISBI 2012 EM membranes, PH2 dermoscopy) with paired views and
label-sparse samples.

Every sample is a fixed square *window* (``crop_size`` pixels, native resolution) of one image, chosen once
from ``seed`` when the DataModule is set up, so a sample index always names the same pixels (per-sample
state such as AdaWAC's weights then follows one piece of tissue). Two kinds of window:

* **label-dense**: a window whose mask has at least ``min_foreground`` foreground (``windows_per_image``
  of them per image);
* **label-sparse** (``sparse_mode="crop"``, default): a window with *no* foreground at all — the analogue of
  the all-background slices of AdaWAC's Synapse protocol ("Adaptively Weighted Data Augmentation
  Consistency Regularization for Robust Optimization under Concept Shift", Dong, Xie, Ward, ICML 2023:
  931 of 2211 training slices, 42 %). They are added until they make up ``sparse_fraction`` of the split
  (train and test alike), drawn from images that have such windows.
* ``sparse_mode="drop"`` instead simulates missing annotations: ``sparse_fraction`` of the *training*
  windows keep their image but get an all-background mask (label noise); the test split keeps true masks
  and has no sparse samples.

Each sample carries a boolean ``"sparse"`` flag (the dataset's ``.sparse`` tensor has them all), so
callbacks can log dense vs sparse samples separately and benchmarks can score them separately.

Augmentation follows AdaWAC's official data pipeline (``gail-yxie/adawac``, after TransUNet): with
probability ½ a random ``rot90`` (k ∈ {0..3}) followed by a flip along a random axis, otherwise a rotation
by an integer angle in [−20°, 20°) with nearest-neighbour interpolation and zero fill; the same geometry
is applied to image and mask. ``paired=True`` returns two independent draws (``image``/``mask`` and
``image2``/``mask2``) of the same window for consistency regularisation. The official code also resizes to
224×224; we keep native-resolution windows (``crop_size``, 64 by default) for CPU budgets.

Batches are dicts: ``image`` ``(B, C, S, S)`` float (normalised with the training split's per-channel mean
and std), ``mask`` ``(B, S, S)`` int64 in {0, 1}, ``sparse`` ``(B,)`` bool, ``index`` ``(B,)`` int64 and,
for PH2, ``group`` ``(B,)`` int64 (``image2``/``mask2`` when paired).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from lightning_reweight.data.indexed import IndexedDataset

__all__ = [
    "PH2_GROUPS",
    "ISBI2012DataModule",
    "PH2DataModule",
    "SegmentationDataModule",
    "WindowSegmentationDataset",
    "load_isbi2012",
    "load_ph2",
    "paired_geometry",
    "sample_windows",
    "window_foreground",
]

SparseMode = Literal["crop", "drop"]

#: PH2 ``clinical_diagnosis`` -> group id
PH2_GROUPS: dict[str, int] = {"common_nevus": 0, "atypical_nevus": 1, "melanoma": 2}


# ---------------------------------------------------------------------------------------------- loading
def _missing(root: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"Expected {what} under {str(root)!r}, but it does not exist. Pass `root=` pointing at your copy of the "
        "data sets (default '../shared/datasets', relative to the working directory)."
    )


def load_isbi2012(root: str | Path = "../shared/datasets") -> tuple[Tensor, Tensor]:
    """The 30 labelled ISBI 2012 EM slices: images ``(30, 1, 512, 512)`` uint8 and masks ``(30, 512, 512)``
    uint8 with 1 = membrane (label value 0 in the files), 0 = cell interior."""
    base = Path(root) / "isbi2012_em_membrane" / "train"
    if not (base / "image").is_dir():
        raise _missing(Path(root), "'isbi2012_em_membrane/train/image/{0..29}.png' and "
                       "'isbi2012_em_membrane/train/label/{0..29}.png' (512x512 grayscale; label 0 = membrane)")
    images = np.stack([np.asarray(Image.open(base / "image" / f"{i}.png").convert("L")) for i in range(30)])
    labels = np.stack([np.asarray(Image.open(base / "label" / f"{i}.png").convert("L")) for i in range(30)])
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy((labels < 128).astype(np.uint8))


def load_ph2(root: str | Path = "../shared/datasets") -> tuple[Tensor, Tensor, Tensor, list[str]]:
    """The 200 PH2 images at 256×192: images ``(200, 3, 192, 256)`` uint8, lesion masks ``(200, 192, 256)``
    uint8 in {0, 1}, ``clinical_diagnosis`` group ids (see ``PH2_GROUPS``) and image ids, in
    ``ph2_metadata.csv`` order."""
    base = Path(root) / "ph2_dermoscopy"
    meta = base / "ph2_metadata.csv"
    if not meta.is_file():
        raise _missing(Path(root), "'ph2_dermoscopy/ph2_metadata.csv' (image_id, clinical_diagnosis), "
                       "'ph2_dermoscopy/images_256x192/<image_id>.png' and "
                       "'ph2_dermoscopy/lesion_masks_256x192/<image_id>_lesion.png'")
    with meta.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    unknown = sorted({r["clinical_diagnosis"] for r in rows} - set(PH2_GROUPS))
    if unknown:
        raise ValueError(f"Expected clinical_diagnosis in {sorted(PH2_GROUPS)}, but got {unknown}.")
    ids = [r["image_id"] for r in rows]
    images = np.stack([np.asarray(Image.open(base / "images_256x192" / f"{i}.png").convert("RGB")) for i in ids])
    masks = np.stack([np.asarray(Image.open(base / "lesion_masks_256x192" / f"{i}_lesion.png").convert("L"))
                      for i in ids])
    groups = torch.tensor([PH2_GROUPS[r["clinical_diagnosis"]] for r in rows], dtype=torch.int64)
    return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy((masks > 127).astype(np.uint8)), groups, ids)


# ---------------------------------------------------------------------------------------------- windows
def _pick_positions(valid: Tensor, rows: Tensor, generator: torch.Generator) -> Tensor:
    """One uniformly random valid position ``(y, x)`` per entry of ``rows`` (vectorised)."""
    if rows.numel() == 0:
        return torch.zeros(0, 2, dtype=torch.int64)
    weights = valid[rows].flatten(1).to(torch.float32)
    flat = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    width = valid.shape[-1]
    return torch.stack([flat // width, flat % width], dim=1)


def window_foreground(masks: Tensor, size: int) -> Tensor:
    """Foreground share of every ``size``×``size`` window (stride 1) of ``(N, H, W)`` binary masks, from a
    summed-area table: ``(N, H − size + 1, W − size + 1)`` float64."""
    sat = F.pad(masks.to(torch.float64).cumsum(1).cumsum(2), (1, 0, 1, 0))
    total = sat[:, size:, size:] - sat[:, :-size, size:] - sat[:, size:, :-size] + sat[:, :-size, :-size]
    return total / (size * size)


def sample_windows(
    masks: Tensor,
    crop_size: int,
    windows_per_image: int,
    sparse_fraction: float,
    min_foreground: float,
    generator: torch.Generator,
) -> Tensor:
    """Choose label-dense and label-sparse windows.

    Args:
        masks: ``(N, H, W)`` binary masks (1 = foreground).
        crop_size: window side ``S``.
        windows_per_image: dense windows per image.
        sparse_fraction: share of all returned windows that have no foreground.
        min_foreground: minimum foreground share of a dense window (if an image has no such window, its
            windows with the most foreground are used).
        generator: the RNG (same seed -> same windows on every rank).

    Returns:
        ``(M, 4)`` int64 rows ``(image, top, left, sparse)``, dense windows first.

    Raises:
        ValueError: the images are smaller than ``crop_size``, or sparse windows are asked for but no image
            has a foreground-free window of that size.
    """
    n, h, w = masks.shape
    if crop_size > min(h, w):
        raise ValueError(f"Expected argument `crop_size` <= the image size {min(h, w)}, but got {crop_size}.")
    frac = window_foreground(masks, crop_size)  # (N, H-S+1, W-S+1)
    dense_ok = frac >= min_foreground
    best = frac >= frac.flatten(1).amax(1).view(n, 1, 1)
    dense_ok = torch.where(dense_ok.flatten(1).any(1).view(n, 1, 1), dense_ok, best)
    rows = torch.arange(n).repeat_interleave(windows_per_image)
    dense = torch.cat([rows[:, None], _pick_positions(dense_ok, rows, generator), torch.zeros_like(rows)[:, None]], 1)

    n_sparse = round(len(dense) * sparse_fraction / (1 - sparse_fraction)) if sparse_fraction > 0 else 0
    if n_sparse == 0:
        return dense
    empty = frac <= 0
    donors = torch.nonzero(empty.flatten(1).any(1)).flatten()
    if donors.numel() == 0:
        raise ValueError(
            f"No image has a foreground-free {crop_size}x{crop_size} window, so no label-sparse crops can be made. "
            "Use a smaller `crop_size`, `sparse_mode='drop'`, or `sparse_fraction=0`."
        )
    # spread sparse windows evenly over the donors (each donor used ⌊k/D⌋ or ⌈k/D⌉ times)
    order = donors[torch.randperm(donors.numel(), generator=generator)]
    srows = order.repeat(math.ceil(n_sparse / donors.numel()))[:n_sparse]
    sparse = torch.cat([srows[:, None], _pick_positions(empty, srows, generator), torch.ones_like(srows)[:, None]], 1)
    return torch.cat([dense, sparse])


def paired_geometry(image: Tensor, mask: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """AdaWAC/TransUNet training geometry, applied identically to ``image`` ``(C, H, W)`` and ``mask`` ``(H, W)``.

    With probability ½: ``rot90`` by k ∈ {0, 1, 2, 3} quarter turns, then a flip along a random axis;
    otherwise a rotation by an integer angle in [−20, 20) degrees (nearest neighbour, zero fill, same size).
    """
    if float(torch.rand((), generator=generator)) < 0.5:
        k = int(torch.randint(0, 4, (), generator=generator))
        axis = -2 + int(torch.randint(0, 2, (), generator=generator))
        image = torch.rot90(image, k, dims=(-2, -1)).flip(axis)
        mask = torch.rot90(mask, k, dims=(-2, -1)).flip(axis)
        return image.contiguous(), mask.contiguous()
    angle = float(torch.randint(-20, 20, (), generator=generator))
    image = TF.rotate(image, angle, interpolation=InterpolationMode.NEAREST, fill=0)
    mask = TF.rotate(mask.unsqueeze(0), angle, interpolation=InterpolationMode.NEAREST, fill=0).squeeze(0)
    return image, mask


class WindowSegmentationDataset(Dataset):
    """Fixed windows of a stack of images, optionally augmented and paired.

    Args:
        images: ``(N, C, H, W)`` uint8 images.
        masks: ``(N, H, W)`` masks in {0, 1}.
        windows: ``(M, 4)`` rows ``(image, top, left, sparse)`` (see ``sample_windows``).
        crop_size: window side.
        mean, std: ``(C,)`` per-channel normalisation (in 0–255 units).
        augment: apply ``paired_geometry`` on every access.
        paired: return a second, independently augmented view (``image2``/``mask2``).
        drop_mask: ``(M,)`` bool, windows whose mask is replaced by all-background (``sparse_mode="drop"``).
        image_groups: optional ``(N,)`` group id per image; ``.groups`` gives it per window.
    """

    def __init__(self, images: Tensor, masks: Tensor, windows: Tensor, crop_size: int, mean: Tensor, std: Tensor,
                 augment: bool = False, paired: bool = False, drop_mask: Tensor | None = None,
                 image_groups: Tensor | None = None):
        self.images, self.masks, self.windows = images, masks, windows.to(torch.int64)
        self.crop_size, self.augment, self.paired = crop_size, augment, paired
        self.mean = mean.float().view(-1, 1, 1)
        self.std = std.float().clamp_min(1e-6).view(-1, 1, 1)
        self.drop_mask = (torch.zeros(len(windows), dtype=torch.bool) if drop_mask is None
                          else drop_mask.to(torch.bool))
        self.sparse = self.windows[:, 3].bool() | self.drop_mask
        self.image_ids = self.windows[:, 0]
        self.groups = None if image_groups is None else image_groups[self.image_ids]

    def __len__(self) -> int:
        return len(self.windows)

    def _view(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        if self.augment:
            image, mask = paired_geometry(image, mask)
        return (image.float() - self.mean) / self.std, mask.to(torch.int64)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img_id, top, left, _ = (int(v) for v in self.windows[i])
        s = self.crop_size
        image = self.images[img_id, :, top:top + s, left:left + s]
        mask = self.masks[img_id, top:top + s, left:left + s]
        if self.drop_mask[i]:
            mask = torch.zeros_like(mask)
        x1, y1 = self._view(image, mask)
        out: dict[str, Any] = {"image": x1, "mask": y1, "sparse": bool(self.sparse[i])}
        if self.paired:
            out["image2"], out["mask2"] = self._view(image, mask)
        return out


# ---------------------------------------------------------------------------------------------- DataModules
class SegmentationDataModule(pl.LightningDataModule):
    """Shared logic of the window-based segmentation DataModules (subclasses implement ``load``).

    Args:
        root: folder holding the data sets (default ``../shared/datasets``, relative to the working dir).
        crop_size: window side in native pixels (a multiple of 2^encoder_depth for a UNet).
        windows_per_image: label-dense windows per image.
        sparse_fraction: share of label-sparse samples in [0, 1) (see the module docstring); AdaWAC's Synapse
            protocol has 42 %.
        sparse_mode: ``"crop"`` (foreground-free windows, train and test) or ``"drop"`` (training masks
            replaced by all-background; test unchanged).
        min_foreground: minimum foreground share of a label-dense window.
        paired: training batches carry two augmented views (needed by ``AdaWAC``).
        augment: augment training windows (``paired_geometry``).
        batch_size: training batch size (evaluation uses the same).
        num_workers: DataLoader workers.
        seed: seed of the window choice (identical on every DDP rank).
    """

    in_channels: int = 1
    num_classes: int = 2
    group_names: tuple[str, ...] = ()

    def __init__(self, root: str = "../shared/datasets", crop_size: int = 64, windows_per_image: int = 4,
                 sparse_fraction: float = 0.4, sparse_mode: SparseMode = "crop", min_foreground: float = 0.05,
                 paired: bool = True, augment: bool = True, batch_size: int = 16, num_workers: int = 0,
                 seed: int = 0):
        super().__init__()
        if not isinstance(crop_size, int) or crop_size < 8:
            raise ValueError(f"Expected argument `crop_size` to be an int >= 8, but got {crop_size!r}.")
        if not isinstance(windows_per_image, int) or windows_per_image < 1:
            raise ValueError(f"Expected argument `windows_per_image` to be an int >= 1, but got {windows_per_image!r}.")
        if not 0 <= sparse_fraction < 1:
            raise ValueError(f"Expected argument `sparse_fraction` to be in [0, 1), but got {sparse_fraction!r}.")
        if sparse_mode not in ("crop", "drop"):
            raise ValueError(f"Expected argument `sparse_mode` to be 'crop' or 'drop', but got {sparse_mode!r}.")
        if not 0 <= min_foreground <= 1:
            raise ValueError(f"Expected argument `min_foreground` to be in [0, 1], but got {min_foreground!r}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Expected argument `batch_size` to be a positive int, but got {batch_size!r}.")
        self.save_hyperparameters()
        self.train_set: IndexedDataset | None = None
        self.test_set: IndexedDataset | None = None

    # subclasses ---------------------------------------------------------------------------------------
    def load(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        """``(images uint8 (N,C,H,W), masks {0,1} (N,H,W), image groups (N,) or None, train ids, test ids)``."""
        raise NotImplementedError

    # setup ---------------------------------------------------------------------------------------------
    def _split(self, images: Tensor, masks: Tensor, groups: Tensor | None, ids: Tensor, train: bool,
               mean: Tensor, std: Tensor) -> IndexedDataset:
        hp = self.hparams
        gen = torch.Generator().manual_seed(int(hp.seed) * 2 + (0 if train else 1))
        crop_frac = hp.sparse_fraction if hp.sparse_mode == "crop" else 0.0
        windows = sample_windows(masks[ids], hp.crop_size, hp.windows_per_image, crop_frac, hp.min_foreground, gen)
        drop = None
        if hp.sparse_mode == "drop" and train and hp.sparse_fraction > 0:
            n_drop = round(len(windows) * hp.sparse_fraction)
            drop = torch.zeros(len(windows), dtype=torch.bool)
            drop[torch.randperm(len(windows), generator=gen)[:n_drop]] = True
        ds = WindowSegmentationDataset(images[ids], masks[ids], windows, hp.crop_size, mean, std,
                                       augment=train and hp.augment, paired=train and hp.paired, drop_mask=drop,
                                       image_groups=None if groups is None else groups[ids])
        return IndexedDataset(ds, groups=ds.groups)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, masks, groups, train_ids, test_ids = self.load()
        train_imgs = images[train_ids].float()
        mean = train_imgs.mean(dim=(0, 2, 3))
        std = train_imgs.std(dim=(0, 2, 3))
        self.train_set = self._split(images, masks, groups, train_ids, True, mean, std)
        self.test_set = self._split(images, masks, groups, test_ids, False, mean, std)

    # views -----------------------------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    def train_sparse(self) -> Tensor:
        """Per-training-sample label-sparse flags (``(N_train,)`` bool)."""
        self.setup()
        return self.train_set.dataset.sparse.clone()

    def test_sparse(self) -> Tensor:
        self.setup()
        return self.test_set.dataset.sparse.clone()

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        hp = self.hparams
        return DataLoader(ds, batch_size=hp.batch_size, shuffle=shuffle, num_workers=hp.num_workers,
                          persistent_workers=hp.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The test split (no separate validation split: 30 / 200 images are too few; select no model on it)."""
        self.setup()
        return self._loader(self.test_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


class ISBI2012DataModule(SegmentationDataModule):
    """ISBI 2012 EM membrane segmentation (``isbi2012_em_membrane``; 30 slices of 512×512, 1 channel).

    Foreground (class 1) = membrane. Split: slices 0–19 train, 20–29 test — a contiguous split of the serial
    section stack, so no test slice has its direct neighbour in training. Defaults: 64×64 windows,
    8 dense windows per slice (160 train / 80 test) and 40 % label-sparse (membrane-free) windows on top
    (107 train / 53 test).

    Example::

        dm = ISBI2012DataModule(root="../shared/datasets", sparse_fraction=0.4)
        trainer.fit(SegmentationModule(in_channels=1), datamodule=dm)
    """

    in_channels = 1

    def __init__(self, root: str = "../shared/datasets", crop_size: int = 64, windows_per_image: int = 8,
                 sparse_fraction: float = 0.4, sparse_mode: SparseMode = "crop", min_foreground: float = 0.05,
                 paired: bool = True, augment: bool = True, batch_size: int = 16, num_workers: int = 0,
                 seed: int = 0):
        super().__init__(root, crop_size, windows_per_image, sparse_fraction, sparse_mode, min_foreground, paired,
                         augment, batch_size, num_workers, seed)

    def load(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        images, masks = load_isbi2012(self.hparams.root)
        return images, masks, None, torch.arange(0, 20), torch.arange(20, 30)


class PH2DataModule(SegmentationDataModule):
    """PH2 skin-lesion segmentation (``ph2_dermoscopy``; 200 RGB images at 256×192) with
    ``clinical_diagnosis`` groups (0 common nevus, 1 atypical nevus, 2 melanoma; ``group`` in every batch).

    Split: within each diagnosis, images sorted by id, every 4th (positions 3, 7, 11, ...) goes to test:
    150 train (60/60/30) / 50 test (20/20/10). Defaults: 64×64 windows with at least 5 % lesion, 2 per
    image (300 train / 100 test), plus 40 % lesion-free skin windows (200 train / 67 test; 162 of the 200
    images have such a window).

    Example::

        dm = PH2DataModule(root="../shared/datasets")
        trainer.fit(SegmentationModule(in_channels=3, num_groups=3), datamodule=dm)
    """

    in_channels = 3
    group_names = ("common_nevus", "atypical_nevus", "melanoma")

    def __init__(self, root: str = "../shared/datasets", crop_size: int = 64, windows_per_image: int = 2,
                 sparse_fraction: float = 0.4, sparse_mode: SparseMode = "crop", min_foreground: float = 0.05,
                 paired: bool = True, augment: bool = True, batch_size: int = 16, num_workers: int = 0,
                 seed: int = 0):
        super().__init__(root, crop_size, windows_per_image, sparse_fraction, sparse_mode, min_foreground, paired,
                         augment, batch_size, num_workers, seed)

    def load(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        images, masks, groups, ids = load_ph2(self.hparams.root)
        order = sorted(range(len(ids)), key=lambda i: (int(groups[i]), ids[i]))
        test = torch.zeros(len(ids), dtype=torch.bool)
        for g in range(len(PH2_GROUPS)):
            members = [i for i in order if int(groups[i]) == g]
            test[members[3::4]] = True
        return images, masks, groups, torch.nonzero(~test).flatten(), torch.nonzero(test).flatten()
