"""The quickstart recipe runs through the console script's LightningCLI and logs weight histograms."""

from pathlib import Path

import yaml

from lightning_reweight.cli import build_cli

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"


def test_quickstart_recipe_runs_and_logs_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = yaml.safe_load(RECIPE.read_text())
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    cfg["trainer"].update(max_epochs=1, limit_train_batches=4, limit_val_batches=1, enable_progress_bar=False,
                          default_root_dir=str(tmp_path))
    cfg["trainer"]["callbacks"][0]["init_args"].update(warmup_steps=1, log_every_n_steps=1)
    cfg["model"]["init_args"]["model_name"] = "resnet10t"
    cfg["data"]["init_args"]["image_size"] = 16
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = build_cli(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 4
    assert "val/balanced_acc" in cli.trainer.callback_metrics
    event_dir = Path(cli.trainer.logger.log_dir)
    acc = EventAccumulator(str(event_dir), size_guidance={"histograms": 0})
    acc.Reload()
    assert "reweight/weights" in acc.Tags()["histograms"]
    assert len(acc.Histograms("reweight/weights")) == 4
    assert (event_dir / "config.yaml").exists()
