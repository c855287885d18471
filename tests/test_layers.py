"""The package's layers: imports flow downwards, and no module takes part in an import cycle.

Every module of ``lightning_reweight`` sits on a floor (``FLOORS``, docs/ARCHITECTURE.md "Layers"); a module may
import its own floor or a lower one, never a higher one, also lazily inside a function, through a relative import,
``importlib.import_module`` or ``LazyKernels``. A new module or package needs one line in ``FLOORS``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "lightning_reweight"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

#: floor of each top-level module or package of ``lightning_reweight`` (a dotted sub-path such as
#: ``data.indexed`` overrides its package; the longest matching key wins). Keep docs/ARCHITECTURE.md in step.
FLOORS: dict[str, float] = {
    "_numba": 0,  # optional numba import
    "_compile": 0,  # the optional torch.compile path (pure functions, eager fallback)
    "distributed": 0,  # O(batch) gathers across ranks
    "sequence": 0,  # per-token -> per-sequence losses
    "state": 1,  # per-sample table, checkpoint readers, stream keys
    "rules": 2,  # pure weight rules
    "losses": 3,
    "metrics": 3,
    "samplers": 3,  # the weighted draw core and the samplers (no Lightning)
    "data.indexed": 3,  # the index-yielding dataset wrapper (torch only)
    "engine": 3.5,  # the one step engine: no Trainer, no Lightning
    "callbacks": 4,  # the Lightning layer: callbacks, dataloader surgery (callbacks/_install.py)
    "doors": 4.5,  # Reweighter: Fabric and plain loops onto the engine
    "contract": 5,  # reduce_loss
    "data": 5,  # DataModules, the sampling plugin
    "models": 6,
    "cli": 7,
    "": 8,  # lightning_reweight/__init__.py: the public re-exports
}
#: floors below this one run without Lightning (``lightning``, ``pytorch_lightning``, ``lightning_fabric``)
LIGHTNING_FLOOR = FLOORS["callbacks"]
_LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")


def _modules() -> dict[str, Path]:
    """Dotted name (relative to the package, ``""`` for its ``__init__``) -> file."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def floor_of(name: str) -> float | None:
    """The floor of a module: its longest dotted prefix in ``FLOORS`` (``None`` when none matches)."""
    parts = name.split(".") if name else []
    for n in range(len(parts), -1, -1):
        key = ".".join(parts[:n])
        if key in FLOORS and (n or not name):
            return FLOORS[key]
    return None


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """Every module this file imports (absolute names, lazy ones inside functions included), with its line."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    here = f"{PACKAGE}.{package}" if package else PACKAGE
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # ``from pkg import mod`` imports the submodule ``pkg.mod`` when there is one
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in ("import_module", "LazyKernels", "__import__"):
                found.append((node.args[0].value, node.lineno))
    return found


def _internal(target: str) -> str | None:
    """The package module a dotted import name refers to (deepest existing one), or ``None`` if external."""
    if target != PACKAGE and not target.startswith(PACKAGE + "."):
        return None
    rest = target[len(PACKAGE) + 1:]
    while rest and rest not in MODULES:
        rest = rest.rpartition(".")[0]
    return rest


def _edges() -> dict[str, set[tuple[str, int]]]:
    edges: dict[str, set[tuple[str, int]]] = {}
    for name, path in MODULES.items():
        edges[name] = set()
        for target, line in _imports(name, path):
            module = _internal(target)
            if module is not None and module != name:
                edges[name].add((module, line))
    return edges


def _where(name: str) -> str:
    return str(MODULES[name].relative_to(ROOT.parent))


def test_every_module_has_a_floor():
    unknown = [_where(m) for m in MODULES if floor_of(m) is None]
    assert not unknown, (
        f"{unknown} have no floor: add their top-level module or package to FLOORS in tests/test_layers.py (and to "
        "the layer table of docs/ARCHITECTURE.md), below every module that imports them and above the ones they "
        "import."
    )


def test_no_module_imports_a_higher_floor():
    bad = []
    for name, targets in _edges().items():
        mine = floor_of(name)
        for target, line in sorted(targets, key=lambda t: t[1]):
            theirs = floor_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                bad.append(f"{_where(name)}:{line} (floor {mine}) imports {PACKAGE}.{target} (floor {theirs})")
    assert not bad, "imports must flow downwards (docs/ARCHITECTURE.md, Layers); move the shared piece lower:\n" \
        + "\n".join(bad)


def test_no_import_cycle_between_modules():
    edges = {name: {t for t, _ in targets} for name, targets in _edges().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(_where(m) for m in comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles (lazy imports included): {cycles}; move the shared piece into a lower module"


def test_the_lower_floors_run_without_lightning():
    bad = []
    for name, path in MODULES.items():
        if floor_of(name) is not None and floor_of(name) < LIGHTNING_FLOOR:
            for target, line in _imports(name, path):
                if target.split(".")[0] in _LIGHTNING:
                    bad.append(f"{_where(name)}:{line} imports {target}")
    assert not bad, f"modules below the Lightning layer (callbacks/) must not import Lightning: {bad}"


def test_samplers_import_nothing_from_callbacks():
    # the case that started the layer test: the dataloader surgery moved to callbacks/_install.py
    for name, targets in _edges().items():
        if name.split(".")[0] == "samplers":
            assert not [t for t, _ in targets if t.split(".")[0] == "callbacks"], _where(name)


@pytest.mark.parametrize("source,expected", [
    ("import lightning_reweight.callbacks.base\n", ["callbacks.base"]),
    ("def f():\n    from ..callbacks import sampling\n", ["callbacks.sampling"]),
    ("from . import core\n", ["samplers.core"]),
    ("K = LazyKernels('lightning_reweight.rules._kernels')\n", ["rules._kernels"]),
    ("import importlib\nimportlib.import_module('lightning_reweight.cli')\n", ["cli"]),
])
def test_the_import_reader_sees_lazy_relative_and_dynamic_imports(tmp_path, source, expected):
    path = tmp_path / "mod.py"
    path.write_text(source)
    found = [_internal(t) for t, _ in _imports("samplers.mod", path)]
    assert [f for f in found if f is not None] == expected


def test_the_moved_installer_names_its_new_home():
    with pytest.raises(ImportError, match=r"from lightning_reweight.callbacks import install_sampler"):
        from lightning_reweight.samplers import install_sampler  # noqa: F401
    from lightning_reweight import install_sampler as top
    from lightning_reweight.callbacks import install_sampler

    assert top is install_sampler
