"""Setuptools shim for what pyproject.toml cannot say: the top-level ``recipes/`` folder (the source of truth the
command line, the tests and the README use) ships in the wheel as the package data ``lightning_reweight/recipes/``.
Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["lightning_reweight", "lightning_reweight.*"]), "lightning_reweight.recipes"],
    package_dir={"lightning_reweight.recipes": "recipes"},
    package_data={"lightning_reweight.recipes": ["*.yaml"]},
)
