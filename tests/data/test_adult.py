"""AdultDataModule on a tiny synthetic file in the UCI format; TabularClassifier; the Adult recipes."""

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_reweight.callbacks.febs import FairErrorBoundScaling
from lightning_reweight.callbacks.group_dro import GroupDRO
from lightning_reweight.data.adult import RACE_GROUPS, AdultDataModule, group_ids, load_adult
from lightning_reweight.models.tabular import TabularClassifier

REPO = Path(__file__).resolve().parents[2]


def _row(rng, test=False):
    race = rng.choice(list(RACE_GROUPS))
    sex = rng.choice(["Male", "Female"])
    label = rng.choice(["<=50K", ">50K"]) + ("." if test else "")
    return ", ".join(map(str, [
        rng.integers(17, 80), rng.choice(["Private", "State-gov", "?"]), rng.integers(10000, 500000),
        rng.choice(["Bachelors", "HS-grad"]), rng.integers(1, 16), rng.choice(["Never-married", "Divorced"]),
        rng.choice(["Sales", "Tech-support"]), rng.choice(["Husband", "Wife", "Own-child"]), race, sex,
        rng.choice([0, 0, 2174]), rng.choice([0, 0, 1902]), rng.integers(10, 60), "United-States", label]))


@pytest.fixture
def adult_root(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "adult.data").write_text("\n".join(_row(rng) for _ in range(120)) + "\n")
    (tmp_path / "adult.test").write_text("|1x3 Cross validator\n" + "\n".join(_row(rng, True) for _ in range(40)) + "\n\n")
    return tmp_path


def test_load_and_groups(adult_root):
    cols = load_adult(adult_root / "adult.test")
    assert len(cols["age"]) == 40  # header line and blank line skipped
    assert set(cols["income"]) <= {"<=50K", ">50K"}  # trailing "." dropped
    cols = {"sex": np.array(["Male", "Female", "Male"], dtype=object),
            "race": np.array(["White", "Other", "Martian"], dtype=object)}
    assert group_ids(cols, "sex").tolist() == [0, 1, 0]
    assert group_ids(cols, "race").tolist() == [0, 4, -1]  # unlisted value -> unknown
    assert group_ids(cols, "sex_race").tolist() == [0, 9, -1]
    with pytest.raises(ValueError, match="group_attribute"):
        group_ids(cols, "age")
    with pytest.raises(FileNotFoundError, match="adult.data"):
        load_adult(adult_root / "missing" / "adult.data")


@pytest.mark.parametrize("attribute,num_groups", [("sex", 2), ("race", 5), ("sex_race", 10)])
def test_datamodule_splits_and_features(adult_root, attribute, num_groups):
    dm = AdultDataModule(root=str(adult_root), group_attribute=attribute, val_fraction=0.25, batch_size=16)
    dm.setup()
    assert dm.num_groups == num_groups and len(dm.group_names) == num_groups
    assert len(dm.train_set) == 90 and len(dm.val_set) == 30 and len(dm.test_set) == 40
    x, y, index, group = next(iter(dm.train_dataloader()))
    assert x.shape == (16, dm.num_features) and x.dtype == torch.float32
    assert set(y.tolist()) <= {0, 1} and index.dtype == torch.int64
    assert int(group.max()) < num_groups
    # continuous features are standardised on the training rows
    train_x = dm.train_set.dataset.tensors[0]
    assert torch.allclose(train_x[:, :6].mean(0), torch.zeros(6), atol=1e-4)
    assert int(dm.group_counts().sum()) == 90
    no_sensitive = AdultDataModule(root=str(adult_root), group_attribute=attribute, include_group_features=False)
    no_sensitive.setup()
    assert no_sensitive.num_features == dm.num_features - 7  # 5 races + 2 sexes dropped


def test_bad_arguments():
    with pytest.raises(ValueError, match="group_attribute"):
        AdultDataModule(group_attribute="age")
    with pytest.raises(ValueError, match="val_fraction"):
        AdultDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="optimizer"):
        TabularClassifier(optimizer="lbfgs")


@pytest.mark.parametrize("callback", [GroupDRO, FairErrorBoundScaling])
def test_tabular_fit_monitor_worst_group_and_reload(adult_root, tmp_path, callback):
    pl.seed_everything(0)
    dm = AdultDataModule(root=str(adult_root), group_attribute="race", val_fraction=0.25, batch_size=16)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc_worst", mode="max")
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback(log_every_n_steps=0), ckpt],
                         default_root_dir=tmp_path)
    model = TabularClassifier(hidden_sizes=[8])
    trainer.fit(model, dm)
    assert ckpt.best_model_score is not None
    metrics = trainer.callback_metrics
    assert {"val/acc", "val/es_acc", "val/es_auc", "val/acc_worst", "val/acc_gap", "val/acc_White"} <= set(metrics)
    assert float(metrics["val/es_acc"]) <= float(metrics["val/acc"]) + 1e-6
    reloaded = TabularClassifier.load_from_checkpoint(ckpt.best_model_path)
    assert reloaded.hparams.in_features == dm.num_features and reloaded.hparams.num_groups == 5
    x = dm.test_set.dataset.tensors[0][:4]
    assert reloaded(x).shape == (4, 2)
    result = trainer.test(model, dm, verbose=False)[0]
    groups = [result[f"test/acc_{name}"] for name in dm.group_names if f"test/acc_{name}" in result]
    assert result["test/acc_worst"] == pytest.approx(min(groups))
    assert result["test/acc_gap"] == pytest.approx(max(groups) - min(groups))


@pytest.mark.parametrize("recipe", ["group_dro_adult", "febs_adult"])
def test_adult_recipes_run(adult_root, tmp_path, recipe, monkeypatch):
    from lightning_reweight.cli import build_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lightning-reweight"])
    build_cli(["fit", "--config", str(REPO / "recipes" / f"{recipe}.yaml"), f"--data.init_args.root={adult_root}",
          "--trainer.max_steps=3", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
          f"--trainer.default_root_dir={tmp_path}"])


def test_any_root_with_an_error_naming_the_expected_layout(tmp_path):
    dm = AdultDataModule(root=str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert "{root}/adult.data" in msg and "{root}/adult.test" in msg and str(tmp_path / "elsewhere") in msg
