"""IndexedDataset and indexed_collate for tuple, dict and tensor samples."""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_reweight import IndexedDataset, indexed_collate


class Dicts(Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, i):
        return {"image": torch.full((2,), float(i)), "label": i % 2}


class Tensors(Dataset):
    targets = [0, 1, 0, 1]

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.tensor([float(i)])


def test_tuple_samples_with_groups():
    ds = IndexedDataset(TensorDataset(torch.arange(6.0), torch.arange(6) % 3), groups=[0, 1, 1, 0, 2, 2])
    x, y, index, group = next(iter(DataLoader(ds, batch_size=6)))
    assert index.tolist() == list(range(6)) and group.tolist() == [0, 1, 1, 0, 2, 2]
    assert ds.num_groups == 3 and ds.targets is None


def test_dict_samples_get_index_group_target():
    ds = IndexedDataset(Dicts(), groups=[0, 0, 1, 1, -1], targets=[0, 1, 0, 1, 0])
    batch = next(iter(DataLoader(ds, batch_size=5)))
    assert batch["index"].tolist() == [0, 1, 2, 3, 4]
    assert batch["group"].tolist() == [0, 0, 1, 1, -1]
    assert batch["target"].tolist() == [0, 1, 0, 1, 0]


def test_tensor_samples_and_target_inference():
    ds = IndexedDataset(Tensors())
    x, index = next(iter(DataLoader(ds, batch_size=4)))
    assert x.shape == (4, 1) and index.tolist() == [0, 1, 2, 3]
    assert ds.targets.tolist() == [0, 1, 0, 1]


def test_custom_collate_sees_original_samples():
    seen = []

    def my_collate(samples):
        seen.append(samples)
        return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples])

    ds = IndexedDataset(TensorDataset(torch.arange(4.0), torch.arange(4)), groups=[1, 1, 0, 0])
    (x, y), index, group = next(iter(DataLoader(ds, batch_size=4, collate_fn=indexed_collate(my_collate, with_group=True))))
    assert all(len(s) == 2 for s in seen[0])  # user collate saw (x, y) only
    assert index.tolist() == [0, 1, 2, 3] and group.tolist() == [1, 1, 0, 0] and y.tolist() == [0, 1, 2, 3]

    def dict_collate(samples):
        assert "index" not in samples[0]
        return {"image": torch.stack([s["image"] for s in samples])}

    batch = next(iter(DataLoader(IndexedDataset(Dicts()), batch_size=3, collate_fn=indexed_collate(dict_collate))))
    assert batch["index"].tolist() == [0, 1, 2] and batch["image"].shape == (3, 2)


def test_bad_input():
    with pytest.raises(ValueError, match="one entry per sample"):
        IndexedDataset(TensorDataset(torch.arange(3.0)), groups=[0, 1])
    with pytest.raises(TypeError, match="integer ids"):
        IndexedDataset(TensorDataset(torch.arange(2.0)), groups=[0.5, 1.0])
    with pytest.raises(ValueError, match="≥ 0"):
        IndexedDataset(TensorDataset(torch.arange(2.0)), groups=[-2, 0])
    ds = IndexedDataset(TensorDataset(torch.arange(2.0)))
    with pytest.raises(ValueError, match="already an IndexedDataset"):
        IndexedDataset(ds)
