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

import difflib
import importlib
import inspect
import re
import sys
from pathlib import Path
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

__all__ = ["ReweightCLI", "build_cli", "main", "recipe_names", "recipes_dir", "weight_summary_lines"]

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

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """As LightningCLI's, but with ``friendly_errors`` a bad argument is one ``error:`` line that names the
        closest valid argument (a misspelled ``--reweight.warmup`` suggests ``--reweight.warmup_steps``) and a
        missing ``--config`` file lists the recipes."""
        if not self.friendly_errors or isinstance(args, dict):
            return super().parse_arguments(parser, args)
        action = getattr(parser, "_subcommands_action", None)
        for p in [parser, *(action._name_parser_map.values() if action is not None else [])]:
            p.exit_on_error = False  # raise, so the message can be explained (below) instead of printed
        try:
            super().parse_arguments(parser, args)
        except Exception as err:  # jsonargparse's ArgumentError (argparse's), with the whole union message
            argv = list(sys.argv[1:] if args is None else args)
            print(f"lightning-reweight: error: {_explain_parse_error(str(err), argv, parser)}", file=sys.stderr)
            raise SystemExit(2) from None

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


def recipes_dir() -> Path:
    """The folder holding the shipped recipes: ``recipes/`` in a source checkout, ``lightning_reweight/recipes/``
    in an installed wheel."""
    packaged = Path(__file__).resolve().parent / "recipes"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "recipes"


def recipe_names() -> list[str]:
    """The shipped recipes, as ``recipes/NAME.yaml``."""
    return sorted(f"recipes/{p.name}" for p in recipes_dir().glob("*.yaml"))


def _resolve_recipe_paths(argv: list[str]) -> list[str]:
    """``--config recipes/NAME.yaml`` reads the shipped recipe when the working directory has no such file (an
    installed package run from anywhere); any other path is left as given."""
    out = list(argv)
    for i, arg in enumerate(out):
        value = arg.split("=", 1)[1] if arg.startswith("--config=") else (out[i + 1] if arg == "--config" and
                                                                          i + 1 < len(out) else None)
        if value is None or Path(value).exists():
            continue
        parts = Path(value).parts
        shipped = recipes_dir() / parts[-1]
        if len(parts) == 2 and parts[0] == "recipes" and shipped.is_file():
            if arg == "--config":
                out[i + 1] = str(shipped)
            else:
                out[i] = f"--config={shipped}"
    return out


def _init_parameters(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return [p.name for p in inspect.signature(cls.__init__).parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except Exception:  # an unimportable class: no suggestion
        return []


def _explain_parse_error(message: str, argv: list[str], parser: LightningArgumentParser) -> str:
    """jsonargparse's message, shortened to its cause, with the closest valid argument or the recipe list."""
    missing = re.search(r'Parser key "config": File does not exist: (.*)', message)
    if missing:
        return (f"Expected --config to name a recipe file, but got {missing.group(1).strip()}, which does not exist. "
                f"Recipes: {', '.join(recipe_names())} (run from the repository root, or give the file's path).")
    unknown = re.search(r'Parser key "([\w.]+)":.*?class_path \'([\w.]+)\':\s*Option \'(\w+)\' is not accepted',
                        message, flags=re.S)
    if unknown:
        key, class_path, name = unknown.groups()
        cls = class_path.rpartition(".")[2]
        close = difflib.get_close_matches(name, _init_parameters(class_path), n=1, cutoff=0.5)
        hint = f"Did you mean `--{key}.{close[0]}`? " if close else ""
        return (f"Expected an argument of {cls} after `--{key}.`, but got `{name}`. {hint}"
                f"`--{key}.help {cls}` lists its arguments.")
    subcommand = next((a for a in argv if a in ("fit", "validate", "test", "predict")), None)
    action = getattr(parser, "_subcommands_action", None)
    sub = action._name_parser_map.get(subcommand) if action is not None and subcommand else None
    if sub is not None:
        known = [s for s in sub._option_string_actions if s.startswith("--")]
        groups = {k.rsplit(".", 1)[0] for k in known if "." in k}  # keys whose arguments are listed one by one
        for arg in argv:
            option = arg.split("=", 1)[0]
            if not option.startswith("--") or option in known or any(
                    option.startswith(k + ".") for k in known if k not in groups):  # a class's own arguments
                continue
            close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            return f"Expected a known argument, but got `{option}`.{hint} `lightning-reweight {subcommand} --help` lists them."
    return message


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
    """Console-script entry point (returns ``None`` so the exit status is 0 on success).

    Errors a user meets first are one ``error:`` line, not a traceback: a bad argument (exit status 2, with the
    closest valid one), a missing ``--config`` file (the recipes listed), a missing data folder (exit status 1,
    the data module's message naming the path and the expected layout).
    """
    if args is None:  # the console script: rewrite sys.argv (LightningCLI warns when given both)
        sys.argv[1:] = _resolve_recipe_paths(sys.argv[1:])
    else:
        args = _resolve_recipe_paths(list(args))
    try:
        build_cli(args, friendly_errors=True)
    except FileNotFoundError as err:  # a data module's "Expected ... under ROOT" message, which names the fix
        print(f"lightning-reweight: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":  # pragma: no cover
    main()
