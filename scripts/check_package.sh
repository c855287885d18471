#!/usr/bin/env bash
# Build the sdist and the wheel, install each (without dependencies) into a fresh virtual environment that borrows
# the project venv's packages, and check from outside the repository that the package imports, knows its version
# and finds its recipes (package data lightning_reweight/recipes/, reached by `--config recipes/NAME.yaml`).
# Usage: bash scripts/check_package.sh [PYTHON]   (default .venv/bin/python, which needs the dev extra: build,
# setuptools>=77; about a minute)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
PY=${1:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m build --no-isolation --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
rm -rf build lightning_reweight.egg-info  # what setuptools leaves in the tree
version=$("$PY" -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
deps=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
for artifact in "$work"/dist/*.whl "$work"/dist/*.tar.gz; do
  rm -rf "$work/venv"
  "$PY" -m venv "$work/venv"
  site=$("$work/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  # the project venv's packages by path only: its .pth files (an editable install of this repository) stay out
  echo "$deps" > "$site/_project_venv_packages.pth"
  # an older setuptools bundled by venv would shadow the project venv's, which builds the sdist
  "$work/venv/bin/python" -m pip uninstall -q -y setuptools 2>/dev/null || true
  "$work/venv/bin/python" -m pip install -q --no-deps --no-index --no-build-isolation "$artifact"
  (cd "$work" && "$work/venv/bin/python" - "$repo" "$version" <<'PY'
import sys
from pathlib import Path

import lightning_reweight
from lightning_reweight.cli import recipe_names, recipes_dir

repo, version = sys.argv[1], sys.argv[2]
installed = Path(lightning_reweight.__file__).resolve().parent
assert not str(installed).startswith(repo), f"imported the repository's copy: {installed}"
assert lightning_reweight.__version__ == version, (lightning_reweight.__version__, version)
assert recipes_dir() == installed / "recipes" and "recipes/quickstart.yaml" in recipe_names(), recipes_dir()
print(f"ok: lightning_reweight {version} from {installed}, {len(recipe_names())} recipes")
PY
  )
  if [[ "$artifact" == *.whl ]]; then  # the console script, once
    (cd "$work" && "$work/venv/bin/lightning-reweight" fit --config recipes/quickstart.yaml --print_config >/dev/null)
    echo "ok: lightning-reweight reads recipes/quickstart.yaml outside the repository"
  fi
  echo "ok: $(basename "$artifact") installs and imports"
done
