"""Test helpers shared across the suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl

REPO = Path(__file__).resolve().parents[1]


def ddp_env(**extra: str) -> dict[str, str]:
    """The environment of a multi-process test script: one thread, the repository importable, and ``_site`` first
    on ``PYTHONPATH``, so every rank destroys its process group at exit after a barrier (its ``sitecustomize``)."""
    site = REPO / "tests" / "ddp_scripts" / "_site"
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]), **extra)


def run_ddp_script(script: str | Path, out_dir: str | Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run a standalone 2-process CPU DDP script (``Trainer(accelerator="cpu", devices=2, strategy="ddp")``).

    Lightning's ``ddp`` strategy re-launches the script itself for rank 1, so the script must be a real file
    that calls ``trainer.fit`` under ``if __name__ == "__main__":``. ``out_dir`` is passed as the first
    argument; each rank writes its results there. Raises with the script's output if it fails.
    """
    env = ddp_env()
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(script), str(out_dir), *args], cwd=str(out_dir), env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"DDP script {script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def make_trainer(callbacks, tmp_path, **kw) -> pl.Trainer:
    """A quiet single-process CPU Trainer for unit tests (``kw`` overrides the defaults)."""
    args = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    args.update(kw)
    return pl.Trainer(callbacks=callbacks, **args)
