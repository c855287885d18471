"""The console script's CLI: the quickstart recipe runs and logs histograms, the weighting method switches from
the command line, the help introduces this package, and a misspelled rule is one error line."""

from pathlib import Path

import pytest
import yaml

from lightning_reweight.callbacks import LossReweighting, MetricsReport
from lightning_reweight.cli import build_cli, main

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "quickstart.yaml"


def _small_quickstart(tmp_path) -> Path:
    cfg = yaml.safe_load(RECIPE.read_text())
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    cfg["trainer"].update(max_epochs=1, limit_train_batches=4, limit_val_batches=1, enable_progress_bar=False,
                          default_root_dir=str(tmp_path))
    cfg["reweight"]["init_args"].update(warmup_steps=1, log_every_n_steps=1)
    cfg["data"]["init_args"]["image_size"] = 16
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_quickstart_recipe_runs_and_logs_histograms(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = build_cli(["fit", "--config", str(_small_quickstart(tmp_path))])
    assert cli.trainer.global_step == 4
    assert "val/balanced_acc" in cli.trainer.callback_metrics
    assert "reweight/ess" in cli.trainer.callback_metrics  # monitorable
    event_dir = Path(cli.trainer.logger.log_dir)
    acc = EventAccumulator(str(event_dir), size_guidance={"histograms": 0})
    acc.Reload()
    assert "reweight/weights" in acc.Tags()["histograms"]
    assert len(acc.Histograms("reweight/weights")) == 4
    assert (event_dir / "config.yaml").exists()


def test_fit_ends_with_a_one_line_weight_summary(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        cli = build_cli(["fit", "--config", str(_small_quickstart(tmp_path))])
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, LossReweighting)]
    seen = cb.table["count"] > 0
    w = cb.table["weight"][seen]
    lines = [r.getMessage() for r in caplog.records if "weights (last use of each of" in r.getMessage()]
    assert len(lines) == 1
    assert f"of {int(seen.sum())} samples" in lines[0] and f"max {float(w.max()):.2f}" in lines[0]
    assert f"ESS {100 * float(w.sum() ** 2 / (w ** 2).sum()) / w.numel():.1f} %" in lines[0]


@pytest.mark.parametrize("rule", ["kl_dro", "quadratic"])
def test_reweight_key_switches_the_rule_from_the_command_line(rule, tmp_path):
    cli = build_cli(["--config", str(RECIPE), f"--reweight.rule={rule}", "--trainer.logger=false",
                     f"--trainer.default_root_dir={tmp_path}"], run=False)
    reweighting = [c for c in cli.trainer.callbacks if isinstance(c, LossReweighting)]
    assert len(reweighting) == 1 and reweighting[0].rule_name == rule
    assert reweighting[0].warmup_steps == 40  # the recipe's other arguments are kept
    assert any(isinstance(c, MetricsReport) for c in cli.trainer.callbacks)


def test_reweight_null_adds_no_callback(tmp_path):
    cli = build_cli(["--config", str(RECIPE), "--reweight=null", "--trainer.logger=false",
                     f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert not any(isinstance(c, LossReweighting) for c in cli.trainer.callbacks)
    assert None not in cli.trainer.callbacks


def test_help_introduces_this_package(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "Lightning Trainer command line tool" not in out
    for name in ("ImageClassifier", "TabularClassifier", "DigitsDataModule", "AdultDataModule", "LossReweighting",
                 "GroupDRO", "EATA", "--reweight.help"):
        assert name in out, name
    with pytest.raises(SystemExit):
        main(["fit", "--reweight.help", "LossReweighting"])
    out = capsys.readouterr().out
    assert "--reweight.rule" in out and "--reweight.warmup_steps" in out


def test_misspelled_rule_is_one_error_line_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(RECIPE), "--reweight.rule=kl_drow", "--trainer.logger=false",
              f"--trainer.default_root_dir={tmp_path}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "lightning-reweight: error: ValueError: Unknown weight rule 'kl_drow'" in err
    assert "kl_dro" in err and "Traceback" not in err and "Union subtypes" not in err


# ------------------------------------------------------------------- the errors a user meets first: one line each


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Does not validate against any of the Union subtypes" not in err
    lines = [line for line in err.splitlines() if line.startswith("lightning-reweight: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_misspelled_callback_argument_suggests_the_closest(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(RECIPE), "--reweight.warmup", "5", f"--trainer.default_root_dir={tmp_path}"])
    assert exc.value.code == 2
    line = _error_line(capsys)
    assert "Did you mean `--reweight.warmup_steps`?" in line and "--reweight.help LossReweighting" in line


def test_misspelled_model_and_trainer_arguments_suggest_the_closest(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(RECIPE), "--model.init_args.lrr", "0.1"])
    assert exc.value.code == 2
    assert "Did you mean `--model.lr`?" in _error_line(capsys)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(RECIPE), "--trainer.max_epohcs", "3"])
    assert exc.value.code == 2
    assert "Did you mean `--trainer.max_epochs`?" in _error_line(capsys)


def test_missing_recipe_lists_the_recipes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", "recipes/quickstrat.yaml"])
    assert exc.value.code == 2
    line = _error_line(capsys)
    assert "quickstrat.yaml" in line and "which does not exist" in line
    assert "recipes/quickstart.yaml" in line and "recipes/group_dro_adult.yaml" in line


def test_shipped_recipe_is_found_from_any_directory(tmp_path, monkeypatch):
    from lightning_reweight.cli import _resolve_recipe_paths, recipe_names, recipes_dir

    monkeypatch.chdir(tmp_path)  # no recipes/ here: the shipped copy is read
    args = _resolve_recipe_paths(["fit", "--config", "recipes/quickstart.yaml", "--config=recipes/rs2.yaml"])
    assert args[2] == str(recipes_dir() / "quickstart.yaml") and args[3] == f"--config={recipes_dir() / 'rs2.yaml'}"
    assert "recipes/quickstart.yaml" in recipe_names()
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "quickstart.yaml").write_text("{}")  # a local file wins
    assert _resolve_recipe_paths(["--config", "recipes/quickstart.yaml"])[1] == "recipes/quickstart.yaml"


def test_missing_data_folder_is_one_error_line(tmp_path, capsys):
    missing = tmp_path / "no_such_copy"
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(ROOT / "recipes" / "group_dro_adult.yaml"), f"--data.init_args.root={missing}",
              "--trainer.fast_dev_run=true", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"])
    assert exc.value.code == 1
    line = _error_line(capsys)
    assert str(missing) in line and "Pass `root=`" in line
