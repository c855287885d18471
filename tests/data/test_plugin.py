"""SamplingDataModule: installs indexing + a sampler into any DataModule's train loader, keeps its settings,
delegates the rest, resumes exactly, and works from LightningCLI YAML."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset, default_collate

from lightning_reweight.callbacks.sampling import SamplerState
from lightning_reweight.data.indexed import IndexedDataset
from lightning_reweight.data.plugin import SamplingDataModule, create_sampler, resolve_weights
from lightning_reweight.samplers import WeightedSampler
from lightning_reweight.samplers.rs2 import RS2Sampler

N = 30


def _collate(samples):  # a user collate that expects the ORIGINAL (x, y) samples
    assert all(len(s) == 2 for s in samples)
    batch = default_collate(samples)
    return {"x": batch[0], "y": batch[1]}


class UserDM(pl.LightningDataModule):
    num_classes = 3

    def __init__(self, collate=None, tag: str = "default"):
        super().__init__()
        self.save_hyperparameters(ignore=["collate"])
        self.collate = collate
        self.setup_calls = []

    def setup(self, stage):
        self.setup_calls.append(stage)
        g = torch.Generator().manual_seed(0)
        y = torch.tensor([0] * 20 + [1] * 7 + [2] * 3)
        self.train = TensorDataset(torch.randn(N, 2, generator=g), y)
        self.train.targets = y

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=4, shuffle=True, drop_last=True, pin_memory=False,
                          collate_fn=self.collate or default_collate)

    def val_dataloader(self):
        return DataLoader(self.train, batch_size=8)

    def state_dict(self):
        return {"user": 1}


def test_installs_sampler_and_keeps_loader_settings():
    dm = SamplingDataModule(UserDM(), sampler="weighted", sampler_kwargs={"weights": "class_balanced"}, seed=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, WeightedSampler) and loader.sampler.seed == 3
    assert loader.batch_size == 4 and loader.drop_last is True
    assert isinstance(loader.dataset, IndexedDataset)
    x, y, index = next(iter(loader))
    assert x.shape == (4, 2) and index.dtype == torch.int64
    # class-balanced: every class carries 1/3 of the sampling mass
    w = loader.sampler.weights
    for c in range(3):
        assert float(w[loader.dataset.targets == c].sum() / w.sum()) == pytest.approx(1 / 3)
    assert dm.num_classes == 3  # attribute delegation
    assert dm.state_dict() == {"user": 1}
    assert len(dm.val_dataloader()) == 4


def test_custom_collate_sees_original_samples():
    dm = SamplingDataModule(UserDM(collate=_collate), sampler="rs2", sampler_kwargs={"fraction": 0.5})
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, RS2Sampler) and len(loader.sampler) == 15
    batch, index = next(iter(loader))
    assert set(batch) == {"x", "y"} and index.shape == (4,)


def test_none_keeps_shuffle_and_plain_dataset_is_accepted():
    dm = SamplingDataModule(UserDM(), sampler="none")
    dm.setup("fit")
    assert isinstance(dm.train_dataloader().sampler, RandomSampler)
    ds = TensorDataset(torch.randn(10, 2), torch.zeros(10, dtype=torch.long))
    dm2 = SamplingDataModule(ds, sampler="weighted", sampler_kwargs={"weights": [1.0] * 10}, batch_size=5,
                             num_workers=0)
    assert len(dm2.train_dataloader()) == 2


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="one of"):
        SamplingDataModule(UserDM(), sampler="nope")
    with pytest.raises(ValueError, match="batch_size"):
        SamplingDataModule(TensorDataset(torch.ones(3)), sampler="none")
    with pytest.raises(TypeError, match="LightningDataModule"):
        SamplingDataModule(42)
    ds = IndexedDataset(TensorDataset(torch.ones(4)))
    with pytest.raises(ValueError, match="one entry per training sample"):
        create_sampler("weighted", ds, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="per-sample targets"):
        create_sampler("weighted", ds, weights="class_balanced")
    with pytest.raises(ValueError, match="class_balanced"):
        resolve_weights("inverse", ds)
    with pytest.raises(ValueError, match="non-negative"):
        create_sampler("weighted", ds, weights=[1.0, -1.0, 1.0, 1.0])


def test_plain_xy_set_without_labels_names_the_samplingdatamodule_fix():
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    plain = TensorDataset(torch.randn(6, 2), y)  # (x, y) with no `.targets`: the labels are not known by name
    dm = SamplingDataModule(plain, sampler="weighted", sampler_kwargs={"weights": "class_balanced"}, batch_size=2)
    with pytest.raises(ValueError, match=r"pass `targets=` to SamplingDataModule"):
        dm.train_dataloader()
    dm = SamplingDataModule(plain, sampler="weighted", sampler_kwargs={"weights": "group_balanced"}, batch_size=2)
    with pytest.raises(ValueError, match=r"pass `groups=` to SamplingDataModule"):
        dm.train_dataloader()
    fixed = SamplingDataModule(plain, sampler="weighted", sampler_kwargs={"weights": "class_balanced"}, batch_size=2,
                               targets=y)  # the fix the message names
    sampler = fixed.train_dataloader().sampler
    assert isinstance(sampler, WeightedSampler)
    assert torch.allclose(sampler.weights.double(), 1.0 / torch.bincount(y)[y].double())


class _Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 3)
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.seen.append(index.tolist())
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fit_adds_sampler_state_and_resumes_exactly(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(root, **kw):
        model = _Model()
        dm = SamplingDataModule(UserDM(), sampler="weighted", sampler_kwargs={"weights": "sqrt_class_balanced"})
        callbacks = kw.pop("callbacks", [])
        trainer = pl.Trainer(default_root_dir=root, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=callbacks, **kw)
        trainer.fit(model, datamodule=dm, ckpt_path=kw.get("ckpt_path"))
        return model, trainer

    full, trainer = run(tmp_path / "full", max_epochs=2, enable_checkpointing=False)
    assert sum(isinstance(cb, SamplerState) for cb in trainer.callbacks) == 1
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=10, save_top_k=-1)
    first, _ = run(tmp_path / "a", max_epochs=2, max_steps=10, callbacks=[ckpt])
    model = _Model()
    trainer = pl.Trainer(default_root_dir=tmp_path / "b", accelerator="cpu", logger=False, max_epochs=2,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=SamplingDataModule(UserDM(), sampler="weighted",
                                                     sampler_kwargs={"weights": "sqrt_class_balanced"}),
                ckpt_path=next((tmp_path / "ck").glob("*.ckpt")))
    assert first.seen + model.seen == full.seen and len(full.seen) == 14


def test_from_lightning_cli_yaml(tmp_path):
    from lightning_reweight.cli import build_cli

    config = tmp_path / "c.yaml"
    config.write_text(f"""
model:
  class_path: tests.data.test_plugin._Model
data:
  class_path: lightning_reweight.data.plugin.SamplingDataModule
  init_args:
    datamodule:
      class_path: tests.data.test_plugin.UserDM
      init_args: {{tag: inner}}
    sampler: weighted
    sampler_kwargs: {{weights: class_balanced, num_samples: 12}}
    seed: 5
trainer:
  max_epochs: 1
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  default_root_dir: {tmp_path}
""")
    cli = build_cli(["fit", "--config", str(config)])
    assert isinstance(cli.datamodule.sampler, WeightedSampler) and cli.datamodule.sampler.seed == 5
    assert cli.trainer.global_step == 3  # 12 draws / batch 4
    # LightningCLI hands a nested DataModule the outer one's hparams; the plugin restores the inner's own
    assert dict(cli.datamodule.datamodule.hparams) == {"tag": "inner", "collate": None}
