"""Segmentation data: window choice (dense / label-sparse), paired geometry, the DataModule on synthetic
images (keys, flags, pairing, determinism, drop mode, groups)."""

import pytest
import torch

from lightning_reweight.data.segmentation import (
    SegmentationDataModule,
    WindowSegmentationDataset,
    paired_geometry,
    sample_windows,
    window_foreground,
)


def blobs(n=6, size=48, seed=0):
    """Images whose foreground is a bright disc in one corner region; the rest is background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = []
    for _ in range(n):
        cy, cx = torch.randint(8, 20, (2,), generator=g).tolist()
        masks.append(((yy - cy) ** 2 + (xx - cx) ** 2 < 36).to(torch.uint8))
    masks = torch.stack(masks)
    images = (masks * 200 + torch.randint(0, 40, masks.shape, generator=g)).to(torch.uint8).unsqueeze(1)
    return images, masks


class Synthetic(SegmentationDataModule):
    def load(self):
        images, masks = blobs(8)
        return images, masks, torch.tensor([0, 1] * 4), torch.arange(6), torch.arange(6, 8)


def test_window_foreground_matches_brute_force():
    _, masks = blobs(2, 20)
    frac = window_foreground(masks, 7)
    brute = torch.stack([torch.stack([torch.stack([masks[n, i:i + 7, j:j + 7].float().mean()
                                                   for j in range(14)]) for i in range(14)]) for n in range(2)])
    torch.testing.assert_close(frac.float(), brute)


def test_sample_windows_dense_sparse_fraction_and_determinism():
    _, masks = blobs()
    w = sample_windows(masks, 16, 3, 0.4, 0.05, torch.Generator().manual_seed(0))
    dense, sparse = w[w[:, 3] == 0], w[w[:, 3] == 1]
    assert len(dense) == 18 and len(sparse) == 12  # 12 / 30 = 40 %
    for img, top, left, flag in w.tolist():
        fg = masks[img, top:top + 16, left:left + 16].float().mean()
        assert (fg == 0) if flag else (fg >= 0.05)
    assert torch.equal(w, sample_windows(masks, 16, 3, 0.4, 0.05, torch.Generator().manual_seed(0)))
    assert sparse[:, 0].unique().numel() == 6  # spread over the donor images


def test_sample_windows_errors():
    masks = torch.ones(2, 20, 20, dtype=torch.uint8)
    with pytest.raises(ValueError, match="foreground-free"):
        sample_windows(masks, 8, 1, 0.5, 0.05, torch.Generator())
    with pytest.raises(ValueError, match="crop_size"):
        sample_windows(masks, 32, 1, 0.0, 0.05, torch.Generator())


def test_paired_geometry_moves_image_and_mask_together():
    torch.manual_seed(0)
    _, masks = blobs(1, 32)
    mask = masks[0].long()
    image = torch.stack([mask.float() * 255, torch.ones_like(mask).float()]).to(torch.uint8)  # channel 0 = mask
    kinds = set()
    for _ in range(40):
        im, m = paired_geometry(image, mask)
        assert im.shape == image.shape and m.shape == mask.shape
        assert torch.equal(im[0].long() // 255, m)
        kinds.add("rot" if (im[1] == 0).any() else "rot90/flip")  # rotations fill corners with 0
    assert kinds == {"rot", "rot90/flip"}


def test_datamodule_batches_flags_pairing_and_groups():
    dm = Synthetic(crop_size=16, windows_per_image=2, sparse_fraction=0.25, batch_size=4, seed=3)
    dm.setup()
    assert len(dm.train_set) == 16 and int(dm.train_sparse().sum()) == 4
    assert len(dm.test_set) == 5 and int(dm.test_sparse().sum()) == 1
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "mask", "image2", "mask2", "sparse", "index", "group"}
    assert batch["image"].shape == (4, 1, 16, 16) and batch["mask"].dtype == torch.int64
    for i, idx in enumerate(batch["index"].tolist()):
        assert bool(batch["sparse"][i]) == bool(dm.train_sparse()[idx])
        if batch["sparse"][i]:
            assert batch["mask"][i].sum() == 0 and batch["mask2"][i].sum() == 0
        # both views come from the same window: same foreground area up to rotation crop/fill
        assert abs(int(batch["mask"][i].sum()) - int(batch["mask2"][i].sum())) <= 0.5 * 16 * 16
    assert batch["group"].tolist() == [int(dm.train_set.groups[i]) for i in batch["index"].tolist()]
    test_batch = next(iter(dm.test_dataloader()))
    assert "image2" not in test_batch
    # same seed -> same windows (identical on every DDP rank)
    dm2 = Synthetic(crop_size=16, windows_per_image=2, sparse_fraction=0.25, batch_size=4, seed=3)
    dm2.setup()
    assert torch.equal(dm.train_set.dataset.windows, dm2.train_set.dataset.windows)


def test_drop_mode_blanks_training_masks_only():
    dm = Synthetic(crop_size=16, windows_per_image=2, sparse_fraction=0.5, sparse_mode="drop", paired=False,
                   augment=False)
    dm.setup()
    ds: WindowSegmentationDataset = dm.train_set.dataset
    assert int(ds.sparse.sum()) == 6 and len(ds) == 12
    for i in range(len(ds)):
        assert (ds[i]["mask"].sum() == 0) == bool(ds.sparse[i])
    assert int(dm.test_sparse().sum()) == 0


@pytest.mark.parametrize("kw, match", [(dict(sparse_fraction=1.0), "sparse_fraction"),
                                       (dict(sparse_mode="zero"), "sparse_mode"),
                                       (dict(crop_size=4), "crop_size")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        Synthetic(**kw)


@pytest.mark.parametrize("module", ["ISBI2012DataModule", "PH2DataModule"])
def test_any_root_with_an_error_naming_the_expected_layout(module, tmp_path):
    import lightning_reweight.data.segmentation as seg

    dm = getattr(seg, module)(root=str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert str(tmp_path / "elsewhere") in msg and "Pass `root=`" in msg
    assert ("train/label/{0..29}.png" in msg) if module == "ISBI2012DataModule" else ("lesion_masks_256x192" in msg)
