"""``lightning-reweight``: LightningCLI with any LightningModule / DataModule chosen by ``class_path``.

    lightning-reweight fit --config recipes/quickstart.yaml
    lightning-reweight test --config recipes/quickstart.yaml --ckpt_path path/to.ckpt
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """The LightningCLI behind the console script (``args``/``run`` as in ``LightningCLI``)."""
    return LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main() -> None:
    """Console-script entry point (returns ``None`` so the exit status is 0 on success)."""
    build_cli()


if __name__ == "__main__":  # pragma: no cover
    main()
