#!/usr/bin/env python
"""Mutation testing for lightning_reweight: does the test suite notice a small change to the code?

For each chosen module the driver makes *mutants* — copies of the module with one small change each — and runs
the tests that exercise that module against every mutant (in a scratch copy of the repository: the working tree
is never modified). A mutant is *killed* when a test fails (or errors, or runs past the time limit) and
*survives* when every test passes: a survivor is behaviour no test checks.

Mutation operators (``--ops`` selects some):

* ``cmp``     a comparison's boundary or sense: ``<`` <-> ``<=``, ``>`` <-> ``>=``, ``==`` <-> ``!=``,
              ``in`` <-> ``not in``, ``is`` <-> ``is not``
* ``const``   a number ±1 (``0.5`` -> ``1.5`` / ``-0.5``), ``True`` <-> ``False``
* ``boolop``  ``and`` <-> ``or``
* ``not``     ``not x`` -> ``x``
* ``binop``   ``+`` <-> ``-``, ``*`` <-> ``/``
* ``raise``   a ``raise`` statement deleted
* ``stmt``    a call statement (``x.update_(...)``) or an augmented assignment (``x += 1``) deleted
* ``return``  ``return <value>`` -> ``return None``

Code inside ``raise`` statements (the messages), f-strings, annotations, docstrings and ``__all__`` is not
mutated. A line whose comment holds ``pragma: no mutate`` is skipped: mark an equivalent mutant with it (a change
no test can notice, e.g. a speed threshold where both paths give the same result), saying why.

Usage (from the repository root, with the project's virtualenv)::

    python scripts/mutate.py rules/instance.py --sample 25 --seed 0          # one module, 25 random mutants
    python scripts/mutate.py --all --sample 25 --seed 0                     # the six core modules
    python scripts/mutate.py state/table.py --list                          # the mutants, without running
    python scripts/mutate.py my/module.py --tests tests/x.py -k "not slow"  # any module, any tests

The tests run for a module come from ``TESTS`` below (fast, focused files; add yours there). By default each
mutant runs in a process forked from the driver after torch/lightning/numba are imported (about 1 s per mutant
instead of 6); ``--subprocess`` starts a fresh interpreter per mutant instead. Not run in CI (minutes, not
seconds); ``tests/test_mutate_driver.py`` tests the driver itself on a toy module.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lightning_reweight"

#: module (relative to the package) -> the test files that exercise it (fast, focused ones)
TESTS: dict[str, list[str]] = {
    "rules/instance.py": [
        "tests/rules/test_instance_rules.py",
        "tests/rules/test_instance_strength.py",
        "tests/rules/test_kl_dro_host_path.py",
    ],
    "rules/fairness.py": [
        "tests/rules/test_fairness_strength.py",
        "tests/callbacks/test_febs.py",
        "tests/callbacks/test_group_dro.py",
    ],
    "state/table.py": [
        "tests/core/test_table.py",
        "tests/core/test_table_repeats.py",
        "tests/core/test_table_strength.py",
    ],
    "state/validate.py": [
        "tests/core/test_validate_strength.py",
        "tests/samplers/test_state_validation.py",
        "tests/core/test_restore.py",
    ],
    "engine.py": [
        "tests/core/test_engine_strength.py",
        "tests/core/test_contract.py",
        "tests/core/test_atomic.py",
        "tests/core/test_mistakes.py",
        "tests/core/test_guards.py",
    ],
    "samplers/core.py": [
        "tests/samplers/test_core_strength.py",
        "tests/samplers/test_core.py",
        "tests/samplers/test_draw.py",
    ],
}
CORE = list(TESTS)

#: third-party modules the driver imports once before forking (each mutant then starts in ~1 s)
PRELOAD = ("numpy", "torch", "lightning", "lightning.pytorch", "torchmetrics", "numba", "pytest")

OPS = ("cmp", "const", "boolop", "not", "binop", "raise", "stmt", "return")
_CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
             ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_BIN_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}
_SYMBOL = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.In: "in",
           ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not", ast.Add: "+", ast.Sub: "-", ast.Mult: "*",
           ast.Div: "/", ast.And: "and", ast.Or: "or"}
PRAGMA = "pragma: no mutate"


@dataclass(frozen=True)
class Mutant:
    """One change: node ``node`` (its position in ``ast.walk`` order) gets mutation ``op`` / ``arg``."""

    module: str
    node: int
    op: str
    arg: object
    line: int
    what: str

    @property
    def key(self) -> str:
        return f"{self.module}:{self.line}:{self.op}:{self.what}"


# ------------------------------------------------------------------------------------------- generation
def _walk(tree: ast.AST) -> tuple[list[ast.AST], dict[ast.AST, ast.AST]]:
    nodes, parents = [], {}
    for node in ast.walk(tree):
        nodes.append(node)
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    return nodes, parents


def _frozen(tree: ast.AST, lines: list[str]) -> set[int]:
    """ids of nodes that are never mutated: messages, annotations, docstrings, ``__all__``, pragma lines."""
    frozen: set[int] = set()

    def freeze(node: ast.AST | None) -> None:
        if node is not None:
            frozen.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, ast.Raise):
            freeze(node.exc)
            freeze(node.cause)
        elif isinstance(node, ast.JoinedStr):
            freeze(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            freeze(node.returns)
            for arg in [*node.args.args, *node.args.posonlyargs, *node.args.kwonlyargs, node.args.vararg,
                        node.args.kwarg]:
                if arg is not None:
                    freeze(arg.annotation)
        elif isinstance(node, ast.AnnAssign):
            freeze(node.annotation)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            freeze(node)
        elif isinstance(node, (ast.ImportFrom, ast.Import)):
            freeze(node)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                freeze(first)
        line = getattr(node, "lineno", None)
        if line is not None and PRAGMA in lines[line - 1]:
            frozen.add(id(node))
    return frozen


def _const_variants(value: object) -> list[object]:
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1]
    if isinstance(value, float) and value == value and abs(value) != float("inf"):
        return [value + 1.0, value - 1.0] if value != 0 else [1.0]
    return []


def generate(source: str, module: str = "<module>", ops: tuple[str, ...] = OPS) -> list[Mutant]:
    """Every mutant of ``source`` for the operators ``ops``, in a fixed order."""
    tree = ast.parse(source)
    lines = source.splitlines()
    nodes, parents = _walk(tree)
    frozen = _frozen(tree, lines)
    out: list[Mutant] = []

    def add(i: int, node: ast.AST, op: str, arg: object, what: str) -> None:
        if op in ops:
            out.append(Mutant(module, i, op, arg, getattr(node, "lineno", 0), what))

    for i, node in enumerate(nodes):
        if id(node) in frozen:
            continue
        if isinstance(node, ast.Compare):
            for j, cmp in enumerate(node.ops):
                new = _CMP_SWAP.get(type(cmp))
                if new is not None:
                    add(i, node, "cmp", j, f"{_SYMBOL[type(cmp)]} -> {_SYMBOL[new]}")
        elif isinstance(node, ast.Constant):
            parent = parents.get(node)
            if isinstance(parent, ast.UnaryOp) and isinstance(parent.op, ast.USub):
                continue  # -1: mutate as a whole below
            for v in _const_variants(node.value):
                add(i, node, "const", v, f"{node.value!r} -> {v!r}")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            for v in _const_variants(-node.operand.value) if not isinstance(node.operand.value, bool) else []:
                add(i, node, "const", v, f"{-node.operand.value!r} -> {v!r}")
        elif isinstance(node, ast.BoolOp):
            new = ast.Or if isinstance(node.op, ast.And) else ast.And
            add(i, node, "boolop", None, f"{_SYMBOL[type(node.op)]} -> {_SYMBOL[new]}")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            add(i, node, "not", None, "not x -> x")
        elif isinstance(node, ast.BinOp) and type(node.op) in _BIN_SWAP:
            if isinstance(node.left, ast.Constant) and isinstance(node.left.value, str):
                continue  # "%" formatting and string concatenation
            add(i, node, "binop", None, f"{_SYMBOL[type(node.op)]} -> {_SYMBOL[_BIN_SWAP[type(node.op)]]}")
        elif isinstance(node, ast.Raise):
            add(i, node, "raise", None, "raise deleted")
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            add(i, node, "stmt", None, "call statement deleted")
        elif isinstance(node, ast.AugAssign):
            add(i, node, "stmt", None, "augmented assignment deleted")
        elif isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            add(i, node, "return", None, "return value -> None")
    return out


def _replace(parent: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for field, value in ast.iter_fields(parent):
        if value is old:
            setattr(parent, field, new)
            return
        if isinstance(value, list) and any(v is old for v in value):
            value[[v is old for v in value].index(True)] = new
            return
    raise LookupError("node not found in its parent")


def apply(source: str, mutant: Mutant) -> str:
    """``source`` with ``mutant`` applied (formatted by ``ast.unparse``)."""
    tree = ast.parse(source)
    nodes, parents = _walk(tree)
    node = nodes[mutant.node]
    op = mutant.op
    if op == "cmp":
        node.ops[mutant.arg] = _CMP_SWAP[type(node.ops[mutant.arg])]()
    elif op == "const":
        _replace(parents[node], node, ast.copy_location(ast.Constant(mutant.arg), node))
    elif op == "boolop":
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif op == "not":
        _replace(parents[node], node, node.operand)
    elif op == "binop":
        node.op = _BIN_SWAP[type(node.op)]()
    elif op in ("raise", "stmt"):
        _replace(parents[node], node, ast.copy_location(ast.Pass(), node))
    elif op == "return":
        node.value = ast.Constant(None)
    else:
        raise ValueError(f"unknown mutation operator {op!r}")
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n"


# -------------------------------------------------------------------------------------------- running
@dataclass
class Result:
    key: str
    line: int
    op: str
    what: str
    status: str  # killed, timeout, survived, error (no tests ran)
    seconds: float


def _scratch_copy(root: Path) -> Path:
    dest = Path(tempfile.mkdtemp(prefix="lr-mutate-"))
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "lightning_logs", "runs",
                                    ".pytest_cache", "benchmarks", "*.ckpt")
    for name in os.listdir(root):
        src = root / name
        if name in (".git", ".venv", "benchmarks", "lightning_logs", "runs", ".pytest_cache"):
            continue
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    return dest


def _pytest_args(tests: list[str], extra: list[str]) -> list[str]:
    return [*tests, "-x", "-q", "--tb=no", "--no-header", "-p", "no:cacheprovider", *extra]


def _child(scratch: Path, args: list[str], log: Path) -> None:
    """In the forked child: run pytest on the scratch copy, exit with its status (3: wrong package imported)."""
    os.setpgid(0, 0)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 4
    try:
        os.chdir(scratch)
        sys.path.insert(0, str(scratch))
        import importlib

        import pytest

        pkg = importlib.import_module(PACKAGE)
        if not str(pkg.__file__).startswith(str(scratch)):
            print(f"mutate: imported {pkg.__file__}, not the scratch copy", flush=True)
            code = 3
        else:
            code = int(pytest.main(args))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_tests(scratch: Path, args: list[str], timeout: float, fork: bool, log: Path) -> tuple[int | None, float]:
    """Run pytest with ``args`` in ``scratch``; returns (exit status or None on timeout, seconds)."""
    start = time.monotonic()
    if not fork:
        env = dict(os.environ, PYTHONPATH=str(scratch), PYTHONDONTWRITEBYTECODE="1")
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=scratch, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                return proc.wait(timeout=timeout), time.monotonic() - start
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return None, time.monotonic() - start
    pid = os.fork()
    if pid == 0:
        _child(scratch, args, log)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), time.monotonic() - start
        if time.monotonic() - start > timeout:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return None, time.monotonic() - start
        time.sleep(0.05)


def _status(code: int | None) -> str:
    if code is None:
        return "timeout"
    if code == 0:
        return "survived"
    if code in (1, 2):  # failed, or interrupted (e.g. the mutant broke an import during collection)
        return "killed"
    return "error"  # 3: wrong package, 4/5: usage error / no tests collected


def mutate_module(module: str, tests: list[str], extra: list[str], scratch: Path, sample: int | None, seed: int,
                  ops: tuple[str, ...], timeout: float | None, fork: bool, verbose: bool) -> tuple[list[Result], float]:
    """Run a sample of ``module``'s mutants; returns the results and the unmutated run's seconds."""
    target = scratch / PACKAGE / module
    original = target.read_text()
    mutants = generate(original, module, ops)
    if sample is not None and sample < len(mutants):
        mutants = sorted(random.Random(f"{seed}:{module}").sample(mutants, sample), key=lambda m: (m.line, m.node))
    args = _pytest_args(tests, extra)
    log = scratch / ".mutate.log"
    code, base = run_tests(scratch, args, timeout or 600, fork, log)
    if code != 0:
        sys.exit(f"mutate: the tests of {module} fail (or time out) without any mutant (status {code}); fix them "
                 f"first:\n{log.read_text()[-3000:]}")
    limit = timeout or max(30.0, 3 * base + 10)
    results = []
    try:
        for n, m in enumerate(mutants, 1):
            try:
                mutated = apply(original, m)
                compile(mutated, str(target), "exec")
            except (SyntaxError, ValueError, LookupError):
                continue
            target.write_text(mutated)
            code, seconds = run_tests(scratch, args, limit, fork, log)
            r = Result(m.key, m.line, m.op, m.what, _status(code), round(seconds, 2))
            results.append(r)
            if verbose:
                print(f"  [{n}/{len(mutants)}] {r.status:8s} {module}:{m.line} {m.what} ({seconds:.1f}s)", flush=True)
    finally:
        target.write_text(original)
    return results, base


def summarize(results: dict[str, list[Result]]) -> str:
    rows = ["| module | mutants | killed | timeout | survived | error | score |", "|---|---|---|---|---|---|---|"]
    total_k = total_n = 0
    for module, rs in results.items():
        counts = {s: sum(r.status == s for r in rs) for s in ("killed", "timeout", "survived", "error")}
        n = counts["killed"] + counts["timeout"] + counts["survived"]
        caught = counts["killed"] + counts["timeout"]
        total_k, total_n = total_k + caught, total_n + n
        score = f"{100 * caught / n:.0f} %" if n else "-"
        rows.append(f"| `{module}` | {n} | {counts['killed']} | {counts['timeout']} | {counts['survived']} | "
                    f"{counts['error']} | {score} |")
    if len(results) > 1 and total_n:
        rows.append(f"| **all** | {total_n} | | | {total_n - total_k} | | **{100 * total_k / total_n:.0f} %** |")
    lines = ["\n".join(rows)]
    survivors = [(m, r) for m, rs in results.items() for r in rs if r.status == "survived"]
    if survivors:
        lines.append("\nSurvivors (behaviour no test checks):")
        for module, r in survivors:
            lines.append(f"  {PACKAGE}/{module}:{r.line}  [{r.op}] {r.what}")
    return "\n".join(lines)


def _preload() -> None:
    for name in PRELOAD:
        try:
            __import__(name)
        except Exception:  # optional: a missing one is imported (or not) by each mutant's tests
            pass
    assert PACKAGE not in sys.modules, "the package must not be imported before forking"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("modules", nargs="*", help=f"modules relative to {PACKAGE}/ (e.g. rules/instance.py)")
    p.add_argument("--all", action="store_true", help=f"the core modules: {', '.join(CORE)}")
    p.add_argument("--tests", nargs="+", help="test files to run (default: TESTS[module])")
    p.add_argument("-k", dest="keyword", help="pytest -k expression")
    p.add_argument("--sample", type=int, help="mutants per module, drawn with --seed (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated operators (default: {','.join(OPS)})")
    p.add_argument("--timeout", type=float, help="seconds per mutant (default: 3 x the unmutated run + 10)")
    p.add_argument("--subprocess", action="store_true", help="a fresh interpreter per mutant instead of fork")
    p.add_argument("--list", action="store_true", help="list the (sampled) mutants and exit")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this script's)")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    modules = CORE if a.all else a.modules
    if not modules:
        p.error("name a module (e.g. rules/instance.py) or pass --all")
    ops = tuple(o for o in a.ops.split(",") if o)
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        p.error(f"unknown operator(s) {unknown}; choose from {OPS}")
    for module in modules:
        if not (a.root / PACKAGE / module).is_file():
            p.error(f"no module {PACKAGE}/{module} under {a.root}")
        if not a.tests and module not in TESTS:
            p.error(f"no tests mapped for {module}: pass --tests, or add it to TESTS in {Path(__file__).name}")
    if a.list:
        for module in modules:
            ms = generate((a.root / PACKAGE / module).read_text(), module, ops)
            if a.sample is not None and a.sample < len(ms):
                ms = sorted(random.Random(f"{a.seed}:{module}").sample(ms, a.sample), key=lambda m: (m.line, m.node))
            for m in ms:
                print(f"{PACKAGE}/{m.module}:{m.line}  [{m.op}] {m.what}")
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    sys.dont_write_bytecode = True
    fork = not a.subprocess and hasattr(os, "fork")
    if fork:
        _preload()
    extra = ["-k", a.keyword] if a.keyword else []
    scratch = _scratch_copy(a.root)
    results: dict[str, list[Result]] = {}
    started = time.monotonic()
    try:
        for module in modules:
            tests = a.tests or [t for t in TESTS[module] if (scratch / t).exists()]
            if not a.quiet:
                print(f"{module}: tests {' '.join(tests)}", flush=True)
            results[module], base = mutate_module(module, tests, extra, scratch, a.sample, a.seed, ops, a.timeout,
                                                  fork, not a.quiet)
            if not a.quiet:
                print(f"{module}: unmutated run {base:.1f}s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(summarize(results))
    print(f"\n{time.monotonic() - started:.0f}s; seed {a.seed}, sample {a.sample}, operators {','.join(ops)}")
    if a.json:
        a.json.write_text(json.dumps({m: [asdict(r) for r in rs] for m, rs in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
