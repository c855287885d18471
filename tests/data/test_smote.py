"""SMOTE plugin: imblearn's SMOTE on tabular and image data, reproducible by seed, wired into a DataModule."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight.data.indexed import IndexedDataset
from lightning_reweight.data.smote import SMOTEDataModule, smote_resample


def _imbalanced(n0=60, n1=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(n0, 2, generator=g), torch.randn(n1, 2, generator=g) * 0.3 + 4.0])
    y = torch.tensor([0] * n0 + [1] * n1)
    return x, y


def test_tabular_balances_and_interpolates_between_minority_points():
    x, y = _imbalanced()
    xr, yr, synthetic = smote_resample(x, y, seed=0)
    assert torch.bincount(yr).tolist() == [60, 60]
    assert torch.equal(xr[:72], x) and torch.equal(yr[:72], y) and not bool(synthetic[:72].any())
    new = xr[synthetic]
    assert new.shape == (48, 2) and bool((yr[synthetic] == 1).all())
    lo, hi = x[y == 1].min(0).values, x[y == 1].max(0).values  # inside the minority bounding box
    assert bool(((new >= lo - 1e-5) & (new <= hi + 1e-5)).all())
    # each synthetic point lies on a segment between two minority points: distance to the set of segments ~ 0
    m = x[y == 1]
    a, b = m[:, None, :], m[None, :, :]
    d = b - a
    t = ((new[:, None, None, :] - a) * d).sum(-1) / d.pow(2).sum(-1).clamp_min(1e-12)
    proj = a + t.clamp(0, 1)[..., None] * d
    dist = (new[:, None, None, :] - proj).norm(dim=-1).flatten(1).min(1).values
    assert float(dist.max()) < 1e-4


def test_reproducible_by_seed():
    x, y = _imbalanced()
    a = smote_resample(x, y, seed=1)[0]
    assert torch.equal(a, smote_resample(x, y, seed=1)[0])
    assert not torch.equal(a, smote_resample(x, y, seed=2)[0])


def test_images_keep_their_shape_and_strategy_dict():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 4, 4, generator=g)
    y = torch.tensor([0] * 30 + [1] * 10)
    xr, yr, _ = smote_resample(x, y, sampling_strategy={1: 20}, k_neighbors=3)
    assert xr.shape == (50, 1, 4, 4) and torch.bincount(yr).tolist() == [30, 20]


def test_bad_input_raises():
    x, y = _imbalanced(n1=4)
    with pytest.raises(ValueError, match="more than `k_neighbors`=5"):
        smote_resample(x, y)
    with pytest.raises(ValueError, match="one integer label per row"):
        smote_resample(x, y[:-1])
    with pytest.raises(ValueError, match="one integer label per row"):
        smote_resample(x, y.float())
    with pytest.raises(ValueError, match="two classes"):
        smote_resample(x, torch.zeros(len(x), dtype=torch.long))
    with pytest.raises(ValueError, match="k_neighbors"):
        SMOTEDataModule(TensorDataset(x, y), k_neighbors=0, batch_size=4)


class _DM(pl.LightningDataModule):
    def setup(self, stage):
        x, y = _imbalanced()
        self.train = IndexedDataset(TensorDataset(x, y), groups=(torch.arange(72) % 2))

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=16, shuffle=True)


class _Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        x, y, index, group = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_datamodule_replaces_training_set_and_trains(tmp_path):
    dm = SMOTEDataModule(_DM(), seed=0)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_epochs=1, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(_Model(), datamodule=dm)
    loader = trainer.train_dataloader
    assert len(loader.dataset) == 120 and torch.bincount(loader.dataset.targets).tolist() == [60, 60]
    assert int(dm.is_synthetic.sum()) == 48
    groups = loader.dataset.groups
    assert bool((groups[72:] == -1).all()) and torch.equal(groups[:72], torch.arange(72) % 2)
    assert trainer.global_step == 8  # ceil(120 / 16)
    again = SMOTEDataModule(_DM(), seed=0)
    again.setup("fit")
    assert torch.equal(again.train_dataloader().dataset.dataset.tensors[0], loader.dataset.dataset.tensors[0])
