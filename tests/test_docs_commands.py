"""Every shell command shown in README.md and docs/*.md is run by a test, here or elsewhere.

- ``lightning-reweight ...``: each one in docs/ is one of README's (spacing aside; a trailing
  ``--trainer.fast_dev_run=true`` aside), which ``tests/test_readme_commands.py`` runs;
- ``bash scripts/quickstart.sh``: run here with a fast dev run (it sets up ``./.venv`` only when it is missing or
  stale, so it needs the repository's own ``.venv``);
- ``python benchmarks/NAME.py ...`` and ``python scripts/NAME.py ...``: the script exists and every option the
  command shows is one of its own (read from its ``--help``); ``op_count.py`` runs in full (seconds), and
  ``compile_step.py``'s measurement runs in ``tests/core/test_compile.py``; the benchmarks' full runs are the
  benchmarks themselves;
- ``pip install ...`` and ``bash .ci/run`` are what CI itself runs (``EXEMPT``).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_readme_commands import COMMANDS as README_COMMANDS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = re.compile(r"^```(?:bash|sh|shell|console)[ \t]*\n(.*?)^```", flags=re.S | re.M)

#: commands that CI itself runs, so no test runs them again
EXEMPT = {
    "pip install .": "scripts/check_package.sh builds and installs the wheel in CI",
    'pip install -e ".[dev]"': "scripts/setup_env.sh (CI's first step) runs it",
    'pip install -e ".[docs]"': "CI builds the documentation site with these tools (mkdocs build --strict)",
    "bash .ci/run": "it is CI",
}


def shell_commands() -> list[tuple[str, str]]:
    """``(page, command)`` for every command line of a fenced shell block, trailing ``# comment`` removed."""
    out = []
    for page in PAGES:
        for block in SHELL.findall(page.read_text()):
            for line in block.splitlines():
                line = re.sub(r"\s+#.*$", "", line.strip())
                if line and not line.startswith("#"):
                    out.append((page.relative_to(ROOT).as_posix(), line))
    return out


COMMANDS = shell_commands()


def _normal(command: str) -> str:
    return " ".join(shlex.split(command.replace(" --trainer.fast_dev_run=true", "")))


def _script_commands() -> list[tuple[str, str]]:
    return [(page, c) for page, c in COMMANDS if re.match(r"^(\S*python\S*)\s+(benchmarks|scripts)/\S+\.py", c)]


def test_every_command_is_covered():
    readme = {_normal(c) for c in README_COMMANDS}
    uncovered = []
    for page, command in COMMANDS:
        if command in EXEMPT or command.startswith("bash scripts/quickstart.sh"):
            continue
        if command.startswith("lightning-reweight "):
            if _normal(command) not in readme:
                uncovered.append(f"{page}: {command} (show it in README.md too, where it runs)")
        elif (page, command) not in _script_commands():
            uncovered.append(f"{page}: {command}")
    assert not uncovered, "commands no test runs:\n" + "\n".join(uncovered)
    assert any(c.startswith("bash scripts/quickstart.sh") for _, c in COMMANDS)


def _options(command: str) -> tuple[Path, list[str]]:
    """The script a command runs and the options it shows (synopsis brackets ``[--quick]`` included)."""
    words = shlex.split(command.replace("[", " ").replace("]", " ").replace("|", " "))
    script = ROOT / words[1]
    return script, [w.split("=")[0] for w in words[2:] if w.startswith("--")]


@pytest.mark.parametrize("page,command", _script_commands(), ids=[c for _, c in _script_commands()])
def test_script_commands_show_real_options(page, command):
    script, options = _options(command)
    assert script.is_file(), f"{page}: {command}: no {script.relative_to(ROOT)}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    shown = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    unknown = [o for o in options if not re.search(rf"(^|[\s,\[]){re.escape(o)}\b", shown.stdout)]
    assert not unknown, f"{page}: {command}: options the script does not take: {unknown}"


def test_the_op_count_command_runs(tmp_path):
    commands = [c for _, c in _script_commands() if "benchmarks/op_count.py" in c]
    assert commands
    script, _ = _options(commands[0])
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    # two callbacks of the ten: the whole script runs, every callback's count is the op budget test's
    run = subprocess.run([sys.executable, str(script), "--only", "linupper,group_dro", "--json",
                          str(tmp_path / "ops.json")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ops of one weighting step" in run.stdout and (tmp_path / "ops.json").is_file()


def test_quickstart_script_runs():
    venv = ROOT / ".venv" / "bin" / "python"
    stamp = ROOT / ".venv" / ".lightning-reweight-installed"
    if not (venv.is_file() and stamp.is_file()):
        pytest.skip("scripts/quickstart.sh sets up ./.venv itself: run where the repository's .venv exists")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(["bash", "scripts/quickstart.sh", "--trainer.fast_dev_run=true", "--trainer.logger=false"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Training recipes/quickstart.yaml" in run.stdout and "TensorBoard:" in run.stdout
