"""Every recipe parses and instantiates through the CLI; the digits recipes also run one step."""

import os
from pathlib import Path

import pytest
import yaml

from lightning_reweight.cli import build_cli

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
# ../shared beside the repository (CI), or LIGHTNING_REWEIGHT_SHARED: a folder holding datasets/
SHARED = Path(os.environ.get("LIGHTNING_REWEIGHT_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "datasets"


def _needs_shared(cfg: dict) -> bool:
    return "datasets" in yaml.safe_dump(cfg.get("data", {})) or "root" in yaml.safe_dump(cfg.get("data", {}))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_instantiates(recipe, tmp_path, monkeypatch):
    cfg = yaml.safe_load(recipe.read_text())
    if _needs_shared(cfg) and not SHARED.exists():
        pytest.skip("needs ../shared/datasets")
    monkeypatch.chdir(recipe.parents[1])  # recipes use paths relative to the repo root
    cli = build_cli(["--config", str(recipe), "--trainer.logger=false",
                     f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert cli.model is not None and cli.datamodule is not None


DIGITS = [r for r in RECIPES if "DigitsDataModule" in r.read_text()]


@pytest.mark.parametrize("recipe", DIGITS, ids=[r.stem for r in DIGITS])
def test_digits_recipe_fast_dev_run(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(recipe.parents[1])
    cli = build_cli(["fit", "--config", str(recipe), "--trainer.fast_dev_run=2", "--trainer.logger=false",
                     f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step >= 1


def test_lm_recipe_fast_dev_run(tmp_path, monkeypatch):
    from lightning_reweight.data.text import default_text_path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "lm_reweight.yaml"
    if not default_text_path().is_file():
        pytest.skip(f"needs {default_text_path()}")
    monkeypatch.chdir(recipe.parents[1])
    cli = build_cli(["fit", "--config", str(recipe), "--trainer.fast_dev_run=true", "--trainer.logger=false",
                     f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step == 1 and "val/bpc" in cli.trainer.callback_metrics


def test_lm_litdata_recipe_fast_dev_run(tmp_path, monkeypatch):
    pytest.importorskip("litdata")
    from lightning_reweight.data.text import default_text_path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "lm_litdata.yaml"
    if not default_text_path().is_file():
        pytest.skip(f"needs {default_text_path()}")
    monkeypatch.chdir(recipe.parents[1])
    cli = build_cli(["fit", "--config", str(recipe), "--trainer.fast_dev_run=true", "--trainer.logger=false",
                     f"--trainer.default_root_dir={tmp_path}", f"--data.data_dir={tmp_path / 'chunks'}"])
    assert cli.trainer.global_step == 1 and "val/bpc" in cli.trainer.callback_metrics
    table = cli.trainer.callbacks  # the keyed table has one row per window of the training text
    reweight = next(cb for cb in table if type(cb).__name__ == "LossReweighting")
    assert reweight.table.num_samples == cli.datamodule.num_keys > 1000


def test_mixing_recipe_fast_dev_run(tmp_path, monkeypatch):
    from lightning_reweight.data.multilingual import default_multilingual_root

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "mixing_cooldown.yaml"
    if not default_multilingual_root().is_dir():
        pytest.skip(f"needs {default_multilingual_root()}")
    monkeypatch.chdir(recipe.parents[1])
    cli = build_cli(["fit", "--config", str(recipe), "--trainer.fast_dev_run=true", "--trainer.logger=false",
                     f"--trainer.default_root_dir={tmp_path}"])
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 1 and "val/bpc_worst" in metrics and "val/bpc/thai" in metrics
    assert cli.datamodule.mixture.position == 16  # one step of 16 sequences, counted by StreamMixing
