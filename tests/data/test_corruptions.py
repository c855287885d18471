"""Corruptions vs hand computation / references, determinism, and the corruption-shift DataModule on a fake zip."""

from __future__ import annotations

import colorsys
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from lightning_reweight.data.corruptions import (
    CORRUPTIONS,
    SEVERITY_PARAMS,
    CIFAR10CDataModule,
    _bilinear_zoom,
    _disk_kernel,
    corrupt,
    load_cifar10,
)


def images(n=6, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_every_corruption_keeps_shape_is_seeded_and_grows_with_severity(name):
    x = images()
    a = corrupt(x, name, 5, seed=1)
    assert a.shape == x.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, corrupt(x, name, 5, seed=1))
    d1 = np.abs(corrupt(x, name, 1, seed=1).astype(float) - x).mean()
    d5 = np.abs(a.astype(float) - x).mean()
    if name == "saturate":  # severities 1-2 desaturate, 3-5 saturate: not monotone in the change
        assert d5 > 0 and d1 > 0
    else:
        assert d5 > d1 > 0


def test_noise_depends_on_seed_and_not_on_the_number_of_images():
    x = images(4)
    np.testing.assert_array_equal(corrupt(x[:1], "gaussian_noise", 3, seed=0), corrupt(x, "gaussian_noise", 3, seed=0)[:1])
    assert not np.array_equal(corrupt(x, "gaussian_noise", 3, seed=0), corrupt(x, "gaussian_noise", 3, seed=1))


