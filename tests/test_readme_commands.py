"""Every ``lightning-reweight ...`` command shown in README.md runs (fast dev run), so none can break unnoticed.

The commands are extracted from README.md itself (fenced code blocks and indented command lines), trailing
``# comments`` removed, and run in-process through the console script's ``main`` with
``--trainer.fast_dev_run=true`` and ``--trainer.logger=false`` appended; real-data recipes read
``../shared/datasets`` as a user's would; CIFAR-10-C streams are cut to 200 images and EATA's Fisher to 200
samples (data-size caps, like the step cap), and decoded arrays are cached in the repository's git-ignored
``.cache/`` (a temporary folder holds ``recipes/`` and ``../shared``, so ``runs/``
outputs stay out of the repository; ``LIGHTNING_REWEIGHT_SHARED`` names another folder holding ``datasets/``). A ``test --ckpt_path P`` command whose checkpoint comes from an earlier
``fit`` is given a checkpoint of the recipe's freshly initialised model at ``P`` (a fast dev run saves none).

Marked ``readme``: about 5-30 s per command on a shared CPU (``pytest -m "not readme"`` skips them).
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# CI has ../shared beside the repository; LIGHTNING_REWEIGHT_SHARED points elsewhere (the folder holding datasets/)
SHARED = Path(os.environ.get("LIGHTNING_REWEIGHT_SHARED", ROOT.parent / "shared")) / "datasets"


def readme_commands(text: str) -> list[str]:
    """Every ``lightning-reweight`` command line in fenced code blocks or indented (4-space) lines."""
    commands, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not (fenced or line.startswith("    ")):
            continue
        body = line.strip()
        if body.startswith("$ "):
            body = body[2:]
        if not body.startswith("lightning-reweight "):
            continue
        body = re.sub(r"\s+#.*$", "", body).strip()  # trailing comment
        if body not in commands:
            commands.append(body)
    return commands


COMMANDS = readme_commands(README.read_text())


def test_readme_shows_commands_and_the_extractor_finds_them():
    text = "```bash\nlightning-reweight fit --config a.yaml   # note\n```\n    lightning-reweight test --config b.yaml\n" \
           "lightning-reweight prose line is ignored\n"
    assert readme_commands(text) == ["lightning-reweight fit --config a.yaml", "lightning-reweight test --config b.yaml"]
    assert len(COMMANDS) >= 10
    assert any("--reweight." in c for c in COMMANDS)  # the "switch a rule" example is among them


def _needs_shared(args: list[str]) -> bool:
    config = args[args.index("--config") + 1] if "--config" in args else None
    return config is not None and "../shared/datasets" in (ROOT / config).read_text()


def _write_checkpoint(args: list[str], path: Path) -> None:
    """A checkpoint of the recipe's model as initialised (what `fit` would have written at `path`)."""
    import lightning.pytorch as pl
    import torch

    from lightning_reweight.cli import build_cli

    config = args[args.index("--config") + 1]
    cli = build_cli(["--config", config, "--trainer.logger=false"], run=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": cli.model.state_dict(), "pytorch-lightning_version": pl.__version__,
                "hyper_parameters": dict(cli.model.hparams)}, path)


@pytest.mark.readme
@pytest.mark.parametrize("command", COMMANDS, ids=[re.sub(r"[^\w.=-]+", "_", c[19:])[:80] for c in COMMANDS])
def test_readme_command_runs(command, tmp_path, monkeypatch):
    from lightning_reweight.cli import main

    args = shlex.split(command)[1:]
    if _needs_shared(args) and not SHARED.exists():
        pytest.skip(f"needs {SHARED}")
    work = tmp_path / "repo"
    work.mkdir()
    (work / "recipes").symlink_to(ROOT / "recipes")
    if SHARED.exists():
        (tmp_path / "shared").symlink_to(SHARED.parent)
    (ROOT / ".cache").mkdir(exist_ok=True)
    (work / ".cache").symlink_to(ROOT / ".cache")  # decoded CIFAR-10 / corrupted streams, shared between runs
    monkeypatch.chdir(work)
    if "--ckpt_path" in args:
        ckpt = work / args[args.index("--ckpt_path") + 1]
        if not ckpt.exists():
            _write_checkpoint(args, ckpt)
    main([*args, *_caps(args), "--trainer.fast_dev_run=true", "--trainer.logger=false"])


def _caps(args: list[str]) -> list[str]:
    """Data-size caps for the slow real-data set-ups (a fast dev run reads one batch of each anyway)."""
    config = (ROOT / args[args.index("--config") + 1]).read_text() if "--config" in args else ""
    caps = []
    if "CIFAR10CDataModule" in config and "corruptions: []" not in config:
        caps.append("--data.init_args.num_test_images=200")
    if "callbacks.tta.EATA" in config:
        caps.append("--reweight.init_args.fisher_samples=200")
    return caps
