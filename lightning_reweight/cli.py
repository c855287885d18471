"""``lightning-reweight``: a LightningCLI for per-sample weighting, with this package's modules listed.

    lightning-reweight fit --config recipes/quickstart.yaml
    lightning-reweight fit --config recipes/quickstart.yaml --reweight.rule=kl_dro
    lightning-reweight test --config recipes/tta_tent.yaml --ckpt_path path/to.ckpt

Besides LightningCLI's ``--trainer``, ``--model`` and ``--data``, the recipe's weighting method has its own
top-level key, ``--reweight`` (any ``Callback``, chosen by ``class_path``): its arguments are switched with
``--reweight.ARG VALUE`` (jsonargparse cannot address one element of ``--trainer.callbacks`` by index).
Further callbacks (reports, checkpoints) stay in ``trainer.callbacks``.
"""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

# imported so that jsonargparse lists them as known subclasses in --help and accepts their short names
import lightning_reweight.callbacks as _callbacks
import lightning_reweight.data as _data
import lightning_reweight.models as _models
from lightning_reweight.callbacks.base import weighting_callbacks
from lightning_reweight.callbacks.logging import weight_summary

__all__ = ["ReweightCLI", "build_cli", "main", "weight_summary_lines"]

for _name in _models.__all__:  # the models package loads its modules lazily: load them all for the CLI
    getattr(_models, _name)


def _public_classes(module: Any, base: type) -> list[str]:
    return sorted(name for name in getattr(module, "__all__", [])
                  if isinstance(getattr(module, name), type) and issubclass(getattr(module, name), base))


def _description() -> str:
    models = ", ".join(_public_classes(_models, pl.LightningModule))
    data = ", ".join(_public_classes(_data, pl.LightningDataModule))
    callbacks = ", ".join(c for c in _public_classes(_callbacks, Callback)
                          if c not in ("WeightingCallback", "EntropyAdaptation"))  # base classes
    return (
        "lightning-reweight: train and test any LightningModule with per-sample weighting, sampling and test-time "
        "adaptation callbacks (a LightningCLI). Recipes: recipes/*.yaml (--config). "
        f"Modules (--model): {models}. DataModules (--data): {data}. Weighting / sampling / TTA callbacks "
        f"(--reweight, or --trainer.callbacks): {callbacks}. Any other LightningModule, LightningDataModule or "
        "Callback is taken by its import path. Arguments of a class: --model.help CLASS (e.g. --model.help "
        "ImageClassifier, --reweight.help LossReweighting); switch an argument with --reweight.ARG VALUE "
        "(e.g. --reweight.rule kl_dro)."
    )


class ReweightCLI(LightningCLI):
    """LightningCLI with a top-level ``reweight`` key for the recipe's weighting callback and errors without
    tracebacks for bad arguments.

    ``reweight`` takes one ``Callback`` by ``class_path`` (or ``null``); it is appended to the Trainer's callbacks.
    With ``friendly_errors``, an exception raised while the classes are built (e.g. a misspelled rule name)
    is printed as one ``error:`` line naming the cause, and the process exits with status 2.
    """

    def __init__(self, *args: Any, friendly_errors: bool = False, **kwargs: Any):
        self.friendly_errors = friendly_errors
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(Callback, "reweight", subclass_mode=True, required=False)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            if not self.friendly_errors:
                raise
            root = err
            while root.__cause__ is not None:  # jsonargparse wraps the class's own error in its union message
                root = root.__cause__
            sub = self.subcommand or "fit"
            print(f"lightning-reweight: error: {type(root).__name__}: {root}\n"
                  f"(raised while building the {sub} configuration; `lightning-reweight {sub} --reweight.help CLASS` "
                  f"(or --model.help / --data.help) lists a class's arguments, `--print_config` shows the "
                  "configuration)", file=sys.stderr)
            raise SystemExit(2) from None

    def after_fit(self) -> None:
        """One line per weighting callback with a per-sample table: the weights the last epoch used."""
        for line in weight_summary_lines(self.trainer):
            rank_zero_info(line)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        parser = self._parser(self.subcommand)
        keys = list(parser.callback_keys)
        present = [k for k in keys if self._get(self.config_init, k) is not None]
        parser.callback_keys = present  # an unset `reweight:` adds no callback
        try:
            return super().instantiate_trainer(**kwargs)
        finally:
            parser.callback_keys = keys


def weight_summary_lines(trainer: pl.Trainer) -> list[str]:
    """``"<prefix> weights (last use of each of N samples): mean 1.00, max 3.21, min 0.12, ESS 81.3 %"`` for every
    ``WeightingCallback`` that keeps a per-sample table (samples never drawn are left out)."""
    lines = []
    for cb in weighting_callbacks(trainer):
        table = cb.table
        if table is None or "weight" not in table.columns or "count" not in table.columns:
            continue
        seen = table["count"] > 0
        if not bool(seen.any()):
            continue
        stats = weight_summary(table["weight"][seen])
        lines.append(f"{cb.prefix} weights (last use of each of {int(seen.sum())} samples): mean {stats['mean']:.2f}, "
                     f"max {stats['max']:.2f}, min {stats['min']:.2f}, ESS {100 * stats['ess_frac']:.1f} %")
    return lines


def build_cli(args: list[str] | None = None, run: bool = True, friendly_errors: bool = False) -> ReweightCLI:
    """The CLI behind the console script (``args``/``run`` as in ``LightningCLI``)."""
    return ReweightCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": _description(), "prog": "lightning-reweight"},
        args=args,
        run=run,
        friendly_errors=friendly_errors,
    )


def main(args: list[str] | None = None) -> None:
    """Console-script entry point (returns ``None`` so the exit status is 0 on success)."""
    build_cli(args, friendly_errors=True)


if __name__ == "__main__":  # pragma: no cover
    main()