def test_contrast_and_gaussian_noise_formulas():
    x = images(2)
    c = SEVERITY_PARAMS["contrast"][2]
    f = x / 255.0
    mean = f.mean(axis=(1, 2), keepdims=True)
    expected = (np.clip((f - mean) * c + mean, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(corrupt(x, "contrast", 3), expected)
    # gaussian noise: x + N(0, c²), clipped; the noise std matches the table
    flat = np.full((1, 64, 64, 3), 128, np.uint8)
    noise = corrupt(flat, "gaussian_noise", 5).astype(float) / 255 - 128 / 255
    assert noise.std() == pytest.approx(SEVERITY_PARAMS["gaussian_noise"][4], rel=0.05)


@pytest.mark.parametrize(("name", "channel"), [("brightness", 2), ("saturate", 1)])
def test_hsv_corruptions_match_an_hsv_round_trip(name, channel):
    x = images(1, size=6)
    x[0, 0, 0] = 0  # black pixel
    x[0, 0, 1] = 90  # grey pixel
    out = corrupt(x, name, 5).astype(int)
    c = SEVERITY_PARAMS[name][4]
    for i in range(6):
        for j in range(6):
            hsv = list(colorsys.rgb_to_hsv(*(x[0, i, j] / 255.0)))
            if name == "brightness":
                hsv[2] = min(max(hsv[2] + c, 0), 1)
            else:
                hsv[1] = min(max(hsv[1] * c[0] + c[1], 0), 1)
            want = (np.clip(colorsys.hsv_to_rgb(*hsv), 0, 1) * 255).astype(np.uint8).astype(int)
            assert np.abs(out[0, i, j] - want).max() <= 1, (i, j, out[0, i, j], want)


def test_zoom_matches_scipy_and_defocus_kernel_is_a_normalised_disk():
    x = np.random.default_rng(0).random((2, 27, 27, 3)).astype(np.float32)
    for factor in (1.01, 1.11, 1.26):
        np.testing.assert_allclose(_bilinear_zoom(x, factor), ndimage.zoom(x, (1, factor, factor, 1), order=1),
                                   atol=1e-5)
    for radius, alias in SEVERITY_PARAMS["defocus_blur"]:
        k = _disk_kernel(radius, alias)
        assert k.sum() == pytest.approx(1.0) and k.shape[0] % 2 == 1
        np.testing.assert_allclose(k, k.T)
    # a constant image stays constant under every blur
    flat = np.full((1, 16, 16, 3), 100, np.uint8)
    for name in ("defocus_blur", "gaussian_blur", "zoom_blur"):
        assert np.abs(corrupt(flat, name, 5).astype(int) - 100).max() <= 1


def test_invalid_arguments():
    with pytest.raises(ValueError, match="Expected argument `corruption`"):
        corrupt(images(), "snow", 3)
    with pytest.raises(ValueError, match="Expected argument `severity`"):
        corrupt(images(), "fog", 6)
    with pytest.raises(ValueError, match="uint8 array"):
        corrupt(images().astype(float), "fog", 1)
    with pytest.raises(ValueError, match="Expected argument `num_test_images`"):
        CIFAR10CDataModule(num_test_images=0)


def _fake_root(tmp_path, n_test=30, n_train=40):
    root = tmp_path / "data"
    (root / "cifar10").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("test", n_test), ("train", n_train)):
        with zipfile.ZipFile(root / "cifar10" / f"cifar10_{split}_jpg.zip", "w") as zf:
            for i in range(n):
                cls = ["bird", "airplane", "cat"][i % 3]
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
                zf.writestr(f"{split}/{cls}/{i:04d}.jpg", buf.getvalue())
    return root


def test_datamodule_streams_loaders_and_cache(tmp_path):
    root, cache = _fake_root(tmp_path), tmp_path / "cache"
    images_, labels, classes = load_cifar10(root, "test", cache)
    assert images_.shape == (30, 32, 32, 3) and classes == ["airplane", "bird", "cat"]
    assert (cache / "cifar10_test.npz").exists()
    dm = CIFAR10CDataModule(root=str(root), corruptions=["contrast", "gaussian_noise"], severities=[5, 3],
                            num_test_images=20, include_clean=True, batch_size=8, train_batch_size=4, val_size=10,
                            cache_dir=str(cache))
    assert dm.shift_names == ["contrast-5", "gaussian_noise-5", "contrast-3", "gaussian_noise-3", "clean"]
    dm.setup("test")
    loaders = dm.test_dataloader()
    assert len(loaders) == 5 and len(dm.predict_dataloader()) == 5
    x, y = next(iter(loaders[-1]))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # the stream is a seeded permutation of the test set (classes mixed), the same for every corruption
    clean_images, clean_labels = dm.test_stream()
    assert len(clean_labels) == 20 and not np.all(np.diff(clean_labels) >= 0)
    np.testing.assert_array_equal(dm.corrupted("contrast", 5)[1], clean_labels)
    np.testing.assert_array_equal(dm.corrupted("contrast", 5)[0], corrupt(clean_images, "contrast", 5, seed=0))
    assert len(list((cache / "cifar10c").glob("*.npy"))) == 4
    dm.setup("fit")
    xb, yb, index = next(iter(dm.train_dataloader()))  # IndexedDataset batches (x, y, index), augmented
    assert xb.shape == (4, 3, 32, 32) and index.dtype == torch.int64 and bool((index < 30).all())
    assert len(dm._train_set) == 30 and len(dm._val_set) == 10
    assert sum(len(b[1]) for b in dm.val_dataloader()) == 10
    with pytest.raises(FileNotFoundError, match="Pass `root=`"):
        load_cifar10(tmp_path / "missing", "test", None)


def _torchvision_root(tmp_path, per_batch=4):
    """A tiny copy in torchvision's CIFAR-10 format: pickled dicts with CHW-flattened uint8 rows."""
    import pickle

    folder = tmp_path / "tv" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with (folder / "batches.meta").open("wb") as fh:
        pickle.dump({"label_names": names, "num_vis": 3072}, fh)
    expected = {}
    for split, batches in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        hwc, labels = [], []
        for name in batches:
            img = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
            lab = rng.integers(0, 10, per_batch).tolist()
            with (folder / name).open("wb") as fh:  # torchvision stores bytes keys in the original files
                pickle.dump({b"data": img.transpose(0, 3, 1, 2).reshape(per_batch, -1), b"labels": lab,
                             b"batch_label": name.encode()}, fh)
            hwc.append(img)
            labels += lab
        expected[split] = (np.concatenate(hwc), np.array(labels))
    return folder.parent, expected


def test_load_cifar10_reads_torchvisions_pickle_folder(tmp_path):
    root, expected = _torchvision_root(tmp_path)
    for given in (root, root / "cifar-10-batches-py"):  # the parent folder or the folder itself
        for split in ("train", "test"):
            images_, labels, classes = load_cifar10(given, split, None)
            np.testing.assert_array_equal(images_, expected[split][0])  # HWC, pixel for pixel
            np.testing.assert_array_equal(labels, expected[split][1])
            assert classes[0] == "airplane" and len(classes) == 10 and labels.dtype == np.int64
    # through the DataModule, with a cache that does not collide with the JPEG-zip cache name
    cache = tmp_path / "cache"
    dm = CIFAR10CDataModule(root=str(root), corruptions=["contrast"], num_test_images=4, batch_size=2,
                            train_batch_size=2, val_size=4, cache_dir=str(cache))
    dm.setup("test")
    x, y = next(iter(dm.test_dataloader()[0]))
    assert x.shape == (2, 3, 32, 32)
    dm.setup("fit")
    assert len(dm._train_set) == 16
    assert (cache / "cifar10_test_pickle.npz").exists() and not (cache / "cifar10_test.npz").exists()


def test_load_cifar10_errors_name_the_layouts_and_download_is_offered(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        load_cifar10(tmp_path / "nowhere", "test", None)
    msg = str(err.value)
    assert "cifar10_{train,test}_jpg.zip" in msg and "cifar-10-batches-py" in msg and "download=True" in msg
    # download=True hands over to torchvision (faked here: it writes the tiny copy where torchvision would)
    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            src, _ = _torchvision_root(tmp_path / "src")
            import shutil

            shutil.copytree(src / "cifar-10-batches-py", Path(root) / "cifar-10-batches-py")

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    images_, labels, _ = load_cifar10(tmp_path / "dl", "test", None, download=True)
    assert calls == [(str(tmp_path / "dl"), False, True)] and images_.shape == (4, 32, 32, 3)
