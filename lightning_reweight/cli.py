"""``lightning-reweight``: LightningCLI with any LightningModule / DataModule chosen by ``class_path``.

    lightning-reweight fit --config recipes/quickstart.yaml
    lightning-reweight test --config recipes/quickstart.yaml --ckpt_path path/to.ckpt
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Entry point of the console script (``args``/``run`` as in ``LightningCLI``, for tests)."""
    return LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
